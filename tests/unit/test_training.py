"""The training pipeline's steps on a small simulated history (seconds, not minutes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.training.candidates import (
    Candidate,
    FittedCandidate,
    anomaly_scores,
    candidate_grid,
)
from edgefleet.cloud.training.data import (
    DEFAULT_SPEC,
    Dataset,
    Episode,
    History,
    check_dataset,
    extract,
    featurize,
    simulate_history,
    split_by_time,
)
from edgefleet.cloud.training.errors import (
    ExportGateError,
    FeatureSchemaError,
    TrainingDataError,
)
from edgefleet.cloud.training.evaluate import best_threshold, evaluate
from edgefleet.cloud.training.export import check_parity, export_model
from edgefleet.edge_agent.inference import ModelBundle, OnnxScorer
from edgefleet.protocols.features import FeatureSpec, FeatureWindows
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

NS = 1_000_000_000


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    folder = tmp_path_factory.mktemp("history")
    return simulate_history(f"sqlite://{folder / 'fog.db'}", folder / "labels.jsonl",
                            hours=1.5, assets=3, seed=3, anomaly_rate=0.3)


@pytest.fixture(scope="module")
def dataset(history: History) -> Dataset:
    return extract(history.store_url, history.labels_path, start_ns=history.start_ns,
                   end_ns=history.end_ns, hop=3)


def test_simulated_history_lands_in_the_store_with_its_labels(history: History) -> None:
    assert history.readings == int(1.5 * 3600) * 3 * 6  # every tag of every asset, each second
    assert history.episodes and history.labels_path.read_text().count('"start"') >= len(
        [e for e in history.episodes if e.end_ns <= history.end_ns])
    assert {e.asset for e in history.episodes} <= {"pump-01", "compressor-02", "conveyor-03"}


def test_windows_are_labelled_by_the_episode_they_end_in(dataset: Dataset) -> None:
    assert len(dataset) > 1000 and 0 < dataset.y.mean() < 1
    for index in np.flatnonzero(dataset.y)[::50]:
        ts, asset = int(dataset.ts_ns[index]), dataset.assets[index]
        owners = [e for e in dataset.episodes
                  if e.asset == asset and e.start_ns <= ts < e.end_ns]
        assert [e.kind for e in owners] == [dataset.kinds[index]]
    assert set(dataset.kinds[dataset.y == 0]) == {""}


def test_training_features_equal_the_edge_agents_windows(dataset: Dataset) -> None:
    """The agent's streaming FeatureWindows, fed the same rows one cycle per call, emits
    exactly the training features (the one shared feature module)."""
    asset = "pump-01"
    frame = dataset.frames[asset]
    windows = FeatureWindows(DEFAULT_SPEC)
    emitted = {}
    for row in range(200):
        samples = [Sample(asset, tag, int(frame.ts_ns[row]), float(frame.values[row, i]),
                          Quality.GOOD) for i, tag in enumerate(frame.tags)]
        for window in windows.add(samples):
            emitted[window.ts_ns] = window.features
    mine = dataset.assets == asset
    checked = 0
    for ts, features in zip(dataset.ts_ns[mine], dataset.X[mine], strict=True):
        if int(ts) in emitted:
            np.testing.assert_array_equal(features, emitted[int(ts)])
            checked += 1
    assert checked > 40


def test_split_is_by_time(dataset: Dataset) -> None:
    split = split_by_time(dataset)
    assert split.train.ts_ns.max() < split.validation.ts_ns.min()
    assert split.validation.ts_ns.max() < split.test.ts_ns.min()
    assert len(split.train) + len(split.validation) + len(split.test) == len(dataset)


# --- bad input: each raises a clear error -------------------------------------------------


def test_empty_window_is_refused(history: History) -> None:
    later = history.end_ns + 3600 * NS
    empty = extract(history.store_url, history.labels_path, start_ns=later,
                    end_ns=later + 3600 * NS)
    with pytest.raises(TrainingDataError, match="is empty"):
        check_dataset(empty, DEFAULT_SPEC)
    with pytest.raises(TrainingDataError, match="end is not after start"):
        extract(history.store_url, history.labels_path, start_ns=later, end_ns=later)


def test_too_small_window_is_refused(history: History) -> None:
    small = extract(history.store_url, history.labels_path, start_ns=history.start_ns,
                    end_ns=history.start_ns + 120 * NS)
    with pytest.raises(TrainingDataError, match="too small"):
        check_dataset(small, DEFAULT_SPEC)


def test_labels_of_one_class_are_refused(dataset: Dataset) -> None:
    unlabelled = featurize(dataset.frames, DEFAULT_SPEC, [], start_ns=dataset.start_ns,
                           end_ns=dataset.end_ns, hop=3)
    with pytest.raises(TrainingDataError, match="one class only"):
        check_dataset(unlabelled, DEFAULT_SPEC)


def test_nan_features_are_refused(dataset: Dataset) -> None:
    X = dataset.X.copy()
    X[5, 2] = np.nan
    with pytest.raises(TrainingDataError, match=r"NaN or infinite \(features speed:roc"):
        check_dataset(dataclasses.replace(dataset, X=X), DEFAULT_SPEC)


def test_feature_schema_mismatch_is_refused(dataset: Dataset) -> None:
    other = FeatureSpec(tags=DEFAULT_SPEC.tags, window=20)
    with pytest.raises(FeatureSchemaError, match="schema"):
        check_dataset(dataset, other)
    narrower = dataclasses.replace(dataset, X=dataset.X[:, :-1])
    with pytest.raises(FeatureSchemaError, match="23 features per window"):
        check_dataset(narrower, DEFAULT_SPEC)


# --- evaluation ---------------------------------------------------------------------------


def test_best_threshold_separates_and_survives_float32() -> None:
    threshold, f1 = best_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert f1 == 1.0 and 0.2 < threshold < 0.8


def test_evaluate_reports_kinds_and_detection_delay() -> None:
    ts = np.arange(10, dtype=np.int64) * NS
    kinds = np.array(["", "", "a", "a", "a", "", "b", "b", "", ""], dtype=object)
    dataset = Dataset(
        spec=DEFAULT_SPEC, start_ns=0, end_ns=10 * NS, ts_ns=ts,
        assets=np.full(10, "m", dtype=object), X=np.zeros((10, 24)),
        y=(kinds != "").astype(np.int8), kinds=kinds,
        episodes=(Episode("m", "a", 2 * NS, 5 * NS), Episode("m", "b", 6 * NS, 8 * NS)),
    )
    scores = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 1.0])
    result = evaluate(dataset, scores, 0.5)
    assert result.confusion == (4, 1, 3, 2)
    assert result.per_kind["a"].recall == pytest.approx(2 / 3)
    assert result.per_kind["a"].mean_delay_s == 1.0  # detected one window after the start
    assert result.per_kind["b"].detected == 0 and result.overall.episodes == 2
    assert result.overall.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 3))


# --- export -------------------------------------------------------------------------------


def _fitted(family: str) -> tuple[FittedCandidate, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1500, 24))
    y = (rng.random(1500) < 0.2).astype(np.int8)
    X[y == 1] += 1.5
    candidate = next(c for c in candidate_grid([family]))
    model = candidate.build(7)
    model.fit(X[:1000], y[:1000]) if candidate.supervised else model.fit(X[:1000][y[:1000] == 0])
    threshold, f1 = best_threshold(y[1000:], anomaly_scores(family, model, X[1000:]))
    return FittedCandidate(candidate, model, threshold, f1, 0.0), X[1000:], y[1000:]


@pytest.mark.parametrize(
    "family", ["isolation_forest", "random_forest", "logistic_regression", "one_class_svm"]
)
def test_export_loads_and_scores_in_the_edge_agents_scorer(tmp_path: Path, family: str) -> None:
    fitted, X, _ = _fitted(family)
    # The latency gate has its own test; a busy test machine must not fail this one.
    result = export_model(fitted, DEFAULT_SPEC, tmp_path / "m.onnx", X, name="plant",
                          version="v-1", latency_budget_us=1e6)
    scorer = OnnxScorer(ModelBundle.load(result.path))  # exactly what the agent does
    assert scorer.threshold == pytest.approx(fitted.threshold)
    assert scorer.bundle.features == DEFAULT_SPEC
    scores = scorer.score(X)
    np.testing.assert_allclose(scores, anomaly_scores(family, fitted.model, X), atol=1e-4)
    assert result.parity_max_abs_diff <= 1e-4 and result.label_agreement >= 0.999
    assert result.onnx_p99_us_batch1 > 0


def test_isolation_forest_export_is_one_tree_ensemble(tmp_path: Path) -> None:
    import onnx

    fitted, X, _ = _fitted("isolation_forest")
    path = export_model(fitted, DEFAULT_SPEC, tmp_path / "if.onnx", X, name="p",
                        version="v").path
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("TreeEnsembleRegressor") == 1 and len(ops) == 5
    assert {o.domain: o.version for o in onnx.load(path).opset_import} == {
        "": 17, "ai.onnx.ml": 3}


def test_a_model_over_the_latency_budget_is_refused(tmp_path: Path) -> None:
    fitted, X, _ = _fitted("logistic_regression")
    with pytest.raises(ExportGateError, match=r"latency gate.*not registered"):
        export_model(fitted, DEFAULT_SPEC, tmp_path / "m.onnx", X, name="p", version="v",
                     latency_budget_us=0.001)


def test_parity_gate() -> None:
    scores = np.linspace(0, 1, 2000)
    assert check_parity(scores + 5e-5, scores, 0.5, "m")[0] <= 1e-4
    # Off by more than the tolerance, but on the same side of the threshold: labels agree.
    assert check_parity(scores * 0.999, scores, 2.0, "m")[1] == 1.0
    with pytest.raises(ExportGateError, match="parity gate"):
        check_parity(1 - scores, scores, 0.5, "m")


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown candidate families"):
        candidate_grid(["gradient_boosting"])
    with pytest.raises(ValueError, match="unknown candidate family"):
        Candidate("nope", ()).build(1)
