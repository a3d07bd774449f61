"""The three Airflow DAGs, each run with `dag.test()` (`python -m edgefleet.cloud.dags`) in
its own process, against the launcher's PostgreSQL (the fog store: a database of this
module's own) and MLflow server. Airflow's metadata database is SQLite under tmp.

The control plane the training DAG asks for a rollout is a recording HTTP server here: the
real one is not built yet, and this pins the request it will have to accept."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from edgefleet.cloud.dags import FOLDER, RETRAIN_REQUEST_URI
from edgefleet.cloud.training.data import simulate_history
from edgefleet.fog_gateway.store import open_store
from edgefleet.protocols.wire import Batch, Quality, Reading

pytestmark = pytest.mark.integration

NS = 1_000_000_000
START_NS = 1_617_235_200 * NS  # 2021-04-01T00:00:00Z
HOURS = 3.0
FAMILIES = "isolation_forest,random_forest"


@dataclass
class Env:
    env: dict[str, str]
    store_url: str
    tracking_uri: str
    model_name: str
    history_end_ns: int
    train_end_ns: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)


def run_dag(env: Env, dag_id: str, conf: dict[str, Any] | None = None,
            extra_env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The runner's JSON outcome and its whole output (Airflow's log, the task logs)."""
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.cloud.dags", dag_id, "--conf", json.dumps(conf or {})],
        capture_output=True, text=True, timeout=600, env={**env.env, **(extra_env or {})},
    )
    output = result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    try:
        outcome = json.loads(last)
    except ValueError:
        pytest.fail(f"{dag_id} printed no outcome (exit {result.returncode}):\n{output[-4000:]}")
    assert result.returncode == (0 if outcome["state"] == "success" else 1)
    return outcome, output


@pytest.fixture(scope="module")
def dag_env(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    import psycopg

    home = tmp_path_factory.mktemp("airflow")
    database = f"dags_{secrets.token_hex(4)}"
    base = urlsplit(stack_env["EDGEFLEET_PG_URL"])
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    store_url = urlunsplit(base._replace(path=f"/{database}"))
    labels = home / "labels.jsonl"
    history = simulate_history(store_url, labels, hours=HOURS, assets=3, seed=7,
                               start_ns=START_NS, device="dags-gw-01")
    env = {
        **stack_env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # As deployed: unpaused, so an asset event queues the DAGs scheduled on it.
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "EDGEFLEET_TRAIN_STORE": store_url,
        "EDGEFLEET_TRAIN_LABELS": str(labels),
        "EDGEFLEET_TRAIN_WORKDIR": str(home / "work"),
        "EDGEFLEET_STATE_DIR": str(home / "state"),
    }
    env.pop("EDGEFLEET_CONTROL_URL", None)
    airflow = Path(sys.executable).with_name("airflow")
    migrated = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True,
                              timeout=300, env=env)
    assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
    yield Env(env, store_url, stack_env["MLFLOW_TRACKING_URI"],
              f"edgefleet-dags-{secrets.token_hex(4)}", history.end_ns)
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


