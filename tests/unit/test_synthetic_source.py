"""The synthetic source: its rate holds whatever the poll schedule, and it is deterministic."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from edgefleet.protocols.config import SourceConfigError, load_sources
from edgefleet.protocols.synthetic import SyntheticSource, SyntheticSourceConfig


def test_loads_through_the_source_union() -> None:
    (config,) = load_sources([{"type": "synthetic", "name": "smoke", "assets": 3}])
    assert isinstance(config, SyntheticSourceConfig)
    assert isinstance(config.build(), SyntheticSource)
    with pytest.raises(SourceConfigError, match=r"sources\[0\] \('smoke'\): tags.0"):
        load_sources([{"type": "synthetic", "name": "smoke", "tags": ["bad tag"]}])


def test_rows_owed_since_the_last_poll_are_returned_evenly_spaced() -> None:
    config = SyntheticSourceConfig(assets=2, tags=("a", "b"), rows_per_s=1000, poll_interval_s=0.05)
    source = config.build()

    async def run() -> int:
        total = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        samples = []
        while loop.time() - start < 0.5:
            samples = await source.poll()
            total += len(samples)
            await asyncio.sleep(0.05)
        elapsed = loop.time() - start
        # 2 assets x 2 tags per row; the first poll owes one interval's rows.
        expected = (elapsed + 0.05) * 1000 * 4
        assert 0.8 * expected <= total <= 1.2 * expected
        stamps = sorted({s.ts_ns for s in samples})
        gaps = {b - a for a, b in itertools.pairwise(stamps)}
        assert max(gaps) - min(gaps) <= 1  # evenly spaced within a poll
        return total

    asyncio.run(run())


def test_same_seed_same_values_and_spikes_stand_out() -> None:
    async def values(seed: int, spike: float) -> list[float]:
        config = SyntheticSourceConfig(
            assets=1, tags=("a",), rows_per_s=1, seed=seed, spike_probability=spike
        )
        ticks = iter(range(10**12, 10**13, 100 * 10**9))  # a poll every 100 s
        source = SyntheticSource(config, clock_ns=lambda: next(ticks))
        out: list[float] = []
        for _ in range(3):
            out += [s.value for s in await source.poll() if s.value is not None]
        return out

    first = asyncio.run(values(7, 0.0))
    assert len(first) == 1 + 100 + 100  # the first poll owes one poll interval (1 s)
    assert first == asyncio.run(values(7, 0.0))
    assert first != asyncio.run(values(8, 0.0))
    spiky = asyncio.run(values(7, 1.0))
    # Every row spiked by 12 noise sigmas (6.0 here), noise differences aside.
    shifts = [b - a for a, b in zip(first, spiky, strict=True)]
    assert sum(shifts) / len(shifts) > 5 and min(shifts) > 2
