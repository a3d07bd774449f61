"""Rolling feature windows: the one feature definition shared by edge inference and training.

A **window** is, for one asset, the last `spec.window` accepted values of every tag in
`spec.tags`, each with its timestamp, in arrival order. Its **features** are, for each tag
in `spec.tags` order and each stat in `spec.stats` order, one number
(`FeatureSpec.feature_names()`: `"<tag>:<stat>"`, tag-major).

Stats of one tag's series `v` (float64) at times `t` (seconds relative to the first value):

| stat    | definition |
|---------|------------|
| `mean`  | arithmetic mean |
| `std`   | population standard deviation (ddof 0) |
| `min`, `max`, `last`, `range` | as named; `range` is `max - min` |
| `rms`   | root mean square |
| `slope` | least-squares slope of `v` against `t`, per second; 0 when every `t` is equal |
| `roc`   | rate of change `(v[-1] - v[0]) / (t[-1] - t[0])`, per second; 0 for a zero span |

Contracts
---------
* **Parity.** The edge (`FeatureWindows`, streaming) and training (`features_from_frame`,
  batch) both compute features with `window_features`, which calls `series_features`, on
  the same int64 timestamps and float64 values; the results are bit-identical (each
  window's reductions run over its own contiguous row, whatever the batch around it).
  `FeatureSpec.schema_hash()` goes into model manifests so both sides agree on the spec.
* **When a window is emitted.** `FeatureWindows.add(samples)` takes one poll cycle's
  samples and then emits at most one window per asset: for an asset that received, in
  this call, at least one usable sample of *every* spec tag and whose every tag ring
  holds `window` values. Its timestamp is the latest of the tags' newest timestamps.
* **Usable samples.** A sample of a spec tag, for a tracked asset, with a finite value
  and quality good or uncertain. Samples with no value, a non-finite value or quality
  bad are counted in `skipped`; samples of other tags or of filtered-out assets are
  counted in `ignored`; neither changes any ring.
* **Bounded memory.** At most `max_assets` assets are tracked, each with two
  `deque(maxlen=window)` per spec tag (timestamps and values). Samples of assets beyond
  that bound are refused and counted in `assets_refused` (a warning is logged once).
  A value near the float64 limits can make a feature inf or nan; the scorer reports it.
* **Cost.** Per sample: two dict lookups, a few comparisons and two deque appends, no
  numpy (0.4–0.9 µs on the 2-core dev box). numpy runs once per call, over every window
  that call emits; a window costs O(tags × window) on top (~25 µs for 6 tags × 30 there),
  and there is at most one per asset per call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Annotated, Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .source import NAME_PATTERN, Sample
from .wire import Quality

__all__ = [
    "FEATURES_VERSION",
    "STATS",
    "FeatureSpec",
    "FeatureWindows",
    "Window",
    "features_from_frame",
    "series_features",
    "window_features",
]

log = logging.getLogger(__name__)

# Bumped whenever a stat's definition changes, so older models' schema hashes stop matching.
FEATURES_VERSION: Final = 1
STATS: Final = ("mean", "std", "min", "max", "slope", "roc", "last", "range", "rms")
DEFAULT_STATS: Final = ("mean", "std", "min", "max", "slope", "roc", "last")
_NS_PER_S: Final = 1e9
# features_from_frame computes this many values per tag per chunk at most (bounds memory).
_FRAME_CHUNK_VALUES: Final = 1 << 20

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class FeatureSpec(BaseModel):
    """Which tags, how many samples per tag and which stats make a model's feature vector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(min_length=1)
    window: int = Field(default=30, ge=2, le=4096)
    stats: tuple[str, ...] = Field(default=DEFAULT_STATS, min_length=1)

    @field_validator("tags")
    @classmethod
    def _unique_tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({tag for tag in value if value.count(tag) > 1})
        if repeated:
            raise ValueError(f"tags must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("stats")
    @classmethod
    def _known_stats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [stat for stat in value if stat not in STATS]
        if unknown:
            raise ValueError(
                f"unknown stats {', '.join(map(repr, unknown))}; known: {', '.join(STATS)}"
            )
        repeated = sorted({stat for stat in value if value.count(stat) > 1})
        if repeated:
            raise ValueError(f"stats must be unique; repeated: {', '.join(repeated)}")
        return value

    def feature_names(self) -> list[str]:
        return [f"{tag}:{stat}" for tag in self.tags for stat in self.stats]

    def schema_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of the spec and `FEATURES_VERSION`."""
        canonical = json.dumps(
            {
                "features_version": FEATURES_VERSION,
                "stats": list(self.stats),
                "tags": list(self.tags),
                "window": self.window,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def series_features(
    ts_ns: npt.ArrayLike, values: npt.ArrayLike, stats: Sequence[str]
) -> FloatArray:
    """The `stats` of one tag's window: `ts_ns` (int64 ns) and `values` (float64) of shape
    `[..., n]`, n ≥ 2; returns shape `[..., len(stats)]`. Leading axes are independent
    windows (a batch, or several tags): each result depends only on its own row, so one
    call over many rows costs one round of numpy calls instead of one per row."""
    ts = np.asarray(ts_ns, dtype=np.int64)
    v = np.ascontiguousarray(values, dtype=np.float64)
    if ts.shape != v.shape or v.ndim == 0 or v.shape[-1] < 2:
        raise ValueError(
            f"ts_ns and values must have the same shape [..., n >= 2]; got {ts.shape}, {v.shape}"
        )
    # Values near the float64 limits overflow to inf/nan features instead of warning: a
    # non-finite feature is reported where it is used (the scorer's ScoringError).
    with np.errstate(over="ignore", invalid="ignore"):
        return _stats(ts, v, stats)


def _stats(ts: IntArray, v: FloatArray, stats: Sequence[str]) -> FloatArray:
    count = v.shape[-1]
    mean = np.add.reduce(v, axis=-1) / count
    deviation = v - mean[..., None]
    # Relative times: the int64 difference is exact, where epoch ns in float64 are not.
    t = (ts - ts[..., :1]).astype(np.float64) / _NS_PER_S
    columns: list[FloatArray] = []
    for stat in stats:
        if stat == "mean":
            columns.append(mean)
        elif stat == "std":
            columns.append(np.sqrt(np.add.reduce(deviation * deviation, axis=-1) / count))
        elif stat == "min":
            columns.append(np.minimum.reduce(v, axis=-1))
        elif stat == "max":
            columns.append(np.maximum.reduce(v, axis=-1))
        elif stat == "range":
            columns.append(np.maximum.reduce(v, axis=-1) - np.minimum.reduce(v, axis=-1))
        elif stat == "last":
            columns.append(v[..., -1])
        elif stat == "rms":
            columns.append(np.sqrt(np.add.reduce(v * v, axis=-1) / count))
        elif stat == "slope":
            t_centred = t - (np.add.reduce(t, axis=-1) / count)[..., None]
            denominator = np.add.reduce(t_centred * t_centred, axis=-1)
            numerator = np.add.reduce(t_centred * deviation, axis=-1)
            columns.append(_divide_or_zero(numerator, denominator))
        elif stat == "roc":
            columns.append(_divide_or_zero(v[..., -1] - v[..., 0], t[..., -1] - t[..., 0]))
        else:
            raise ValueError(f"unknown stat {stat!r}; known: {', '.join(STATS)}")
    return np.stack(columns, axis=-1)


def _divide_or_zero(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    out = np.zeros(np.shape(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def window_features(
    spec: FeatureSpec, ts_by_tag: Mapping[str, npt.ArrayLike],
    values_by_tag: Mapping[str, npt.ArrayLike],
) -> FloatArray:
    """The feature vector of one window (`[spec.window]` arrays per tag → `[F]`), or of a
    batch of windows (`[n, spec.window]` per tag → `[n, F]`), in `feature_names()` order.
    The one function both the edge and training call."""
    missing = [tag for tag in spec.tags if tag not in ts_by_tag or tag not in values_by_tag]
    if missing:
        raise ValueError(f"window has no series for tags {', '.join(map(repr, missing))}")
    # Tags stacked on axis -2: one series_features call for every tag of every window.
    ts = np.stack([np.asarray(ts_by_tag[tag], dtype=np.int64) for tag in spec.tags], axis=-2)
    values = np.stack(
        [np.asarray(values_by_tag[tag], dtype=np.float64) for tag in spec.tags], axis=-2
    )
    if values.shape[-1] != spec.window or ts.shape != values.shape:
        raise ValueError(
            f"a window holds {spec.window} timestamps and values per tag; got shapes "
            f"{ts.shape[:-2] + ts.shape[-1:]} and {values.shape[:-2] + values.shape[-1:]}"
        )
    features = series_features(ts, values, spec.stats)  # [..., tags, stats]
    return features.reshape(*features.shape[:-2], len(spec.tags) * len(spec.stats))


@dataclass(frozen=True, slots=True)
class Window:
    """One asset's feature vector at `ts_ns` (the latest of its tags' newest timestamps)."""

    asset: str
    ts_ns: int
    features: FloatArray


class _AssetRings:
    """The rings of one asset, indexed by the tag's position in the spec."""

    __slots__ = ("fresh", "ts", "values")

    def __init__(self, tags: int, window: int) -> None:
        self.ts: list[deque[int]] = [deque(maxlen=window) for _ in range(tags)]
        self.values: list[deque[float]] = [deque(maxlen=window) for _ in range(tags)]
        self.fresh = 0  # bit i set: tag i received a usable sample in the current call


