"""The embedded publisher: no Kafka, accepted messages are written straight to the store.

This is the demo's default (DESIGN.md, "Embedded defaults"): one process, a SQLite file,
the same schema and the same `(device, seq)` deduplication as PostgreSQL. The ingest's
contract is unchanged: a request is answered 202 only after the store committed it.

One writer thread owns the store. Requests queue their message with a future; the writer
takes everything queued (group commit: one transaction for many requests, which is what
makes SQLite fast here) and resolves the futures after the commit. The queue is bounded
by rows (`max_pending_rows`): when full, publishing raises IngestBusy (429, the agent
backs off and keeps the rows). When the store is unavailable, the waiting requests get
IngestUnavailable (503, the agent retries) and `health()` reports it until a write
succeeds again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from edgefleet.protocols.wire import Batch, Heartbeat

from .ingest import IngestBusy, IngestUnavailable

if TYPE_CHECKING:
    from .store import Store

__all__ = ["StorePublisher", "StorePublisherStats"]

log = logging.getLogger(__name__)

_MAX_GROUP_ROWS: Final = 100_000  # rows per transaction at most


@dataclasses.dataclass
class StorePublisherStats:
    messages_taken: int = 0  # by the writer, committed or not
    commits: int = 0
    rows_written: int = 0
    duplicates: int = 0
    heartbeats: int = 0
    failures: int = 0
    refused_busy: int = 0


@dataclasses.dataclass(slots=True)
class _Pending:
    message: Batch | Heartbeat
    rows: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class StorePublisher:
    """See the module docstring. `store_factory` is called in the writer thread."""

    def __init__(
        self,
        store_factory: Callable[[], Store],
        *,
        max_pending_rows: int = 500_000,
        unavailable_retry_after_s: float = 5.0,
    ) -> None:
        self.max_pending_rows = max_pending_rows
        self.unavailable_retry_after_s = unavailable_retry_after_s
        self.stats = StorePublisherStats()
        self._store_factory = store_factory
        self._store: Store | None = None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._pending_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._healthy = True
        self._last_error = ""
        self._thread = threading.Thread(target=self._run, name="fog-store-writer", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> StorePublisher:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the writer and close the store."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    # ---- Publisher ---------------------------------------------------------------------

    async def publish_batch(self, batch: Batch, body: bytes) -> None:
        await self._submit(batch, len(batch.readings))

    async def publish_heartbeat(self, heartbeat: Heartbeat, body: bytes) -> None:
        await self._submit(heartbeat, 1)

    def health(self) -> tuple[bool, str]:
        if not self._healthy:
            return False, f"store unavailable: {self._last_error}"
        return True, f"{self._pending_rows} rows waiting for the store"

    async def _submit(self, message: Batch | Heartbeat, rows: int) -> None:
        loop = asyncio.get_running_loop()
        pending = _Pending(message, rows, loop, loop.create_future())
        with self._cond:
            if self._stopping:
                raise IngestUnavailable("the gateway is stopping", 1.0)
            if self._queue and self._pending_rows + rows > self.max_pending_rows:
                self.stats.refused_busy += 1
                raise IngestBusy(f"{self._pending_rows} rows are waiting for the store")
            self._queue.append(pending)
            self._pending_rows += rows
            self._cond.notify()
        await pending.future

    # ---- the writer thread ---------------------------------------------------------------

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            group: list[_Pending] = []
            rows = 0
            while self._queue and (not group or rows + self._queue[0].rows <= _MAX_GROUP_ROWS):
                item = self._queue.popleft()
                rows += item.rows
                group.append(item)
            self._pending_rows -= rows
            self.stats.messages_taken += len(group)
            return group

    def _run(self) -> None:
        from .store import StoreUnavailable

        while True:
            group = self._take()
            if not group:
                break  # stopping, and nothing left
            batches = [p.message for p in group if isinstance(p.message, Batch)]
            heartbeats = [p.message for p in group if isinstance(p.message, Heartbeat)]
            error: BaseException | None = None
            try:
                if self._store is None:
                    self._store = self._store_factory()
                result = self._store.write(batches, heartbeats)
            except StoreUnavailable as err:
                error = IngestUnavailable(str(err), self.unavailable_retry_after_s)
                self.stats.failures += 1
                if self._healthy:
                    log.error("store unavailable, answering 503 until it is back: %s", err)
                self._healthy, self._last_error = False, str(err)
                time.sleep(0.2)  # do not spin on a down database while requests keep coming
            except Exception as err:  # a bug: fail these requests (503), keep serving
                log.exception("store write failed")
                error = IngestUnavailable(f"store write failed: {err}", 1.0)
                self.stats.failures += 1
            else:
                if not self._healthy:
                    log.info("store available again")
                self._healthy = True
                self.stats.commits += 1
                self.stats.rows_written += result.readings
                self.stats.duplicates += result.duplicates
                self.stats.heartbeats += result.heartbeats
            for pending in group:
                pending.loop.call_soon_threadsafe(_settle, pending.future, error)
        if self._store is not None:
            self._store.close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client gone); the write stands
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
