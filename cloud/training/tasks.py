"""The training pipeline as tasks: what the `training_pipeline` DAG runs, one Airflow task
each, and what `edgefleet train` runs inline (`run_inline`), in the same order:

```
extract ─► train ─► evaluate ─► export ─► register ─► promote ─► request_rollout
```

Contracts
---------
* **State, not objects, between tasks.** Each task takes the previous task's `state`
  (a small JSON-able dict, which Airflow passes on as an XCom) and returns it extended
  with its own figures. Large objects (the split, the fitted models, the scores) are
  pickled into the run's folder `<workdir>/runs/<run id>/`, which only this pipeline
  writes; the newest `KEEP_RUNS` folders are kept.
* **Configuration is not state.** Every task is handed the `TrainingConfig` (built from the
  environment and the DAG's params); store URLs, the tracking URI and the control plane's
  token may hold secrets and never go into an XCom.
* **Nothing moves on failure.** Checks and gates raise `TrainingError` before anything is
  written to MLflow; `champion` moves only in `promote_task`; a rollout is requested only
  for a version that became champion in this run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .candidates import FAMILIES
from .data import MIN_WINDOWS, NS, Split, store_time_range
from .errors import TrainingDataError, TrainingError
from .export import DEFAULT_LATENCY_BUDGET_US
from .pipeline import (
    TrainResult,
    evaluate_step,
    export_step,
    extract_step,
    promote_step,
    register_step,
    train_step,
)
from .registry import DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, Registration

__all__ = [
    "KEEP_RUNS",
    "TASKS",
    "RolloutRequestError",
    "TrainingConfig",
    "evaluate_task",
    "export_task",
    "extract_task",
    "promote_task",
    "register_task",
    "request_rollout_task",
    "run_inline",
    "train_task",
]

log = logging.getLogger(__name__)

KEEP_RUNS: Final = 5
DEFAULT_WAVES: Final = "1,10%,50%,100%"
ROLLOUT_PATH: Final = "/v1/deployments"
_RUN_ID_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.-]+")


class RolloutRequestError(TrainingError):
    """The control plane refused, or could not be reached for, the rollout request."""


@dataclass(frozen=True)
class TrainingConfig:
    """Where the data, the registry and the control plane are, and how to train.

    The window is `[start_ns, end_ns)` when both are given, else the last `hours` of
    readings in the store."""

    store_url: str
    labels: str
    workdir: str
    tracking_uri: str | None = None
    model_name: str = DEFAULT_MODEL_NAME
    hours: float = 12.0
    start_ns: int | None = None
    end_ns: int | None = None
    hop: int = 5
    families: tuple[str, ...] = FAMILIES
    seed: int = 7
    latency_budget_us: float = DEFAULT_LATENCY_BUDGET_US
    experiment: str = DEFAULT_EXPERIMENT
    artifact_root: str | None = None
    min_windows: int = MIN_WINDOWS
    control_url: str | None = None
    rollout_target: str = ""
    rollout_waves: str = DEFAULT_WAVES

    def __post_init__(self) -> None:
        problems = []
        if self.hours <= 0:
            problems.append(f"hours must be positive, not {self.hours}")
        if (self.start_ns is None) != (self.end_ns is None):
            problems.append("give both start_ns and end_ns, or neither")
        if self.hop < 1:
            problems.append(f"hop must be at least 1, not {self.hop}")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            problems.append(f"families must be among {', '.join(FAMILIES)} "
                            f"(got {', '.join(self.families) or 'none'})")
        if self.control_url and not self.control_url.startswith(("http://", "https://")):
            problems.append(f"control_url must be http:// or https://, not {self.control_url}")
        if problems:
            raise ValueError("training config: " + "; ".join(problems))

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> TrainingConfig:
        """The config of a DAG run: `EDGEFLEET_TRAIN_*` and the services' variables, then
        `overrides` (the DAG's params; None and "" mean "not given")."""
        env = os.environ if env is None else env
        state = Path(env.get("EDGEFLEET_STATE_DIR")
                     or Path.home() / ".local" / "state" / "edgefleet") / "train"
        values: dict[str, Any] = {
            "store_url": env.get("EDGEFLEET_TRAIN_STORE") or f"sqlite://{state / 'fog.db'}",
            "labels": env.get("EDGEFLEET_TRAIN_LABELS") or str(state / "labels.jsonl"),
            "workdir": env.get("EDGEFLEET_TRAIN_WORKDIR") or str(state),
            "tracking_uri": (env.get("MLFLOW_TRACKING_URI")
                             or f"sqlite:///{state / 'mlflow.db'}"),
            "control_url": env.get("EDGEFLEET_CONTROL_URL") or None,
        }
        if values["tracking_uri"].startswith("sqlite:"):
            values["artifact_root"] = str(state / "mlruns")
        for key, value in (overrides or {}).items():
            if value is None or value == "":
                continue
            values[key] = value
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"training config: unknown setting(s) {', '.join(unknown)}")
        clean = dict(values)
        if isinstance(clean.get("families"), str):
            clean["families"] = tuple(f for f in clean["families"].split(",") if f)
        elif "families" in clean:
            clean["families"] = tuple(clean["families"])
        return cls(**clean)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the run folder -----------------------------------------------------------------------