class _Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "body": json.loads(body)})
        answer = json.dumps({"deployment": "dep-1", "state": "pending"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def control_plane() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    recorded: list[dict[str, Any]] = []
    handler = type("Recorder", (_Recorder,), {"requests": recorded})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", recorded
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trained(dag_env: Env, control_plane: tuple[str, list[dict[str, Any]]]) -> Env:
    """One training_pipeline run with a control plane configured: the first champion."""
    url, _ = control_plane
    outcome, output = run_dag(
        dag_env, "training_pipeline",
        {"model_name": dag_env.model_name, "families": FAMILIES,
         "rollout_target": "site=plant-a", "start_ns": START_NS,
         "end_ns": dag_env.history_end_ns},
        {"EDGEFLEET_CONTROL_URL": url, "EDGEFLEET_CONTROL_TOKEN": "operator-token-for-test"},
    )
    assert outcome["state"] == "success", output[-6000:]
    dag_env.outputs["first"] = outcome
    dag_env.train_end_ns = outcome["returns"]["extract"]["parts_ns"]["train"][1]
    return dag_env


def test_training_pipeline_registers_promotes_and_requests_a_rollout(
    trained: Env, control_plane: tuple[str, list[dict[str, Any]]]
) -> None:
    from mlflow import MlflowClient

    outcome = trained.outputs["first"]
    assert outcome["tasks"] == dict.fromkeys(
        ("extract", "train", "evaluate", "export", "register", "promote", "request_rollout"),
        "success")
    final = outcome["returns"]["request_rollout"]
    assert final["promotion"]["promoted"] and final["promotion"]["reason"] == "no champion yet"
    assert final["parity_max_abs_diff"] <= 1e-4
    assert final["family"] in ("isolation_forest", "random_forest")
    client = MlflowClient(tracking_uri=trained.tracking_uri)
    champion = client.get_model_version_by_alias(trained.model_name, "champion")
    assert str(champion.version) == final["registered"]["version"] == "1"
    assert champion.tags["data_window"] == "2021-04-01T00:00:00Z/2021-04-01T03:00:00Z"
    # Secrets stay out of the XComs: the store URL and the token are nowhere in them.
    assert trained.store_url not in json.dumps(outcome["returns"])
    # The rollout request reached the control plane, authenticated, for this version.
    _, recorded = control_plane
    assert recorded == [{
        "path": "/v1/deployments", "auth": "Bearer operator-token-for-test",
        "body": {"model": f"{trained.model_name}@champion", "version": "1",
                 "target": "site=plant-a", "waves": ["1", "10%", "50%", "100%"],
                 "requested_by": f"training_pipeline {outcome['run_id']}"},
    }]
    assert final["rollout"]["answer"] == {"deployment": "dep-1", "state": "pending"}


def test_a_model_that_does_not_beat_the_champion_stays_challenger(
    trained: Env, control_plane: tuple[str, list[dict[str, Any]]]
) -> None:
    from mlflow import MlflowClient

    url, recorded = control_plane
    before = len(recorded)
    outcome, output = run_dag(
        trained, "training_pipeline",
        {"model_name": trained.model_name, "families": FAMILIES, "start_ns": START_NS,
         "end_ns": trained.history_end_ns},
        {"EDGEFLEET_CONTROL_URL": url},
    )
    assert outcome["state"] == "success", output[-6000:]
    final = outcome["returns"]["request_rollout"]
    assert not final["promotion"]["promoted"]
    assert final["rollout"] == {"requested": False, "reason": "this run's model did not "
                                "become champion; nothing to roll out"}
    assert len(recorded) == before
    client = MlflowClient(tracking_uri=trained.tracking_uri)
    assert str(client.get_model_version_by_alias(trained.model_name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(trained.model_name, "challenger").version) \
        == final["registered"]["version"] == "2"


def test_training_pipeline_fails_on_an_empty_window_and_registers_nothing(
    trained: Env,
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained.tracking_uri)
    versions = len(client.search_model_versions(f"name = '{trained.model_name}'"))
    later = trained.history_end_ns + 24 * 3600 * NS
    outcome, output = run_dag(
        trained, "training_pipeline",
        {"model_name": trained.model_name, "families": FAMILIES, "start_ns": later,
         "end_ns": later + 3600 * NS},
    )
    assert outcome["state"] == "failed"
    assert outcome["tasks"]["extract"] == "failed"
    assert {outcome["tasks"][t] for t in ("train", "register", "promote")} == {"upstream_failed"}
    assert "is empty: no feature windows" in output
    assert len(client.search_model_versions(f"name = '{trained.model_name}'")) == versions


def test_drift_monitor_requests_retraining_only_on_drift(trained: Env) -> None:
    # The champion's own training period: no drift, no event.
    outcome, output = run_dag(trained, "drift_monitor",
                              {"model_name": trained.model_name, "hours": 1.0,
                               "end_ns": trained.train_end_ns})
    assert outcome["state"] == "success", output[-6000:]
    assert outcome["tasks"] == {"measure": "success", "request_retraining": "skipped"}
    assert not outcome["returns"]["measure"]["drifted"]
    assert outcome["asset_events"] == []

    # Later, the plant spends 70 % of its time in anomalies instead of 15 %.
    shifted_start = trained.history_end_ns + 3600 * NS
    shifted = simulate_history(trained.store_url, Path(trained.env["AIRFLOW_HOME"]) / "x.jsonl",
                               hours=2, assets=3, seed=7, anomaly_rate=0.7,
                               start_ns=shifted_start, device="dags-gw-02")
    outcome, output = run_dag(trained, "drift_monitor",
                              {"model_name": trained.model_name, "hours": 1.0,
                               "end_ns": shifted.end_ns})
    assert outcome["state"] == "success", output[-6000:]
    assert outcome["tasks"] == {"measure": "success", "request_retraining": "success"}
    report = outcome["returns"]["measure"]
    assert report["drifted"] and len(report["drifted_features"]) >= 3
    [event] = outcome["asset_events"]
    assert event["uri"] == RETRAIN_REQUEST_URI
    assert event["extra"]["champion_version"] == "1"
    assert event["extra"]["drifted_features"] == report["drifted_features"]
    # Airflow queued a training_pipeline run on the event (its scheduler starts it).
    assert outcome["queued_dags"] == ["training_pipeline"]


def test_drift_monitor_skips_when_there_is_no_champion(dag_env: Env) -> None:
    outcome, output = run_dag(dag_env, "drift_monitor",
                              {"model_name": f"never-trained-{secrets.token_hex(3)}"})
    assert outcome["state"] == "success", output[-6000:]
    assert outcome["tasks"] == {"measure": "skipped", "request_retraining": "skipped"}
    assert "has no champion to compare against" in output
    assert outcome["asset_events"] == []


def test_data_quality_passes_a_complete_store_and_fails_loudly_on_gaps(dag_env: Env) -> None:
    outcome, output = run_dag(dag_env, "data_quality")
    assert outcome["state"] == "success", output[-6000:]
    report = outcome["returns"]["completeness"]
    assert report["failing"] == [] and report["ratio"] == 1.0

    # A device whose link dropped 100 of its 300 seqs.
    ts = START_NS + int(HOURS * 3600 * NS) + 7 * 24 * 3600 * NS
    batches = [
        Batch(device="dags-gappy-01", first_seq=first, last_seq=first + 99, sent_at=ts,
              readings=tuple(Reading("dags-gappy-01", "pump-01", "flow", ts + seq * NS, 1.0,
                                     Quality.GOOD, seq) for seq in range(first, first + 100)))
        for first in (0, 200)
    ]
    store = open_store(dag_env.store_url)
    try:
        store.write(batches)
    finally:
        store.close()
    outcome, output = run_dag(dag_env, "data_quality", {"min_ratio": 0.99})
    assert outcome["state"] == "failed"
    assert outcome["tasks"] == {"completeness": "failed"}
    assert re.search(r"1 of \d device\(s\) below 99\.00% completeness", output)
    assert "dags-gappy-01 66.6667% (100 of 300 seqs missing)" in output
