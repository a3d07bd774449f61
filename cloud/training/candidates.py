"""Candidate models and their small grids; the winner is chosen by validation F1.

Every candidate's `anomaly_scores` is "higher = more anomalous" and is exactly what its
ONNX export outputs as `score` (see export.py):

| family | fitted on | score |
|---|---|---|
| `isolation_forest` | normal training windows | `-decision_function` |
| `one_class_svm` (scaled) | a sample of normal training windows | `-decision_function` |
| `random_forest` | all training windows | `P(anomaly)` |
| `logistic_regression` (scaled) | all training windows | `P(anomaly)` |

Each candidate's threshold is the one maximising F1 on the validation windows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .data import Split
from .evaluate import best_threshold

__all__ = [
    "FAMILIES",
    "Candidate",
    "FittedCandidate",
    "anomaly_scores",
    "candidate_grid",
    "fit_candidates",
]

log = logging.getLogger(__name__)

FAMILIES: Final = ("isolation_forest", "random_forest", "logistic_regression", "one_class_svm")
# The edge budget for IsolationForest at batch 1 (p99 <= 0.5 ms) holds up to here.
MAX_ISOLATION_TREES: Final = 100
_OCSVM_MAX_ROWS: Final = 3000

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Candidate:
    family: str
    params: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return self.family + "".join(f".{k}-{v}" for k, v in self.params)

    @property
    def supervised(self) -> bool:
        return self.family in ("random_forest", "logistic_regression")

    def build(self, seed: int) -> Any:
        from sklearn.ensemble import IsolationForest, RandomForestClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        params = dict(self.params)
        if self.family == "isolation_forest":
            return IsolationForest(random_state=seed, **params)
        if self.family == "random_forest":
            return RandomForestClassifier(random_state=seed, class_weight="balanced",
                                          n_jobs=1, **params)
        if self.family == "logistic_regression":
            return make_pipeline(StandardScaler(), LogisticRegression(
                max_iter=2000, class_weight="balanced", **params))
        if self.family == "one_class_svm":
            return make_pipeline(StandardScaler(), OneClassSVM(**params))
        raise ValueError(f"unknown candidate family {self.family!r}; known: {FAMILIES}")


def candidate_grid(
    families: Sequence[str] = FAMILIES, *, max_isolation_trees: int = MAX_ISOLATION_TREES
) -> list[Candidate]:
    grids: dict[str, list[dict[str, Any]]] = {
        "isolation_forest": [
            {"n_estimators": n, "max_samples": 256}
            for n in sorted({min(50, max_isolation_trees), max_isolation_trees})
        ],
        "random_forest": [
            {"n_estimators": 60, "max_depth": depth, "min_samples_leaf": 2}
            for depth in (8, 14)
        ],
        "logistic_regression": [{"C": c} for c in (0.1, 1.0)],
        "one_class_svm": [{"nu": nu, "gamma": "scale"} for nu in (0.05, 0.15)],
    }
    unknown = [family for family in families if family not in grids]
    if unknown:
        raise ValueError(f"unknown candidate families {unknown}; known: {list(FAMILIES)}")
    return [Candidate(family, tuple(sorted(params.items())))
            for family in families for params in grids[family]]


def anomaly_scores(family: str, model: Any, X: npt.ArrayLike) -> FloatArray:
    """Scores (higher = more anomalous) of `model` on `X`, as its ONNX export computes."""
    if family in ("random_forest", "logistic_regression"):
        return np.asarray(model.predict_proba(X)[:, 1], dtype=np.float64)
    return -np.asarray(model.decision_function(X), dtype=np.float64)


@dataclass(frozen=True)
class FittedCandidate:
    candidate: Candidate
    model: Any
    threshold: float
    validation_f1: float
    fit_seconds: float


def fit_candidates(
    split: Split, candidates: Sequence[Candidate], *, seed: int = 7
) -> list[FittedCandidate]:
    """Fit every candidate on the training windows; best validation F1 first."""
    train, validation = split.train, split.validation
    normal = train.X[train.y == 0]
    rng = np.random.default_rng(seed)
    fitted: list[FittedCandidate] = []
    for candidate in candidates:
        model = candidate.build(seed)
        started = time.perf_counter()
        if candidate.supervised:
            model.fit(train.X, train.y)
        elif candidate.family == "one_class_svm" and len(normal) > _OCSVM_MAX_ROWS:
            model.fit(normal[rng.choice(len(normal), _OCSVM_MAX_ROWS, replace=False)])
        else:
            model.fit(normal)
        seconds = time.perf_counter() - started
        scores = anomaly_scores(candidate.family, model, validation.X)
        threshold, f1 = best_threshold(validation.y, scores)
        log.info("candidate %s: validation F1 %.3f (fit %.1f s)", candidate.name, f1, seconds)
        fitted.append(FittedCandidate(candidate, model, threshold, f1, seconds))
    return sorted(fitted, key=lambda f: -f.validation_f1)