def _run_dir(config: TrainingConfig, run_id: str) -> Path:
    safe = _RUN_ID_UNSAFE.sub("_", run_id).strip("._") or "run"
    return Path(config.workdir).absolute() / "runs" / safe


def _prune_runs(runs: Path, keep: int = KEEP_RUNS) -> None:
    folders = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _save(state: Mapping[str, Any], name: str, value: Any) -> None:
    with (Path(state["run_dir"]) / f"{name}.pkl").open("wb") as handle:
        pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)


def _load(state: Mapping[str, Any], name: str) -> Any:
    path = Path(state["run_dir"]) / f"{name}.pkl"
    try:
        with path.open("rb") as handle:
            return pickle.load(handle)  # noqa: S301 - written by this pipeline, this run
    except FileNotFoundError as err:
        raise TrainingError(
            f"the run folder lacks {path.name}: run the tasks in order "
            f"(extract, train, evaluate, export, register, promote), in the same run"
        ) from err


def _timed(state: Mapping[str, Any], task: str, started: float, **figures: Any) -> dict[str, Any]:
    timings = {**state.get("timings", {}), task: round(time.perf_counter() - started, 3)}
    return {**state, **figures, "timings": timings}


# --- tasks --------------------------------------------------------------------------------


def extract_task(config: TrainingConfig, run_id: str) -> dict[str, Any]:
    """Read the window's history and labels from the store, check it, split it by time."""
    started = time.perf_counter()
    if config.start_ns is not None and config.end_ns is not None:
        start_ns, end_ns = config.start_ns, config.end_ns
    else:
        span = store_time_range(config.store_url)
        if span is None:
            raise TrainingDataError(f"the store holds no readings to train on "
                                    f"({_redact(config.store_url)})")
        end_ns = span[1] + 1
        start_ns = max(span[0], end_ns - int(config.hours * 3600 * NS))
    labels = Path(config.labels)
    if not labels.exists():
        raise TrainingDataError(f"labels file {labels} does not exist")
    split = extract_step(config.store_url, labels, start_ns=start_ns, end_ns=end_ns,
                         hop=config.hop, min_windows=config.min_windows)
    run_dir = _run_dir(config, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    _prune_runs(run_dir.parent)
    state: dict[str, Any] = {"run_id": run_id, "run_dir": str(run_dir)}
    _save(state, "split", split)
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    return _timed(state, "extract", started, start_ns=start_ns, end_ns=end_ns,
                  windows={name: len(part) for name, part in parts.items()},
                  parts_ns={name: [part.start_ns, part.end_ns] for name, part in parts.items()})


def train_task(config: TrainingConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Fit every candidate; the best validation F1 is this run's model."""
    started = time.perf_counter()
    split: Split = _load(state, "split")
    trained = train_step(split, families=config.families, seed=config.seed,
                         min_windows=config.min_windows)
    _save(state, "trained", trained)
    return _timed(state, "train", started, candidate=trained.champion.candidate.name,
                  family=trained.champion.candidate.family,
                  validation_f1={f.candidate.name: round(f.validation_f1, 4)
                                 for f in trained.candidates},
                  train_seconds=round(trained.train_seconds, 3))


def evaluate_task(config: TrainingConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen model on the held-out test window: per kind, overall, detection delay."""
    started = time.perf_counter()
    split: Split = _load(state, "split")
    trained: TrainResult = _load(state, "trained")
    evaluation, scores = evaluate_step(trained, split)
    _save(state, "evaluation", (evaluation, scores))
    return _timed(state, "evaluate", started, test=evaluation.as_dict())


def export_task(config: TrainingConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """ONNX export through the parity and latency gates (a failure raises ExportGateError)."""
    started = time.perf_counter()
    split: Split = _load(state, "split")
    trained: TrainResult = _load(state, "trained")
    label = f"{trained.champion.candidate.family}-{_stamp()}"
    exported = export_step(trained, split, Path(state["run_dir"]) / "model.onnx",
                           name=config.model_name, version=label,
                           latency_budget_us=config.latency_budget_us)
    _save(state, "exported", exported)
    return _timed(state, "export", started, onnx_path=str(exported.path), model_label=label,
                  parity_max_abs_diff=exported.parity_max_abs_diff,
                  parity_label_agreement=exported.label_agreement,
                  onnx_p99_us_batch1=exported.onnx_p99_us_batch1,
                  sklearn_p99_us_batch1=exported.sklearn_p99_us_batch1)


def register_task(config: TrainingConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Log the run to MLflow and register the model as `challenger` (no tracking URI: the
    run stops after the gates and nothing is registered)."""
    started = time.perf_counter()
    if config.tracking_uri is None:
        return _timed(state, "register", started, registered=None)
    split: Split = _load(state, "split")
    trained: TrainResult = _load(state, "trained")
    evaluation, scores = _load(state, "evaluation")
    registration = register_step(
        tracking_uri=config.tracking_uri, model_name=config.model_name, split=split,
        trained=trained, evaluation=evaluation, exported=_load(state, "exported"),
        test_scores=scores, experiment=config.experiment,
        artifact_root=Path(config.artifact_root) if config.artifact_root else None,
    )
    return _timed(state, "register", started, registered=asdict(registration))


def promote_task(config: TrainingConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Move `champion` to the new version if it beats the champion on the same window."""
    started = time.perf_counter()
    if config.tracking_uri is None or not state.get("registered"):
        return _timed(state, "promote", started, promotion=None)
    promotion = promote_step(tracking_uri=config.tracking_uri,
                             registration=Registration(**state["registered"]),
                             split=_load(state, "split"))
    return _timed(state, "promote", started, promotion=asdict(promotion))


def request_rollout_task(
    config: TrainingConfig, state: Mapping[str, Any], *, token: str | None = None,
) -> dict[str, Any]:
    """Ask the control plane to roll the new champion out to the fleet.

    `POST {control_url}/v1/deployments` with `{"model": "NAME@champion", "version": V,
    "target": selector, "waves": [...], "requested_by": ...}` and the bearer token from
    `token` or $EDGEFLEET_CONTROL_TOKEN. With no control plane configured, or when this
    run's model did not become champion, nothing is requested and the reason is logged."""
    started = time.perf_counter()
    promotion = state.get("promotion")
    registered = state.get("registered")
    if not promotion or not promotion.get("promoted") or not registered:
        reason = "this run's model did not become champion; nothing to roll out"
        log.info(reason)
        return _timed(state, "request_rollout", started,
                      rollout={"requested": False, "reason": reason})
    if not config.control_url:
        reason = (f"no control plane configured (EDGEFLEET_CONTROL_URL); champion "
                  f"{registered['model_name']} v{registered['version']} is not rolled out")
        log.warning(reason)
        return _timed(state, "request_rollout", started,
                      rollout={"requested": False, "reason": reason})
    body = {
        "model": f"{registered['model_name']}@champion",
        "version": registered["version"],
        "target": config.rollout_target,
        "waves": [w.strip() for w in config.rollout_waves.split(",") if w.strip()],
        "requested_by": f"training_pipeline {state.get('run_id', '')}".strip(),
    }
    answer = _post_json(config.control_url.rstrip("/") + ROLLOUT_PATH, body,
                        token or os.environ.get("EDGEFLEET_CONTROL_TOKEN"))
    log.info("rollout of %s v%s requested: %s", registered["model_name"],
             registered["version"], answer)
    return _timed(state, "request_rollout", started,
                  rollout={"requested": True, "request": body, "answer": answer})


def _post_json(url: str, body: Mapping[str, Any], token: str | None,
               timeout_s: float = 30.0) -> Any:
    if not url.startswith(("http://", "https://")):
        raise RolloutRequestError(f"the control plane URL must be http:// or https://: {url}")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(),  # noqa: S310
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            text = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:500]
        raise RolloutRequestError(
            f"the control plane refused the rollout request: HTTP {err.code} {detail}"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        raise RolloutRequestError(f"cannot reach the control plane at {url}: {err}") from err
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {"text": text[:500]}


TASKS: Final[tuple[Callable[[TrainingConfig, Mapping[str, Any]], dict[str, Any]], ...]] = (
    train_task, evaluate_task, export_task, register_task, promote_task, request_rollout_task,
)


def run_inline(config: TrainingConfig, run_id: str | None = None) -> dict[str, Any]:
    """Every task in the DAG's order, in this process: `edgefleet train`."""
    state = extract_task(config, run_id or f"inline-{_stamp()}")
    for task in TASKS:
        state = task(config, state)
    return state



def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")


def _redact(url: str) -> str:
    """A URL with its password replaced, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)
