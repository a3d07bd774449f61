"""`edgefleet train`: run the training pipeline inline and register a champion.

    edgefleet train                               simulate a labelled history into the
                                                  embedded store (first run), train, register
    edgefleet train --store postgresql://… --labels labels.jsonl --hours 24
    edgefleet train --tracking-uri http://127.0.0.1:5000

Defaults are embedded: the state folder is `--state-dir`, else $EDGEFLEET_STATE_DIR, else
`~/.local/state/edgefleet/train`; it holds the fog store `fog.db`, the labels, the exported
models, and MLflow's `mlflow.db` with its `mlruns/` artifact folder. The tracking URI is
`--tracking-uri`, else $MLFLOW_TRACKING_URI, else that local `sqlite:///…/mlflow.db`.

The window is the last `--hours` of readings in the store (with `--simulate`, or on a
first run on the embedded store, exactly the simulated history).

Exit status: 0 a champion is registered (this run's model, or the champion it did not
beat); 1 a step failed (bad data, a gate, the registry), with the reason on stderr;
2 usage.

Module-level imports are the standard library only (`edgefleet --help` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "default_state_dir", "run"]


def default_state_dir() -> Path:
    env = os.environ.get("EDGEFLEET_STATE_DIR")
    base = Path(env) if env else Path.home() / ".local" / "state" / "edgefleet"
    return base / "train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="folder for the embedded store, labels, models and MLflow "
                        "(default: $EDGEFLEET_STATE_DIR/train or ~/.local/state/edgefleet/train)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local "
                        "sqlite:/// store in the state folder)")
    parser.add_argument("--store", default=None,
                        help="fog store URL, sqlite:///… or postgresql://… (default: the "
                        "state folder's fog.db)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="labels JSONL of the episodes (default: the state folder's "
                        "labels.jsonl)")
    parser.add_argument("--simulate", action="store_true",
                        help="first write a simulated labelled history into the store "
                        "(implied on the embedded store when no labels exist yet)")
    parser.add_argument("--hours", type=float, default=12.0,
                        help="training window: the last H hours of readings (default 12)")
    parser.add_argument("--assets", type=int, default=6,
                        help="simulated assets (default 6)")
    parser.add_argument("--seed", type=int, default=7, help="simulation and model seed")
    parser.add_argument("--anomaly-rate", type=float, default=0.15,
                        help="simulated share of time in anomaly episodes (default 0.15)")
    parser.add_argument("--hop", type=int, default=5,
                        help="a feature window every N samples per asset (default 5)")
    parser.add_argument("--families", default=None,
                        help="comma-separated candidate families (default: all of "
                        "isolation_forest, random_forest, logistic_regression, one_class_svm)")
    parser.add_argument("--model-name", default=None,
                        help="registered model name (default edgefleet-anomaly)")
    parser.add_argument("--latency-budget-us", type=float, default=None,
                        help="p99 budget per batch of 1 for the ONNX model (default 500)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError

    from .candidates import FAMILIES
    from .data import simulate_history
    from .errors import TrainingError
    from .export import DEFAULT_LATENCY_BUDGET_US
    from .registry import DEFAULT_MODEL_NAME
    from .tasks import TrainingConfig, run_inline

    state = (args.state_dir or default_state_dir()).absolute()
    state.mkdir(parents=True, exist_ok=True)
    embedded_store = args.store is None
    store_url = args.store or f"sqlite://{state / 'fog.db'}"  # state is absolute
    labels = args.labels or state / "labels.jsonl"
    tracking_uri = (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{state / 'mlflow.db'}")  # SQLAlchemy: 4 slashes, absolute
    local_tracking = tracking_uri.startswith("sqlite:")
    if args.hours <= 0 or args.assets < 1:
        raise CliError("--hours must be positive and --assets at least 1")
    try:
        config = TrainingConfig(
            store_url=store_url, labels=str(labels), workdir=str(state),
            tracking_uri=tracking_uri, model_name=args.model_name or DEFAULT_MODEL_NAME,
            hours=args.hours, hop=args.hop,
            families=tuple(args.families.split(",")) if args.families else FAMILIES,
            seed=args.seed,
            latency_budget_us=args.latency_budget_us or DEFAULT_LATENCY_BUDGET_US,
            artifact_root=str(state / "mlruns") if local_tracking else None,
            control_url=os.environ.get("EDGEFLEET_CONTROL_URL") or None,
        )
    except ValueError as err:
        raise CliError(str(err)) from err

    started = time.perf_counter()
    try:
        if args.simulate or (embedded_store and not labels.exists()):
            history = simulate_history(store_url, labels, hours=args.hours, assets=args.assets,
                                       seed=args.seed, anomaly_rate=args.anomaly_rate)
            config = replace(config, start_ns=history.start_ns, end_ns=history.end_ns)
            print(f"simulated {args.hours:g} h of {args.assets} assets: {history.readings} "
                  f"readings, {len(history.episodes)} episodes → {store_url}", file=sys.stderr)
        elif not labels.exists():
            raise CliError(f"labels file {labels} does not exist (give --labels, or "
                           "--simulate to write a simulated history)")
        result = run_inline(config)
    except (TrainingError, ValueError) as err:
        raise CliError(str(err), 1) from err
    summary = summarise(result, tracking_uri, time.perf_counter() - started)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(render(summary))
    return 0 if summary["champion_version"] is not None else 1


def summarise(state: dict[str, Any], tracking_uri: str, seconds: float) -> dict[str, Any]:
    """The run's figures (the tasks' final state) as one JSON-serialisable dict."""
    registered = state.get("registered") or {}
    promotion = state.get("promotion") or {}
    return {
        "tracking_uri": tracking_uri,
        "model_name": registered.get("model_name"),
        "version": registered.get("version"),
        "promoted": bool(promotion.get("promoted")),
        "promotion": promotion.get("reason", "not registered"),
        "champion_version": promotion.get("champion_version"),
        "candidate": state["candidate"],
        "validation_f1": state["validation_f1"],
        "test": state["test"],
        "windows": state["windows"],
        "parity_max_abs_diff": state["parity_max_abs_diff"],
        "parity_label_agreement": state["parity_label_agreement"],
        "onnx_p99_us_batch1": state["onnx_p99_us_batch1"],
        "sklearn_p99_us_batch1": state["sklearn_p99_us_batch1"],
        "train_seconds": state["train_seconds"],
        "timings": state["timings"],
        "rollout": state.get("rollout"),
        "total_seconds": seconds,
        "onnx_path": state["onnx_path"],
    }


def render(summary: dict[str, Any]) -> str:
    test = summary["test"]
    overall = test["overall"]
    lines = [
        "candidates (validation F1): "
        + ", ".join(f"{name} {f1:.3f}" for name, f1 in summary["validation_f1"].items()),
        f"chosen: {summary['candidate']} (threshold {test['threshold']:.4g})",
        f"windows: train {summary['windows']['train']}, validation "
        f"{summary['windows']['validation']}, test {summary['windows']['test']}",
        f"test: {_row(overall)}",
    ]
    lines += [f"  {kind:<13} {_row(m)}" for kind, m in test["per_kind"].items()]
    lines += [
        f"ONNX: parity max |diff| {summary['parity_max_abs_diff']:.2g} (labels agree "
        f"{summary['parity_label_agreement']:.2%}), p99 batch 1: onnx "
        f"{summary['onnx_p99_us_batch1']:.0f} µs, "
        f"sklearn {summary['sklearn_p99_us_batch1']:.0f} µs",
        f"train {summary['train_seconds']:.1f} s, total {summary['total_seconds']:.1f} s",
        f"registry {summary['tracking_uri']}: {summary['model_name']} v{summary['version']} "
        f"@challenger; {summary['promotion']}; champion is v{summary['champion_version']}",
    ]
    return "\n".join(lines)


def _row(m: dict[str, Any]) -> str:
    delay = "-" if m["median_delay_s"] is None else f"{m['median_delay_s']:.0f} s"
    roc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
    pr = "-" if m["pr_auc"] is None else f"{m['pr_auc']:.3f}"
    return (f"F1 {m['f1']:.3f} P {m['precision']:.3f} R {m['recall']:.3f} ROC-AUC {roc} "
            f"PR-AUC {pr} episodes {m['detected']}/{m['episodes']} median delay {delay}")
