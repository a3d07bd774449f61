"""The training pipeline's steps as plain functions over in-memory objects:

```
extract_step ─► train_step ─► evaluate_step ─► export_step ─► register_step ─► promote_step
 (store+labels)  (candidates,   (test window,    (ONNX, parity    (MLflow run,      (champion
  checks, split)  val F1 pick)   per kind)        + latency gates)  challenger)       if better)
```

`tasks.py` wraps each step as a task of the training DAG (and of `edgefleet train`, which
runs the same tasks inline). Every check runs before anything is written to MLflow, so bad
input (an empty or tiny window, one class, NaNs, a feature-schema mismatch) or a failed
gate leaves the registry, and the `champion` alias, as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.protocols.features import FeatureSpec

from .candidates import FAMILIES, FittedCandidate, anomaly_scores, candidate_grid, fit_candidates
from .data import (
    DEFAULT_SPEC,
    MIN_WINDOWS,
    Dataset,
    Episode,
    Split,
    check_dataset,
    extract,
    featurize,
    split_by_time,
)
from .evaluate import Evaluation, evaluate, flat_metrics
from .export import DEFAULT_LATENCY_BUDGET_US, ExportResult, export_model
from .registry import (
    DEFAULT_EXPERIMENT,
    Promotion,
    Registration,
    feature_reference,
    git_sha,
    log_and_register,
    promote,
)

__all__ = [
    "TrainResult",
    "evaluate_step",
    "export_step",
    "extract_step",
    "promote_step",
    "register_step",
    "train_step",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    champion: FittedCandidate
    candidates: list[FittedCandidate]
    train_seconds: float


def extract_step(
    store_url: str, labels: Path | Sequence[Episode], *, start_ns: int, end_ns: int,
    spec: FeatureSpec = DEFAULT_SPEC, hop: int = 5, min_windows: int = MIN_WINDOWS,
) -> Split:
    """Features and labels of `[start_ns, end_ns)` from the store, checked and split."""
    dataset = extract(store_url, labels, start_ns=start_ns, end_ns=end_ns, spec=spec, hop=hop)
    return check_split(split_by_time(dataset), spec, min_windows=min_windows)


def check_split(split: Split, spec: FeatureSpec, *, min_windows: int = MIN_WINDOWS) -> Split:
    check_dataset(split.train, spec, part="training part", min_windows=min_windows)
    check_dataset(split.validation, spec, part="validation part",
                  min_windows=max(1, min_windows // 4))
    check_dataset(split.test, spec, part="test part", min_windows=max(1, min_windows // 4))
    return split


def train_step(
    split: Split, spec: FeatureSpec = DEFAULT_SPEC, *, families: Sequence[str] = FAMILIES,
    seed: int = 7, min_windows: int = MIN_WINDOWS,
) -> TrainResult:
    """Fit every candidate; the best validation F1 is the run's champion candidate."""
    check_split(split, spec, min_windows=min_windows)
    started = time.perf_counter()
    fitted = fit_candidates(split, candidate_grid(families), seed=seed)
    return TrainResult(fitted[0], fitted, time.perf_counter() - started)


def evaluate_step(trained: TrainResult, split: Split) -> tuple[Evaluation, np.ndarray[Any, Any]]:
    """The chosen candidate on the held-out test window, and its scores there."""
    champion = trained.champion
    scores = anomaly_scores(champion.candidate.family, champion.model, split.test.X)
    return evaluate(split.test, scores, champion.threshold), scores


def export_step(
    trained: TrainResult, split: Split, path: Path, *, name: str, version: str,
    spec: FeatureSpec = DEFAULT_SPEC,
    latency_budget_us: float = DEFAULT_LATENCY_BUDGET_US,
) -> ExportResult:
    return export_model(trained.champion, spec, path, split.test.X, name=name, version=version,
                        latency_budget_us=latency_budget_us)


def register_step(
    *, tracking_uri: str, model_name: str, split: Split, trained: TrainResult,
    evaluation: Evaluation, exported: ExportResult, test_scores: np.ndarray[Any, Any],
    spec: FeatureSpec = DEFAULT_SPEC, experiment: str = DEFAULT_EXPERIMENT,
    artifact_root: Path | None = None,
) -> Registration:
    champion = trained.champion
    full_start, full_end = split.train.start_ns, split.test.end_ns
    params: dict[str, Any] = {
        "candidate": champion.candidate.name,
        "family": champion.candidate.family,
        **{f"model_{k}": v for k, v in champion.candidate.params},
        "threshold": champion.threshold,
        "features_window": spec.window,
        "features_tags": ",".join(spec.tags),
        "features_stats": ",".join(spec.stats),
        "train_windows": len(split.train),
        "validation_windows": len(split.validation),
        "test_windows": len(split.test),
        "candidates_tried": len(trained.candidates),
    }
    metrics = {
        **flat_metrics(evaluation, "test"),
        "validation_f1": champion.validation_f1,
        "parity_max_abs_diff": exported.parity_max_abs_diff,
        "parity_label_agreement": exported.label_agreement,
        "onnx_p99_us_batch1": exported.onnx_p99_us_batch1,
        "sklearn_p99_us_batch1": exported.sklearn_p99_us_batch1,
        "train_seconds": trained.train_seconds,
        **{f"validation_f1_{f.candidate.name}": f.validation_f1 for f in trained.candidates},
    }
    tags = {
        "data_window": f"{_iso(full_start)}/{_iso(full_end)}",
        "data_window_start_ns": str(full_start),
        "data_window_end_ns": str(full_end),
        "eval_window": f"{_iso(split.test.start_ns)}/{_iso(split.test.end_ns)}",
        "git_sha": git_sha(),
        "feature_schema_hash": spec.schema_hash(),
        "model_family": champion.candidate.family,
        "onnx_version": str(exported.metadata["version"]),
    }
    return log_and_register(
        tracking_uri=tracking_uri, model_name=model_name, onnx_path=exported.path,
        params=params, metrics=metrics, evaluation=evaluation, test=split.test,
        test_scores=test_scores, reference=feature_reference(split.train), tags=tags,
        experiment=experiment, artifact_root=artifact_root,
    )


def promote_step(*, tracking_uri: str, registration: Registration, split: Split) -> Promotion:
    """`champion` moves to the new version only if it beats the current champion on this
    run's test window, re-featurized with the champion's own spec when that differs."""
    test = split.test

    def test_for_spec(other: FeatureSpec) -> Dataset:
        if other.schema_hash() == test.spec.schema_hash():
            return test
        whole = featurize(test.frames, other, test.episodes, start_ns=test.start_ns,
                          end_ns=test.end_ns, hop=test.hop)
        return whole.subset(whole.ts_ns >= test.start_ns, test.start_ns, test.end_ns)

    return promote(tracking_uri=tracking_uri, registration=registration,
                   test_for_spec=test_for_spec)


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
