"""Feature windows: the spec, the stats against hand-computed values, and exact parity
between the edge's streaming windows and training's batch windows."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from edgefleet.protocols.features import (
    STATS,
    FeatureSpec,
    FeatureWindows,
    features_from_frame,
    series_features,
    window_features,
)
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

T0 = 1_795_000_000_123_000_000
S = 1_000_000_000  # ns per second


def cycle(asset: str, tags: dict[str, float], ts_ns: int,
          quality: Quality = Quality.GOOD) -> list[Sample]:
    return [Sample(asset, tag, ts_ns, value, quality) for tag, value in tags.items()]


# ---- spec ---------------------------------------------------------------------------------


def test_spec_defaults_and_feature_names_are_tag_major() -> None:
    spec = FeatureSpec(tags=("temp", "flow"), stats=("mean", "max"))
    assert spec.window == 30
    assert spec.feature_names() == ["temp:mean", "temp:max", "flow:mean", "flow:max"]
    assert FeatureSpec(tags=("a",)).stats == ("mean", "std", "min", "max", "slope", "roc", "last")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tags": ("a",), "stats": ("mean", "median")}, "stats"),
        ({"tags": ("a",), "stats": ("mean", "mean")}, "stats"),
        ({"tags": ("a", "b", "a")}, "tags"),
        ({"tags": ()}, "tags"),
        ({"tags": ("bad tag",)}, "tags"),
        ({"tags": ("a",), "window": 1}, "window"),
        ({"tags": ("a",), "window": 4097}, "window"),
        ({"tags": ("a",), "windw": 5}, "windw"),
    ],
)
def test_invalid_specs_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FeatureSpec.model_validate(fields)


def test_unknown_stat_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown stats 'median'; known: mean, std"):
        FeatureSpec(tags=("a",), stats=("median",))


def test_schema_hash_is_stable_and_follows_every_field() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=10, stats=("mean", "slope"))
    again = FeatureSpec.model_validate_json(spec.model_dump_json())
    assert spec.schema_hash() == again.schema_hash()
    assert len(spec.schema_hash()) == 64 and int(spec.schema_hash(), 16) >= 0
    changed = [
        FeatureSpec(tags=("a", "b"), window=11, stats=("mean", "slope")),
        FeatureSpec(tags=("b", "a"), window=10, stats=("mean", "slope")),
        FeatureSpec(tags=("a", "b"), window=10, stats=("slope", "mean")),
        FeatureSpec(tags=("a", "b", "c"), window=10, stats=("mean", "slope")),
        FeatureSpec(tags=("a", "b"), window=10, stats=("mean", "slope", "rms")),
    ]
    hashes = {spec.schema_hash()} | {other.schema_hash() for other in changed}
    assert len(hashes) == len(changed) + 1


# ---- stats --------------------------------------------------------------------------------


def test_stats_match_hand_computed_values() -> None:
    ts = np.array([T0, T0 + 1 * S, T0 + 2 * S, T0 + 4 * S], dtype=np.int64)
    values = np.array([1.0, 3.0, 2.0, 6.0])
    got = dict(zip(STATS, series_features(ts, values, STATS).tolist(), strict=True))
    # mean 12/4; deviations -2, 0, -1, 3; t = 0, 1, 2, 4 s (mean 1.75);
    # slope = Σ(t-t̄)(v-v̄) / Σ(t-t̄)² = 10 / 8.75; roc = (6 - 1) / (4 s - 0 s).
    expected = {
        "mean": 3.0,
        "std": math.sqrt(14 / 4),
        "min": 1.0,
        "max": 6.0,
        "slope": 10 / 8.75,
        "roc": 5 / 4,
        "last": 6.0,
        "range": 5.0,
        "rms": math.sqrt((1 + 9 + 4 + 36) / 4),
    }
    assert got == pytest.approx(expected, rel=0, abs=1e-12)


def test_slope_and_roc_are_zero_for_a_zero_time_span() -> None:
    ts = np.full(3, T0, dtype=np.int64)
    assert series_features(ts, [1.0, 5.0, 2.0], ("slope", "roc")).tolist() == [0.0, 0.0]


def test_window_features_concatenates_tags_in_spec_order() -> None:
    spec = FeatureSpec(tags=("b", "a"), window=3, stats=("mean", "last"))
    ts = np.array([T0, T0 + S, T0 + 2 * S], dtype=np.int64)
    features = window_features(spec, {"a": ts, "b": ts}, {"a": [1.0, 2.0, 3.0], "b": [4, 5, 9]})
    assert features.tolist() == [6.0, 9.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="3 timestamps and values per tag"):
        window_features(spec, {"a": ts[:2], "b": ts[:2]}, {"a": [1.0, 2.0], "b": [4.0, 5.0]})
    with pytest.raises(ValueError, match="'a'"):
        window_features(spec, {"b": ts}, {"b": [4.0, 5.0, 9.0]})


# ---- streaming ----------------------------------------------------------------------------


def history(
    rows: int, tags: tuple[str, ...], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Aligned per-tag histories with jittered timestamps and values of mixed scales."""
    rng = np.random.default_rng(seed)
    series = {}
    for index, tag in enumerate(tags):
        ts = T0 + np.cumsum(rng.integers(S // 20, S // 5, size=rows)) + index * 1_000
        values = rng.normal(loc=10.0**index, scale=3.0**index, size=rows)
        series[tag] = (ts.astype(np.int64), values)
    return series


def test_streaming_windows_equal_training_windows_exactly() -> None:
    spec = FeatureSpec(tags=("temp", "flow", "vibration"), window=8, stats=STATS)
    rows = 60
    by_asset = {"pump-01": history(rows, spec.tags, seed=1),
                "pump-02": history(rows, spec.tags, seed=2)}
    windows = FeatureWindows(spec)
    streamed: dict[str, list[tuple[int, np.ndarray]]] = {asset: [] for asset in by_asset}
    for row in range(rows):
        samples = []
        for asset, series in by_asset.items():
            # Tags arrive in a different order every cycle; some values are uncertain.
            order = spec.tags[row % 3:] + spec.tags[:row % 3]
            quality = Quality.UNCERTAIN if row % 7 == 0 else Quality.GOOD
            samples += [Sample(asset, tag, int(series[tag][0][row]), float(series[tag][1][row]),
                               quality) for tag in order]
        samples.append(Sample("pump-01", "not-a-feature", T0, 1.0, Quality.GOOD))
        for window in windows.add(samples):
            streamed[window.asset].append((window.ts_ns, window.features))

    for asset, series in by_asset.items():
        ts, matrix = features_from_frame(spec, series)
        assert matrix.shape == (rows - spec.window + 1, len(spec.feature_names()))
        assert [end for end, _ in streamed[asset]] == ts.tolist()
        assert np.array_equal(np.stack([features for _, features in streamed[asset]]), matrix)
        # hop picks every hop-th of the same windows, starting with the first full one.
        hop_ts, hop_matrix = features_from_frame(spec, series, hop=5)
        assert np.array_equal(hop_matrix, matrix[::5]) and np.array_equal(hop_ts, ts[::5])
    assert windows.uncertain > 0 and windows.ignored == rows


def test_window_ends_at_the_latest_newest_timestamp_of_its_tags() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=2, stats=("last",))
    windows = FeatureWindows(spec)
    windows.add(cycle("m", {"a": 1.0, "b": 2.0}, T0))
    (window,) = windows.add([Sample("m", "a", T0 + 5, 3.0, Quality.GOOD),
                             Sample("m", "b", T0 + 9, 4.0, Quality.GOOD)])
    assert window.ts_ns == T0 + 9
    assert window.features.tolist() == [3.0, 4.0]


def test_at_most_one_window_per_asset_per_call() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=3, stats=("mean", "last"))
    windows = FeatureWindows(spec)
    samples = []
    for row in range(6):  # six rows of two assets in one call
        samples += cycle("m1", {"a": row, "b": 10 * row}, T0 + row * S)
        samples += cycle("m2", {"a": -row, "b": 5.0}, T0 + row * S)
    emitted = windows.add(samples)
    assert [window.asset for window in emitted] == ["m1", "m2"]
    # The window is the last `window` values: rows 3, 4, 5.
    assert emitted[0].features.tolist() == [4.0, 5.0, 40.0, 50.0]
    assert windows.windows_emitted == 2


