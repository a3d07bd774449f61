"""The SQLite store-and-forward buffer: seqs, claims, acks, dead letters, full policies,
corrupt files and bounded memory. Time is a fake clock; nothing here waits on wall time."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.edge_agent.buffer import (
    BufferConfig,
    BufferFull,
    BufferLocked,
    BufferOpenError,
    SqliteBuffer,
)
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Batch, Quality

T0 = 1_795_000_000_000_000_000  # ns
SECOND = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(n: int, start: int = 0, tags: int = 1, step_ns: int = SECOND) -> list[Sample]:
    """n samples cycling over `tags` tags of one asset; sample i has value i, ts T0+i*step."""
    return [
        Sample(
            "press-1",
            f"t{(start + i) % tags}",
            T0 + (start + i) * step_ns,
            float(start + i),
            Quality.GOOD,
        )
        for i in range(n)
    ]


def make(tmp_path: Path, clock: FakeClock | None = None, **overrides: Any) -> SqliteBuffer:
    config = BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0, **overrides)
    return SqliteBuffer.open(config, clock=clock or FakeClock())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def buf(tmp_path: Path, clock: FakeClock) -> Iterator[SqliteBuffer]:
    buffer = make(tmp_path, clock, commit_rows=100)
    yield buffer
    buffer.close()


def drain(buffer: SqliteBuffer, device: str | None = None, ack: bool = False) -> list[Batch]:
    batches = []
    while (batch := buffer.claim_batch(device, max_rows=10_000)) is not None:
        batches.append(batch)
        if ack:
            buffer.ack(batch.device, batch.last_seq, first_seq=batch.first_seq)
    return batches


def present_seqs(buffer: SqliteBuffer, device: str) -> list[int]:
    """Every seq stored for `device`, via the public claim API (leases them all)."""
    return [r.seq for batch in drain(buffer, device) for r in batch.readings]


# --- seq ---------------------------------------------------------------------------------


def test_seqs_are_per_device_gap_free_and_continue_after_restart(tmp_path: Path) -> None:
    with make(tmp_path, commit_rows=50) as buffer:
        assert buffer.append("dev-a", samples(3)) == [1, 2, 3]
        assert buffer.append("dev-b", samples(2)) == [1, 2]
        assert buffer.append("dev-a", samples(120, start=3)) == list(range(4, 124))
    with make(tmp_path, commit_rows=50) as buffer:
        assert buffer.committed_seq("dev-a") == 123
        assert buffer.committed_seq("dev-b") == 2
        assert buffer.committed_seq("dev-c") == 0
        assert buffer.append("dev-a", samples(1)) == [124]
        assert buffer.append("dev-b", samples(1)) == [3]
        buffer.flush()
        assert present_seqs(buffer, "dev-a") == list(range(1, 125))
        assert present_seqs(buffer, "dev-b") == [1, 2, 3]
        assert buffer.verify() == []


def test_rows_commit_at_commit_rows_or_after_the_interval(
    buf: SqliteBuffer, clock: FakeClock
) -> None:
    buf.append("dev", samples(99))
    assert buf.committed_seq("dev") == 0
    assert buf.stats().staged == 99
    assert buf.claim_batch() is None  # nothing leaves the buffer before it is committed
    buf.append("dev", samples(1, start=99))  # the 100th row fills a transaction
    assert buf.committed_seq("dev") == 100
    buf.append("dev", samples(5, start=100))
    assert buf.flush_if_due() == 0
    clock.now += 0.1
    assert buf.flush_if_due() == 5
    assert buf.committed_seq("dev") == 105
    buf.append("dev", samples(2, start=105))
    clock.now += 0.1
    batch = buf.claim_batch(max_rows=1000)  # a claim commits what is due first
    assert batch is not None and batch.last_seq == 107


def test_transactions_hold_at_most_commit_rows(buf: SqliteBuffer) -> None:
    commits = buf.stats().commits
    buf.append("dev", samples(60))
    buf.append("dev", samples(60, start=60))  # 120 > 100: the first 60 commit alone
    assert buf.committed_seq("dev") == 60
    buf.append("dev", samples(450, start=120))  # a large call commits in chunks of 100
    assert buf.stats().staged == 0
    assert buf.committed_seq("dev") == 570
    assert buf.stats().commits - commits == 1 + 6  # 60, then 510 as 100 x 5 + 10
    assert present_seqs(buf, "dev") == list(range(1, 571))


def test_readings_carry_what_was_appended(buf: SqliteBuffer) -> None:
    buf.append(
        "dev",
        [
            Sample("a", "x", T0, 1.5, Quality.GOOD),
            Sample("b", "y", T0 + 1, None, Quality.BAD),
            Sample("a", "x", T0 + 2, -2.0, Quality.UNCERTAIN),
        ],
    )
    buf.flush()
    batch = buf.claim_batch()
    assert batch is not None
    assert [
        (r.device, r.asset, r.tag, r.ts, r.value, r.quality, r.seq) for r in batch.readings
    ] == [
        ("dev", "a", "x", T0, 1.5, Quality.GOOD, 1),
        ("dev", "b", "y", T0 + 1, None, Quality.BAD, 2),
        ("dev", "a", "x", T0 + 2, -2.0, Quality.UNCERTAIN, 3),
    ]


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        Sample("a b", "x", T0, 1.0, Quality.GOOD),  # not an identifier
        Sample("a", "", T0, 1.0, Quality.GOOD),
        Sample("a", "x", -1, 1.0, Quality.GOOD),
        Sample("a", "x", 2**63, 1.0, Quality.GOOD),
        Sample("a", "x", T0, 1.0, "excellent"),  # type: ignore[arg-type]
    ],
)
def test_an_invalid_sample_rejects_the_whole_call(buf: SqliteBuffer, bad: Sample) -> None:
    buf.append("dev", samples(2))
    with pytest.raises(ValueError, match=r"samples\[1\]"):
        buf.append("dev", [samples(1)[0], bad, samples(1)[0]])
    assert buf.append("dev", samples(1)) == [3]  # no seq was spent on the refused call
    buf.flush()
    assert present_seqs(buf, "dev") == [1, 2, 3]


def test_bad_device_name_is_refused(buf: SqliteBuffer) -> None:
    with pytest.raises(ValueError, match="device name"):
        buf.append("no/slashes", samples(1))


def test_values_a_reading_cannot_carry_are_stored_as_bad_and_counted(buf: SqliteBuffer) -> None:
    buf.append(
        "dev",
        [
            Sample("a", "x", T0, math.nan, Quality.GOOD),
            Sample("a", "x", T0, math.inf, Quality.UNCERTAIN),
            Sample("a", "x", T0, None, Quality.GOOD),
            Sample("a", "x", T0, 1.0, Quality.GOOD),
        ],
    )
    buf.flush()
    batch = buf.claim_batch()
    assert batch is not None
    assert [(r.value, r.quality) for r in batch.readings] == [
        (None, Quality.BAD),
        (None, Quality.BAD),
        (None, Quality.BAD),
        (1.0, Quality.GOOD),
    ]
    assert buf.stats().coerced == 3


def test_series_are_bounded(tmp_path: Path) -> None:
    with make(tmp_path, max_series=3) as buffer:
        buffer.append("dev", samples(3, tags=3))
        with pytest.raises(ValueError, match="max_series"):
            buffer.append("dev", samples(4, tags=4))


# --- claim / ack -------------------------------------------------------------------------


def test_claims_lease_ranges_and_acks_delete_them(buf: SqliteBuffer, clock: FakeClock) -> None:
    buf.append("dev", samples(250))
    buf.flush()
    first = buf.claim_batch(max_rows=100)
    second = buf.claim_batch(max_rows=100)
    assert first is not None and second is not None
    assert (first.first_seq, first.last_seq, second.first_seq, second.last_seq) == (
        1,
        100,
        101,
        200,
    )
    # The second batch is acknowledged first (pipelined sends): only its rows go.
    assert buf.ack("dev", second.last_seq, first_seq=second.first_seq) == 100
    assert buf.stats().depth == 150
    third = buf.claim_batch(max_rows=100)
    assert third is not None and (third.first_seq, third.last_seq) == (201, 250)
    assert buf.claim_batch() is None  # everything left is leased
    # The first send failed: released, it is claimed again, identical.
    buf.release("dev", first.first_seq)
    again = buf.claim_batch(max_rows=100)
    assert again is not None and again.readings == first.readings
    # The third's forwarder died: its lease expires and the rows come back.
    clock.now += buf.config.claim_lease_s + 1
    assert buf.claim_batch(max_rows=1000) is not None  # 1..100 again (lease expired too)
    retry = buf.claim_batch(max_rows=1000)
    assert retry is not None and (retry.first_seq, retry.last_seq) == (201, 250)
    assert buf.ack("dev", 250) == 150  # cumulative ack of everything up to 250
    assert buf.stats().depth == 0
    assert buf.claim_batch() is None
    assert buf.verify() == []


def test_min_seq_claims_live_rows_ahead_of_the_backlog(buf: SqliteBuffer) -> None:
    buf.append("dev", samples(100))
    buf.flush()
    live = buf.claim_batch("dev", max_rows=1000, min_seq=81)
    assert live is not None and (live.first_seq, live.last_seq) == (81, 100)
    backlog = buf.claim_batch("dev", max_rows=1000)
    assert backlog is not None and (backlog.first_seq, backlog.last_seq) == (1, 80)
    assert buf.claim_batch("dev", min_seq=50) is None  # all leased
    buf.ack("dev", 100, first_seq=81)
    assert buf.stats().depth == 80


def test_unacked_batches_are_claimed_again_after_a_restart(tmp_path: Path) -> None:
    with make(tmp_path) as buffer:
        buffer.append("dev", samples(30))
        buffer.flush()
        batch = buffer.claim_batch(max_rows=10)
        assert batch is not None
        buffer.ack("dev", 10)
        assert buffer.claim_batch(max_rows=10) is not None  # 11..20 leased, never acked
    with make(tmp_path) as buffer:
        batch = buffer.claim_batch(max_rows=100)
        assert batch is not None and (batch.first_seq, batch.last_seq) == (11, 30)


def test_ack_of_an_uncommitted_seq_is_an_error(buf: SqliteBuffer) -> None:
    buf.append("dev", samples(5))  # staged only
    with pytest.raises(ValueError, match="last committed seq is 0"):
        buf.ack("dev", 3)
    with pytest.raises(ValueError):
        buf.ack("ghost", 1)


def test_devices_take_turns(buf: SqliteBuffer) -> None:
    buf.append("a", samples(30))
    buf.append("b", samples(30))
    buf.append("c", samples(30))
    buf.flush()
    order = [batch.device for batch in iter(lambda: buf.claim_batch(max_rows=10), None)]
    assert order == ["a", "b", "c"] * 3


def test_claim_stops_at_a_gap_and_validates_max_rows(tmp_path: Path) -> None:
    with make(tmp_path, commit_rows=10, max_rows=20, when_full="drop_oldest") as buffer:
        with pytest.raises(ValueError, match="max_rows"):
            buffer.claim_batch(max_rows=0)
        buffer.append("dev", samples(10))
        buffer.ack("dev", 5, first_seq=3)  # a hole at 3..5
        batches = drain(buffer)
        assert [(b.first_seq, b.last_seq) for b in batches] == [(1, 2), (6, 10)]


def test_stats_report_depth_and_oldest_row(buf: SqliteBuffer) -> None:
    assert buf.stats().oldest_unacked_ts is None
    buf.append("a", samples(10, start=5))
    buf.append("b", samples(10, start=2))
    buf.flush()
    stats = buf.stats()
    assert stats.depth == 20
    assert stats.oldest_unacked_ts == T0 + 2 * SECOND
    assert stats.devices["a"].committed_seq == 10
    assert stats.bytes_on_disk > 0


# --- dead letters ------------------------------------------------------------------------


def test_dead_letters_are_moved_counted_listed_and_kept(tmp_path: Path) -> None:
    with make(tmp_path) as buffer:
        buffer.append("dev", samples(30, tags=3))
        buffer.flush()
        refused = buffer.claim_batch(max_rows=10)
        assert refused is not None
        dlq_id = buffer.dead_letter(refused, "422: readings[3].tag is not allowed")
        stats = buffer.stats()
        assert (stats.dlq_batches, stats.dlq_rows, stats.depth) == (1, 10, 20)
        batch = buffer.claim_batch(max_rows=100)
        assert batch is not None and batch.first_seq == 11  # never retried
    with make(tmp_path) as buffer:  # and kept across restarts
        [entry] = buffer.dlq_list()
        assert (entry.dlq_id, entry.device, entry.first_seq, entry.last_seq, entry.rows) == (
            dlq_id,
            "dev",
            1,
            10,
            10,
        )
        assert entry.reason.startswith("422")
        assert buffer.dlq_batch(dlq_id).readings == refused.readings
        assert buffer.dlq_delete(dlq_id) is True
        assert buffer.dlq_list() == []
        assert buffer.stats().dlq_batches == 0
        with pytest.raises(KeyError):
            buffer.dlq_batch(dlq_id)


# --- when full ---------------------------------------------------------------------------


def test_block_refuses_appends_until_acks_free_space(tmp_path: Path) -> None:
    with make(tmp_path, commit_rows=100, max_rows=1000, when_full="block") as buffer:
        for i in range(11):  # the 11th commit takes the buffer to 1100 > 1000 (the slack)
            buffer.append("dev", samples(100, start=100 * i))
        assert buffer.stats().full
        with pytest.raises(BufferFull, match="max_rows"):
            buffer.append("dev", samples(1))
        assert not buffer.accepting()
        buffer.ack("dev", 150)  # 950 left: still above the low watermark (900)
        assert not buffer.accepting()
        buffer.ack("dev", 200)  # 900
        assert buffer.accepting()
        assert buffer.append("dev", samples(1)) == [1101]  # no seq spent on refusals
        stats = buffer.stats()
        assert (stats.appends_refused, stats.dropped_total, stats.full) == (1, 0, False)
        buffer.flush()
        assert present_seqs(buffer, "dev") == list(range(201, 1102))  # nothing accepted lost


def test_drop_oldest_drops_exactly_down_to_the_low_watermark(tmp_path: Path) -> None:
    with make(tmp_path, commit_rows=100, max_rows=1000, when_full="drop_oldest") as buffer:
        for i in range(11):
            buffer.append("dev", samples(100, start=100 * i))
        stats = buffer.stats()
        assert (stats.depth, stats.dropped_total, stats.devices["dev"].dropped) == (900, 200, 200)
        assert not stats.full
        assert present_seqs(buffer, "dev") == list(range(201, 1101))  # the oldest 200 went
    with make(tmp_path, max_rows=1000) as buffer:  # counters persist
        assert buffer.stats().dropped_total == 200
        assert buffer.verify() == []


def test_drop_oldest_takes_the_device_with_the_oldest_rows(tmp_path: Path) -> None:
    with make(tmp_path, commit_rows=10, max_rows=100, when_full="drop_oldest") as buffer:
        buffer.append("new", samples(50, start=1000))
        buffer.append("old", samples(51, start=0))
        stats = buffer.stats()
        assert stats.devices["old"].dropped == stats.dropped_total == 11
        assert stats.devices["new"].dropped == 0


def test_downsample_replaces_the_oldest_rows_by_min_max_mean(tmp_path: Path) -> None:
    bucket_s = 10
    with make(
        tmp_path,
        commit_rows=100,
        max_rows=1000,
        when_full="downsample",
        downsample_bucket_s=bucket_s,
        compact_chunk_rows=200,
    ) as buffer:
        # 2 tags, one sample per tag per second: 20 raw rows per 10 s bucket and tag.
        for i in range(11):
            buffer.append("dev", samples(100, start=100 * i, tags=2, step_ns=SECOND // 2))
        stats = buffer.stats()
        dev = stats.devices["dev"]
        assert dev.compacted > 0 and dev.dropped == 0
        assert stats.depth <= 900
        batches = drain(buffer, "dev")
        rows = [r for b in batches for r in b.readings]
        raw = [r for r in rows if ":" not in r.tag]
        aggregates = [r for r in rows if ":" in r.tag]
        # Accounting: every committed seq is present or counted as compacted, and every
        # aggregate row is counted.
        assert len(rows) + dev.compacted == dev.committed_seq
        assert len(aggregates) == dev.aggregates == stats.aggregates_total
        # The raw rows left are the newest; the compacted ones are the oldest seqs.
        assert [r.seq for r in raw] == list(range(dev.compacted + 1, 1101))
        # Aggregates have fresh seqs after the raw rows they replaced were committed, and
        # hold min/max/mean of each (tag, bucket) of the replaced rows.
        assert min(r.seq for r in aggregates) > 1000
        expected: dict[tuple[str, int], list[float]] = {}
        for i in range(dev.compacted):  # sample i has seq i+1, value i
            ts = T0 + i * SECOND // 2
            expected.setdefault((f"t{i % 2}", ts - ts % (bucket_s * SECOND)), []).append(float(i))
        got = {(r.tag, r.ts): r.value for r in aggregates}
        assert len(got) == 3 * len(expected)
        for (tag, bucket_ts), values in expected.items():
            assert got[(f"{tag}:min", bucket_ts)] == min(values)
            assert got[(f"{tag}:max", bucket_ts)] == max(values)
            assert got[(f"{tag}:mean", bucket_ts)] == pytest.approx(sum(values) / len(values))
        assert all(r.quality is Quality.GOOD for r in aggregates)
        assert buffer.verify() == []


def test_downsample_falls_back_to_dropping_when_nothing_raw_is_left(tmp_path: Path) -> None:
    with make(
        tmp_path,
        commit_rows=50,
        max_rows=100,
        when_full="downsample",
        downsample_bucket_s=1000,
        compact_chunk_rows=50,
    ) as buffer:
        # 60 tags at one sample per bucket: compaction cannot shrink anything.
        for i in range(4):
            buffer.append("dev", samples(50, start=50 * i, tags=60, step_ns=1000 * SECOND))
        stats = buffer.stats()
        assert stats.compacted_total == 0
        assert stats.dropped_total == 110  # 150 > 100 -> 90, 140 -> 90
        assert stats.depth == 90


@pytest.mark.parametrize("policy", ["block", "drop_oldest", "downsample"])
def test_the_byte_cap_holds_on_disk(tmp_path: Path, policy: str) -> None:
    max_bytes = 1024 * 1024
    with make(
        tmp_path,
        commit_rows=1000,
        max_bytes=max_bytes,
        when_full=policy,
        downsample_bucket_s=60,
        compact_chunk_rows=2000,
    ) as buffer:
        peak = 0
        refused = 0
        for i in range(150):
            try:
                buffer.append("dev", samples(1000, start=1000 * i, tags=20, step_ns=SECOND // 20))
            except BufferFull:
                refused += 1
            peak = max(peak, buffer.stats().bytes_on_disk)
        stats = buffer.stats()
        if policy == "block":
            assert refused > 0 and stats.dropped_total == 0
        else:
            assert refused == 0 and stats.dropped_total + stats.compacted_total > 0
        # Slack (BufferConfig's docstring): one transaction's WAL and the 32 KiB -shm file.
        assert peak <= max_bytes + 128 * 1024, peak
        assert buffer.verify() == []
        # Every committed seq (aggregates have seqs too) is stored, dropped or compacted.
        seqs = present_seqs(buffer, "dev")
        assert len(seqs) == len(set(seqs))
        assert len(seqs) + stats.dropped_total + stats.compacted_total == buffer.committed_seq(
            "dev"
        )


def test_free_disk_guard(tmp_path: Path, clock: FakeClock) -> None:
    free = {"bytes": 10**12}
    config = BufferConfig(path=tmp_path / "b.db", min_free_bytes=100 * 1024**2, commit_rows=100)
    buffer = SqliteBuffer.open(config, clock=clock, disk_free=lambda _: free["bytes"])
    with buffer:
        buffer.append("dev", samples(100))
        free["bytes"] = 50 * 1024**2  # someone else filled the disk
        buffer.append("dev", samples(100, start=100))  # accepted, and now full
        with pytest.raises(BufferFull, match="min_free_bytes"):
            buffer.append("dev", samples(1))
        free["bytes"] = 10**12
        clock.now += 1
        assert buffer.append("dev", samples(1)) == [201]


# --- opening -----------------------------------------------------------------------------


def corrupt_and_reopen(path: Path, caplog: pytest.LogCaptureFixture) -> SqliteBuffer:
    with caplog.at_level(logging.ERROR, logger="edgefleet.edge_agent.buffer"):
        buffer = SqliteBuffer.open(BufferConfig(path=path, min_free_bytes=0))
    assert any("quarantined" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    return buffer


def test_a_garbage_file_is_quarantined(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "buffer.db"
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    with corrupt_and_reopen(path, caplog) as buffer:
        stats = buffer.stats()
        assert stats.quarantined_total == 1 and stats.quarantined_path is not None
        assert Path(stats.quarantined_path).read_bytes() == garbage  # kept for forensics
        assert ".corrupt-" in stats.quarantined_path
        assert buffer.append("dev", samples(1)) == [1]  # a fresh, working buffer


def test_a_truncated_database_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "buffer.db"
    with make(tmp_path) as buffer:
        buffer.append("dev", samples(50_000, tags=10))
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with corrupt_and_reopen(path, caplog) as buffer:
        stats = buffer.stats()
        assert stats.quarantined_total == 1
        assert Path(stats.quarantined_path or "").stat().st_size == size // 2
        assert stats.depth == 0
        assert buffer.append("dev", samples(1)) == [1]


def test_another_applications_database_is_refused_not_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE precious (x)")
    conn.close()
    with pytest.raises(BufferOpenError, match="not an edgefleet buffer"):
        SqliteBuffer.open(BufferConfig(path=path))
    assert path.exists()


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with make(tmp_path), pytest.raises(BufferLocked):
        make(tmp_path)
    make(tmp_path).close()  # released on close


def test_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="when_full"):
        BufferConfig(path=tmp_path, when_full="drop_newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extra"):
        BufferConfig(path=tmp_path, max_byte=10)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="commit_rows"):
        BufferConfig(path=tmp_path, max_rows=10, commit_rows=100)


# --- bounded memory ----------------------------------------------------------------------


def test_a_million_row_backlog_is_read_by_index_with_flat_rss(tmp_path: Path) -> None:
    process = psutil.Process()
    with make(tmp_path, commit_rows=5000) as buffer:
        plans = buffer.query_plans()
        for name in ("claim", "ack", "head"):
            assert "USING PRIMARY KEY" in plans[name], plans
        chunk = samples(5000, tags=50)
        buffer.append("dev", chunk)  # warm up allocators and the page cache
        drain(buffer, ack=True)
        baseline = process.memory_info().rss
        for _ in range(200):
            buffer.append("dev", chunk)
        assert buffer.stats().depth == 1_000_000
        after_ingest = process.memory_info().rss
        claimed = 0
        while claimed < 1_000_000:
            batch = buffer.claim_batch(max_rows=10_000)
            assert batch is not None
            claimed += len(batch.readings)
            buffer.ack("dev", batch.last_seq)
        after_drain = process.memory_info().rss
        assert buffer.stats().depth == 0
    growth_mb = (max(after_ingest, after_drain) - baseline) / 1e6
    assert growth_mb < 30, (baseline, after_ingest, after_drain)


def test_release_all_makes_every_claimed_row_claimable_again(tmp_path: Path) -> None:
    buffer = make(tmp_path)
    try:
        buffer.append("edge-01", samples(30))
        buffer.flush()
        first = buffer.claim_batch("edge-01", 10)
        second = buffer.claim_batch("edge-01", 10)
        assert first is not None and second is not None and second.first_seq == 11
        assert buffer.release_all() == 2
        again = buffer.claim_batch("edge-01", 30)
        assert again is not None and (again.first_seq, again.last_seq) == (1, 30)
    finally:
        buffer.close()
