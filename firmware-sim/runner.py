"""Run a simulated plant: one clock, one `Plant`, many protocol servers, one label stream.

The runner maps wall time to simulated time (`time_scale` simulated seconds per wall
second, from `start_ns`), advances the plant, and hands the new state to every server.
Label events go to a JSONL file as they happen (one object per line, flushed at once, so
a reader tailing it sees every episode boundary within one update).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .model import LabelEvent, Plant
from .server import ProtocolServer

__all__ = ["LabelWriter", "SimRunner"]

log = logging.getLogger(__name__)

# Servers are updated at most this often (wall seconds), however fast simulated time runs.
MIN_UPDATE_PERIOD_S = 0.02


class LabelWriter:
    """Appends label events to a JSONL file, one flushed line per event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None
        self.written = 0

    def __call__(self, event: LabelEvent) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps(event.as_dict(), separators=(",", ":")) + "\n")
        self._handle.flush()
        self.written += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class SimRunner:
    def __init__(
        self,
        plant: Plant,
        servers: Sequence[ProtocolServer],
        *,
        time_scale: float = 1.0,
        update_period_s: float | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.plant = plant
        self.servers = list(servers)
        self.time_scale = time_scale
        tick_wall_s = plant.tick_ns / 1e9 / time_scale
        self.update_period_s = update_period_s or max(MIN_UPDATE_PERIOD_S, tick_wall_s)
        self.updates = 0
        self.behind = False
        self.started = asyncio.Event()

    def sim_now_ns(self, wall_elapsed_s: float, start_ns: int) -> int:
        return start_ns + int(wall_elapsed_s * self.time_scale * 1e9)

    async def run(self, stop: asyncio.Event | None = None, duration_s: float | None = None) -> None:
        """Serve until `stop` is set or `duration_s` wall seconds have passed."""
        stop = stop or asyncio.Event()
        started: list[ProtocolServer] = []
        try:
            for server in self.servers:
                await server.start()
                started.append(server)
                server.update(self.plant)
            self.started.set()
            start_ns = self.plant.now_ns
            t0 = time.monotonic()
            while not stop.is_set():
                elapsed = time.monotonic() - t0
                if duration_s is not None and elapsed >= duration_s:
                    break
                self.plant.advance_to(self.sim_now_ns(elapsed, start_ns))
                for server in self.servers:
                    server.update(self.plant)
                self.updates += 1
                next_at = t0 + self.updates * self.update_period_s
                delay = max(0.0, next_at - time.monotonic())
                behind = next_at - time.monotonic() < -self.update_period_s
                if behind != self.behind:  # log the change of state, not every late update
                    self.behind = behind
                    if behind:
                        log.warning("simulator fell behind its %.3f s update period",
                                    self.update_period_s)
                    else:
                        log.info("simulator caught up with its update period")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        finally:
            for server in reversed(started):
                try:
                    await server.stop()
                except Exception:  # one server failing to stop must not strand the others
                    log.exception("stopping %s failed", server.name)
