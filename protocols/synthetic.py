"""A synthetic polled source: readings at a fixed rate, with no device behind them.

For smoke-testing an agent install before any PLC is wired, and for benchmarks that must
measure the agent rather than a field protocol:

```yaml
sources:
  - type: synthetic
    name: smoke
    assets: 10                 # asset-0 … asset-9
    tags: [speed, flow, pressure, current, temperature, vibration]
    rows_per_s: 1000           # per asset: one row = one value of every tag
    poll_interval_s: 0.1
    spike_probability: 0.001   # a row whose values jump by `spike_size` standard deviations
```

Each `poll()` returns every row that fell due since the previous poll (so the rate holds
whatever the poll schedule does, up to `max_rows_per_poll` rows per asset, the bound on one
poll's size; rows beyond it are skipped and counted in `stats.errors["behind"]`).
Timestamps are spaced evenly between polls. Values are a slow sine per tag plus Gaussian
noise from a seeded generator, so two runs with the same seed produce the same values.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .source import NAME_PATTERN, Sample, SourceStats
from .wire import Quality

__all__ = ["SyntheticSource", "SyntheticSourceConfig"]

_NS = 1_000_000_000


class SyntheticSourceConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["synthetic"] = "synthetic"
    name: str = Field(default="synthetic", pattern=NAME_PATTERN)
    assets: int = Field(default=1, ge=1, le=10_000)
    asset_prefix: str = Field(default="asset", pattern=NAME_PATTERN, max_length=64)
    tags: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        default=("speed", "flow", "pressure", "current", "temperature", "vibration"),
        min_length=1,
        max_length=256,
    )
    rows_per_s: float = Field(default=1.0, gt=0, le=1_000_000)
    poll_interval_s: float = Field(default=1.0, gt=0)
    max_rows_per_poll: int = Field(default=100_000, ge=1)
    spike_probability: float = Field(default=0.0, ge=0, le=1)
    spike_size: float = Field(default=12.0, gt=0)
    seed: int = 0

    def build(self) -> SyntheticSource:
        return SyntheticSource(self)


class SyntheticSource:
    """The `PolledSource` a `SyntheticSourceConfig` describes."""

    def __init__(
        self, config: SyntheticSourceConfig, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.config = config
        self.name = config.name
        self.poll_interval_s = config.poll_interval_s
        self.stats = SourceStats()
        self.rows = 0
        self._rng = random.Random(config.seed)
        self._assets = [f"{config.asset_prefix}-{i}" for i in range(config.assets)]
        tag_count = len(config.tags)
        # Per tag: a base level, a sine amplitude and period, a noise level.
        self._shape = [
            (50.0 + 10 * i, 5.0 + i, 300.0 + 37 * i, 0.5 + 0.1 * i) for i in range(tag_count)
        ]
        self._clock_ns = clock_ns
        self._last_ns: int | None = None
        self._carry = 0.0  # fractional rows owed from the previous poll

    async def poll(self) -> list[Sample]:
        now = self._clock_ns()
        if self._last_ns is None:
            self._last_ns = now - int(self.config.poll_interval_s * _NS)
        elapsed_s = (now - self._last_ns) / _NS
        owed = elapsed_s * self.config.rows_per_s + self._carry
        rows = int(owed)
        self._carry = owed - rows
        if rows > self.config.max_rows_per_poll:
            self.stats.count_error("behind")
            rows = self.config.max_rows_per_poll
        samples: list[Sample] = []
        if rows:
            step = (now - self._last_ns) / rows
            samples = self._rows(self._last_ns, step, rows)
        self._last_ns = now
        self.rows += rows
        self.stats.samples += len(samples)
        return samples

    def _rows(self, start_ns: int, step_ns: float, rows: int) -> list[Sample]:
        rng = self._rng
        gauss = rng.gauss
        tags = self.config.tags
        shape = self._shape
        spike_p = self.config.spike_probability
        spike = self.config.spike_size
        good = Quality.GOOD
        out: list[Sample] = []
        append = out.append
        for r in range(1, rows + 1):
            ts = start_ns + int(step_ns * r)
            t_s = ts / _NS
            for asset in self._assets:
                jump = spike if spike_p and rng.random() < spike_p else 0.0
                for tag, (base, amp, period, noise) in zip(tags, shape, strict=True):
                    value = base + amp * math.sin(t_s * 2 * math.pi / period)
                    value += noise * (gauss(0.0, 1.0) + jump)
                    append(Sample(asset, tag, ts, value, good))
        return out

    async def close(self) -> None:
        return None
