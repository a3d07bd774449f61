"""ONNX scoring on the edge: feature windows in, anomaly scores out, as readings.

```
samples ─► FeatureWindows.add ─► windows (≤ 1 per asset per cycle)
        ─► OnnxScorer.score (ONE session.run per cycle, every window in one matrix)
        ─► InferenceResult ─► readings ml:<version>:score, ml:<version>:is_anomaly
```

Contracts
---------
* **A model is an `.onnx` file plus metadata**, from the sidecar `<file>.json` when it
  exists, else the ONNX metadata key `edgefleet` (a JSON string):
  `{"name", "version", "threshold", "features": {FeatureSpec}, "score_output"?,
  "score_sign"?}`. `ModelBundle.load` checks everything a running agent would otherwise
  trip over later: the file, the graph, the metadata, one float input of shape `[N, F]`
  with F the feature spec's width, a score output, and one probe run on a `[1, F]` row.
  Every failure is a `ModelLoadError` naming the file and the problem.
* **Score direction.** `score` is always "higher = more anomalous": the model's output is
  multiplied by `score_sign` (-1 for models like IsolationForest's decision function).
  A window is an anomaly when `score > threshold`.
* **Cost.** One `InferenceSession` with one intra-op and one inter-op thread (the agent
  shares a small box with the sources), sequential execution, CPU provider. One
  `session.run` per cycle, whatever the number of assets.
* **Failures** (runtime errors, non-finite or missing scores) raise `ScoringError` from
  `OnnxScorer.score` and are counted in `OnnxScorer.errors`; `Inferencer.run` catches
  them, logs the start and the end of a failing episode (not each failure) and returns
  no results for that cycle. The data itself is forwarded either way.
* **Inference output never feeds inference**: a feature spec may not name an `ml:` tag,
  so the `ml:<version>:*` readings are never part of a window.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.protocols.features import FeatureSpec, FeatureWindows
from edgefleet.protocols.source import NAME_PATTERN, Sample
from edgefleet.protocols.wire import Quality

__all__ = [
    "INFERENCE_TAG_PREFIX",
    "LATENCY_WINDOW",
    "METADATA_KEY",
    "InferenceResult",
    "Inferencer",
    "ModelBundle",
    "ModelLoadError",
    "ModelMetadata",
    "OnnxScorer",
    "ScoringError",
    "inference_tags",
]

log = logging.getLogger(__name__)

INFERENCE_TAG_PREFIX: Final = "ml:"
METADATA_KEY: Final = "edgefleet"  # the ONNX metadata_props key holding the metadata JSON
LATENCY_WINDOW: Final = 1024  # scoring calls whose durations latency_us() summarises
_SCORE_SUFFIX: Final = ":score"
_ANOMALY_SUFFIX: Final = ":is_anomaly"
# The longest inference tag must stay a wire identifier (128 characters at most).
_MAX_VERSION_LENGTH: Final = 128 - len(INFERENCE_TAG_PREFIX) - len(_ANOMALY_SUFFIX)
_INPUT_DTYPES: Final[dict[str, type[np.floating[Any]]]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}
# Every exception class onnxruntime's native layer raises (they derive from Exception
# directly), plus what its Python wrapper raises for bad arguments.
_ORT_ERRORS: Final[tuple[type[Exception], ...]] = (
    RuntimeError, ValueError, TypeError,
    *(value for value in vars(ort_state).values()
      if isinstance(value, type) and issubclass(value, Exception)),
)

FloatArray = npt.NDArray[np.float64]


class ModelLoadError(Exception):
    """A model file that cannot be served; the message names the file and the problem."""


class ScoringError(Exception):
    """One scoring call failed (runtime error, or scores missing or not finite)."""


def inference_tags(model_version: str) -> tuple[str, str]:
    """The tags of a model version's readings: (`ml:<v>:score`, `ml:<v>:is_anomaly`)."""
    stem = INFERENCE_TAG_PREFIX + model_version
    return stem + _SCORE_SUFFIX, stem + _ANOMALY_SUFFIX


