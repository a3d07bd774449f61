"""A real `edgefleet agent run` process following a real `edgefleet control run`: enrolled
with a one-time token, it installs signed models from a 100 % wave, shadows each new one on
its live windows, swaps it in (its inference rows change model version), refuses to swap a
model that fails on live data (the deployment rolls back by itself), and rolls back on an
operator's order with the control plane's artifacts out of reach. The operator's side goes
through `edgefleet fleet`, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet.cloud.control.harness import ControlProcess, build_nan_model, build_registry
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.edge_agent.harness import AgentProcess, write_agent_config
from edgefleet.edge_agent.sink import LocalSink
from edgefleet.protocols.features import FeatureSpec
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

NAME = "line-anomaly"
DEVICE = "gw-real-01"
SPEC = FeatureSpec(tags=("t0", "t1"), window=10, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
SOURCE = {"type": "synthetic", "name": "synthetic", "assets": 2, "tags": ["t0", "t1"],
          "rows_per_s": 50, "poll_interval_s": 0.1}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """v1 and v2: honest z-score models; v3: NaN on live rows (t0's mean is about 50)."""
    folder = tmp_path_factory.mktemp("registry")
    models = [
        build_zscore_model(folder / f"v{n}.onnx", SPEC, means=[50.0] * WIDTH,
                           stds=[std] * WIDTH, name=NAME, version=f"zscore-{n}")
        for n, std in ((1, 100.0), (2, 200.0))
    ]
    models.append(build_nan_model(folder / "v3.onnx", SPEC, means=[50.0] * WIDTH,
                                  stds=[100.0] * WIDTH, trigger_index=0, trigger_above=10.0,
                                  name=NAME, version="zscore-nan"))
    return build_registry(folder, NAME, models)


@pytest.fixture
def control(tmp_path: Path, registry: str) -> Iterator[ControlProcess]:
    with ControlProcess(tmp_path / "control", tracking_uri=registry, shadow_s=1.0,
                        poll_s=0.5) as process:
        yield process


def fleet(control: ControlProcess, *args: str) -> subprocess.CompletedProcess[str]:
    token = control.operator_headers()["Authorization"].split(" ", 1)[1]
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "fleet", *args], capture_output=True,
        text=True, timeout=60,
        env={**os.environ, "EDGEFLEET_CONTROL_URL": control.url,
             "EDGEFLEET_CONTROL_TOKEN": token})


def deploy(control: ControlProcess, version: str) -> str:
    done = fleet(control, "deploy", "--model", f"{NAME}/{version}", "--target", "site=test",
                 "--waves", "100%", "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["id"])


def deployment(control: ControlProcess, deployment_id: str) -> dict[str, Any]:
    done = fleet(control, "status", deployment_id, "--json")
    assert done.returncode in (0, 1), done.stderr
    view: dict[str, Any] = json.loads(done.stdout)
    return view


def model_versions(sink: LocalSink) -> set[str]:
    """Model versions in the inference rows the agent forwarded lately."""
    return {r.tag.split(":")[1] for r in list(sink.readings)[-400:] if r.tag.startswith("ml:")}


def test_an_agent_follows_rollouts_refuses_a_bad_model_and_rolls_back_offline(
    tmp_path: Path, control: ControlProcess
) -> None:
    # Enrolled as an operator and a gateway would: a one-time token from `edgefleet fleet`,
    # exchanged by `edgefleet agent enroll`, which prints the agent's fleet section.
    made = fleet(control, "enrollment-token", "--label", "site=test")
    assert made.returncode == 0, made.stderr
    enrolled = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "agent", "enroll", "--url", control.url,
         "--token", "-", "--device", DEVICE, "--state-dir", str(tmp_path / "agent" / "state")],
        input=made.stdout, capture_output=True, text=True, timeout=60)
    assert enrolled.returncode == 0, enrolled.stderr
    section = yaml.safe_load(enrolled.stdout)["fleet"]
    assert (tmp_path / "agent" / "state" / "device.token").stat().st_mode & 0o777 == 0o600

    with LocalSink(keep_readings=5000) as sink:
        config = write_agent_config(
            tmp_path / "agent", fog_url=sink.url, sources=[SOURCE], device=DEVICE,
            state_dir=str(tmp_path / "agent" / "state"),
            fleet={**section, "poll_min_s": 0.2, "poll_max_s": 1.0, "backoff_cap_s": 2.0})
        with AgentProcess(config) as agent:
            # v1 from the fleet: no model before, so nothing to compare in the shadow.
            first = deploy(control, "1")
            wait_for(lambda: deployment(control, first)["state"] == "succeeded",
                     "v1 rolled out", timeout_s=60,
                     details=lambda: agent.log()[-3000:] + control.log()[-2000:])
            wait_for(lambda: model_versions(sink) == {"zscore-1"}, "v1 scoring live data",
                     timeout_s=30, details=lambda: str(model_versions(sink)))

            # v2 is shadowed beside v1 on live windows, then swapped in.
            second = deploy(control, "2")
            wait_for(lambda: deployment(control, second)["state"] == "succeeded",
                     "v2 rolled out", timeout_s=60, details=lambda: agent.log()[-3000:])
            wait_for(lambda: model_versions(sink) == {"zscore-2"}, "v2 scoring live data",
                     timeout_s=30, details=lambda: str(model_versions(sink)))
            devices = json.loads(fleet(control, "devices", "--json").stdout)
            [me] = [d for d in devices if d["device"] == DEVICE]
            assert me["current_model"] == f"{NAME}/2" and me["shadow"]["rows"] > 0
            assert me["shadow"]["anomaly_rate_shift"] is not None

            # v3 fails on every live window in the shadow: never swapped in, rolled back.
            third = deploy(control, "3")
            wait_for(lambda: deployment(control, third)["state"] == "rolled_back",
                     "the NaN model rolled back", timeout_s=60,
                     details=lambda: agent.log()[-3000:] + control.log()[-3000:])
            reasons = " ".join(deployment(control, third)["progress"]["reasons"])
            assert DEVICE in reasons, reasons
            assert model_versions(sink) == {"zscore-2"}

            # An operator rolls the fleet back to v1 with the artifacts out of reach: the
            # agent needs nothing but the desired state (v1 is still on its disk).
            for path in (control.artifact_root / NAME / "1").iterdir():
                path.unlink()
            assert fleet(control, "rollback", second).returncode == 0
            wait_for(lambda: model_versions(sink) == {"zscore-1"}, "back on v1",
                     timeout_s=60, details=lambda: agent.log()[-3000:])
            assert "rolled_back" in agent.log() or "rolled back" in agent.log()
