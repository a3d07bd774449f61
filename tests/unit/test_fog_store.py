"""The fog store on SQLite (no servers): exactly-once on (device, seq), counts, heartbeat
ordering, the inferences view, all-or-nothing writes, URLs, and the TimescaleDB DDL.

TimescaleDB is not installable on the development machines, so its branch is checked here
at the level of the statements the store generates; tests/integration/test_fog_store_pg.py
runs the plain-PostgreSQL branch against a real server."""

from __future__ import annotations

import logging
import re
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.fog_gateway.store import (
    Completeness,
    PgStore,
    SqliteStore,
    StoreUnavailable,
    WriteResult,
    open_store,
    partition_statement,
    pg_schema_statements,
)
from edgefleet.protocols.wire import Batch, Heartbeat, Quality, Reading

T0 = 1_795_000_000_000_000_000  # ns, 2026-11-18
SECOND = 1_000_000_000


def make_batch(
    device: str,
    first_seq: int,
    count: int,
    *,
    tags: Sequence[str] = ("temp",),
    asset: str = "press-1",
    t0: int = T0,
    step_ns: int = SECOND,
) -> Batch:
    """Seqs first_seq.. of `device`; seq s has ts t0 + s*step_ns and value s, so a resend of
    a seq is the same reading. Tags cycle by seq."""
    readings = tuple(
        Reading(device, asset, tags[seq % len(tags)], t0 + seq * step_ns, float(seq),
                Quality.GOOD, seq)
        for seq in range(first_seq, first_seq + count)
    )
    return Batch(device=device, first_seq=first_seq, last_seq=first_seq + count - 1,
                 readings=readings, sent_at=t0)


def make_heartbeat(device: str, ts: int, **fields: Any) -> Heartbeat:
    values: dict[str, Any] = {
        "agent_version": "0.1.0", "buffer_depth": 0, "dropped_total": 0, "compacted_total": 0,
        "uptime_s": 1.0,
    }
    values.update(fields)
    return Heartbeat(device=device, ts=ts, **values)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "fog.db")
    store.setup()
    yield store
    store.close()


def by_device(store: SqliteStore) -> dict[str, Completeness]:
    return {c.device: c for c in store.completeness()}


def test_a_resent_batch_is_stored_once(store: SqliteStore) -> None:
    batch = make_batch("plc-1", 1, 50)
    assert store.write([batch]) == WriteResult(50, 0, 0, {})
    assert store.write([batch]) == WriteResult(0, 50, 0, {"plc-1": 50})
    assert store.count_rows() == 50
    assert by_device(store)["plc-1"] == Completeness("plc-1", 50, 50, 0, 50, 1.0)


def test_a_partially_overlapping_batch_adds_only_its_new_rows(store: SqliteStore) -> None:
    store.write([make_batch("plc-1", 1, 10)])
    result = store.write([make_batch("plc-1", 6, 10), make_batch("plc-2", 1, 3)])
    assert result == WriteResult(readings=8, duplicates=5, heartbeats=0,
                                 duplicates_by_device={"plc-1": 5})
    assert store.count_rows() == 18
    assert by_device(store)["plc-1"] == Completeness("plc-1", 15, 15, 0, 5, 1.0)


def test_rows_repeated_within_one_call_are_duplicates(store: SqliteStore) -> None:
    batch = make_batch("plc-1", 1, 20)
    result = store.write([batch, make_batch("plc-1", 11, 20), batch])
    assert result == WriteResult(30, 30, 0, {"plc-1": 30})
    assert store.count_rows() == 30


def test_completeness_shows_gaps_as_missing(store: SqliteStore) -> None:
    store.write([make_batch("plc-1", 1, 10), make_batch("plc-1", 21, 10)])
    store.write([make_batch("plc-2", 100, 5)])
    store.write([make_batch("plc-1", 21, 2)])
    assert store.completeness() == [
        Completeness("plc-1", received=20, expected=30, missing=10, duplicates=2,
                     ratio=20 / 30),
        Completeness("plc-2", received=5, expected=5, missing=0, duplicates=0, ratio=1.0),
    ]
    store.write([make_batch("plc-1", 11, 10)])  # the late batch fills the gap
    assert by_device(store)["plc-1"] == Completeness("plc-1", 30, 30, 0, 2, 1.0)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(calls=st.lists(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 40), st.integers(1, 15)),
             min_size=1, max_size=4),
    min_size=1, max_size=6,
))
def test_counts_match_a_model_under_any_resend_pattern(
    tmp_path: Path, calls: list[list[tuple[str, int, int]]]
) -> None:
    store = SqliteStore(tmp_path / f"model-{uuid.uuid4().hex}.db")  # fresh per example
    stored: dict[str, set[int]] = {"a": set(), "b": set()}
    received = 0
    for call in calls:
        result = store.write([make_batch(device, first, count) for device, first, count in call])
        new = 0
        for device, first, count in call:
            seqs = set(range(first, first + count))
            new += len(seqs - stored[device])
            stored[device] |= seqs
            received += count
        assert result.readings == new
    assert store.count_rows() == sum(len(s) for s in stored.values())
    for c in store.completeness():
        seqs = stored[c.device]
        assert (c.received, c.expected) == (len(seqs), max(seqs) - min(seqs) + 1)
        assert c.missing == c.expected - c.received
    assert sum(c.duplicates for c in store.completeness()) == received - store.count_rows()
    store.close()