class ModelMetadata(BaseModel):
    """What a model file carries besides its graph (sidecar JSON or ONNX metadata)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    version: Annotated[str, Field(pattern=NAME_PATTERN, max_length=_MAX_VERSION_LENGTH)]
    threshold: Annotated[float, Field(allow_inf_nan=False)]
    features: FeatureSpec
    score_output: Annotated[str, Field(min_length=1)] | None = None  # default: first output
    score_sign: float = 1.0

    @field_validator("score_sign")
    @classmethod
    def _unit_sign(cls, value: float) -> float:
        if value not in (1.0, -1.0):
            raise ValueError("must be 1 (higher = more anomalous) or -1 (lower = more anomalous)")
        return value

    @field_validator("features")
    @classmethod
    def _no_inference_tags(cls, value: FeatureSpec) -> FeatureSpec:
        looped = [tag for tag in value.tags if tag.startswith(INFERENCE_TAG_PREFIX)]
        if looped:
            raise ValueError(
                f"tags {', '.join(looped)} are inference outputs ({INFERENCE_TAG_PREFIX}…); "
                "a model cannot take them as features"
            )
        return value


def _session(model_bytes: bytes) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _describe(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: "
        f"{error['msg'].removeprefix('Value error, ')}"
        for error in err.errors()
    )


@dataclass(frozen=True)
class ModelBundle:
    """A model file checked and ready to serve (see `load`)."""

    path: Path
    name: str
    version: str
    threshold: float
    features: FeatureSpec
    input_name: str
    score_output: str
    score_sign: float
    model_bytes: bytes = field(repr=False)

    @classmethod
    def load(cls, path: Path | str, *, threshold: float | None = None) -> ModelBundle:
        """Read and check `path` and its metadata; `threshold` overrides the model's own."""
        path = Path(path)
        try:
            model_bytes = path.read_bytes()
        except FileNotFoundError as err:
            raise ModelLoadError(f"model {path}: no such file") from err
        except OSError as err:
            raise ModelLoadError(f"model {path}: cannot read it ({err.strerror})") from err
        try:
            session = _session(model_bytes)
        except _ORT_ERRORS as err:
            raise ModelLoadError(
                f"model {path}: not a loadable ONNX model ({_first_line(err)})"
            ) from err
        metadata = cls._metadata(path, session)
        input_name, width = cls._check_input(path, session, metadata.features)
        outputs = [output.name for output in session.get_outputs()]
        score_output = metadata.score_output or outputs[0]
        if score_output not in outputs:
            raise ModelLoadError(
                f"model {path}: score_output {score_output!r} is not an output of the graph "
                f"(outputs: {', '.join(outputs)})"
            )
        if threshold is None:
            threshold = metadata.threshold
        elif not math.isfinite(threshold):
            raise ModelLoadError(f"model {path}: the threshold override {threshold} is not finite")
        cls._probe(path, session, input_name, score_output, width)
        return cls(
            path=path,
            name=metadata.name,
            version=metadata.version,
            threshold=float(threshold),
            features=metadata.features,
            input_name=input_name,
            score_output=score_output,
            score_sign=metadata.score_sign,
            model_bytes=model_bytes,
        )

    @staticmethod
    def _metadata(path: Path, session: Any) -> ModelMetadata:
        sidecar = path.with_name(path.name + ".json")
        if sidecar.exists():
            source = f"sidecar {sidecar.name}"
            try:
                text = sidecar.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ModelLoadError(f"model {path}: cannot read {source} ({err})") from err
        else:
            source = f"ONNX metadata key {METADATA_KEY!r}"
            found = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            if found is None:
                raise ModelLoadError(
                    f"model {path}: no metadata (neither a sidecar {sidecar.name} nor an "
                    f"ONNX metadata key {METADATA_KEY!r})"
                )
            text = found
        try:
            return ModelMetadata.model_validate_json(text)
        except ValidationError as err:
            raise ModelLoadError(
                f"model {path}: invalid metadata in {source}: {_describe(err)}"
            ) from err

    @staticmethod
    def _check_input(path: Path, session: Any, features: FeatureSpec) -> tuple[str, int]:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"model {path}: takes {len(inputs)} inputs; a model takes one [N, F] matrix"
            )
        model_input = inputs[0]
        width = len(features.feature_names())
        if model_input.type not in _INPUT_DTYPES:
            raise ModelLoadError(
                f"model {path}: input {model_input.name!r} is {model_input.type}; expected "
                "tensor(float) or tensor(double)"
            )
        shape = list(model_input.shape)
        if len(shape) != 2:
            raise ModelLoadError(
                f"model {path}: input {model_input.name!r} has shape {shape}; expected [N, {width}]"
            )
        if isinstance(shape[1], int) and shape[1] != width:
            raise ModelLoadError(
                f"model {path}: input {model_input.name!r} takes {shape[1]} features; the "
                f"feature spec makes {width} ({len(features.tags)} tags × "
                f"{len(features.stats)} stats)"
            )
        return str(model_input.name), width

    @staticmethod
    def _probe(path: Path, session: Any, input_name: str, score_output: str, width: int) -> None:
        """One run on a row of zeros: a width the graph only checks at run time, or an
        output that is not one number per row, fails here rather than in the first cycle."""
        dtype = _INPUT_DTYPES[session.get_inputs()[0].type]
        try:
            output = session.run([score_output], {input_name: np.zeros((1, width), dtype=dtype)})
        except _ORT_ERRORS as err:
            raise ModelLoadError(
                f"model {path}: does not run on a [1, {width}] feature row ({_first_line(err)})"
            ) from err
        scores = np.asarray(output[0])
        if scores.dtype.kind not in "fiu" or scores.size != 1:
            raise ModelLoadError(
                f"model {path}: output {score_output!r} gives {scores.size} value(s) of type "
                f"{scores.dtype} for one row; expected one number per row"
            )


