"""The training pipeline: labelled history → features → candidates → ONNX → MLflow.

Each step is a plain function (see `pipeline`) that `edgefleet train` runs inline and the
Airflow DAGs call as tasks. Importing this package imports nothing heavy.
"""

from __future__ import annotations

from .errors import (
    ExportGateError,
    FeatureSchemaError,
    PromotionError,
    TrainingDataError,
    TrainingError,
)

__all__ = [
    "ExportGateError",
    "FeatureSchemaError",
    "PromotionError",
    "TrainingDataError",
    "TrainingError",
]
