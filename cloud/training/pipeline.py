"""The training pipeline as plain task functions, run inline by `edgefleet train` and, later,
by the Airflow DAG (one task each):

```
extract_step ─► train_step ─► evaluate_step ─► export_step ─► register_step
 (store+labels)  (candidates,   (test window,    (ONNX, parity    (MLflow run, version,
  checks, split)  val F1 pick)   per kind)        + latency gates)  challenger/champion)
```

Every check runs before anything is written to MLflow, so bad input (an empty or tiny
window, one class, NaNs, a feature-schema mismatch) or a failed gate leaves the registry,
and the `champion` alias, as they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    DEFAULT_MODEL_NAME,
    Registration,
    feature_reference,
    git_sha,
    log_and_register,
)

__all__ = [
    "PipelineResult",
    "TrainResult",
    "evaluate_step",
    "export_step",
    "extract_step",
    "register_step",
    "run_pipeline",
    "train_step",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    champion: FittedCandidate
    candidates: list[FittedCandidate]
    train_seconds: float


@dataclass(frozen=True)
class PipelineResult:
    split: Split
    trained: TrainResult
    evaluation: Evaluation
    exported: ExportResult
    registration: Registration | None
    timings: dict[str, float] = field(default_factory=dict)


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
    test = split.test

    def test_for_spec(other: FeatureSpec) -> Dataset:
        if other.schema_hash() == test.spec.schema_hash():
            return test
        whole = featurize(test.frames, other, test.episodes, start_ns=test.start_ns,
                          end_ns=test.end_ns, hop=test.hop)
        return whole.subset(whole.ts_ns >= test.start_ns, test.start_ns, test.end_ns)

    return log_and_register(
        tracking_uri=tracking_uri, model_name=model_name, onnx_path=exported.path,
        params=params, metrics=metrics, evaluation=evaluation, test=test,
        test_scores=test_scores, reference=feature_reference(split.train), tags=tags,
        test_for_spec=test_for_spec, experiment=experiment, artifact_root=artifact_root,
    )


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_pipeline(
    *, store_url: str, labels: Path | Sequence[Episode], start_ns: int, end_ns: int,
    workdir: Path, tracking_uri: str | None, model_name: str = DEFAULT_MODEL_NAME,
    spec: FeatureSpec = DEFAULT_SPEC, hop: int = 5, families: Sequence[str] = FAMILIES,
    seed: int = 7, latency_budget_us: float = DEFAULT_LATENCY_BUDGET_US,
    experiment: str = DEFAULT_EXPERIMENT, artifact_root: Path | None = None,
    min_windows: int = MIN_WINDOWS,
) -> PipelineResult:
    """Every step in order; `tracking_uri=None` stops after the gates (nothing registered)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    split = extract_step(store_url, labels, start_ns=start_ns, end_ns=end_ns, spec=spec,
                         hop=hop, min_windows=min_windows)
    timings["extract_s"] = time.perf_counter() - started
    trained = train_step(split, spec, families=families, seed=seed, min_windows=min_windows)
    timings["train_s"] = trained.train_seconds
    evaluation, scores = evaluate_step(trained, split)
    version = f"{trained.champion.candidate.family}-{_stamp()}"
    started = time.perf_counter()
    exported = export_step(trained, split, workdir / f"{version}.onnx", name=model_name,
                           version=version, spec=spec, latency_budget_us=latency_budget_us)
    timings["export_s"] = time.perf_counter() - started
    registration = None
    if tracking_uri is not None:
        started = time.perf_counter()
        registration = register_step(
            tracking_uri=tracking_uri, model_name=model_name, split=split, trained=trained,
            evaluation=evaluation, exported=exported, test_scores=scores, spec=spec,
            experiment=experiment, artifact_root=artifact_root,
        )
        timings["register_s"] = time.perf_counter() - started
    return PipelineResult(split, trained, evaluation, exported, registration, timings)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