class OnnxScorer:
    """One ONNX Runtime session serving a `ModelBundle`; see the module's contracts."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        try:
            self.session: Any = _session(bundle.model_bytes)
        except _ORT_ERRORS as err:
            raise ModelLoadError(
                f"model {bundle.path}: not a loadable ONNX model ({_first_line(err)})"
            ) from err
        self._input_dtype = _INPUT_DTYPES[self.session.get_inputs()[0].type]
        self._width = len(bundle.features.feature_names())
        self.calls = 0  # session.run calls
        self.errors = 0  # failed calls (raised ScoringError)
        self._durations_ns: deque[int] = deque(maxlen=LATENCY_WINDOW)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def threshold(self) -> float:
        return self.bundle.threshold

    def score(self, features: npt.ArrayLike) -> FloatArray:
        """Scores (higher = more anomalous) of a `[n, F]` feature matrix, in one run."""
        with np.errstate(over="ignore"):  # beyond float32: inf, reported as non-finite below
            matrix = np.ascontiguousarray(features, dtype=self._input_dtype)
        if matrix.ndim != 2 or matrix.shape[1] != self._width:
            raise ValueError(f"expected a [n, {self._width}] feature matrix, got {matrix.shape}")
        rows = matrix.shape[0]
        if rows == 0:
            return np.empty(0, dtype=np.float64)
        bundle = self.bundle
        self.calls += 1
        started = time.perf_counter_ns()
        try:
            output = self.session.run([bundle.score_output], {bundle.input_name: matrix})[0]
        except _ORT_ERRORS as err:
            self.errors += 1
            raise ScoringError(f"model {bundle.version}: run failed ({_first_line(err)})") from err
        self._durations_ns.append(time.perf_counter_ns() - started)
        scores = np.asarray(output, dtype=np.float64).reshape(-1)
        if scores.shape[0] != rows:
            self.errors += 1
            raise ScoringError(
                f"model {bundle.version}: {scores.shape[0]} scores for {rows} rows"
            )
        finite = np.isfinite(scores)
        if not finite.all():
            self.errors += 1
            raise ScoringError(
                f"model {bundle.version}: {rows - int(finite.sum())} of {rows} scores are "
                "not finite"
            )
        return scores if bundle.score_sign == 1.0 else scores * bundle.score_sign

    def latency_us(self, percentile: float) -> float | None:
        """The `percentile` (0–100) of the last `LATENCY_WINDOW` runs' durations, in µs;
        None before the first run."""
        if not 0 <= percentile <= 100:
            raise ValueError("percentile must be between 0 and 100")
        if not self._durations_ns:
            return None
        durations = np.fromiter(self._durations_ns, dtype=np.float64)
        return float(np.percentile(durations, percentile)) / 1000.0


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """The score of one asset's window ending at `ts_ns`."""

    asset: str
    ts_ns: int
    score: float
    is_anomaly: bool
    model_version: str