def test_a_window_needs_a_new_sample_of_every_tag_in_the_call() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=2, stats=("last",))
    windows = FeatureWindows(spec)
    assert windows.add(cycle("m", {"a": 1.0, "b": 1.0}, T0)) == []  # rings not full yet
    assert len(windows.add(cycle("m", {"a": 2.0, "b": 2.0}, T0 + S))) == 1
    assert windows.add(cycle("m", {"a": 3.0}, T0 + 2 * S)) == []  # b has nothing new
    assert windows.add(cycle("m", {"b": 3.0}, T0 + 2 * S)) == []  # a's was last call
    (window,) = windows.add(cycle("m", {"a": 4.0, "b": 4.0}, T0 + 3 * S))
    assert window.features.tolist() == [4.0, 4.0]


def test_bad_missing_and_non_finite_values_are_skipped_and_counted() -> None:
    spec = FeatureSpec(tags=("a",), window=2, stats=("mean",))
    windows = FeatureWindows(spec)
    emitted = windows.add([
        Sample("m", "a", T0, 1.0, Quality.GOOD),
        Sample("m", "a", T0 + 1, None, Quality.UNCERTAIN),
        Sample("m", "a", T0 + 2, 50.0, Quality.BAD),
        Sample("m", "a", T0 + 3, math.nan, Quality.GOOD),
        Sample("m", "a", T0 + 4, 3.0, Quality.UNCERTAIN),
    ])
    assert windows.skipped == 3
    assert (windows.accepted, windows.uncertain) == (2, 1)
    assert windows.buffered("m") == {"a": 2}
    (window,) = emitted
    assert window.features.tolist() == [2.0]  # mean of 1.0 and 3.0 only


