"""The benchmark commands run as users type them (short durations; figures are in
BENCHMARKS.md, not asserted as timings here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_protocols_prints_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "protocols", "--json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "EDGEFLEET_BENCH_SECONDS": "1"},
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("modbus_readings_per_s", "opcua_tags_per_s", "mqtt_msgs_per_s"):
        assert figures[key] > 0, key
    assert 0 < figures["modbus_cpu_percent"] <= 100 * os.cpu_count()  # type: ignore[operator]
    # Nothing is lost on the way: every published MQTT message was decoded.
    assert figures["mqtt_decoded"] == figures["mqtt_published"]
    assert figures["modbus_bad_samples"] == 0 and figures["opcua_bad_samples"] == 0


def test_bench_agent_prints_every_figure_and_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "agent", "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EDGEFLEET_BENCH_SECONDS": "2", "EDGEFLEET_BENCH_OUTAGE_S": "4",
             "EDGEFLEET_BENCH_BACKLOG_ROWS": "50000", "EDGEFLEET_BENCH_RATE": "20000"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for key in ("readings_per_s", "agent_cpu_cores", "modbus_e2e_readings_per_s",
                "rss_mb_empty", "rss_mb_backlog_5m", "infer_p99_us", "drain_ratio"):
        assert figures[key] > 0, key
    assert figures["lost_rows"] == 0
    assert figures["inference_rows"] > 0  # the model ran on the windows


def test_bench_fog_prints_every_figure_and_stores_each_row_once(
    stack_env: dict[str, str],
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "fog", "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, **stack_env, "EDGEFLEET_BENCH_SECONDS": "6",
             "EDGEFLEET_BENCH_COPY_ROWS": "20000", "EDGEFLEET_BENCH_KAFKA_MESSAGES": "20000"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for key in ("copy_rows_per_s", "naive_insert_rows_per_s", "e2e_rows_per_s",
                "kafka_msgs_per_s"):
        assert figures[key] > 0, key
    assert figures["e2e_rows_lost"] == 0 and figures["dup_run_rows_lost"] == 0
    assert figures["dup_rows_in_db"] == 0
    # Every second copy really reached the database and was removed there.
    assert figures["duplicates_removed"] == figures["dup_run_rows"] > 0


def test_bench_train_prints_every_figure_and_passes_the_gates() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "train", "--json"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EDGEFLEET_BENCH_HOURS": "3", "EDGEFLEET_BENCH_ASSETS": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    for key in ("f1_champion", "onnx_p99_us_batch1", "sklearn_p99_us_batch1", "train_seconds",
                "test_windows"):
        assert figures[key] > 0, key
    # The registered model passed the export gates (a failed gate would have exited non-zero).
    assert figures["parity_max_abs_diff"] <= 1e-4
    assert figures["onnx_p99_us_batch1"] <= 500
    assert figures["f1_per_kind"], "no anomaly kind in the test window"


def test_bench_rollout_prints_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "rollout", "--json"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "EDGEFLEET_BENCH_AGENTS": "12", "EDGEFLEET_BENCH_POLL_S": "0.5",
             "EDGEFLEET_BENCH_SHADOW_S": "0.5", "EDGEFLEET_BENCH_RPS_SECONDS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["agents"] == 12
    for key in ("converge_s", "desired_state_rps", "rollback_s"):
        assert figures[key] > 0, key
    # The rollback reached every agent that had run the bad model.
    assert figures["rollback_agents"] > 0