class Inferencer:
    """Feature windows and a scorer, run once per ingest cycle.

    Without a scorer (no model yet) `run` returns [] and keeps no windows.
    """

    def __init__(self, scorer: OnnxScorer | None, windows: FeatureWindows | None) -> None:
        if scorer is not None:
            spec = scorer.bundle.features
            if windows is None:
                windows = FeatureWindows(spec)
            elif windows.spec != spec:
                raise ValueError("the windows' feature spec is not the model's")
            if any(tag.startswith(INFERENCE_TAG_PREFIX) for tag in spec.tags):
                raise ValueError(f"a feature spec may not name {INFERENCE_TAG_PREFIX} tags")
        self.scorer = scorer
        self.windows = windows
        self.rows_scored = 0  # windows scored
        self.anomalies = 0  # of those, score > threshold
        self.failed_runs = 0  # cycles whose scoring raised ScoringError
        self._failing = False

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, assets: Sequence[str] | None = None) -> Inferencer:
        """A scorer for `bundle` and windows for `assets` (default: any asset)."""
        allowed = frozenset(assets) if assets is not None else None
        max_assets = max(10_000, len(allowed)) if allowed is not None else 10_000
        windows = FeatureWindows(bundle.features, max_assets=max_assets, assets=allowed)
        return cls(OnnxScorer(bundle), windows)

    def run(self, samples: Sequence[Sample]) -> list[InferenceResult]:
        """Take one cycle's samples; score the windows they complete, in one model run."""
        scorer, windows = self.scorer, self.windows
        if scorer is None or windows is None:
            return []
        # ml: tags are never spec tags (checked at load), so FeatureWindows ignores them.
        completed = windows.add(samples)
        if not completed:
            return []
        matrix = np.stack([window.features for window in completed])
        try:
            scores = scorer.score(matrix)
        except ScoringError as err:
            self.failed_runs += 1
            if not self._failing:
                self._failing = True
                log.warning("inference: %s; windows go unscored until the model runs again", err)
            return []
        if self._failing:
            self._failing = False
            log.info("inference: model %s scoring again (%d failed cycle(s) so far)",
                     scorer.version, self.failed_runs)
        threshold, version = scorer.threshold, scorer.version
        results = [
            InferenceResult(window.asset, window.ts_ns, score, score > threshold, version)
            for window, score in zip(completed, scores.tolist(), strict=True)
        ]
        self.rows_scored += len(results)
        self.anomalies += sum(result.is_anomaly for result in results)
        return results

    def to_samples(self, results: Sequence[InferenceResult]) -> list[Sample]:
        """Each result as two good readings at the window's end: `ml:<version>:score`
        (the score) and `ml:<version>:is_anomaly` (1.0 or 0.0)."""
        good = Quality.GOOD
        samples: list[Sample] = []
        for result in results:
            score_tag, anomaly_tag = inference_tags(result.model_version)
            samples.append(Sample(result.asset, score_tag, result.ts_ns, result.score, good))
            samples.append(Sample(result.asset, anomaly_tag, result.ts_ns,
                                  1.0 if result.is_anomaly else 0.0, good))
        return samples
