"""The training DAG's task layer, drift statistics and the data-quality check, without
Airflow: the task callables are plain functions."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.cloud.training.drift import ks_from_quantiles, psi
from edgefleet.cloud.training.errors import TrainingError
from edgefleet.cloud.training.quality import DataQualityError, check_completeness
from edgefleet.cloud.training.tasks import (
    KEEP_RUNS,
    RolloutRequestError,
    TrainingConfig,
    _prune_runs,
    request_rollout_task,
    train_task,
)
from edgefleet.fog_gateway.store import open_store
from edgefleet.protocols.wire import Batch, Quality, Reading

NS = 1_000_000_000


def _reference(column: np.ndarray) -> tuple[list[float], list[float], dict[str, float]]:
    edges = np.unique(np.quantile(column, np.linspace(0, 1, 11)))
    counts = np.histogram(column, bins=edges)[0]
    quantiles = {str(q): float(np.quantile(column, q))
                 for q in (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)}
    return edges.tolist(), (counts / counts.sum()).tolist(), quantiles


def test_psi_and_ks_are_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(3)
    edges, fractions, quantiles = _reference(rng.normal(0, 1, 20_000))
    same = rng.normal(0, 1, 5_000)
    shifted = rng.normal(0.8, 1, 5_000)
    assert psi(edges, fractions, same) < 0.02
    assert ks_from_quantiles(quantiles, same) < 0.03
    assert psi(edges, fractions, shifted) > 0.5
    assert ks_from_quantiles(quantiles, shifted) > 0.25
    # Values beyond the reference's range fall into the outer bins, not out of the count.
    assert psi(edges, fractions, np.full(100, 50.0)) > 5


def test_a_point_mass_in_both_samples_is_not_drift() -> None:
    rng = np.random.default_rng(4)
    reference = np.r_[np.zeros(6_000), rng.exponential(1, 4_000)]  # 60 % exactly zero
    recent = np.r_[np.zeros(600), rng.exponential(1, 400)]
    edges, fractions, quantiles = _reference(reference)
    assert ks_from_quantiles(quantiles, recent) < 0.05
    assert psi(edges, fractions, recent) < 0.05
    assert ks_from_quantiles(quantiles, np.ones(1000)) > 0.5


def test_psi_of_a_constant_reference_counts_every_new_value() -> None:
    assert psi([2.0], [1.0], np.full(50, 2.0)) == pytest.approx(0.0, abs=1e-9)
    assert psi([2.0], [1.0], np.r_[np.full(25, 2.0), np.full(25, 3.0)]) > 1


def test_config_comes_from_the_environment_then_the_params(tmp_path: Path) -> None:
    env = {"EDGEFLEET_TRAIN_STORE": "postgresql://u:secret@db/fog",
           "EDGEFLEET_TRAIN_LABELS": "/data/labels.jsonl",
           "MLFLOW_TRACKING_URI": "http://mlflow:5000", "EDGEFLEET_STATE_DIR": str(tmp_path),
           "EDGEFLEET_CONTROL_URL": "https://control:8443"}
    config = TrainingConfig.from_env({"hours": 6, "families": "random_forest",
                                      "start_ns": None, "rollout_target": ""}, env=env)
    assert config.store_url == "postgresql://u:secret@db/fog"
    assert config.tracking_uri == "http://mlflow:5000" and config.artifact_root is None
    assert config.hours == 6 and config.families == ("random_forest",)
    assert config.workdir == str(tmp_path / "train") and config.start_ns is None
    embedded = TrainingConfig.from_env(env={"EDGEFLEET_STATE_DIR": str(tmp_path)})
    assert embedded.store_url == f"sqlite://{tmp_path}/train/fog.db"
    assert embedded.tracking_uri == f"sqlite:///{tmp_path}/train/mlflow.db"
    assert embedded.artifact_root == str(tmp_path / "train" / "mlruns")


@pytest.mark.parametrize(("values", "message"), [
    ({"hours": 0}, "hours must be positive"),
    ({"families": "xgboost"}, "families must be among"),
    ({"start_ns": 5}, "give both start_ns and end_ns"),
    ({"control_url": "file:///etc/passwd"}, "control_url must be http"),
    ({"learning_rate": 1}, "unknown setting"),
])
def test_bad_config_is_refused_with_the_reason(values: dict[str, Any], message: str) -> None:
    base = {"store_url": "sqlite:///x.db", "labels": "l.jsonl", "workdir": "/tmp/w"}
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_dict({**base, **values})


def _config(tmp_path: Path, **values: Any) -> TrainingConfig:
    return TrainingConfig(store_url=f"sqlite:///{tmp_path}/fog.db", labels="labels.jsonl",
                          workdir=str(tmp_path), **values)


def test_a_task_run_out_of_order_says_so(tmp_path: Path) -> None:
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    with pytest.raises(TrainingError, match="run the tasks in order"):
        train_task(_config(tmp_path), {"run_dir": str(tmp_path / "runs" / "r1")})


def test_only_the_newest_run_folders_are_kept(tmp_path: Path) -> None:
    import os

    for i in range(KEEP_RUNS + 3):
        folder = tmp_path / f"run-{i}"
        folder.mkdir()
        os.utime(folder, (1_000_000 + i, 1_000_000 + i))
    _prune_runs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"run-{i}" for i in range(3, KEEP_RUNS + 3)]


PROMOTED = {"run_id": "r", "registered": {"model_name": "m", "version": "4"},
            "promotion": {"promoted": True}}


def test_no_rollout_without_a_control_plane_or_a_new_champion(tmp_path: Path) -> None:
    out = request_rollout_task(_config(tmp_path), PROMOTED)
    assert out["rollout"]["requested"] is False
    assert "no control plane configured" in out["rollout"]["reason"]
    out = request_rollout_task(_config(tmp_path, control_url="http://127.0.0.1:9"),
                               {**PROMOTED, "promotion": {"promoted": False}})
    assert out["rollout"] == {"requested": False, "reason": "this run's model did not become "
                              "champion; nothing to roll out"}


@pytest.fixture
def refusing_control_plane() -> Iterator[str]:
    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"detail": "model edgefleet-anomaly v4 is not signed"}).encode()
            self.send_response(422)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refused_rollout_request_fails_the_task_with_the_answer(
    tmp_path: Path, refusing_control_plane: str
) -> None:
    with pytest.raises(RolloutRequestError, match=r"HTTP 422.*is not signed"):
        request_rollout_task(_config(tmp_path, control_url=refusing_control_plane), PROMOTED)
    with pytest.raises(RolloutRequestError, match="cannot reach the control plane"):
        request_rollout_task(_config(tmp_path, control_url="http://127.0.0.1:9"), PROMOTED)


def _write(url: str, device: str, firsts: tuple[int, ...], size: int = 50) -> None:
    store = open_store(url)
    try:
        store.write([
            Batch(device=device, first_seq=first, last_seq=first + size - 1, sent_at=NS,
                  readings=tuple(Reading(device, "pump-01", "flow", (seq + 1) * NS, 1.0,
                                         Quality.GOOD, seq)
                                 for seq in range(first, first + size)))
            for first in firsts
        ])
    finally:
        store.close()


def test_data_quality_names_every_device_below_the_threshold(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fog.db"
    with pytest.raises(DataQualityError, match="no readings from any device"):
        check_completeness(url)
    _write(url, "gw-ok", (0, 50))
    _write(url, "gw-gappy", (0, 100))  # seqs 50..99 never arrived
    report = check_completeness(url, min_ratio=0.5)
    assert report.ratio == pytest.approx(200 / 250)
    with pytest.raises(DataQualityError,
                       match=r"1 of 2 device\(s\) below 99\.90% completeness: gw-gappy "
                             r"66\.6667% \(50 of 150 seqs missing\)"):
        check_completeness(url)
    with pytest.raises(ValueError, match="min_ratio"):
        check_completeness(url, min_ratio=1.5)