def test_the_newest_heartbeat_wins(store: SqliteStore) -> None:
    newer = make_heartbeat("plc-1", T0 + 10 * SECOND, buffer_depth=5, model_version="m-2")
    older = make_heartbeat("plc-1", T0, buffer_depth=99, model_version="m-1")
    assert store.write([], [newer]).heartbeats == 1
    assert store.write([], [older]).heartbeats == 0  # a late resend does not go back in time
    (status,) = store.device_status()
    assert (status["last_seen"], status["buffer_depth"], status["model_version"]) == (
        T0 + 10 * SECOND, 5, "m-2",
    )
    # Within one call the order of arrival does not matter either.
    latest = make_heartbeat("plc-2", T0 + 2 * SECOND, status="running", buffer_oldest_ts=T0)
    result = store.write([], [latest, make_heartbeat("plc-2", T0 + SECOND, status="stale")])
    assert result.heartbeats == 1
    status = store.device_status()[1]
    assert status["device"] == "plc-2"
    assert (status["status"], status["buffer_oldest_ts"]) == ("running", T0)
    assert set(status) == {
        "device", "last_seen", "agent_version", "model_version", "applied_generation",
        "buffer_depth", "buffer_oldest_ts", "dropped_total", "compacted_total",
        "inference_errors_total", "uptime_s", "status", "updated_at",
    }


def inference_batch(device: str) -> Batch:
    """Sensor readings and the outputs of two model versions, in one seq space."""
    rows = [
        ("temp", 71.5), ("ml:v1:score", 0.25), ("ml:v1:is_anomaly", 0.0),
        ("ml:iforest:2:score", 0.75), ("ml:iforest:2:is_anomaly", 1.0),
        ("ml::score", 9.0), ("mlx:v1:score", 9.0), ("ml:v1:other", 9.0),
    ]
    readings = tuple(
        Reading(device, "press-1", tag, T0, value, Quality.GOOD, seq)
        for seq, (tag, value) in enumerate(rows, start=1)
    )
    return Batch(device=device, first_seq=1, last_seq=len(rows), readings=readings, sent_at=T0)


def test_the_inferences_view_pivots_model_outputs(store: SqliteStore, tmp_path: Path) -> None:
    store.write([inference_batch("plc-1")])
    with sqlite3.connect(tmp_path / "fog.db") as conn:
        rows = conn.execute(
            "SELECT device, asset, ts, model_version, score, is_anomaly FROM inferences "
            "ORDER BY model_version"
        ).fetchall()
    assert rows == [
        ("plc-1", "press-1", T0, "iforest:2", 0.75, 1),
        ("plc-1", "press-1", T0, "v1", 0.25, 0),
    ]


def test_missing_values_and_quality_are_stored(store: SqliteStore, tmp_path: Path) -> None:
    readings = (
        Reading("plc-1", "press-1", "temp", T0, None, Quality.BAD, 1),
        Reading("plc-1", "press-1", "temp", T0 + 1, 3.5, Quality.UNCERTAIN, 2),
    )
    store.write([Batch(device="plc-1", first_seq=1, last_seq=2, readings=readings, sent_at=T0)])
    with sqlite3.connect(tmp_path / "fog.db") as conn:
        rows = conn.execute("SELECT seq, ts, value, quality FROM readings ORDER BY seq").fetchall()
    assert rows == [(1, T0, None, "bad"), (2, T0 + 1, 3.5, "uncertain")]


def test_a_write_that_fails_midway_leaves_nothing(store: SqliteStore) -> None:
    store.write([make_batch("plc-1", 1, 10)], [make_heartbeat("plc-1", T0)])
    # The readings go in first; the heartbeat then fails (too large for an INTEGER).
    # Struct constructors do not range-check, so such an object can reach the store.
    bad = make_heartbeat("plc-1", T0 + SECOND, applied_generation=2**70)
    with pytest.raises(OverflowError):
        store.write([make_batch("plc-1", 11, 10), make_batch("plc-2", 1, 5)], [bad])
    assert store.count_rows() == 10
    assert store.completeness() == [Completeness("plc-1", 10, 10, 0, 0, 1.0)]
    assert store.device_status()[0]["last_seen"] == T0
    # The store is usable afterwards and the rows were not half-counted.
    assert store.write([make_batch("plc-1", 11, 10)]).readings == 10


def test_setup_is_idempotent_and_says_what_the_store_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fog.db"
    first = SqliteStore(path)
    with caplog.at_level(logging.INFO, logger="edgefleet.fog_gateway.store"):
        assert first.setup() == f"sqlite {path}"
    assert f"sqlite {path}" in caplog.text
    first.write([make_batch("plc-1", 1, 5)])
    first.setup()
    first.close()
    second = SqliteStore(path)
    assert second.setup() == f"sqlite {path}"
    assert second.count_rows() == 5
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    second.close()


