"""Reference ONNX models: small, genuine graphs for tests, benches and the demo.

`build_zscore_model` writes a model an edge agent serves like any trained one: input
`features` (float32 `[N, F]`, F = the feature spec's width), output `score` (float32
`[N]`) = `max_j |x_j - mean_j| / std_j`, the largest absolute z-score of a row. Its
metadata (name, version, threshold, feature spec; see edge-agent/inference.py) is embedded
under the ONNX metadata key `edgefleet`, or written to the sidecar `<file>.json`.

Opset 17 by default: `ReduceMax` takes its axes as an attribute up to opset 17 and as an
input from 18 on; both are supported. The IR version is the lowest the opset allows, so
older ONNX Runtime builds on the edge load the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet.protocols.features import FeatureSpec

__all__ = ["METADATA_KEY", "build_zscore_model", "fit_zscore_model"]

METADATA_KEY: Final = "edgefleet"  # edge-agent/inference.py reads this key
MIN_OPSET: Final = 13
STD_FLOOR: Final = 1e-6


def build_zscore_model(
    path: Path,
    spec: FeatureSpec,
    *,
    means: Sequence[float],
    stds: Sequence[float],
    version: str = "zscore-1",
    name: str = "zscore",
    threshold: float = 3.0,
    sidecar: bool = False,
    opset: int = 17,
) -> Path:
    """Write the max-|z| model for `spec` to `path` (checked by onnx.checker); return it."""
    width = len(spec.feature_names())
    mean = np.asarray(means, dtype=np.float32)
    std = np.asarray(stds, dtype=np.float32)
    if mean.shape != (width,) or std.shape != (width,):
        raise ValueError(
            f"means and stds need {width} values each (the spec's features), got "
            f"{mean.shape[0] if mean.ndim else 0} and {std.shape[0] if std.ndim else 0}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError("means must be finite and stds finite and > 0")
    if not math.isfinite(threshold):
        raise ValueError("threshold must be finite")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be at least {MIN_OPSET}")

    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        helper.make_node("Abs", ["z"], ["abs_z"]),
    ]
    initializers = [numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std")]
    if opset >= 18:
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMax", ["abs_z", "axes"], ["score"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMax", ["abs_z"], ["score"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=initializers,
    )
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opset_ids,
        ir_version=helper.find_min_ir_version_for(opset_ids),
        producer_name="edgefleet.cloud.reference_models",
    )
    metadata: dict[str, Any] = {
        "name": name,
        "version": version,
        "threshold": threshold,
        "features": spec.model_dump(mode="json"),
        "score_output": "score",
        "score_sign": 1,
    }
    text = json.dumps(metadata, sort_keys=True)
    if not sidecar:
        helper.set_model_props(model, {METADATA_KEY: text})
    onnx.checker.check_model(model, full_check=True)

    path = Path(path)
    onnx.save(model, path)
    if sidecar:
        path.with_name(path.name + ".json").write_text(text + "\n", encoding="utf-8")
    return path


def fit_zscore_model(
    path: Path, spec: FeatureSpec, X: npt.ArrayLike, **kwargs: Any
) -> Path:
    """`build_zscore_model` with each feature's mean and std (floored at `STD_FLOOR`)
    taken from the feature matrix `X` ([n, F], e.g. from `features_from_frame`)."""
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"X must be a non-empty [n, F] matrix, got shape {matrix.shape}")
    means = matrix.mean(axis=0)
    stds = np.maximum(matrix.std(axis=0), STD_FLOOR)
    return build_zscore_model(
        path, spec, means=means.tolist(), stds=stds.tolist(), **kwargs
    )
