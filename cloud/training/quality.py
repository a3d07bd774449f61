"""Data quality before training: how complete is what the fog gateway stored?

The fog store counts, per device, the seqs it received against the range it has seen
(`Store.completeness()`; gaps are seqs never received). Training on a history with holes
would teach the model that a dead link is normal, so the `data_quality` DAG fails loudly,
naming every device below the threshold, instead of passing a partial window on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from .errors import TrainingDataError

__all__ = ["DEFAULT_MIN_RATIO", "DataQualityError", "QualityReport", "check_completeness"]

DEFAULT_MIN_RATIO: Final = 0.999


class DataQualityError(TrainingDataError):
    """The stored history is not complete enough to train on."""


@dataclass(frozen=True)
class DeviceQuality:
    device: str
    received: int
    expected: int
    missing: int
    duplicates: int
    ratio: float


@dataclass(frozen=True)
class QualityReport:
    min_ratio: float
    devices: tuple[DeviceQuality, ...]

    @property
    def received(self) -> int:
        return sum(d.received for d in self.devices)

    @property
    def expected(self) -> int:
        return sum(d.expected for d in self.devices)

    @property
    def ratio(self) -> float:
        return self.received / self.expected if self.expected else 0.0

    @property
    def failing(self) -> list[DeviceQuality]:
        return [d for d in self.devices if d.ratio < self.min_ratio]

    def as_dict(self) -> dict[str, Any]:
        return {"min_ratio": self.min_ratio, "ratio": self.ratio, "received": self.received,
                "expected": self.expected, "devices": [asdict(d) for d in self.devices],
                "failing": [d.device for d in self.failing]}


def measure_completeness(store_url: str, min_ratio: float = DEFAULT_MIN_RATIO) -> QualityReport:
    from edgefleet.fog_gateway.store import open_store

    store = open_store(store_url)
    try:
        rows = store.completeness()
    finally:
        store.close()
    return QualityReport(min_ratio, tuple(
        DeviceQuality(r.device, r.received, r.expected, r.missing, r.duplicates, r.ratio)
        for r in rows
    ))


def check_completeness(store_url: str, min_ratio: float = DEFAULT_MIN_RATIO) -> QualityReport:
    """The store's completeness; raises DataQualityError when it is empty or any device is
    below `min_ratio` (every such device named, with its gap count)."""
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must be in (0, 1], not {min_ratio}")
    report = measure_completeness(store_url, min_ratio)
    if not report.devices:
        raise DataQualityError("the fog store has received no readings from any device")
    if report.failing:
        worst = sorted(report.failing, key=lambda d: d.ratio)
        listed = "; ".join(f"{d.device} {d.ratio:.4%} ({d.missing} of {d.expected} seqs "
                           "missing)" for d in worst[:10])
        more = f"; and {len(worst) - 10} more" if len(worst) > 10 else ""
        raise DataQualityError(
            f"{len(worst)} of {len(report.devices)} device(s) below {min_ratio:.2%} "
            f"completeness: {listed}{more}"
        )
    return report