def test_rings_stay_bounded_by_the_window() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=16)
    windows = FeatureWindows(spec)
    for row in range(100 * spec.window):
        windows.add(cycle("m", {"a": float(row), "b": -float(row)}, T0 + row * S))
    assert windows.buffered("m") == {"a": 16, "b": 16}
    assert windows.accepted == 2 * 100 * spec.window


def test_max_assets_bounds_the_assets_tracked(caplog: pytest.LogCaptureFixture) -> None:
    spec = FeatureSpec(tags=("a",), window=2, stats=("last",))
    windows = FeatureWindows(spec, max_assets=2)
    with caplog.at_level(logging.WARNING, logger="edgefleet.protocols.features"):
        for row in range(3):
            emitted = windows.add(
                [Sample(f"m{i}", "a", T0 + row, float(row), Quality.GOOD) for i in range(4)]
            )
    assert windows.assets_tracked == 2
    assert sorted(window.asset for window in emitted) == ["m0", "m1"]
    assert windows.assets_refused == 2 * 3  # m2 and m3, three cycles
    assert windows.buffered("m2") == {}
    assert len([r for r in caplog.records if "max_assets" in r.getMessage()]) == 1


def test_asset_filter_ignores_other_assets() -> None:
    spec = FeatureSpec(tags=("a",), window=2, stats=("last",))
    windows = FeatureWindows(spec, assets=frozenset({"m1"}))
    for row in range(2):
        emitted = windows.add(cycle("m1", {"a": 1.0}, T0 + row) + cycle("m2", {"a": 1.0}, T0 + row))
    assert [window.asset for window in emitted] == ["m1"]
    assert windows.ignored == 2 and windows.assets_tracked == 1


# ---- training frames ----------------------------------------------------------------------


def test_features_from_frame_checks_its_input() -> None:
    spec = FeatureSpec(tags=("a", "b"), window=4, stats=("mean",))
    ts = np.arange(3, dtype=np.int64) + T0
    ts_empty, empty = features_from_frame(spec, {"a": (ts, [1.0, 2, 3]), "b": (ts, [1.0, 2, 3])})
    assert ts_empty.shape == (0,) and empty.shape == (0, 2)
    with pytest.raises(ValueError, match="same length"):
        features_from_frame(spec, {"a": (ts, [1.0, 2, 3]), "b": (ts[:2], [1.0, 2])})
    with pytest.raises(ValueError, match="'b'"):
        features_from_frame(spec, {"a": (ts, [1.0, 2, 3])})
    with pytest.raises(ValueError, match="finite"):
        features_from_frame(spec, {"a": (ts, [1.0, math.nan, 3]), "b": (ts, [1.0, 2, 3])})
    with pytest.raises(ValueError, match="hop"):
        features_from_frame(spec, {"a": (ts, [1.0, 2, 3]), "b": (ts, [1.0, 2, 3])}, hop=0)
