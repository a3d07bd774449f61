"""ONNX export with skl2onnx, and the two gates a model passes before it is registered.

The exported graph takes `features` (float32 `[N, F]`) and outputs `score` (float32 `[N]`,
higher = more anomalous; see candidates.py for each family's score). Its metadata (name,
version, threshold, feature spec) sits under the ONNX metadata key `edgefleet`, where the
edge agent's `ModelBundle.load` reads it; the gates load the file through that same code.

Opsets are pinned (`ONNX_OPSETS`): the default domain at 17 and `ai.onnx.ml` at 3.
skl2onnx 1.20 refuses IsolationForest below `ai.onnx.ml` 2; at 3 it loads in ONNX Runtime
1.32 and matches scikit-learn to ~2e-7. Upstream reports of IsolationForest failures at
ml opset 3 are why the parity gate checks every export anyway.

Gates (`ExportGateError` on failure, naming the model and the figures):
* **parity**: on held-out rows, `max |onnx - sklearn| <= PARITY_ABS_TOL`, or the anomaly
  labels (`score > threshold`) agree on at least `PARITY_LABEL_AGREEMENT` of the rows;
* **latency**: p99 of `OnnxScorer.score` on one row (the agent's session options, 1000
  runs, best of 3 rounds) is at most `latency_budget_us`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgefleet.protocols.features import FeatureSpec

from .candidates import FittedCandidate, anomaly_scores
from .errors import ExportGateError

__all__ = [
    "DEFAULT_LATENCY_BUDGET_US",
    "ONNX_OPSETS",
    "PARITY_ABS_TOL",
    "PARITY_LABEL_AGREEMENT",
    "ExportResult",
    "check_parity",
    "export_model",
    "to_onnx_model",
]

ONNX_OPSETS: Final = {"": 17, "ai.onnx.ml": 3}
METADATA_KEY: Final = "edgefleet"  # edge-agent/inference.py reads this key
PARITY_ABS_TOL: Final = 1e-4
PARITY_LABEL_AGREEMENT: Final = 0.999
DEFAULT_LATENCY_BUDGET_US: Final = 500.0
_LATENCY_RUNS: Final = 1000
_LATENCY_ROUNDS: Final = 3
_SKLEARN_LATENCY_RUNS: Final = 200

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: dict[str, Any]
    parity_max_abs_diff: float
    label_agreement: float
    onnx_p99_us_batch1: float
    sklearn_p99_us_batch1: float
    onnx_scores: FloatArray


def to_onnx_model(fitted: FittedCandidate, spec: FeatureSpec) -> Any:
    """The skl2onnx graph of `fitted.model`, reduced to one output `score` [N]."""
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    family = fitted.candidate.family
    model = fitted.model
    width = len(spec.feature_names())
    if family == "isolation_forest":
        return _isolation_forest_model(model, width)
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    supervised = family in ("random_forest", "logistic_regression")
    options = {id(final): {"zipmap": False}} if supervised else None
    onx = convert_sklearn(
        model, initial_types=[("features", FloatTensorType([None, width]))],
        target_opset=dict(ONNX_OPSETS), options=options,
    )
    graph = onx.graph
    outputs = [output.name for output in graph.output]
    if supervised:  # probabilities [N, 2] -> column 1
        graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64),
                                                         "edgefleet_positive"))
        graph.node.append(helper.make_node("Gather", [outputs[1], "edgefleet_positive"],
                                           ["score"], axis=1))
    else:  # decision_function [N, 1] (lower = more anomalous) -> -x as [N]
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64),
                                                         "edgefleet_flat"))
        graph.node.append(helper.make_node("Neg", [outputs[1]], ["edgefleet_negated"]))
        graph.node.append(helper.make_node("Reshape", ["edgefleet_negated", "edgefleet_flat"],
                                           ["score"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, [None]))
    return onx


def _isolation_forest_model(model: Any, width: int) -> Any:
    """IsolationForest as ONE `TreeEnsembleRegressor` whose leaves hold their path length
    (`depth + c(n_leaf) - 1`, scikit-learn's definition), summed over trees, then
    `score = 2 ** (-sum / (trees * c(max_samples))) + offset_` (= -decision_function).

    skl2onnx's converter emits ~32 nodes per tree (p50 ~1 ms at 50 trees on the dev box,
    far over the edge budget); this graph has five nodes whatever the tree count."""
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.ensemble._iforest import _average_path_length

    if model.max_features not in (1.0, width) or model.n_features_in_ != width:
        raise ExportGateError(
            f"IsolationForest with max_features={model.max_features} is not supported by "
            "the compact export; use max_features=1.0"
        )
    attrs: dict[str, Any] = {key: [] for key in (
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
        "nodes_truenodeids", "nodes_falsenodeids", "target_treeids", "target_nodeids",
        "target_ids", "target_weights")}
    for tree_id, (estimator, path_lengths, average_lengths) in enumerate(zip(
        model.estimators_, model._decision_path_lengths, model._average_path_length_per_tree,
        strict=True,
    )):
        tree = estimator.tree_
        for node in range(tree.node_count):
            leaf = tree.children_left[node] == -1
            attrs["nodes_treeids"].append(tree_id)
            attrs["nodes_nodeids"].append(node)
            attrs["nodes_featureids"].append(0 if leaf else int(tree.feature[node]))
            attrs["nodes_values"].append(0.0 if leaf else float(tree.threshold[node]))
            attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
            attrs["nodes_truenodeids"].append(0 if leaf else int(tree.children_left[node]))
            attrs["nodes_falsenodeids"].append(0 if leaf else int(tree.children_right[node]))
            if leaf:
                attrs["target_treeids"].append(tree_id)
                attrs["target_nodeids"].append(node)
                attrs["target_ids"].append(0)
                attrs["target_weights"].append(
                    float(path_lengths[node] + average_lengths[node] - 1.0))
    denominator = len(model.estimators_) * float(_average_path_length([model._max_samples])[0])
    factor = -np.log(2.0) / denominator if denominator else 0.0
    nodes = [
        helper.make_node("TreeEnsembleRegressor", ["features"], ["depths"],
                         domain="ai.onnx.ml", n_targets=1, aggregate_function="SUM", **attrs),
        helper.make_node("Mul", ["depths", "factor"], ["exponent"]),
        helper.make_node("Exp", ["exponent"], ["normality"]),
        helper.make_node("Add", ["normality", "offset"], ["shifted"]),
        helper.make_node("Reshape", ["shifted", "flat"], ["score"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([[factor]], dtype=np.float32), "factor"),
        numpy_helper.from_array(np.array([[model.offset_]], dtype=np.float32), "offset"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes, "isolation_forest",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid(domain, version) for domain, version in ONNX_OPSETS.items()]
    return helper.make_model(graph, opset_imports=opsets,
                             ir_version=helper.find_min_ir_version_for(opsets),
                             producer_name="edgefleet.cloud.training")


def export_model(
    fitted: FittedCandidate,
    spec: FeatureSpec,
    path: Path,
    X_holdout: npt.ArrayLike,
    *,
    name: str,
    version: str,
    latency_budget_us: float = DEFAULT_LATENCY_BUDGET_US,
) -> ExportResult:
    """Write the ONNX model to `path`, load it as the edge agent does, and run both gates."""
    import onnx
    from onnx import helper

    from edgefleet.edge_agent.inference import ModelBundle, ModelLoadError, OnnxScorer

    holdout = np.asarray(X_holdout, dtype=np.float64)
    onx = to_onnx_model(fitted, spec)
    metadata: dict[str, Any] = {
        "name": name,
        "version": version,
        "threshold": fitted.threshold,
        "features": spec.model_dump(mode="json"),
        "score_output": "score",
        "score_sign": 1,
    }
    helper.set_model_props(onx, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    onnx.checker.check_model(onx, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onx, path)
    label = f"model {fitted.candidate.name} ({path.name})"
    try:
        scorer = OnnxScorer(ModelBundle.load(path))
    except ModelLoadError as err:
        raise ExportGateError(f"{label}: the edge agent cannot load the export: {err}") from err

    onnx_scores = scorer.score(holdout)
    sklearn_scores = anomaly_scores(fitted.candidate.family, fitted.model, holdout)
    diff, agreement = check_parity(onnx_scores, sklearn_scores, fitted.threshold, label)

    row = holdout[:1] if len(holdout) else np.zeros((1, len(spec.feature_names())))
    for _ in range(20):  # warm up
        scorer.score(row)
    onnx_p99 = _onnx_p99_us(scorer, row)
    sklearn_p99 = _sklearn_p99_us(fitted, row)
    if onnx_p99 > latency_budget_us:
        raise ExportGateError(
            f"{label} fails the latency gate: p99 {onnx_p99:.0f} µs per batch of 1 > budget "
            f"{latency_budget_us:.0f} µs; not registered"
        )
    return ExportResult(path, metadata, diff, agreement, onnx_p99, sklearn_p99, onnx_scores)


def check_parity(
    onnx_scores: npt.ArrayLike, sklearn_scores: npt.ArrayLike, threshold: float, label: str
) -> tuple[float, float]:
    """(max |diff|, label agreement); `ExportGateError` when both are out of tolerance."""
    ours = np.asarray(onnx_scores, dtype=np.float64)
    theirs = np.asarray(sklearn_scores, dtype=np.float64)
    if ours.shape != theirs.shape:
        raise ExportGateError(f"{label}: {ours.shape} ONNX scores for {theirs.shape} rows")
    if not len(ours):
        return 0.0, 1.0
    diff = float(np.max(np.abs(ours - theirs)))
    agreement = float(np.mean((ours > threshold) == (theirs > threshold)))
    if diff > PARITY_ABS_TOL and agreement < PARITY_LABEL_AGREEMENT:
        raise ExportGateError(
            f"{label} fails the parity gate: max |onnx - sklearn| = {diff:.3g} > "
            f"{PARITY_ABS_TOL:g} and labels agree on {agreement:.4%} < "
            f"{PARITY_LABEL_AGREEMENT:.1%} of {len(ours)} held-out rows; not registered"
        )
    return diff, agreement


def _onnx_p99_us(scorer: Any, row: FloatArray) -> float:
    """p99 of `OnnxScorer.score` on one row: the best of `_LATENCY_ROUNDS` rounds, so that
    another process taking the CPU for a moment does not fail a model that is fast."""
    from edgefleet.edge_agent.inference import OnnxScorer

    best = float("inf")
    for _ in range(_LATENCY_ROUNDS):
        fresh = OnnxScorer(scorer.bundle)
        for _ in range(_LATENCY_RUNS):
            fresh.score(row)
        best = min(best, fresh.latency_us(99) or 0.0)
    return best


def _sklearn_p99_us(fitted: FittedCandidate, row: FloatArray) -> float:
    durations = np.empty(_SKLEARN_LATENCY_RUNS)
    for i in range(_SKLEARN_LATENCY_RUNS):
        started = time.perf_counter_ns()
        anomaly_scores(fitted.candidate.family, fitted.model, row)
        durations[i] = time.perf_counter_ns() - started
    return float(np.percentile(durations, 99)) / 1000.0
