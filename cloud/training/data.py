"""Training data: a labelled history in the fog store, feature windows, a time-based split.

```
simulate_history ─► fog store `readings` (wire Batches, as an agent forwards them)
                 └► labels JSONL (LabelEvent start/end lines, as `edgefleet sim` writes)
extract          ─► aligned series per asset ─► features (protocols/features.py) + labels
split_by_time    ─► train | validation | test, by window end time
```

Contracts
---------
* **Features come from `edgefleet.protocols.features`** (`features_from_frame`), the module
  the edge agent scores with, so training and serving compute the same numbers.
* **Alignment.** One row per (asset, ts) at which every spec tag has a finite value of
  quality good or uncertain; other rows are dropped and counted (`Dataset.dropped_rows`),
  as the edge skips such samples.
* **Labels.** A window is anomalous, of kind K, when its end time lies inside an episode
  of K of its asset (`start <= ts < end`). An episode still open when the labels end
  lasts until the end of the extracted window.
* **Checks** (`check_dataset`) raise `TrainingDataError` / `FeatureSchemaError` with a
  message naming the window and the problem; nothing downstream runs on such data.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgefleet.firmware_sim.model import AssetKind, LabelEvent, Plant
from edgefleet.protocols.features import FeatureSpec, features_from_frame
from edgefleet.protocols.wire import MAX_BATCH_READINGS, Batch, Quality, Reading

from .errors import FeatureSchemaError, TrainingDataError

__all__ = [
    "DEFAULT_SPEC",
    "TRAINING_TAGS",
    "AssetFrame",
    "Dataset",
    "Episode",
    "History",
    "Split",
    "check_dataset",
    "extract",
    "featurize",
    "load_episodes",
    "simulate_history",
    "split_by_time",
    "store_time_range",
]

NS: Final = 1_000_000_000
TRAINING_TAGS: Final = ("speed", "flow", "pressure", "current", "temperature", "vibration")
# Shape stats only. Levels (mean, min, max, last) follow the shift and daily load and
# differ by machine kind, so with a time-based split they describe hours the model never
# trained on: on a 12 h, 6-asset history the best test F1 was 0.80 (logistic regression)
# with the default stats and 0.93 (random forest) with these (docs/training.md).
DEFAULT_SPEC: Final = FeatureSpec(tags=TRAINING_TAGS, window=30,
                                  stats=("std", "slope", "roc", "range"))
# Monday 2026-01-05 00:00 UTC: a fixed default start makes simulated histories repeatable.
DEFAULT_START_NS: Final = 1_767_571_200 * NS
MIN_WINDOWS: Final = 200
_WRITE_BATCHES: Final = 20  # Batches per store.write call (one transaction each)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ObjArray = npt.NDArray[np.object_]


@dataclass(frozen=True, slots=True)
class Episode:
    """One labelled anomaly episode of one asset: `[start_ns, end_ns)`."""

    asset: str
    kind: str
    start_ns: int
    end_ns: int
    tag: str | None = None


@dataclass(frozen=True)
class History:
    """What `simulate_history` wrote."""

    store_url: str
    labels_path: Path
    start_ns: int
    end_ns: int
    readings: int
    episodes: tuple[Episode, ...]


@dataclass(frozen=True)
class AssetFrame:
    """One asset's aligned series: `ts_ns [n]` and `values [n, tags]` (spec tag order)."""

    tags: tuple[str, ...]
    ts_ns: IntArray
    values: FloatArray


@dataclass(frozen=True)
class Dataset:
    """Feature windows with labels. `kinds[i]` is the episode kind, "" when normal."""

    spec: FeatureSpec
    start_ns: int
    end_ns: int
    ts_ns: IntArray
    assets: ObjArray
    X: FloatArray
    y: npt.NDArray[np.int8]
    kinds: ObjArray
    episodes: tuple[Episode, ...]
    frames: Mapping[str, AssetFrame] = field(default_factory=dict, repr=False)
    dropped_rows: int = 0
    hop: int = 1  # windows end every `hop` aligned rows of an asset

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, mask: npt.NDArray[np.bool_], start_ns: int, end_ns: int) -> Dataset:
        return Dataset(
            spec=self.spec, start_ns=start_ns, end_ns=end_ns, ts_ns=self.ts_ns[mask],
            assets=self.assets[mask], X=self.X[mask], y=self.y[mask], kinds=self.kinds[mask],
            episodes=tuple(e for e in self.episodes if start_ns <= e.start_ns < end_ns),
            frames=self.frames, dropped_rows=self.dropped_rows, hop=self.hop,
        )

    def window_text(self) -> str:
        return f"[{_iso(self.start_ns)}, {_iso(self.end_ns)})"


