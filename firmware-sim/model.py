"""A process model of plant assets, with labelled anomaly episodes.

Each asset is a motor-driven machine (centrifugal pump, air compressor, conveyor drive)
with six physically coupled tags that every kind shares by name:

| tag | pump | compressor | conveyor |
|---|---|---|---|
| `speed` | shaft speed, rpm | shaft speed, rpm | belt drive speed, rpm |
| `flow` | m³/h delivered | m³/min free air | t/h carried |
| `pressure` | discharge, bar | receiver, bar | belt tension, kN |
| `current` | motor current, A | motor current, A | motor current, A |
| `temperature` | bearing, °C | discharge air, °C | gearbox, °C |
| `vibration` | RMS velocity, mm/s | RMS velocity, mm/s | RMS velocity, mm/s |

Load follows three 8-hour shifts (with a dip at each handover), a daily cycle and a quieter
weekend; speed tracks load through the drive, and flow, pressure, current, temperature and
vibration follow from speed and load through simple laws (affinity laws for the pump,
a load/unload cycle for the compressor, friction plus payload for the conveyor), with
first-order thermal lag and Gaussian sensor noise.

Anomaly episodes start at random (a Poisson process per asset) so that each asset spends
on average `anomaly_rate` of its time in one, and each has a ground-truth `LabelEvent`
at its start and its end:

- `bearing_wear`: vibration and temperature rise slowly over the episode;
- `cavitation` (pumps; compressors and conveyors get `overload` instead): pressure drops,
  flow oscillates, vibration gets broadband noise;
- `overload`: current and temperature rise, speed sags;
- `stuck_sensor`, `spikes`, `drift`: one tag's *sensor* misbehaves (frozen, random spikes,
  a growing offset) while the process itself is healthy.

Determinism: the model advances in fixed ticks of simulated time, each asset drawing
from its own generator seeded from (seed, asset index), so the same scenario and seed
give the same values and labels however often, and whenever, the model is read.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "TAGS",
    "AnomalyKind",
    "Asset",
    "AssetKind",
    "LabelEvent",
    "Plant",
    "TagSpec",
]

NS = 1_000_000_000


class AssetKind(enum.StrEnum):
    PUMP = "pump"
    COMPRESSOR = "compressor"
    CONVEYOR = "conveyor"


class AnomalyKind(enum.IntEnum):
    """Ground-truth labels. The integer is what status points carry (0 = normal)."""

    NONE = 0
    BEARING_WEAR = 1
    CAVITATION = 2
    OVERLOAD = 3
    STUCK_SENSOR = 4
    SPIKES = 5
    DRIFT = 6

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def is_sensor_fault(self) -> bool:
        return self in (AnomalyKind.STUCK_SENSOR, AnomalyKind.SPIKES, AnomalyKind.DRIFT)


@dataclass(frozen=True)
class TagSpec:
    """A tag's name, unit and engineering range (the range scaled-int16 encodings use)."""

    name: str
    unit: str
    low: float
    high: float


_TAG_NAMES = ("speed", "flow", "pressure", "current", "temperature", "vibration")
TAGS: dict[AssetKind, tuple[TagSpec, ...]] = {
    AssetKind.PUMP: (
        TagSpec("speed", "rpm", 0, 3600), TagSpec("flow", "m3/h", 0, 400),
        TagSpec("pressure", "bar", 0, 16), TagSpec("current", "A", 0, 200),
        TagSpec("temperature", "degC", -20, 150), TagSpec("vibration", "mm/s", 0, 50),
    ),
    AssetKind.COMPRESSOR: (
        TagSpec("speed", "rpm", 0, 3600), TagSpec("flow", "m3/min", 0, 40),
        TagSpec("pressure", "bar", 0, 16), TagSpec("current", "A", 0, 300),
        TagSpec("temperature", "degC", -20, 150), TagSpec("vibration", "mm/s", 0, 50),
    ),
    AssetKind.CONVEYOR: (
        TagSpec("speed", "rpm", 0, 1800), TagSpec("flow", "t/h", 0, 1200),
        TagSpec("pressure", "kN", 0, 100), TagSpec("current", "A", 0, 150),
        TagSpec("temperature", "degC", -20, 150), TagSpec("vibration", "mm/s", 0, 50),
    ),
}

# Mean episode length in simulated seconds, by kind.
_MEAN_DURATION_S: dict[AnomalyKind, float] = {
    AnomalyKind.BEARING_WEAR: 900.0,
    AnomalyKind.CAVITATION: 300.0,
    AnomalyKind.OVERLOAD: 300.0,
    AnomalyKind.STUCK_SENSOR: 300.0,
    AnomalyKind.SPIKES: 240.0,
    AnomalyKind.DRIFT: 600.0,
}
_AMBIENT_C = 22.0
_THERMAL_TAU_S = 120.0  # first-order lag of temperatures


