"""The embedded mode: HTTP ingest → StorePublisher → SQLite store, the demo's default.
A 202 means committed: the rows are in the store when the answer arrives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgefleet.fog_gateway.auth import DeviceTokens, add_device
from edgefleet.fog_gateway.embedded import StorePublisher
from edgefleet.fog_gateway.ingest import IngestBusy, IngestLimits, IngestUnavailable, create_app
from edgefleet.fog_gateway.store import (
    Store,
    StoreUnavailable,
    WriteResult,
    open_store,
)
from edgefleet.protocols.wire import Batch, Heartbeat, encode_binary

from .test_fog_ingest import WIRE, batch, heartbeat


def test_accepted_rows_are_committed_deduplicated_and_measured(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fog.db'}"
    token = add_device(tmp_path / "tokens.json", "edge-01")
    publisher = StorePublisher(lambda: open_store(url)).start()
    # The replay guard is off so the second copy reaches the store, which must dedupe it.
    app = create_app(DeviceTokens(tmp_path / "tokens.json"), publisher,
                     limits=IngestLimits(replay_ranges_per_device=0))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": WIRE}
    try:
        with TestClient(app) as client:
            for first in (1, 11, 1, 31):  # 1..10 twice, 21..30 never sent: a gap
                body = encode_binary(batch(first=first, rows=10))
                assert client.post("/v1/ingest", content=body, headers=headers).status_code == 202
            hb = encode_binary(heartbeat())
            assert client.post("/v1/ingest", content=hb, headers=headers).status_code == 202
            store = open_store(url)  # a second reader sees what the 202s promised
            [row] = store.completeness()
            assert (row.device, row.received, row.expected, row.missing) == ("edge-01", 30, 40, 10)
            assert row.duplicates == 10 and row.ratio == pytest.approx(0.75)
            assert store.count_rows() == 30
            [status] = store.device_status()
            assert status["device"] == "edge-01" and status["buffer_depth"] == 3
            store.close()
    finally:
        publisher.close()
    assert publisher.stats.rows_written == 30 and publisher.stats.duplicates == 10


class BrokenStore:
    """A store whose database is down until `up` is set."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.written: list[Batch] = []

    def setup(self) -> str:
        return "fake"

    def write(self, batches: Sequence[Batch], heartbeats: Sequence[Heartbeat] = ()
              ) -> WriteResult:
        if not self.up.is_set():
            raise StoreUnavailable("fake database down")
        self.written.extend(batches)
        return WriteResult(readings=sum(len(b.readings) for b in batches), duplicates=0,
                           heartbeats=len(heartbeats), duplicates_by_device={})

    def close(self) -> None:
        pass


def test_a_down_store_answers_unavailable_and_recovers() -> None:
    fake = BrokenStore()
    store: Store = fake  # type: ignore[assignment]
    publisher = StorePublisher(lambda: store).start()

    async def main() -> None:
        with pytest.raises(IngestUnavailable, match="fake database down"):
            await publisher.publish_batch(batch(), b"")
        assert publisher.health()[0] is False
        fake.up.set()
        await publisher.publish_batch(batch(), b"")
        assert publisher.health()[0] is True

    try:
        asyncio.run(main())
    finally:
        publisher.close()
    assert len(fake.written) == 1  # the refused one was not written behind the 503


def test_a_full_queue_refuses_with_busy_and_keeps_what_it_holds() -> None:
    fake = BrokenStore()
    store: Store = fake  # type: ignore[assignment]
    release = threading.Event()
    original = fake.write

    def slow_write(batches: Sequence[Batch], heartbeats: Sequence[Heartbeat] = ()
                   ) -> WriteResult:
        release.wait(10)
        return original(batches, heartbeats)

    fake.write = slow_write  # type: ignore[method-assign]
    fake.up.set()
    publisher = StorePublisher(lambda: store, max_pending_rows=25).start()

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("condition not reached in 5 s")

    async def main() -> None:
        first = asyncio.create_task(publisher.publish_batch(batch(first=1), b""))
        await until(lambda: publisher.stats.messages_taken == 1)  # the writer holds it
        queued = [asyncio.create_task(publisher.publish_batch(batch(first=f), b""))
                  for f in (11, 21)]
        await until(lambda: publisher.pending_rows == 20)
        with pytest.raises(IngestBusy):
            await publisher.publish_batch(batch(first=31), b"")  # 30 rows would be over 25
        release.set()
        await asyncio.gather(first, *queued)

    try:
        asyncio.run(main())
    finally:
        publisher.close()
    assert sorted(b.first_seq for b in fake.written) == [1, 11, 21]
    assert publisher.stats.refused_busy == 1
