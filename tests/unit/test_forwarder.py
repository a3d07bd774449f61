"""The forwarder against a real buffer and a scripted transport: what each fog answer
does (ack, retry with Retry-After, hold, split, dead-letter), live data first after an
outage, batch size bounds, and the drain at shutdown."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.edge_agent.forwarder import (
    BufferExecutor,
    FogConfig,
    Forwarder,
    SendOutcome,
)
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Batch, Heartbeat, Quality, decode_binary

DEVICE = "edge-01"
T0 = 1_795_000_000_000_000_000


def samples(n: int, start: int = 0) -> list[Sample]:
    return [Sample("pump-01", f"t{i % 6}", T0 + (start + i) * 1000, float(i), Quality.GOOD)
            for i in range(n)]


class ScriptedFog:
    """A transport whose answer is chosen per call by `answer(batch)`; records what it
    accepted (decoded, so the encoding is exercised)."""

    def __init__(self) -> None:
        self.answer: Callable[[Batch], SendOutcome] = lambda batch: SendOutcome(202)
        self.accepted: list[Batch] = []
        self.calls = 0
        self.sizes: list[int] = []
        self.heartbeats: list[Heartbeat] = []

    async def send(self, body: bytes, *, kind: Literal["batch", "heartbeat"]) -> SendOutcome:
        self.calls += 1
        self.sizes.append(len(body))
        data = gzip.decompress(body)
        if kind == "heartbeat":
            self.heartbeats.append(decode_binary(data, Heartbeat))
            return SendOutcome(202)
        batch = decode_binary(data)
        outcome = self.answer(batch)
        if 200 <= outcome.status < 300:
            self.accepted.append(batch)
        await asyncio.sleep(0)
        return outcome

    async def close(self) -> None:
        pass

    def seqs(self) -> list[int]:
        return sorted(r.seq for b in self.accepted for r in b.readings)


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[SqliteBuffer]:
    buf = SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0))
    yield buf
    buf.close()


def fog_config(**overrides: Any) -> FogConfig:
    settings: dict[str, Any] = {
        "url": "http://127.0.0.1:9/v1/ingest", "batch_max_rows": 100,
        "batch_max_wait_s": 0.01, "backoff_initial_s": 0.01, "backoff_cap_s": 0.05,
        "in_flight": 1,
    }
    settings.update(overrides)
    return FogConfig(**settings)


async def run_until(forwarder: Forwarder, done: Callable[[], bool], timeout: float = 10.0
                    ) -> None:
    task = asyncio.create_task(forwarder.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_accepted_batches_are_acked_in_seq_order(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()

    async def main() -> None:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(450))
        buffer.flush()
        await run_until(forwarder, lambda: buffer.stats().depth == 0)
        bx.shutdown()
        assert forwarder.stats.rows_sent == 450
        assert forwarder.stats.batches_sent == 5
        assert forwarder.stats.connected is True

    asyncio.run(main())
    assert fog.seqs() == list(range(1, 451))
    assert [b.first_seq for b in fog.accepted] == [1, 101, 201, 301, 401]


def test_a_4xx_batch_is_dead_lettered_once_and_the_rest_flows(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    fog.answer = lambda b: SendOutcome(422, "bad tag") if b.first_seq == 101 else SendOutcome(202)

    async def main() -> Forwarder:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(300))
        buffer.flush()
        await run_until(forwarder, lambda: buffer.stats().depth == 0)
        bx.shutdown()
        return forwarder

    forwarder = asyncio.run(main())
    assert fog.calls == 3  # never retried
    assert forwarder.stats.dead_lettered_batches == 1
    assert forwarder.stats.dead_lettered_rows == 100
    letters = buffer.dlq_list()
    assert [(d.first_seq, d.last_seq) for d in letters] == [(101, 200)]
    assert "422" in letters[0].reason and "bad tag" in letters[0].reason
    assert [r.seq for r in buffer.dlq_batch(letters[0].dlq_id).readings] == list(range(101, 201))
    assert fog.seqs() == [*range(1, 101), *range(201, 301)]


def test_503_is_retried_after_retry_after_and_nothing_is_lost(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    answers = iter([SendOutcome(503, "busy", retry_after=0.3), SendOutcome(0, "refused")])
    fog.answer = lambda b: next(answers, SendOutcome(202))

    async def main() -> tuple[Forwarder, float]:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(100))
        buffer.flush()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await run_until(forwarder, lambda: buffer.stats().depth == 0)
        bx.shutdown()
        return forwarder, loop.time() - start

    forwarder, took = asyncio.run(main())
    assert took >= 0.3  # Retry-After honoured though the backoff cap is 0.05 s
    assert fog.calls == 3
    assert forwarder.stats.retries == 2 and forwarder.stats.outages == 1
    assert fog.seqs() == list(range(1, 101))


def test_auth_refusals_hold_the_rows_instead_of_dead_lettering_them(
    buffer: SqliteBuffer, caplog: pytest.LogCaptureFixture
) -> None:
    fog = ScriptedFog()
    fog.answer = lambda b: SendOutcome(401, "unknown token")

    async def main() -> Forwarder:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(300))
        buffer.flush()
        await run_until(forwarder, lambda: fog.calls >= 3)
        bx.shutdown()
        return forwarder

    forwarder = asyncio.run(main())
    assert buffer.stats().depth == 300 and buffer.dlq_list() == []
    assert forwarder.stats.connected is False and forwarder.stats.dead_lettered_rows == 0
    assert sum("refused this agent" in r.getMessage() for r in caplog.records) == 1


def test_413_splits_the_batch_until_it_fits(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    fog.answer = lambda b: SendOutcome(413) if len(b.readings) > 30 else SendOutcome(202)

    async def main() -> Forwarder:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(200))
        buffer.flush()
        await run_until(forwarder, lambda: buffer.stats().depth == 0)
        bx.shutdown()
        return forwarder

    forwarder = asyncio.run(main())
    assert forwarder.stats.splits >= 2 and buffer.dlq_list() == []
    assert fog.seqs() == list(range(1, 201))
    assert max(len(b.readings) for b in fog.accepted) <= 30


def test_batches_respect_the_byte_cap(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()

    async def main() -> None:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(batch_max_rows=5000, batch_max_bytes=4096), bx, fog,
                              DEVICE)
        buffer.append(DEVICE, samples(5000))
        buffer.flush()
        await run_until(forwarder, lambda: buffer.stats().depth == 0)
        bx.shutdown()

    asyncio.run(main())
    assert fog.seqs() == list(range(1, 5001))
    sent = fog.sizes[-len(fog.accepted):]
    assert max(sent) <= 4096, sent
    assert len(fog.accepted) < 200  # it adapts, not one row per batch


def test_live_rows_go_ahead_of_the_backlog_after_an_outage(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    down = True
    fog.answer = lambda b: SendOutcome(0, "connection refused") if down else SendOutcome(202)

    async def main() -> tuple[int, int]:
        nonlocal down
        bx = BufferExecutor(buffer)
        # The backlog is paced at 200 rows/s: live rows must not wait behind it.
        forwarder = Forwarder(fog_config(backlog_rows_per_s=200), bx, fog, DEVICE)
        task = asyncio.create_task(forwarder.run())
        buffer.append(DEVICE, samples(2000))  # rows 1..2000 pile up during the outage
        buffer.flush()
        async with asyncio.timeout(10):
            while forwarder.stats.outages == 0:
                await asyncio.sleep(0.005)
        down = False
        # The first backlog batch shows the forwarder has marked where live rows begin
        # (`connected` turns True a step earlier, before the mark).
        async with asyncio.timeout(10):
            while forwarder.stats.backlog_rows_sent == 0:
                await asyncio.sleep(0.005)
        live_first = buffer.committed_seq(DEVICE) + 1
        buffer.append(DEVICE, samples(100, start=5000))  # live rows after the reconnect
        buffer.flush()
        forwarder.notify(100)
        async with asyncio.timeout(10):
            while not any(b.first_seq >= live_first for b in fog.accepted):
                await asyncio.sleep(0.005)
        backlog_left = buffer.stats().depth - 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        bx.shutdown()
        return live_first, backlog_left

    live_first, backlog_left = asyncio.run(main())
    assert backlog_left > 1000  # the live batch went while most of the backlog waited
    assert any(b.first_seq >= live_first for b in fog.accepted)


def test_drain_sends_everything_within_the_timeout(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()

    async def main() -> int:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(1234))
        left = await forwarder.drain(5.0)
        bx.shutdown()
        return left

    assert asyncio.run(main()) == 0
    assert fog.seqs() == list(range(1, 1235))


def test_drain_gives_up_at_the_timeout_and_keeps_the_rows(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    fog.answer = lambda b: SendOutcome(0, "connection refused")

    async def main() -> int:
        bx = BufferExecutor(buffer)
        forwarder = Forwarder(fog_config(), bx, fog, DEVICE)
        buffer.append(DEVICE, samples(100))
        left = await forwarder.drain(0.5)
        bx.shutdown()
        return left

    assert asyncio.run(main()) == 100
    assert buffer.stats().depth == 100


def test_heartbeats_are_sent_as_wire_messages(buffer: SqliteBuffer) -> None:
    fog = ScriptedFog()
    beat = Heartbeat(device=DEVICE, ts=T0, agent_version="0.1.0", buffer_depth=3,
                     dropped_total=0, compacted_total=0, uptime_s=1.5, status="ok")

    async def main() -> bool:
        bx = BufferExecutor(buffer)
        ok = await Forwarder(fog_config(), bx, fog, DEVICE).send_heartbeat(beat)
        bx.shutdown()
        return ok

    assert asyncio.run(main()) is True
    assert fog.heartbeats == [beat]


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"url": "ftp://fog/x"}, "url: expected http(s)"),
        ({"token": "a", "token_file": "/t"}, "token_file: set together with token"),
        ({"client_cert": "/c.pem"}, "client_cert, client_key"),
        ({"ca_file": "/ca.pem"}, "TLS files need an https://"),
        ({"backoff_initial_s": 5, "backoff_cap_s": 1}, "backoff_cap_s"),
    ],
)
def test_fog_config_names_the_bad_setting(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        FogConfig(url=overrides.pop("url", "http://fog:8080/v1/ingest"), **overrides)