@dataclass(frozen=True)
class Split:
    train: Dataset
    validation: Dataset
    test: Dataset


def _iso(ts_ns: int) -> str:
    return str(np.datetime64(ts_ns, "ns").astype("datetime64[s]")) + "Z"


# --- simulation ---------------------------------------------------------------------------


def simulate_history(
    store_url: str,
    labels_path: Path,
    *,
    hours: float = 12.0,
    assets: int = 6,
    seed: int = 7,
    anomaly_rate: float = 0.15,
    interval_s: float = 1.0,
    start_ns: int = DEFAULT_START_NS,
    device: str = "sim-gateway-01",
) -> History:
    """Run the plant model for `hours` of simulated time, sampling every tag of every asset
    each `interval_s`, and write the samples to the fog store at `store_url` as one
    device's wire Batches (gap-free seqs from 0) and the label events to `labels_path`
    (JSONL, replaced). Deterministic for a given seed, start and size."""
    from edgefleet.fog_gateway.store import open_store

    if hours <= 0 or assets < 1 or interval_s <= 0:
        raise ValueError("hours and interval_s must be positive and assets at least 1")
    kinds = list(AssetKind)
    members = [(f"{kinds[i % len(kinds)].value}-{i + 1:02d}", kinds[i % len(kinds)])
               for i in range(assets)]
    events: list[LabelEvent] = []
    plant = Plant(members, seed=seed, anomaly_rate=anomaly_rate, start_ns=start_ns,
                  tick_s=interval_s, label_sink=events.append)
    step_ns = int(interval_s * NS)
    steps = int(hours * 3600 / interval_s)
    end_ns = start_ns + steps * step_ns
    store = open_store(store_url)
    written = 0
    try:
        pending: list[Batch] = []
        for batch in _batches(plant, device, steps, step_ns):
            pending.append(batch)
            if len(pending) >= _WRITE_BATCHES:
                written += store.write(pending).readings
                pending = []
        if pending:
            written += store.write(pending).readings
    finally:
        store.close()
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    with labels_path.open("w", encoding="utf-8") as handle:
        for event in events:
            handle.write(json.dumps(event.as_dict(), separators=(",", ":")) + "\n")
    return History(store_url, labels_path, start_ns, end_ns, written,
                   tuple(_pair_events(events, end_ns)))


def _batches(plant: Plant, device: str, steps: int, step_ns: int) -> Iterator[Batch]:
    good = Quality.GOOD
    seq = 0
    readings: list[Reading] = []
    start = plant.now_ns
    for step in range(steps):
        ts = start + step * step_ns
        plant.advance_to(ts)
        for name, asset in plant.assets.items():
            for tag in TRAINING_TAGS:
                readings.append(Reading(device, name, tag, ts, asset.values[tag], good, seq))
                seq += 1
        if len(readings) + len(plant.assets) * len(TRAINING_TAGS) > MAX_BATCH_READINGS:
            yield _batch(device, readings, ts)
            readings = []
    if readings:
        yield _batch(device, readings, readings[-1].ts)


def _batch(device: str, readings: list[Reading], sent_at: int) -> Batch:
    return Batch(device=device, first_seq=readings[0].seq, last_seq=readings[-1].seq,
                 readings=tuple(readings), sent_at=sent_at)


# --- labels -------------------------------------------------------------------------------