def test_a_store_used_before_setup_sets_itself_up(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fog.db")
    assert store.write([make_batch("plc-1", 1, 3)]).readings == 3
    store.close()


def test_a_file_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)  # a folder, not a database file
    with pytest.raises(StoreUnavailable, match=re.escape(str(tmp_path))) as caught:
        store.write([make_batch("plc-1", 1, 3)])
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


def test_open_store_chooses_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == tmp_path / "a.db"
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:data/b.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == tmp_path / "data" / "b.db"

    pg = open_store("postgresql://fog:s3cret@db.example:5433/edgefleet?sslmode=require")
    assert isinstance(pg, PgStore)  # made without connecting
    assert pg.name == "postgresql://fog@db.example:5433/edgefleet"
    assert "s3cret" not in pg.description
    assert isinstance(open_store("postgres://fog@db/edgefleet", schema="fog"), PgStore)

    with pytest.raises(ValueError, match="'mysql'"):
        open_store("mysql://db/edgefleet")
    with pytest.raises(ValueError, match="host"):
        open_store("sqlite://host/fog.db")
    with pytest.raises(ValueError, match="schema"):
        PgStore("postgresql://db/edgefleet", schema="Robert'); DROP TABLE readings")


# --- the PostgreSQL DDL, TimescaleDB included ---------------------------------------------


def test_timescaledb_statements_make_a_compressed_hypertable_with_policies() -> None:
    statements = pg_schema_statements("timescaledb", retention_days=30, compress_after_days=3)
    text = "\n".join(statements)
    readings = next(s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS readings"))
    assert "PRIMARY KEY (device, seq, ts)" in readings
    assert "PARTITION BY" not in readings
    assert (
        "create_hypertable('readings', 'ts', chunk_time_interval => INTERVAL '1 day', "
        "if_not_exists => TRUE)" in text
    )
    # Compression needs every unique-key column as a segment-by or order-by column.
    segment = re.search(r"compress_segmentby = '([^']*)'", text)
    order = re.search(r"compress_orderby = '([^']*)'", text)
    assert segment and order
    columns = {c.strip().split()[0] for c in f"{segment[1]},{order[1]}".split(",")}
    assert {"device", "seq", "ts"} <= columns
    assert "add_compression_policy('readings', INTERVAL '3 days', if_not_exists => TRUE)" in text
    assert "add_retention_policy('readings', INTERVAL '30 days', if_not_exists => TRUE)" in text
    assert "WITH NO DATA" in text


def test_timescaledb_statements_define_a_one_minute_continuous_aggregate() -> None:
    statements = pg_schema_statements("timescaledb")
    (aggregate,) = [s for s in statements if "readings_1m" in s and "MATERIALIZED VIEW" in s]
    normalized = " ".join(aggregate.split())
    assert "WITH (timescaledb.continuous" in normalized
    assert "time_bucket(INTERVAL '1 minute', ts) AS bucket" in normalized
    for aggregate_function in ("avg(value)", "min(value)", "max(value)", "count(*)"):
        assert aggregate_function in normalized
    assert "GROUP BY bucket, device, asset, tag" in normalized
    policy = next(s for s in statements if "add_continuous_aggregate_policy" in s)
    assert "schedule_interval => INTERVAL '1 minute'" in policy
    assert "add_retention_policy('readings', INTERVAL '90 days'" in "\n".join(statements)
    assert "add_compression_policy('readings', INTERVAL '7 days'" in "\n".join(statements)


@pytest.mark.parametrize("layout", ["timescaledb", "partitions"])
def test_schema_statements_are_idempotent_and_complete(layout: Any) -> None:
    statements = pg_schema_statements(layout)
    for statement in statements:
        head = " ".join(statement.split()[:6]).upper()
        if head.startswith("CREATE"):
            assert "IF NOT EXISTS" in head or "OR REPLACE" in head, statement
        if "add_" in statement or "create_hypertable" in statement:
            assert "if_not_exists => TRUE" in statement
    text = "\n".join(statements)
    for name in ("readings", "device_seq", "device_status", "store_meta"):
        assert f"CREATE TABLE IF NOT EXISTS {name} (" in text
    for view in ("completeness", "inferences"):
        assert f"CREATE OR REPLACE VIEW {view} AS" in text
    assert ("PARTITION BY RANGE (ts)" in text) == (layout == "partitions")
    assert ("timescaledb" in text) == (layout == "timescaledb")


def test_timescaledb_retention_must_outlast_compression() -> None:
    with pytest.raises(ValueError, match="retention"):
        pg_schema_statements("timescaledb", retention_days=7, compress_after_days=7)


def test_daily_partitions_are_bounded_in_utc() -> None:
    day = (T0 // SECOND) // 86_400  # 2026-11-18
    assert partition_statement(day) == (
        "CREATE TABLE IF NOT EXISTS readings_p20261118 PARTITION OF readings FOR VALUES "
        "FROM ('2026-11-18 00:00:00+00') TO ('2026-11-19 00:00:00+00')"
    )