class FeatureWindows:
    """Streaming feature windows per asset (see the module's contracts).

    `assets` restricts tracking to these assets (default: any asset, up to `max_assets`).
    """

    def __init__(
        self, spec: FeatureSpec, *, max_assets: int = 10_000,
        assets: frozenset[str] | None = None,
    ) -> None:
        if max_assets < 1:
            raise ValueError("max_assets must be at least 1")
        self.spec = spec
        self.max_assets = max_assets
        self.allowed_assets = assets
        self.accepted = 0  # usable samples taken into a ring (good or uncertain)
        self.uncertain = 0  # of those, quality uncertain
        self.skipped = 0  # spec tag, tracked asset, but no value / non-finite / bad
        self.ignored = 0  # not a spec tag, or an asset outside `assets`
        self.assets_refused = 0  # samples refused: their asset is new and max_assets reached
        self.windows_emitted = 0
        self._tag_index = {tag: index for index, tag in enumerate(spec.tags)}
        self._all_fresh = (1 << len(spec.tags)) - 1
        self._rings: dict[str, _AssetRings] = {}
        self._refusal_logged = False

    @property
    def assets_tracked(self) -> int:
        return len(self._rings)

    def buffered(self, asset: str) -> dict[str, int]:
        """How many values each tag's ring holds for `asset` (empty if not tracked)."""
        rings = self._rings.get(asset)
        if rings is None:
            return {}
        return {tag: len(rings.values[index]) for tag, index in self._tag_index.items()}

    def add(self, samples: Iterable[Sample]) -> list[Window]:
        """Take one poll cycle's samples; return the windows this call completes, at most
        one per asset, in the order their assets first received a sample in this call."""
        tag_index = self._tag_index
        rings_by_asset = self._rings
        allowed = self.allowed_assets
        bad = Quality.BAD
        uncertain = Quality.UNCERTAIN
        isfinite = math.isfinite
        touched: list[_AssetRings] = []
        touched_assets: list[str] = []
        accepted = uncertain_count = skipped = ignored = 0
        try:
            for sample in samples:
                index = tag_index.get(sample.tag)
                if index is None:
                    ignored += 1
                    continue
                asset = sample.asset
                rings = rings_by_asset.get(asset)
                if rings is None:
                    if allowed is not None and asset not in allowed:
                        ignored += 1
                        continue
                    rings = self._track(asset)
                    if rings is None:
                        continue
                value = sample.value
                quality = sample.quality
                if value is None or quality is bad or not isfinite(value):
                    skipped += 1
                    continue
                if quality is uncertain:
                    uncertain_count += 1
                accepted += 1
                rings.ts[index].append(sample.ts_ns)
                rings.values[index].append(value)
                if not rings.fresh:
                    touched.append(rings)
                    touched_assets.append(asset)
                rings.fresh |= 1 << index
        except BaseException:
            # A malformed sample must not leave stale marks: the asset would never emit.
            for rings in touched:
                rings.fresh = 0
            raise
        finally:
            self.accepted += accepted
            self.uncertain += uncertain_count
            self.skipped += skipped
            self.ignored += ignored
        return self._emit(touched, touched_assets)

    def _track(self, asset: str) -> _AssetRings | None:
        if len(self._rings) >= self.max_assets:
            self.assets_refused += 1
            if not self._refusal_logged:
                self._refusal_logged = True
                log.warning(
                    "feature windows: tracking %d assets already (max_assets); asset %r and "
                    "any further new asset are not scored", self.max_assets, asset,
                )
            return None
        rings = _AssetRings(len(self.spec.tags), self.spec.window)
        self._rings[asset] = rings
        return rings

    def _emit(self, touched: list[_AssetRings], assets: list[str]) -> list[Window]:
        window = self.spec.window
        ready: list[tuple[str, _AssetRings]] = []
        for asset, rings in zip(assets, touched, strict=True):
            complete = rings.fresh == self._all_fresh
            rings.fresh = 0
            if complete and all(len(ring) == window for ring in rings.values):
                ready.append((asset, rings))
        if not ready:
            return []
        # Every ring of every ready asset in one pass each: [asset, tag, window] arrays.
        shape = (len(ready), len(self.spec.tags), window)
        count = shape[0] * shape[1] * shape[2]
        ts_rings = [ring for _, rings in ready for ring in rings.ts]
        value_rings = [ring for _, rings in ready for ring in rings.values]
        ts = np.fromiter(chain.from_iterable(ts_rings), dtype=np.int64, count=count)
        values = np.fromiter(chain.from_iterable(value_rings), dtype=np.float64, count=count)
        ts = ts.reshape(shape)
        values = values.reshape(shape)
        features = window_features(
            self.spec,
            {tag: ts[:, index] for tag, index in self._tag_index.items()},
            {tag: values[:, index] for tag, index in self._tag_index.items()},
        )
        ends = ts[:, :, -1].max(axis=1).tolist()
        self.windows_emitted += len(ready)
        return [
            Window(asset, end, features[row])
            for row, ((asset, _), end) in enumerate(zip(ready, ends, strict=True))
        ]


