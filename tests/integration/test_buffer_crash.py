"""kill -9 during heavy ingest, then restart: no committed row is lost, no seq gap appears.

A child process appends continuously to a buffer (three devices, calls of random size)
and, after each explicit flush, writes the committed seq of every device to a side file
in one `write` (a line the parent trusts only if complete). The parent SIGKILLs it at a
random moment, reopens the buffer and checks, per device, that every seq up to the
reported committed one is present (or counted as compacted), that the stored seqs have no
gap and no duplicate, and that appending continues at the next seq. The same file goes
through several kills in a row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

DEVICES = ("plc-a", "plc-b", "plc-c")
ROUNDS = 3

CHILD = r"""
import os, random, sys
from pathlib import Path
from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

path, side, policy, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
devices = ("plc-a", "plc-b", "plc-c")
rng = random.Random(seed)
config = BufferConfig(
    path=Path(path), min_free_bytes=0, when_full=policy, commit_rows=500,
    commit_interval_s=0.02, max_rows=None if policy == "block" else 20_000,
    downsample_bucket_s=1.0,
)
buffer = SqliteBuffer.open(config)
fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
first = {d: buffer.committed_seq(d) + 1 for d in devices}
ts = 1_795_000_000_000_000_000
calls = 0
while True:
    device = devices[calls % 3]
    n = rng.randint(1, 300)
    batch = [Sample("asset-%d" % (i % 4), "tag-%d" % (i % 3), ts + i * 1_000_000, float(i),
                    Quality.GOOD) for i in range(n)]
    ts += n * 1_000_000
    seqs = buffer.append(device, batch)
    if first.get(device) is not None and policy == "block":
        # After a restart, the first seq handed out follows the last committed one.
        # (Under downsample, a compaction may give aggregates the next seqs first.)
        assert seqs[0] == first.pop(device), (seqs[0], device)
    calls += 1
    if calls % 7 == 0:
        buffer.flush()
        line = " ".join("%s=%d" % (d, buffer.committed_seq(d)) for d in devices) + "\n"
        os.write(fd, line.encode())
"""


def read_reported(side: Path) -> dict[str, int]:
    """The last complete line of the side file: committed seq per device."""
    text = side.read_text() if side.exists() else ""
    lines = [line for line in text.split("\n")[:-1] if line]  # a partial last line is ignored
    if not lines:
        return {}
    return {k: int(v) for k, v in (item.split("=") for item in lines[-1].split())}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def stored_seqs(buffer: SqliteBuffer, device: str) -> list[int]:
    seqs: list[int] = []
    while (batch := buffer.claim_batch(device, max_rows=10_000)) is not None:
        seqs.extend(r.seq for r in batch.readings)
    return seqs


@pytest.mark.parametrize("policy", ["block", "downsample"])
def test_kill_9_during_ingest_loses_no_committed_row(
    tmp_path: Path, policy: Literal["block", "downsample"]
) -> None:
    path = tmp_path / "buffer.db"
    rng = random.Random()
    seed = rng.randrange(2**32)
    print(f"seed {seed}")  # shown when the test fails
    rng.seed(seed)
    config = BufferConfig(
        path=path,
        min_free_bytes=0,
        when_full=policy,
        max_rows=None if policy == "block" else 20_000,
    )
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for round_ in range(ROUNDS):
        side = tmp_path / f"committed-{round_}.txt"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(side), policy, str(rng.randrange(2**32))],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            # Let it get going (several reported commits), then kill it at a random moment.
            wait_for(
                lambda: len(read_reported(side)) == 3 or child.poll() is not None,  # noqa: B023
                timeout=120,
                what="the child's first commits",
            )
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            time.sleep(rng.uniform(0.0, 0.6))
            assert child.poll() is None, "the child must still be ingesting when killed"
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=60) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            if child.stderr:
                child.stderr.close()
        reported = read_reported(side)
        assert set(reported) == set(DEVICES)

        with SqliteBuffer.open(config) as buffer:
            assert buffer.verify() == []
            stats = buffer.stats()
            for device in DEVICES:
                committed = buffer.committed_seq(device)
                assert committed >= reported[device], (device, committed, reported[device])
                seqs = stored_seqs(buffer, device)
                assert len(seqs) == len(set(seqs)), f"{device}: duplicate seqs"
                assert seqs == sorted(seqs)
                dev = stats.devices[device]
                if policy == "block":
                    # Nothing is ever dropped: exactly 1..committed, every row present.
                    assert seqs == list(range(1, committed + 1)), f"{device}: gap"
                else:
                    # Every seq up to the committed one is stored or counted as compacted
                    # or dropped: no seq went missing without a counter saying so.
                    assert len(seqs) + dev.compacted + dev.dropped == committed, device
                    assert seqs[-1] == committed
                assert buffer.append(device, [Sample("a", "t", 1, 1.0, Quality.GOOD)]) == [
                    committed + 1
                ]
            buffer.flush()
        # The child of the next round asserts it continues at committed + 2.
