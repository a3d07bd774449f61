"""Feature drift: recent feature windows against the champion's training reference.

The reference is the `reference/feature_reference.json` artifact logged with the champion's
MLflow run (see `registry.feature_reference`): per feature, decile bin edges with the
training share in each bin, and quantiles. Recent windows come from the fog store through
the same feature module the agent scores with, computed with the champion's own spec.

* **PSI** per feature over the reference's decile bins (values outside the edges count in
  the outer bins; each share is floored at `PSI_FLOOR` so an empty bin is finite).
* **KS** per feature: the largest gap between the recent empirical CDF and the reference
  CDF at the reference quantiles (an estimate from the stored quantiles, not a two-sample
  test on raw training data, which is not kept).
* A feature **drifts** when its PSI reaches `psi_threshold` *and* its KS reaches
  `ks_threshold`; the model's inputs drift when at least `min_features` features do.
  Both statistics must agree, and several features, so that one noisy measure does not
  retrain the fleet. The defaults (PSI 0.25, the usual "major shift" level; KS 0.2; three
  features) leave alone the slow wander of one plant from hour to hour in the simulator,
  and catch a plant whose share of anomalous operation jumped from 15 % to 70 %.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from edgefleet.protocols.features import FeatureSpec

from .data import NS, Dataset, extract, store_time_range
from .errors import FeatureSchemaError, TrainingDataError, TrainingError
from .registry import CHAMPION

__all__ = [
    "DEFAULT_KS_THRESHOLD",
    "DEFAULT_MIN_FEATURES",
    "DEFAULT_PSI_THRESHOLD",
    "DriftReport",
    "FeatureDrift",
    "NoChampionError",
    "champion_reference",
    "detect_drift",
    "ks_from_quantiles",
    "measure_drift",
    "psi",
]

DEFAULT_PSI_THRESHOLD: Final = 0.25
DEFAULT_KS_THRESHOLD: Final = 0.2
DEFAULT_MIN_FEATURES: Final = 3
PSI_FLOOR: Final = 1e-4
MIN_RECENT_WINDOWS: Final = 50


class NoChampionError(TrainingError):
    """The model has no champion yet: there is no reference to compare with."""


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    psi: float
    ks: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    model_name: str
    champion_version: str
    windows: int
    window: tuple[int, int]
    psi_threshold: float
    ks_threshold: float
    min_features: int
    features: tuple[FeatureDrift, ...]

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    @property
    def drifted(self) -> bool:
        return len(self.drifted_features) >= self.min_features

    def summary(self) -> str:
        worst = sorted(self.features, key=lambda f: f.psi, reverse=True)[:3]
        top = ", ".join(f"{f.name} PSI {f.psi:.3f} KS {f.ks:.3f}" for f in worst)
        verdict = (f"DRIFT in {len(self.drifted_features)} feature(s)" if self.drifted
                   else "no drift")
        return (f"{self.model_name} v{self.champion_version}: {verdict} over {self.windows} "
                f"recent windows (thresholds PSI {self.psi_threshold}, KS "
                f"{self.ks_threshold}, at least {self.min_features} feature(s)); worst: {top}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted,
                "drifted_features": self.drifted_features}


def psi(edges: npt.ArrayLike, reference_fractions: npt.ArrayLike,
        values: npt.ArrayLike) -> float:
    """Population stability index of `values` over the reference's bins."""
    edges_ = np.asarray(edges, dtype=np.float64)
    expected = np.asarray(reference_fractions, dtype=np.float64)
    sample = np.asarray(values, dtype=np.float64)
    if len(edges_) < 2 or len(sample) == 0:
        # A constant reference feature: everything that is not that constant is new.
        share_other = float(np.mean(sample != edges_[0])) if len(sample) else 0.0
        actual = np.array([1 - share_other, share_other])
        expected = np.array([1.0, 0.0])
    else:
        # Inner edges only: the outer bins reach to ±infinity.
        bins = np.searchsorted(edges_[1:-1], sample, side="right")
        actual = np.bincount(bins, minlength=len(expected)) / len(sample)
    expected = np.maximum(expected, PSI_FLOOR)
    actual = np.maximum(actual, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_from_quantiles(quantiles: Mapping[str, float], values: npt.ArrayLike) -> float:
    """Largest gap between the recent CDF and the reference CDF at the reference quantiles.

    At a quantile value x the reference CDF lies in [q_x, q_next), where q_x is the highest
    level whose quantile is x and q_next the next level up (several levels share x when the
    reference has a point mass there). The gap counted is the recent CDF's distance from
    that interval, so a point mass in both does not read as drift."""
    sample = np.sort(np.asarray(values, dtype=np.float64))
    if len(sample) == 0 or not quantiles:
        return 0.0
    levels = sorted((float(q), float(x)) for q, x in quantiles.items())
    gap = 0.0
    for i, (q, x) in enumerate(levels):
        if i + 1 < len(levels) and levels[i + 1][1] == x:
            continue  # a higher level shares this value: judge x there
        upper = levels[i + 1][0] if i + 1 < len(levels) else 1.0
        recent = np.searchsorted(sample, x, side="right") / len(sample)
        gap = max(gap, q - recent, recent - upper)
    return float(gap)


def measure_drift(
    reference: Mapping[str, Any], recent: Dataset, *, model_name: str, champion_version: str,
    psi_threshold: float = DEFAULT_PSI_THRESHOLD, ks_threshold: float = DEFAULT_KS_THRESHOLD,
    min_features: int = DEFAULT_MIN_FEATURES,
) -> DriftReport:
    if reference.get("feature_schema_hash") != recent.spec.schema_hash():
        raise FeatureSchemaError(
            f"the champion's reference was computed with feature schema "
            f"{str(reference.get('feature_schema_hash'))[:12]}, the recent windows with "
            f"{recent.spec.schema_hash()[:12]}"
        )
    names = recent.spec.feature_names()
    drifts = []
    for index, name in enumerate(names):
        stats = reference["features"][name]
        column = recent.X[:, index]
        column = column[np.isfinite(column)]
        p = psi(stats["bin_edges"], stats["bin_fractions"], column)
        k = ks_from_quantiles(stats["quantiles"], column)
        drifts.append(FeatureDrift(name, round(p, 6), round(k, 6),
                                   p >= psi_threshold and k >= ks_threshold))
    return DriftReport(model_name, champion_version, len(recent),
                       (recent.start_ns, recent.end_ns), psi_threshold, ks_threshold,
                       min_features, tuple(drifts))


def champion_reference(tracking_uri: str, model_name: str) -> tuple[str, dict[str, Any]]:
    """(version, reference) of the model's current champion, from its MLflow run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as err:
        raise NoChampionError(
            f"{model_name} has no {CHAMPION} to compare against: {err}"
        ) from err
    if not version.run_id:
        raise TrainingError(f"{model_name} v{version.version} has no MLflow run to hold "
                            "its feature reference")
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(version.run_id,
                                             "reference/feature_reference.json", folder)
            reference = json.loads(Path(path).read_text(encoding="utf-8"))
    except (MlflowException, OSError, ValueError) as err:
        raise TrainingError(f"cannot read the feature reference of {model_name} "
                            f"v{version.version} (run {version.run_id}): {err}") from err
    return str(version.version), reference


def detect_drift(
    *, store_url: str, tracking_uri: str, model_name: str, hours: float = 1.0,
    end_ns: int | None = None, hop: int = 5,
    psi_threshold: float = DEFAULT_PSI_THRESHOLD, ks_threshold: float = DEFAULT_KS_THRESHOLD,
    min_features: int = DEFAULT_MIN_FEATURES, min_windows: int = MIN_RECENT_WINDOWS,
) -> DriftReport:
    """The last `hours` of readings in the store (up to `end_ns`) against the champion."""
    version, reference = champion_reference(tracking_uri, model_name)
    spec = FeatureSpec.model_validate(reference["features_spec"])
    if end_ns is None:
        span = store_time_range(store_url)
        if span is None:
            raise TrainingDataError("the store holds no readings to check for drift")
        end_ns = span[1] + 1
    start_ns = end_ns - int(hours * 3600 * NS)
    recent = extract(store_url, (), start_ns=start_ns, end_ns=end_ns, spec=spec, hop=hop)
    if len(recent) < min_windows:
        raise TrainingDataError(
            f"only {len(recent)} recent feature windows in {recent.window_text()}, at least "
            f"{min_windows} needed to judge drift; widen the window"
        )
    return measure_drift(reference, recent, model_name=model_name, champion_version=version,
                         psi_threshold=psi_threshold, ks_threshold=ks_threshold,
                         min_features=min_features)
