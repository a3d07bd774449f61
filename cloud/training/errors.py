"""The training pipeline's errors: one tree, each message naming the step and the problem."""

from __future__ import annotations

__all__ = [
    "ExportGateError",
    "FeatureSchemaError",
    "PromotionError",
    "TrainingDataError",
    "TrainingError",
]


class TrainingError(Exception):
    """A training step cannot go on; nothing was registered and no alias moved."""


class TrainingDataError(TrainingError):
    """The data cannot train a model: an empty or too-small window, one class only, NaNs."""


class FeatureSchemaError(TrainingError):
    """Features computed with one spec were handed to a step expecting another."""


class ExportGateError(TrainingError):
    """The ONNX export failed a gate (parity or latency); the model is not registered."""


class PromotionError(TrainingError):
    """The current champion cannot be compared with the challenger on the same window."""
