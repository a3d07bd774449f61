"""`edgefleet bench train`: the whole pipeline on a simulated history, embedded defaults.

Figures: `f1_champion` (test F1 of the registered champion on the held-out window),
`parity_max_abs_diff` (ONNX vs scikit-learn on the test rows), `onnx_p99_us_batch1` and
`sklearn_p99_us_batch1` (the same row, the same run), `train_seconds` (fitting every
candidate), plus the per-kind test F1 and the time each stage took.

Size by environment: EDGEFLEET_BENCH_HOURS (default 12), EDGEFLEET_BENCH_ASSETS (6).
Everything lives in a temporary folder (fog store, labels, MLflow sqlite store).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["bench_train"]


def bench_train() -> dict[str, Any]:
    from .data import simulate_history
    from .tasks import TrainingConfig, run_inline

    hours = float(os.environ.get("EDGEFLEET_BENCH_HOURS", "12"))
    assets = int(os.environ.get("EDGEFLEET_BENCH_ASSETS", "6"))
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-train-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        history = simulate_history(f"sqlite://{folder / 'fog.db'}", folder / "labels.jsonl",
                                   hours=hours, assets=assets)
        simulate_seconds = time.perf_counter() - started
        state = run_inline(TrainingConfig(
            store_url=history.store_url, labels=str(history.labels_path),
            start_ns=history.start_ns, end_ns=history.end_ns, workdir=str(folder),
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            artifact_root=str(folder / "mlruns"),
        ))
    overall = state["test"]["overall"]
    assert state["promotion"]["promoted"]  # a fresh registry
    return {
        "f1_champion": round(overall["f1"], 4),
        "f1_per_kind": {k: round(m["f1"], 4) for k, m in state["test"]["per_kind"].items()},
        "roc_auc_champion": overall["roc_auc"],
        "pr_auc_champion": overall["pr_auc"],
        "median_detection_delay_s": overall["median_delay_s"],
        "episodes_detected": f"{overall['detected']}/{overall['episodes']}",
        "champion_candidate": state["candidate"],
        "parity_max_abs_diff": state["parity_max_abs_diff"],
        "onnx_p99_us_batch1": round(state["onnx_p99_us_batch1"], 1),
        "sklearn_p99_us_batch1": round(state["sklearn_p99_us_batch1"], 1),
        "train_seconds": round(state["train_seconds"], 2),
        "simulate_seconds": round(simulate_seconds, 2),
        "extract_seconds": round(state["timings"]["extract"], 2),
        "register_seconds": round(state["timings"]["register"]
                                  + state["timings"]["promote"], 2),
        "history_hours": hours,
        "assets": assets,
        "test_windows": state["windows"]["test"],
    }
