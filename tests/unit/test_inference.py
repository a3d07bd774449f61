"""Edge inference against real ONNX Runtime sessions of real models, built in tmp_path by
cloud/reference_models.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet.cloud.reference_models import build_zscore_model, fit_zscore_model
from edgefleet.edge_agent.inference import (
    Inferencer,
    InferenceResult,
    ModelBundle,
    ModelLoadError,
    OnnxScorer,
    ScoringError,
)
from edgefleet.protocols.features import FeatureSpec, FeatureWindows, features_from_frame
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

T0 = 1_795_000_000_123_000_000
S = 1_000_000_000
SPEC = FeatureSpec(tags=("temp", "flow"), window=4, stats=("mean", "std", "max", "last"))
WIDTH = len(SPEC.feature_names())  # 8
MEANS = [float(i) for i in range(WIDTH)]
STDS = [0.5 + i / 4 for i in range(WIDTH)]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return build_zscore_model(tmp_path / "zscore.onnx", SPEC, means=MEANS, stds=STDS,
                              version="zscore-7", threshold=2.5)


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def metadata(**changes: object) -> str:
    fields: dict[str, object] = {"name": "zscore", "version": "side-1", "threshold": 1.5,
                                 "features": SPEC.model_dump(mode="json")}
    fields.update(changes)
    return json.dumps(fields)


def cycle(asset: str, row: int, temp: float, flow: float) -> list[Sample]:
    ts = T0 + row * S
    return [Sample(asset, "temp", ts, temp, Quality.GOOD),
            Sample(asset, "flow", ts, flow, Quality.GOOD)]


# ---- loading ------------------------------------------------------------------------------


def test_loads_embedded_metadata(model_path: Path) -> None:
    assert not sidecar_of(model_path).exists()
    bundle = ModelBundle.load(model_path)
    assert (bundle.name, bundle.version, bundle.threshold) == ("zscore", "zscore-7", 2.5)
    assert bundle.features == SPEC
    assert (bundle.input_name, bundle.score_output, bundle.score_sign) == ("features", "score", 1)
    assert bundle.model_bytes == model_path.read_bytes()
    assert ModelBundle.load(model_path, threshold=4.0).threshold == 4.0


def test_loads_sidecar_metadata_which_wins_over_embedded(tmp_path: Path, model_path: Path) -> None:
    side_only = build_zscore_model(tmp_path / "side.onnx", SPEC, means=MEANS, stds=STDS,
                                   version="side-0", sidecar=True)
    assert json.loads(sidecar_of(side_only).read_text())["version"] == "side-0"
    assert ModelBundle.load(side_only).version == "side-0"

    sidecar_of(model_path).write_text(metadata())
    bundle = ModelBundle.load(model_path)
    assert (bundle.version, bundle.threshold) == ("side-1", 1.5)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"absent\.onnx: no such file"):
        ModelBundle.load(tmp_path / "absent.onnx")


def test_garbage_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00not an onnx model\xff" * 10)
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx: not a loadable ONNX model"):
        ModelBundle.load(path)


def test_missing_metadata(tmp_path: Path) -> None:
    path = build_zscore_model(tmp_path / "bare.onnx", SPEC, means=MEANS, stds=STDS, sidecar=True)
    sidecar_of(path).unlink()
    with pytest.raises(ModelLoadError, match=r"no metadata.*bare\.onnx\.json.*'edgefleet'"):
        ModelBundle.load(path)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"threshold": "high"}, "threshold"),
        ({"score_sign": 2}, "score_sign: must be 1"),
        ({"version": "v" * 120}, "version"),
        ({"features": {"tags": ["temp"], "stats": ["median"]}}, "features.stats"),
        ({"features": {"tags": ["ml:other:score"]}}, "inference outputs"),
        ({"score_output": "label"}, "'label' is not an output"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_invalid_metadata(model_path: Path, changes: dict[str, object], problem: str) -> None:
    sidecar_of(model_path).write_text(metadata(**changes))
    with pytest.raises(ModelLoadError, match=problem):
        ModelBundle.load(model_path)


def test_input_width_must_match_the_feature_spec(model_path: Path) -> None:
    narrow = FeatureSpec(tags=("temp",), window=4, stats=("mean", "std", "max", "last"))
    sidecar_of(model_path).write_text(metadata(features=narrow.model_dump(mode="json")))
    with pytest.raises(ModelLoadError, match="takes 8 features; the feature spec makes 4"):
        ModelBundle.load(model_path)


def test_a_width_known_only_at_run_time_is_checked_by_a_probe(model_path: Path) -> None:
    model = onnx.load(model_path)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "F"
    onnx.save(model, model_path)
    narrow = FeatureSpec(tags=("temp",), window=4, stats=("mean", "std", "max", "last"))
    sidecar_of(model_path).write_text(metadata(features=narrow.model_dump(mode="json")))
    with pytest.raises(ModelLoadError, match=r"does not run on a \[1, 4\] feature row"):
        ModelBundle.load(model_path)


# ---- scoring ------------------------------------------------------------------------------


def test_scores_are_the_max_absolute_z_score(model_path: Path) -> None:
    scorer = OnnxScorer(ModelBundle.load(model_path))
    matrix = np.random.default_rng(3).normal(scale=4.0, size=(50, WIDTH))
    expected = np.max(np.abs((matrix - np.array(MEANS)) / np.array(STDS)), axis=1)
    scores = scorer.score(matrix)
    assert scores.dtype == np.float64 and scores.shape == (50,)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert scorer.calls == 1 and scorer.errors == 0
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        scorer.score(matrix[:, :3])


def test_score_sign_turns_lower_is_worse_into_higher_is_worse(model_path: Path) -> None:
    sidecar_of(model_path).write_text(metadata(score_sign=-1))
    scorer = OnnxScorer(ModelBundle.load(model_path))
    row = np.array([MEANS]) + 1.0
    assert scorer.score(row)[0] == pytest.approx(-max(1.0 / s for s in STDS), rel=1e-6)


def test_non_finite_scores_raise_and_are_counted(model_path: Path) -> None:
    scorer = OnnxScorer(ModelBundle.load(model_path))
    with pytest.raises(ScoringError, match="1 of 2 scores are not finite"):
        scorer.score(np.array([MEANS, [np.inf] * WIDTH]))
    assert (scorer.calls, scorer.errors) == (1, 1)


def test_session_runs_on_one_thread_sequentially(model_path: Path) -> None:
    scorer = OnnxScorer(ModelBundle.load(model_path))
    options = scorer.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert scorer.session.get_providers() == ["CPUExecutionProvider"]


def test_latency_percentiles(model_path: Path) -> None:
    scorer = OnnxScorer(ModelBundle.load(model_path))
    assert scorer.latency_us(50) is None
    for rows in range(1, 21):
        scorer.score(np.zeros((rows, WIDTH)))
    p50, p99 = scorer.latency_us(50), scorer.latency_us(99)
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    with pytest.raises(ValueError, match="percentile"):
        scorer.latency_us(101)


# ---- the inferencer -----------------------------------------------------------------------


def normal_rows(rows: int, seed: int) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return [(20.0 + rng.normal(scale=0.5), 3.0 + rng.normal(scale=0.1)) for _ in range(rows)]


def fitted_model(tmp_path: Path) -> Path:
    """A z-score model fitted on the training windows of normal operation."""
    rows = normal_rows(400, seed=11)
    ts = T0 + np.arange(len(rows), dtype=np.int64) * S
    series = {"temp": (ts, np.array([r[0] for r in rows])),
              "flow": (ts, np.array([r[1] for r in rows]))}
    _, matrix = features_from_frame(SPEC, series)
    return fit_zscore_model(tmp_path / "fitted.onnx", SPEC, matrix, version="fit-1",
                            threshold=6.0)


def test_spike_is_flagged_and_one_run_scores_every_asset(tmp_path: Path) -> None:
    inferencer = Inferencer.from_bundle(ModelBundle.load(fitted_model(tmp_path)))
    scorer = inferencer.scorer
    assert scorer is not None
    assets = [f"pump-{i:02d}" for i in range(5)]
    rows = normal_rows(10, seed=12)
    for row, (temp, flow) in enumerate(rows[:-1]):
        samples = [s for asset in assets for s in cycle(asset, row, temp, flow)]
        calls = scorer.calls
        results = inferencer.run(samples)
        # Rings fill after `window` cycles; from then on every cycle is one run for all.
        assert len(results) == (len(assets) if row >= SPEC.window - 1 else 0)
        assert scorer.calls == calls + (1 if results else 0)
    assert not any(result.is_anomaly for result in inferencer.run([]) + results)

    temp, flow = rows[-1]
    samples = [s for asset in assets[1:] for s in cycle(asset, 9, temp, flow)]
    samples += cycle(assets[0], 9, temp + 40.0, flow)
    results = inferencer.run(samples)
    flagged = {result.asset: result.is_anomaly for result in results}
    assert flagged == {assets[0]: True} | {asset: False for asset in assets[1:]}
    assert all(result.model_version == "fit-1" and result.ts_ns == T0 + 9 * S
               for result in results)
    assert inferencer.anomalies == 1
    assert inferencer.rows_scored == 5 * (len(rows) - SPEC.window + 1)


def test_without_a_model_run_returns_nothing_and_keeps_no_windows() -> None:
    windows = FeatureWindows(SPEC)
    inferencer = Inferencer(None, windows)
    for row in range(2 * SPEC.window):
        assert inferencer.run(cycle("pump-01", row, 1.0, 2.0)) == []
    assert windows.accepted == 0 and windows.assets_tracked == 0
    assert Inferencer(None, None).run(cycle("pump-01", 0, 1.0, 2.0)) == []


def test_assets_restrict_inference(model_path: Path) -> None:
    inferencer = Inferencer.from_bundle(ModelBundle.load(model_path), ("pump-02",))
    for row in range(SPEC.window):
        results = inferencer.run(cycle("pump-01", row, 1.0, 2.0) + cycle("pump-02", row, 1.0, 2.0))
    assert [result.asset for result in results] == ["pump-02"]


def test_to_samples_tags(model_path: Path) -> None:
    inferencer = Inferencer.from_bundle(ModelBundle.load(model_path))
    results = [InferenceResult("pump-01", T0, 3.25, True, "zscore-7"),
               InferenceResult("pump-02", T0 + 1, 0.5, False, "zscore-7")]
    samples = inferencer.to_samples(results)
    assert samples == [
        Sample("pump-01", "ml:zscore-7:score", T0, 3.25, Quality.GOOD),
        Sample("pump-01", "ml:zscore-7:is_anomaly", T0, 1.0, Quality.GOOD),
        Sample("pump-02", "ml:zscore-7:score", T0 + 1, 0.5, Quality.GOOD),
        Sample("pump-02", "ml:zscore-7:is_anomaly", T0 + 1, 0.0, Quality.GOOD),
    ]
    # Fed back in, inference readings are never features.
    inferencer.run(samples)
    assert inferencer.windows is not None and inferencer.windows.accepted == 0


def test_scoring_failures_are_counted_and_logged_once_per_episode(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inferencer = Inferencer.from_bundle(ModelBundle.load(model_path))
    scorer = inferencer.scorer
    assert scorer is not None
    with caplog.at_level(logging.INFO, logger="edgefleet.edge_agent.inference"):
        values = [1.0] * SPEC.window + [1e308] * 3 + [1.0] * (SPEC.window + 1)
        for row, value in enumerate(values):
            results = inferencer.run(cycle("pump-01", row, value, 2.0))
    # A window holding 1e308 overflows its mean: its score is not finite.
    assert scorer.errors == inferencer.failed_runs == 3 + SPEC.window - 1
    assert len(results) == 1 and np.isfinite(results[0].score)
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "go unscored" in m]) == 1
    assert len([m for m in messages if "scoring again" in m]) == 1