def features_from_frame(
    spec: FeatureSpec, asset_series: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    hop: int = 1,
) -> tuple[IntArray, FloatArray]:
    """Training's side of parity: every window of one asset's history.

    `asset_series` maps each spec tag to its full history `(ts_ns, values)`, aligned: the
    same length for every tag, row i being poll cycle i, every value finite (drop or fill
    gaps first; the edge skips missing values, so a gap would shift its windows). Returns
    `(ts_ns [m], X [m, F])` for the windows ending at rows `window-1, window-1+hop, …`,
    exactly what `FeatureWindows.add` emits when fed those rows one cycle per call.
    """
    if hop < 1:
        raise ValueError("hop must be at least 1")
    history: dict[str, tuple[IntArray, FloatArray]] = {}
    for tag in spec.tags:
        if tag not in asset_series:
            raise ValueError(f"asset_series has no history for tag {tag!r}")
        ts, values = asset_series[tag]
        ts_array = np.asarray(ts, dtype=np.int64)
        values_array = np.asarray(values, dtype=np.float64)
        if ts_array.ndim != 1 or ts_array.shape != values_array.shape:
            raise ValueError(f"tag {tag!r}: ts_ns and values must be 1-D and of equal length")
        if not np.isfinite(values_array).all():
            raise ValueError(f"tag {tag!r}: values must be finite (drop or fill gaps first)")
        history[tag] = (ts_array, values_array)
    lengths = {len(ts) for ts, _ in history.values()}
    if len(lengths) != 1:
        raise ValueError(f"every tag's history must have the same length; got {sorted(lengths)}")
    rows = lengths.pop()
    width = len(spec.tags) * len(spec.stats)
    if rows < spec.window:
        return np.empty(0, dtype=np.int64), np.empty((0, width), dtype=np.float64)

    ends = np.arange(spec.window - 1, rows, hop)
    window_ts = np.max([ts[ends] for ts, _ in history.values()], axis=0)
    # Window k covers rows [ends[k] - window + 1, ends[k]]: row ends[k] - window + 1 of
    # sliding_window_view. Chunks bound the copy to _FRAME_CHUNK_VALUES values per tag.
    starts = ends - (spec.window - 1)
    chunk = max(1, _FRAME_CHUNK_VALUES // spec.window)
    parts: list[FloatArray] = []
    for first in range(0, len(starts), chunk):
        picked = starts[first:first + chunk]
        ts_by_tag = {
            tag: np.ascontiguousarray(sliding_window_view(ts, spec.window)[picked])
            for tag, (ts, _) in history.items()
        }
        values_by_tag = {
            tag: np.ascontiguousarray(sliding_window_view(values, spec.window)[picked])
            for tag, (_, values) in history.items()
        }
        parts.append(window_features(spec, ts_by_tag, values_by_tag))
    return window_ts.astype(np.int64), np.concatenate(parts, axis=0)