@dataclass(frozen=True)
class LabelEvent:
    """The start or end of an anomaly episode: the ground truth models are scored on."""

    event: str  # "start" | "end"
    episode: int  # per-plant episode number, shared by its start and end
    asset: str
    kind: str  # AnomalyKind label, e.g. "bearing_wear"
    tag: str | None  # the faulty sensor for sensor faults, else None
    ts_ns: int

    def as_dict(self) -> dict[str, object]:
        return {
            "event": self.event, "episode": self.episode, "asset": self.asset,
            "kind": self.kind, "tag": self.tag, "ts_ns": self.ts_ns,
        }


@dataclass
class _Episode:
    number: int
    kind: AnomalyKind
    start_ns: int
    end_ns: int
    tag: str | None = None
    frozen_value: float | None = None

    def progress(self, now_ns: int) -> float:
        span = max(1, self.end_ns - self.start_ns)
        return min(1.0, max(0.0, (now_ns - self.start_ns) / span))


@dataclass
class Asset:
    """One machine: its kind, its generator, its process state and current tag values."""

    name: str
    kind: AssetKind
    rng: random.Random
    rated_speed: float
    values: dict[str, float] = field(default_factory=dict)
    temperature_c: float = _AMBIENT_C + 20
    episode: _Episode | None = None
    next_episode_ns: int = 0

    @property
    def status(self) -> AnomalyKind:
        return self.episode.kind if self.episode else AnomalyKind.NONE

    @property
    def tags(self) -> tuple[TagSpec, ...]:
        return TAGS[self.kind]