def load_episodes(path: Path, *, end_ns: int | None = None) -> tuple[Episode, ...]:
    """Episodes from a labels JSONL file (start/end `LabelEvent` lines)."""
    events: list[LabelEvent] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                events.append(LabelEvent(**json.loads(line)))
            except (ValueError, TypeError) as err:
                raise TrainingDataError(
                    f"labels {path}:{number}: not a label event ({err})"
                ) from err
    return tuple(_pair_events(events, end_ns))


def _pair_events(events: Iterable[LabelEvent], end_ns: int | None) -> list[Episode]:
    open_: dict[int, LabelEvent] = {}
    episodes: list[Episode] = []
    for event in events:
        if event.event == "start":
            open_[event.episode] = event
        elif event.event == "end" and event.episode in open_:
            start = open_.pop(event.episode)
            episodes.append(Episode(start.asset, start.kind, start.ts_ns, event.ts_ns, start.tag))
    for start in open_.values():
        episodes.append(Episode(start.asset, start.kind, start.ts_ns,
                                end_ns if end_ns is not None else 2**63 - 1, start.tag))
    return sorted(episodes, key=lambda e: (e.start_ns, e.asset))


# --- extraction ---------------------------------------------------------------------------


def extract(
    store_url: str,
    labels: Path | Sequence[Episode],
    *,
    start_ns: int,
    end_ns: int,
    spec: FeatureSpec = DEFAULT_SPEC,
    hop: int = 5,
    assets: Sequence[str] | None = None,
) -> Dataset:
    """Feature windows of every asset in the store over `[start_ns, end_ns)`, labelled."""
    if end_ns <= start_ns:
        raise TrainingDataError(
            f"empty training window [{_iso(start_ns)}, {_iso(end_ns)}): end is not after start"
        )
    rows = list(_read_rows(store_url, spec.tags, start_ns, end_ns, assets))
    seen = {row[1] for row in rows}
    absent = [tag for tag in spec.tags if tag not in seen]
    if seen and absent:
        raise FeatureSchemaError(
            f"the feature spec needs tags {', '.join(absent)}, which the store has no "
            f"readings of in [{_iso(start_ns)}, {_iso(end_ns)}) (it has {', '.join(sorted(seen))})"
        )
    frames, dropped = _align(rows, spec.tags)
    episodes = load_episodes(labels, end_ns=end_ns) if isinstance(labels, Path) else tuple(labels)
    return featurize(frames, spec, episodes, start_ns=start_ns, end_ns=end_ns, hop=hop,
                     dropped_rows=dropped)


def _read_rows(
    store_url: str, tags: Sequence[str], start_ns: int, end_ns: int,
    assets: Sequence[str] | None,
) -> Iterator[tuple[str, str, int, float | None, str]]:
    from edgefleet.fog_gateway.store import PgStore, SqliteStore, open_store

    store = open_store(store_url)
    # Only placeholders are interpolated into the SQL below; every value is a parameter.
    tag_marks = ", ".join("?" for _ in tags)
    asset_filter = f" AND asset IN ({', '.join('?' for _ in assets)})" if assets else ""
    params: list[Any] = [*tags, start_ns, end_ns, *(assets or ())]
    if isinstance(store, SqliteStore):
        store.setup()
        store.close()
        conn = sqlite3.connect(store.path)
        try:
            yield from conn.execute(
                "SELECT asset, tag, ts, value, quality FROM readings "  # noqa: S608
                f"WHERE tag IN ({tag_marks}) AND ts >= ? AND ts < ?{asset_filter}",
                params,
            )
        finally:
            conn.close()
        return
    assert isinstance(store, PgStore)
    import psycopg

    store.setup()
    store.close()
    params[len(tags)] = np.datetime64(start_ns, "ns").astype("datetime64[us]").item()
    params[len(tags) + 1] = np.datetime64(end_ns, "ns").astype("datetime64[us]").item()
    query = (
        "SELECT asset, tag, (extract(epoch FROM ts) * 1000000)::bigint * 1000, value, "  # noqa: S608
        f"quality FROM readings WHERE tag IN ({tag_marks}) "
        "AND ts >= %s::timestamp AT TIME ZONE 'UTC' "
        f"AND ts < %s::timestamp AT TIME ZONE 'UTC'{asset_filter}"
    ).replace("?", "%s")
    with psycopg.connect(store.url) as pg:
        pg.execute(f"SET search_path TO {store.schema}, public")
        yield from pg.execute(query, params)


