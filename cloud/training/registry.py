"""MLflow: log the run, register the ONNX model, alias `challenger`, promote to `champion`.

MLflow 3 semantics: no stages; aliases (`models:/NAME@champion`). `mlflow.onnx.log_model`
takes `name=`; the model is registered from the URI it returns.

Two steps, two tasks of the training DAG:

* `log_and_register` logs the run and registers its ONNX model as a new version with alias
  `challenger`. The `champion` alias is not touched.
* `promote` moves `champion` to that version only when there is no champion, or when the
  challenger scores a strictly higher F1 than the current champion **on the same evaluation
  window** (the champion is re-scored here, from its own ONNX file and threshold, with its
  own feature spec). A champion that cannot be re-scored raises `PromotionError` and the
  alias stays where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgefleet.protocols.features import FeatureSpec

from .data import Dataset
from .errors import PromotionError
from .evaluate import Evaluation, evaluate

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_MODEL_NAME",
    "ChampionScore",
    "Promotion",
    "Registration",
    "feature_reference",
    "git_sha",
    "log_and_register",
    "promote",
    "score_champion",
]

log = logging.getLogger(__name__)

CHALLENGER: Final = "challenger"
CHAMPION: Final = "champion"
DEFAULT_MODEL_NAME: Final = "edgefleet-anomaly"
DEFAULT_EXPERIMENT: Final = "edgefleet-training"
_QUANTILES: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class ChampionScore:
    version: str
    f1: float


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    run_id: str
    model_uri: str
    test_f1: float


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    champion_version: str
    previous_champion: ChampionScore | None
    reason: str


def git_sha() -> str:
    """The source tree's commit (EDGEFLEET_GIT_SHA overrides), or "unknown"."""
    if os.environ.get("EDGEFLEET_GIT_SHA"):
        return os.environ["EDGEFLEET_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def feature_reference(dataset: Dataset) -> dict[str, Any]:
    """Per-feature statistics of the training windows, the reference drift checks compare
    recent features with (PSI over the decile bins, KS over the quantiles)."""
    X = dataset.X
    features: dict[str, Any] = {}
    for index, name in enumerate(dataset.spec.feature_names()):
        column = X[:, index]
        edges = np.unique(np.quantile(column, np.linspace(0, 1, 11)))
        # A constant feature has one edge: one bin holds everything.
        counts = (np.histogram(column, bins=edges)[0] if len(edges) > 1
                  else np.array([len(column)]))
        features[name] = {
            "mean": float(column.mean()), "std": float(column.std()),
            "min": float(column.min()), "max": float(column.max()),
            "quantiles": {str(q): float(np.quantile(column, q)) for q in _QUANTILES},
            "bin_edges": edges.tolist(),
            "bin_fractions": (counts / max(1, counts.sum())).tolist(),
        }
    return {
        "feature_schema_hash": dataset.spec.schema_hash(),
        "features_spec": dataset.spec.model_dump(mode="json"),
        "windows": len(dataset),
        "data_window": [dataset.start_ns, dataset.end_ns],
        "features": features,
    }


def _plots(folder: Path, evaluation: Evaluation, y: npt.ArrayLike, scores: npt.ArrayLike,
           title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    tn, fp, fn, tp = evaluation.confusion
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.imshow([[tn, fp], [fn, tp]], cmap="Blues")
    for (row, col), value in np.ndenumerate(np.array([[tn, fp], [fn, tp]])):
        axes.text(col, row, str(value), ha="center", va="center")
    axes.set_xticks([0, 1], ["normal", "anomaly"])
    axes.set_yticks([0, 1], ["normal", "anomaly"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("labelled")
    axes.set_title(f"{title}: test confusion")
    confusion = folder / "confusion_matrix.png"
    figure.tight_layout()
    figure.savefig(confusion, dpi=100)
    plt.close(figure)

    precision, recall, _ = precision_recall_curve(y, scores)
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot(recall, precision)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    pr_auc = evaluation.overall.pr_auc
    axes.set_title(f"{title}: test PR curve (AUC {pr_auc:.3f})" if pr_auc is not None
                   else f"{title}: test PR curve")
    curve = folder / "pr_curve.png"
    figure.tight_layout()
    figure.savefig(curve, dpi=100)
    plt.close(figure)
    return [confusion, curve]


def _experiment_id(mlflow: Any, name: str, artifact_root: Path | None) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_root.absolute().as_uri() if artifact_root is not None else None
    return str(mlflow.create_experiment(name, artifact_location=location))


def score_champion(
    client: Any, model_name: str, test_for_spec: Callable[[FeatureSpec], Dataset]
) -> ChampionScore | None:
    """The current champion's F1 on the evaluation window (None when there is none)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.exceptions import MlflowException

    from edgefleet.edge_agent.inference import ModelBundle, ModelLoadError, OnnxScorer

    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
    uri = f"models:/{model_name}@{CHAMPION}"
    try:
        model = mlflow.onnx.load_model(uri)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "champion.onnx"
            onnx.save(model, path)
            bundle = ModelBundle.load(path)
    except (MlflowException, ModelLoadError, OSError) as err:
        raise PromotionError(
            f"cannot re-score the current champion {model_name} v{version.version} on the "
            f"evaluation window ({err}); the champion alias is left as it is"
        ) from err
    test = test_for_spec(bundle.features)
    scores = OnnxScorer(bundle).score(test.X)
    f1 = evaluate(test, scores, bundle.threshold).overall.f1
    return ChampionScore(str(version.version), f1)


def log_and_register(
    *,
    tracking_uri: str,
    model_name: str,
    onnx_path: Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    evaluation: Evaluation,
    test: Dataset,
    test_scores: npt.ArrayLike,
    reference: Mapping[str, Any],
    tags: Mapping[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_root: Path | None = None,
) -> Registration:
    """Log one run and register its ONNX model as a new version with alias `challenger`."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    test_f1 = evaluation.overall.f1
    experiment_id = _experiment_id(mlflow, experiment, artifact_root)
    example = np.asarray(test.X[:5], dtype=np.float32)
    model = onnx.load(onnx_path)
    with mlflow.start_run(experiment_id=experiment_id) as run, \
            tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        mlflow.set_tags(dict(tags))
        for path in _plots(folder, evaluation, test.y, test_scores, params.get("candidate", "")):
            mlflow.log_artifact(str(path), artifact_path="plots")
        (folder / "feature_reference.json").write_text(json.dumps(reference, indent=1))
        (folder / "evaluation.json").write_text(json.dumps(evaluation.as_dict(), indent=1))
        mlflow.log_artifact(str(folder / "feature_reference.json"), artifact_path="reference")
        mlflow.log_artifact(str(folder / "evaluation.json"), artifact_path="evaluation")
        signature = infer_signature(example, np.zeros(len(example), dtype=np.float32))
        info = mlflow.onnx.log_model(model, name="model", signature=signature,
                                     input_example=example, save_as_external_data=False)
        registered = mlflow.register_model(info.model_uri, model_name)
        version = str(registered.version)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        client.set_model_version_tag(model_name, version, "run_id", run.info.run_id)
        # What MLflow stored (onnx.save of this proto, no external data): the checksum an
        # agent in standalone mode and the control plane's publisher check downloads with.
        client.set_model_version_tag(model_name, version, "onnx_sha256",
                                     hashlib.sha256(model.SerializeToString()).hexdigest())
        client.set_model_version_tag(model_name, version, "test_f1", f"{test_f1:.6f}")
        client.set_registered_model_alias(model_name, CHALLENGER, version)
        log.info("registered %s v%s as %s (test F1 %.4f)", model_name, version, CHALLENGER,
                 test_f1)
        return Registration(model_name, version, run.info.run_id,
                            f"models:/{model_name}/{version}", test_f1)


def promote(
    *, tracking_uri: str, registration: Registration,
    test_for_spec: Callable[[FeatureSpec], Dataset],
) -> Promotion:
    """Move `champion` to the registered version if it beats the current champion on the
    same evaluation window (see the module docstring)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    name, version, f1 = registration.model_name, registration.version, registration.test_f1
    previous = score_champion(client, name, test_for_spec)
    if previous is not None and previous.version == version:
        return Promotion(False, version, previous, f"v{version} is already the champion")
    if previous is None:
        promoted, reason = True, "no champion yet"
    elif f1 > previous.f1:
        promoted = True
        reason = (f"F1 {f1:.4f} beats champion v{previous.version} ({previous.f1:.4f}) on "
                  "the same window")
    else:
        promoted = False
        reason = (f"F1 {f1:.4f} does not beat champion v{previous.version} "
                  f"({previous.f1:.4f}) on the same window; it stays challenger")
    if previous is not None:
        client.set_model_version_tag(name, version, "champion_f1_same_window",
                                     f"{previous.f1:.6f}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_tag(registration.run_id, "promotion", reason)
    log.info("%s v%s: %s", name, version, reason)
    champion = version if promoted else previous.version if previous else version
    return Promotion(promoted, champion, previous, reason)