def load_factor(ts_ns: int) -> float:
    """Plant demand in [0.2, 1]: three shifts, a daily cycle, handover dips, weekends."""
    seconds = ts_ns / NS
    day_s = seconds % 86_400
    weekday = int(seconds // 86_400 + 3) % 7  # 1970-01-01 was a Thursday; 5, 6 = weekend
    daily = 0.75 + 0.15 * math.sin(2 * math.pi * (day_s - 6 * 3600) / 86_400)
    since_handover = day_s % (8 * 3600)  # shifts change at 00:00, 08:00, 16:00
    if since_handover < 900:  # a 15-minute dip while crews hand over
        daily *= 0.6 + 0.4 * since_handover / 900
    if weekday >= 5:
        daily *= 0.6
    return min(1.0, max(0.2, daily))


class Plant:
    """The simulated plant: advance it in time, then read tag values and status.

    `advance_to(ts_ns)` runs whole ticks of `tick_s` simulated seconds up to `ts_ns`;
    `label_sink`, if given, receives every `LabelEvent` as it happens, and the last
    `label_history` events are kept in `labels`.
    """

    def __init__(
        self,
        assets: list[tuple[str, AssetKind]],
        *,
        seed: int = 7,
        anomaly_rate: float = 0.05,
        start_ns: int,
        tick_s: float = 0.1,
        noise: float = 1.0,
        label_sink: Callable[[LabelEvent], None] | None = None,
        label_history: int = 10_000,
    ) -> None:
        if not 0 <= anomaly_rate < 1:
            raise ValueError(f"anomaly_rate must be in [0, 1), got {anomaly_rate}")
        if tick_s <= 0:
            raise ValueError(f"tick_s must be positive, got {tick_s}")
        names = [name for name, _ in assets]
        if len(set(names)) != len(names):
            raise ValueError("asset names must be unique")
        self.anomaly_rate = anomaly_rate
        self.tick_ns = int(tick_s * NS)
        self.noise = noise
        self.now_ns = start_ns
        self.label_sink = label_sink
        self.labels: deque[LabelEvent] = deque(maxlen=label_history)
        self._episodes = 0
        self.assets: dict[str, Asset] = {}
        for index, (name, kind) in enumerate(assets):
            rng = random.Random(f"{seed}:{index}:{name}")
            rated = {AssetKind.CONVEYOR: 1480.0}.get(kind, 2960.0) * rng.uniform(0.97, 1.03)
            asset = Asset(name, kind, rng, rated)
            asset.next_episode_ns = start_ns + self._gap_ns(asset)
            self.assets[name] = asset
            self._compute(asset)

    # ---- time ---------------------------------------------------------------------------

    def advance_to(self, ts_ns: int) -> None:
        """Advance the model by whole ticks until `now_ns` reaches `ts_ns` (never back)."""
        while self.now_ns + self.tick_ns <= ts_ns:
            self.now_ns += self.tick_ns
            for asset in self.assets.values():
                self._schedule(asset)
                self._compute(asset)

    def values(self, asset: str) -> dict[str, float]:
        return dict(self.assets[asset].values)

    def status(self, asset: str) -> AnomalyKind:
        return self.assets[asset].status

    # ---- episodes -----------------------------------------------------------------------

    def _gap_ns(self, asset: Asset) -> int:
        """Time to the next episode, so that episodes cover `anomaly_rate` of the time."""
        if self.anomaly_rate == 0:
            return 2**62
        mean_duration = sum(_MEAN_DURATION_S.values()) / len(_MEAN_DURATION_S)
        mean_gap = mean_duration * (1 - self.anomaly_rate) / self.anomaly_rate
        return int(asset.rng.expovariate(1 / mean_gap) * NS)

    def _emit(self, event: LabelEvent) -> None:
        self.labels.append(event)
        if self.label_sink is not None:
            self.label_sink(event)

    def _schedule(self, asset: Asset) -> None:
        now = self.now_ns
        episode = asset.episode
        if episode is not None and now >= episode.end_ns:
            self._emit(LabelEvent("end", episode.number, asset.name, episode.kind.label,
                                  episode.tag, now))
            asset.episode = None
            asset.next_episode_ns = now + self._gap_ns(asset)
        if asset.episode is None and now >= asset.next_episode_ns:
            kinds = [k for k in _MEAN_DURATION_S
                     if k != AnomalyKind.CAVITATION or asset.kind == AssetKind.PUMP]
            kind = asset.rng.choice(kinds)
            duration_s = _MEAN_DURATION_S[kind] * asset.rng.uniform(0.5, 1.5)
            tag = asset.rng.choice(_TAG_NAMES) if kind.is_sensor_fault else None
            self._episodes += 1
            asset.episode = _Episode(self._episodes, kind, now, now + int(duration_s * NS), tag,
                                     asset.values.get(tag) if tag else None)
            self._emit(LabelEvent("start", self._episodes, asset.name, kind.label, tag, now))

    # ---- physics ------------------------------------------------------------------------

    def _compute(self, asset: Asset) -> None:
        rng = asset.rng
        load = load_factor(self.now_ns)
        episode = asset.episode
        kind = episode.kind if episode else AnomalyKind.NONE
        p = episode.progress(self.now_ns) if episode else 0.0
        t_s = self.now_ns / NS

        # Speed tracks demand through the drive; an overload makes it sag.
        speed = asset.rated_speed * (0.55 + 0.45 * load)
        if kind == AnomalyKind.OVERLOAD:
            speed *= 1 - 0.06 * p
        n = speed / asset.rated_speed  # per-unit speed

        if asset.kind == AssetKind.PUMP:
            flow = 320 * n * (0.7 + 0.3 * load)  # affinity law: Q ~ n
            pressure = 10.5 * n * n - 2.0 * (flow / 320) ** 2  # H ~ n^2 minus system loss
            power = flow * pressure / 36 / 0.72  # kW, hydraulic power over efficiency
        elif asset.kind == AssetKind.COMPRESSOR:
            # Load/unload cycle of the receiver: a slow sawtooth whose duty follows demand.
            phase = (t_s / 90.0) % 1.0
            loaded = phase < 0.35 + 0.6 * load
            flow = (28 * n) if loaded else 2.0
            pressure = 7.0 + (0.8 * phase if loaded else 0.8 * (1 - phase))
            power = (flow * pressure * 0.55 + 18) if loaded else 22.0
        else:
            flow = 950 * load * n
            pressure = 20 + 55 * load  # belt tension grows with payload
            power = 6 + 0.045 * flow + 4 * n

        current = power * 1000 / (math.sqrt(3) * 400 * 0.86)  # 400 V three-phase, cos phi
        vibration = 1.2 + 1.6 * n * n + 0.4 * load

        if kind == AnomalyKind.CAVITATION:
            pressure *= 1 - 0.25 * min(1.0, 4 * p)
            flow *= 1 + 0.15 * math.sin(2 * math.pi * 0.5 * t_s) * min(1.0, 4 * p)
            vibration += abs(rng.gauss(0, 2.5))
        elif kind == AnomalyKind.OVERLOAD:
            current *= 1 + 0.45 * min(1.0, 3 * p)
        elif kind == AnomalyKind.BEARING_WEAR:
            vibration *= 1 + 2.0 * p

        # Temperature: first-order lag towards a steady state set by losses and wear.
        steady = _AMBIENT_C + 0.22 * current + (25 * p if kind == AnomalyKind.BEARING_WEAR else 0)
        if kind == AnomalyKind.OVERLOAD:
            steady += 20 * p
        alpha = 1 - math.exp(-self.tick_ns / NS / _THERMAL_TAU_S)
        asset.temperature_c += alpha * (steady - asset.temperature_c)

        true_values = {
            "speed": speed, "flow": flow, "pressure": pressure, "current": current,
            "temperature": asset.temperature_c, "vibration": vibration,
        }
        noise_sd = {"speed": 3.0, "flow": 0.01 * max(flow, 1), "pressure": 0.03, "current": 0.4,
                    "temperature": 0.15, "vibration": 0.05}
        values = {
            tag: value + rng.gauss(0, noise_sd[tag] * self.noise)
            for tag, value in true_values.items()
        }
        if episode is not None and episode.tag is not None:
            tag = episode.tag
            if kind == AnomalyKind.STUCK_SENSOR:
                if episode.frozen_value is None:
                    episode.frozen_value = values[tag]
                values[tag] = episode.frozen_value
            elif kind == AnomalyKind.SPIKES and rng.random() < 0.05:
                values[tag] += rng.choice((-1, 1)) * 6 * max(abs(true_values[tag]), 1) * 0.1
            elif kind == AnomalyKind.DRIFT:
                values[tag] += 0.25 * p * max(abs(true_values[tag]), 1)
        # Physical floors: nothing here goes negative.
        asset.values = {tag: max(0.0, value) if tag != "temperature" else value
                        for tag, value in values.items()}
