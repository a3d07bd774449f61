"""The training pipeline: labelled history → features → candidates → ONNX → MLflow.

Each step is a plain function (see `pipeline`); `tasks` wraps them as the Airflow DAG's
tasks, which `edgefleet train` runs inline. Importing this package imports nothing heavy.
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
