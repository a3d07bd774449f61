"""Evaluation: window-level and event-level metrics, overall and per anomaly kind.

Window level: a window is predicted anomalous when its score is **above** the threshold
(the edge agent's rule, `score > threshold`). Per kind K the metrics are computed on the
normal windows plus the windows of K, so each kind's precision counts the false alarms a
detector of K alone would raise. ROC-AUC and PR-AUC are `None` where one class is absent.

Event level: an episode is detected when some window of its asset ending inside the
episode is predicted anomalous; its detection delay is that window's end minus the
episode's start. Episodes no window ends inside are not counted (too short, or cut by
the split).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .data import NS, Dataset

__all__ = ["Evaluation", "KindMetrics", "best_threshold", "evaluate", "flat_metrics"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class KindMetrics:
    windows: int
    positives: int
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    pr_auc: float | None
    episodes: int
    detected: int
    mean_delay_s: float | None
    median_delay_s: float | None


@dataclass(frozen=True)
class Evaluation:
    threshold: float
    overall: KindMetrics
    per_kind: Mapping[str, KindMetrics]
    confusion: tuple[int, int, int, int]  # tn, fp, fn, tp

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "overall": asdict(self.overall),
            "per_kind": {kind: asdict(m) for kind, m in self.per_kind.items()},
            "confusion": dict(zip(("tn", "fp", "fn", "tp"), self.confusion, strict=True)),
        }


def best_threshold(y: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float]:
    """The threshold maximising F1 of `score > threshold` on (y, scores), and that F1.
    The threshold lies halfway between the chosen score and the next lower one, so it
    survives the float32 rounding of an ONNX export."""
    labels = np.asarray(y).astype(bool)
    values = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-values, kind="stable")
    sorted_scores = values[order]
    hits = np.cumsum(labels[order])
    positives = int(labels.sum())
    # Only the last of equal scores is a possible cut (all equal scores fall on one side).
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    predicted = np.arange(1, len(values) + 1)
    f1 = np.where(last, 2 * hits / (predicted + positives), -1.0)
    best = int(np.argmax(f1))
    upper = sorted_scores[best]
    lower = sorted_scores[best + 1] if best + 1 < len(sorted_scores) else upper - 1.0
    return float((upper + lower) / 2), float(f1[best])


def evaluate(dataset: Dataset, scores: npt.ArrayLike, threshold: float) -> Evaluation:
    """Metrics of `scores` (higher = more anomalous) on `dataset` at `threshold`."""
    values = np.asarray(scores, dtype=np.float64)
    if values.shape != (len(dataset),):
        raise ValueError(f"{values.shape} scores for {len(dataset)} windows")
    predicted = values > threshold
    truth = dataset.y.astype(bool)
    kinds = sorted({str(kind) for kind in dataset.kinds if kind} |
                   {e.kind for e in dataset.episodes})
    overall = _metrics(dataset, truth, values, predicted, np.ones(len(dataset), bool), None)
    normal = ~truth
    per_kind = {
        kind: _metrics(dataset, truth, values, predicted, normal | (dataset.kinds == kind), kind)
        for kind in kinds
    }
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    return Evaluation(float(threshold), overall, per_kind, (tn, fp, fn, tp))


def _metrics(
    dataset: Dataset, truth: npt.NDArray[np.bool_], scores: FloatArray,
    predicted: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_], kind: str | None,
) -> KindMetrics:
    from sklearn.metrics import average_precision_score, roc_auc_score

    t, p, s = truth[mask], predicted[mask], scores[mask]
    tp = int((t & p).sum())
    precision = tp / int(p.sum()) if p.any() else 0.0
    recall = tp / int(t.sum()) if t.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both = bool(t.any() and (~t).any())
    delays: list[float] = []
    counted = 0
    for episode in dataset.episodes:
        if kind is not None and episode.kind != kind:
            continue
        inside = ((dataset.assets == episode.asset) & (dataset.ts_ns >= episode.start_ns)
                  & (dataset.ts_ns < episode.end_ns))
        if not inside.any():
            continue
        counted += 1
        hits = np.flatnonzero(inside & predicted)
        if len(hits):
            first = int(dataset.ts_ns[hits].min())
            delays.append((first - episode.start_ns) / NS)
    return KindMetrics(
        windows=int(mask.sum()), positives=int(t.sum()), precision=precision, recall=recall,
        f1=f1,
        roc_auc=float(roc_auc_score(t, s)) if both else None,
        pr_auc=float(average_precision_score(t, s)) if both else None,
        episodes=counted, detected=len(delays),
        mean_delay_s=float(np.mean(delays)) if delays else None,
        median_delay_s=float(np.median(delays)) if delays else None,
    )


def flat_metrics(evaluation: Evaluation, prefix: str) -> dict[str, float]:
    """`{prefix}_f1`, `{prefix}_{kind}_recall`, … for MLflow (None values left out)."""
    out: dict[str, float] = {f"{prefix}_threshold": evaluation.threshold}
    groups = {"": evaluation.overall, **{f"{k}_": m for k, m in evaluation.per_kind.items()}}
    for stem, metrics in groups.items():
        for key, value in asdict(metrics).items():
            if value is not None:
                out[f"{prefix}_{stem}{key}"] = float(value)
    return out
