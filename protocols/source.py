"""What a field-protocol source is: the small interface every connector implements.

A connector turns one protocol into `Sample`s and knows nothing else: not the buffer,
not Kafka, not HTTP. The edge agent stamps each sample with its device name and a
gap-free `seq` when it appends it to the buffer, which turns it into a wire `Reading`.

Two shapes, because protocols come in two:
- `PolledSource` (Modbus, OPC UA's polling fallback): the agent calls `poll()` on its
  schedule and gets every configured point back, each with a quality;
- `StreamingSource` (MQTT, OPC UA subscriptions): `run(emit)` pushes samples as they
  arrive and returns only when cancelled.

Faults never escape as crashes: a point that cannot be read comes back with quality
`bad` (or `uncertain`), and a message that cannot be decoded is counted in
`SourceStats.rejected` and logged once per change of state, not once per failure.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .wire import Quality

__all__ = [
    "NAME_PATTERN",
    "Backoff",
    "PolledSource",
    "Sample",
    "SourceError",
    "SourceStats",
    "StreamingSource",
    "finite_number",
]

# wire.IDENTIFIER_PATTERN for pydantic fields: pydantic's regex engine has no \Z, and its `$`
# does not match before a trailing newline, so `$` is exact here.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one tag of one asset, before the agent gives it a device and a seq.

    `ts_ns` is the source timestamp (UTC epoch ns) where the protocol carries one (OPC UA,
    Sparkplug, a JSON field), else the time the value was received.
    """

    asset: str
    tag: str
    ts_ns: int
    value: float | None
    quality: Quality


@dataclass
class SourceStats:
    """Counters every source keeps; the agent exports them as metrics."""

    samples: int = 0  # samples emitted, any quality
    bad: int = 0  # samples emitted with quality bad
    rejected: int = 0  # messages or responses dropped as undecodable, each logged
    reconnects: int = 0  # sessions re-established after a loss
    errors: dict[str, int] = field(default_factory=dict)  # by short reason

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


def finite_number(value: Any) -> float | None:
    """The float a numeric or boolean field value stands for (True is 1.0); None when it
    is not a number or not finite, which sources report as a bad-quality sample."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


class SourceError(Exception):
    """A source cannot go on as configured (bad config discovered at connect, …)."""


@runtime_checkable
class PolledSource(Protocol):
    name: str
    stats: SourceStats

    async def poll(self) -> list[Sample]:
        """Read every configured point once. Never raises for field faults: unreadable
        points come back with quality bad."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class StreamingSource(Protocol):
    name: str
    stats: SourceStats

    async def run(self, emit: Callable[[Sample], None]) -> None:
        """Connect, emit samples as they arrive, reconnect with `Backoff` after a loss;
        return only when cancelled."""
        ...


class Backoff:
    """Capped exponential backoff with full jitter, shared by every reconnecting client.

    `next_delay()` returns a delay drawn uniformly from [0, min(cap, initial * 2**n)];
    `reset()` after a success. Full jitter keeps a fleet of agents that lost the same
    broker from reconnecting in lockstep.
    """

    def __init__(
        self, initial_s: float = 0.2, cap_s: float = 30.0, rng: random.Random | None = None
    ) -> None:
        if initial_s <= 0 or cap_s < initial_s:
            raise ValueError("backoff needs 0 < initial_s <= cap_s")
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempts = 0