def store_time_range(store_url: str) -> tuple[int, int] | None:
    """(oldest, newest) reading timestamps in the store, epoch ns; None when it is empty."""
    from edgefleet.fog_gateway.store import PgStore, SqliteStore, open_store

    store = open_store(store_url)
    store.setup()
    store.close()
    row: Any
    if isinstance(store, SqliteStore):
        conn = sqlite3.connect(store.path)
        try:
            row = conn.execute("SELECT min(ts), max(ts) FROM readings").fetchone()
        finally:
            conn.close()
    else:
        assert isinstance(store, PgStore)
        import psycopg

        with psycopg.connect(store.url) as pg:
            pg.execute(f"SET search_path TO {store.schema}, public")
            row = pg.execute(
                "SELECT (extract(epoch FROM min(ts)) * 1000000)::bigint * 1000, "
                "(extract(epoch FROM max(ts)) * 1000000)::bigint * 1000 FROM readings"
            ).fetchone()
    if row is None or row[0] is None:
        return None
    return int(row[0]), int(row[1])


def _align(
    rows: Sequence[tuple[str, str, int, float | None, str]], tags: Sequence[str]
) -> tuple[dict[str, AssetFrame], int]:
    """Pivot rows (any order) into one aligned frame per asset, in time order. Columnar:
    one pass per column over the rows, then numpy per asset."""
    if not rows:
        return {}, 0
    tag_index = {tag: i for i, tag in enumerate(tags)}
    asset_ids: dict[str, int] = {}
    asset_col, tag_col, ts_col, value_col, quality_col = zip(*rows, strict=True)
    asset_code = np.fromiter((asset_ids.setdefault(a, len(asset_ids)) for a in asset_col),
                             dtype=np.int64, count=len(rows))
    column = np.fromiter((tag_index[t] for t in tag_col), dtype=np.int64, count=len(rows))
    ts = np.fromiter(ts_col, dtype=np.int64, count=len(rows))
    value = np.array(value_col, dtype=np.float64)  # None -> NaN
    value[np.array(quality_col, dtype=object) == Quality.BAD.value] = np.nan
    frames: dict[str, AssetFrame] = {}
    dropped = 0
    for asset, code in sorted(asset_ids.items()):
        mine = asset_code == code
        unique_ts, row = np.unique(ts[mine], return_inverse=True)
        matrix = np.full((len(unique_ts), len(tags)), np.nan)
        matrix[row, column[mine]] = value[mine]
        complete = np.isfinite(matrix).all(axis=1)
        dropped += int((~complete).sum())
        frames[asset] = AssetFrame(tuple(tags), unique_ts[complete], matrix[complete])
    return frames, dropped


def featurize(
    frames: Mapping[str, AssetFrame],
    spec: FeatureSpec,
    episodes: Sequence[Episode],
    *,
    start_ns: int,
    end_ns: int,
    hop: int = 5,
    dropped_rows: int = 0,
) -> Dataset:
    """Feature windows (every `hop`-th) of each asset's frame with `spec`, labelled."""
    width = len(spec.feature_names())
    ts_parts: list[IntArray] = []
    x_parts: list[FloatArray] = []
    asset_parts: list[ObjArray] = []
    for asset, frame in sorted(frames.items()):
        missing = [tag for tag in spec.tags if tag not in frame.tags]
        if missing:
            raise FeatureSchemaError(
                f"the feature spec needs tags {', '.join(missing)}, which asset {asset} has "
                "no series of in this window"
            )
        series = {
            tag: (frame.ts_ns, frame.values[:, frame.tags.index(tag)]) for tag in spec.tags
        }
        ts, X = features_from_frame(spec, series, hop=hop)
        ts_parts.append(ts)
        x_parts.append(X)
        asset_parts.append(np.full(len(ts), asset, dtype=object))
    ts_all = np.concatenate(ts_parts) if ts_parts else np.empty(0, dtype=np.int64)
    X_all = np.concatenate(x_parts) if x_parts else np.empty((0, width))
    asset_all = np.concatenate(asset_parts) if asset_parts else np.empty(0, dtype=object)
    kinds = np.full(len(ts_all), "", dtype=object)
    by_asset: dict[str, list[Episode]] = {}
    for episode in episodes:
        by_asset.setdefault(episode.asset, []).append(episode)
    for asset, own in by_asset.items():
        mine = asset_all == asset
        for episode in own:
            inside = mine & (ts_all >= episode.start_ns) & (ts_all < episode.end_ns)
            kinds[inside] = episode.kind
    y = (kinds != "").astype(np.int8)
    kept = tuple(e for e in episodes if start_ns <= e.start_ns < end_ns and e.asset in frames)
    return Dataset(spec=spec, start_ns=start_ns, end_ns=end_ns, ts_ns=ts_all, assets=asset_all,
                   X=X_all, y=y, kinds=kinds, episodes=kept, frames=dict(frames),
                   dropped_rows=dropped_rows, hop=hop)


# --- split and checks ---------------------------------------------------------------------


def split_by_time(
    dataset: Dataset, fractions: tuple[float, float] = (0.6, 0.2)
) -> Split:
    """Train on the first `fractions[0]` of the window's time, validate on the next
    `fractions[1]`, test on the rest: later data never trains an earlier decision."""
    train_share, validation_share = fractions
    if train_share <= 0 or validation_share <= 0 or train_share + validation_share >= 1:
        raise ValueError("fractions must be positive and sum to less than 1")
    span = dataset.end_ns - dataset.start_ns
    cut1 = dataset.start_ns + int(span * train_share)
    cut2 = dataset.start_ns + int(span * (train_share + validation_share))
    ts = dataset.ts_ns
    return Split(
        train=dataset.subset(ts < cut1, dataset.start_ns, cut1),
        validation=dataset.subset((ts >= cut1) & (ts < cut2), cut1, cut2),
        test=dataset.subset(ts >= cut2, cut2, dataset.end_ns),
    )


def check_dataset(
    dataset: Dataset, spec: FeatureSpec, *, part: str = "training data",
    min_windows: int = MIN_WINDOWS,
) -> None:
    """Raise a clear error if `dataset` cannot train or evaluate a model for `spec`."""
    window = dataset.window_text()
    if dataset.spec.schema_hash() != spec.schema_hash():
        raise FeatureSchemaError(
            f"{part} {window}: features were computed with schema "
            f"{dataset.spec.schema_hash()[:12]} but the pipeline expects "
            f"{spec.schema_hash()[:12]} (tags {', '.join(spec.tags)}, window {spec.window}, "
            f"stats {', '.join(spec.stats)})"
        )
    width = len(spec.feature_names())
    if dataset.X.ndim != 2 or dataset.X.shape[1] != width:
        raise FeatureSchemaError(
            f"{part} {window}: {dataset.X.shape[-1]} features per window, the spec makes {width}"
        )
    count = len(dataset)
    if count == 0:
        raise TrainingDataError(
            f"{part} {window} is empty: no feature windows (no aligned readings of "
            f"{', '.join(spec.tags)} in the store for that window?)"
        )
    if count < min_windows:
        raise TrainingDataError(
            f"{part} {window} is too small: {count} feature windows, at least {min_windows} "
            "needed; widen the window"
        )
    finite = np.isfinite(dataset.X)
    if not finite.all():
        bad_columns = [spec.feature_names()[i] for i in np.flatnonzero(~finite.all(axis=0))]
        raise TrainingDataError(
            f"{part} {window}: {int((~finite).sum())} feature values are NaN or infinite "
            f"(features {', '.join(bad_columns[:5])}{' …' if len(bad_columns) > 5 else ''})"
        )
    positives = int(dataset.y.sum())
    if positives == 0 or positives == count:
        which = "normal" if positives == 0 else "anomalous"
        raise TrainingDataError(
            f"{part} {window}: labels of one class only (all {count} windows {which}); "
            "a model needs labelled anomaly episodes and normal operation"
        )
