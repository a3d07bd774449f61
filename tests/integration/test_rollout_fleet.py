"""Staged rollouts end to end: `edgefleet control run` as a real process (SQLite; one
scenario on the launcher's PostgreSQL), 1,000 simulated agents (`SimulatedFleet`: the
agent's own model-management code, ModelUpdater, FleetClient and ModelStore, in one
process) and 3 real `edgefleet agent run` processes, all enrolled in one fleet.

The real agents score synthetic data (temp ≈ 50, vib ≈ 60) with the fleet's models; the
simulated ones score draws around 0. Wave 1 (one device) may pick either kind; where the
two kinds of device fail differently, each scenario asserts what its wave-1 device must
show (a real agent sees NaN on every window of model 5 and refuses to swap it in; a
simulated one sees NaN on a third of its batches, swaps, and the gate rolls it back).

Models (one registered name, genuine ONNX files in a local sqlite MLflow registry):

| version | what | expected fate |
|---------|------|---------------|
| 1 | max-|z| model, means 0 | the fleet's starting model |
| 2 | means 0.1 | converges through waves 1,10%,50%,100% |
| 3 | a good model whose stored artifact is corrupted after publishing | stopped in wave 1 |
| 4 | a valid model for another feature spec (6 features, not 4) | refused: wrong_schema |
| 5 | NaN whenever feature 0 > 5.5 (live spikes), finite on the probe | fails in the shadow |
| 6 | means 0.15 | reaches agents that were offline when their wave started |

Assertions go through the API (`/v1/deployments/{id}`, `/v1/devices`) and through the
fleet (what each agent serves, its updater's counters). Every device enrolled in the
control plane, real agents included, must end on the expected model.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from edgefleet.cloud.control.harness import ControlProcess, build_nan_model, build_registry
from edgefleet.cloud.control.simfleet import SimulatedFleet, memory_tempdir
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.edge_agent.harness import AgentProcess, write_agent_config
from edgefleet.edge_agent.model_manager import ModelStore
from edgefleet.edge_agent.sink import LocalSink
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import load_public_key
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

NAME = "line-anomaly"
SPEC = FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))
OTHER_SPEC = FeatureSpec(tags=("temp", "vib", "pressure"), window=4, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
AGENTS = int(os.environ.get("EDGEFLEET_TEST_AGENTS", 1000))
PG_AGENTS = 60  # the PostgreSQL scenario shows the SQL paths, not the scale
REAL_AGENTS = 3
REAL_SOURCE = {"type": "synthetic", "name": "synthetic", "assets": 1, "tags": ["temp", "vib"],
               "rows_per_s": 20, "poll_interval_s": 0.25}
POLL_S = 1.0
SHADOW_S = 1.0
WAVES = "1,10%,50%,100%"
V1, V2, CORRUPT, WRONG_SHAPE, NAN, V6 = (f"{NAME}/{v}" for v in "123456")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("rollout-models")
    zeros, ones = [0.0] * WIDTH, [1.0] * WIDTH
    other = len(OTHER_SPEC.feature_names())
    models = [
        build_zscore_model(folder / "v1.onnx", SPEC, means=zeros, stds=ones, name=NAME,
                           version="zscore-1"),
        build_zscore_model(folder / "v2.onnx", SPEC, means=[0.1] * WIDTH, stds=ones,
                           name=NAME, version="zscore-2"),
        build_zscore_model(folder / "v3.onnx", SPEC, means=[0.05] * WIDTH, stds=ones,
                           name=NAME, version="zscore-3"),
        build_zscore_model(folder / "v4.onnx", OTHER_SPEC, means=[0.0] * other,
                           stds=[1.0] * other, name=NAME, version="zscore-other-spec"),
        build_nan_model(folder / "v5.onnx", SPEC, means=zeros, stds=ones, trigger_above=5.5,
                        name=NAME, version="zscore-nan"),
        build_zscore_model(folder / "v6.onnx", SPEC, means=[0.15] * WIDTH, stds=ones,
                           name=NAME, version="zscore-6"),
    ]
    return build_registry(folder / "mlflow", NAME, models)


@dataclass
class Plane:
    """A control plane process, its operator API, and a simulated fleet on it."""

    control: ControlProcess
    fleet: SimulatedFleet
    api: httpx.Client
    real: dict[str, Path] = field(default_factory=dict)  # device -> its store

    def enrollment_token(self, labels: dict[str, str]) -> str:
        made = self.api.post("/v1/enrollment-tokens", json={"labels": labels})
        assert made.status_code == 201, made.text
        return str(made.json()["token"])

    def deploy(self, model: str, waves: str = WAVES, **policy: Any) -> str:
        # The latency gate is relaxed: the simulated agents share one process and a small
        # box, so a shadow's p99 measures their contention, not the model.
        answer = self.api.post("/v1/deployments", json={
            "model": model, "target": "*", "waves": waves,
            "policy": {"max_latency_p99_us": 1_000_000.0, **policy}})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def view(self, deployment: str) -> dict[str, Any]:
        answer = self.api.get(f"/v1/deployments/{deployment}")
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()
        return data

    def wait_ended(self, deployment: str, timeout_s: float) -> dict[str, Any]:
        return wait_for(lambda: self._ended(deployment), f"deployment {deployment} to end",
                        timeout_s, every_s=0.2, details=(self.control.log,))

    def _ended(self, deployment: str) -> dict[str, Any] | None:
        view = self.view(deployment)
        return view if view["state"] in ("succeeded", "rolled_back", "aborted") else None

    def devices(self) -> dict[str, dict[str, Any]]:
        answer = self.api.get("/v1/devices")
        assert answer.status_code == 200, answer.text
        return {d["device"]: d for d in answer.json()["devices"] if not d["revoked"]}

    def all_on(self, model: str) -> bool:
        """Every simulated agent serves `model` and every enrolled device reports it."""
        if any(m != model for m in self.fleet.models().values()):
            return False
        return all(d["current_model"] == model for d in self.devices().values())

    def wait_all_on(self, model: str, timeout_s: float = 60.0) -> None:
        wait_for(lambda: self.all_on(model), f"every device on {model}", timeout_s,
                 every_s=0.2, details=(lambda: _off(self, model),))

    def baseline(self) -> str:
        """The one model the whole fleet runs now (each scenario starts from it)."""
        models = set(self.fleet.models().values())
        assert len(models) == 1 and None not in models, models
        return str(models.pop())

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: dict(agent.updater.counters)
                for name, agent in self.fleet.agents.items()}

    def installed(self, device: str) -> list[str]:
        """The models in a device's store (a real agent's read from its folder)."""
        if device in self.real:
            keys = [load_public_key(self.control.public_key_text())]
            return ModelStore(self.real[device], keys, SPEC).installed()
        return self.fleet.agents[device].store.installed()


def _off(plane: Plane, model: str) -> str:
    off = {a: m for a, m in plane.fleet.models().items() if m != model}
    return f"{len(off)} simulated agent(s) not on {model}: {dict(list(off.items())[:5])}"


def _touched(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> set[str]:
    """Agents that did anything about a model between two counter snapshots."""
    keys = ("downloads", "installs", "refusals", "shadows", "failures", "rollbacks", "swaps")
    return {name for name, counts in after.items()
            if any(counts[k] != before[name][k] for k in keys)
            or counts["errors"] != before[name]["errors"]}


def _start_plane(folder: Path, registry: str, db_url: str | None,
                 agents: int) -> tuple[ControlProcess, SimulatedFleet, httpx.Client]:
    control = ControlProcess(folder / "control", db_url=db_url, tracking_uri=registry,
                             shadow_s=SHADOW_S, poll_s=POLL_S).start()
    try:
        api = httpx.Client(base_url=control.url, headers=control.operator_headers(),
                           timeout=60.0)
        fleet = SimulatedFleet(control.url, control.public_key_text(),
                               memory_tempdir("edgefleet-test-fleet-"), agents, features=SPEC,
                               poll_s=POLL_S, observe_s=0.2, spike_value=7.0,
                               backoff_initial_s=0.2, backoff_cap_s=1.0)
        asyncio.run(fleet.enroll_all(control.operator_headers()))
        fleet.start()
    except BaseException:
        control.stop()
        raise
    return control, fleet, api


def _start_real_agents(plane: Plane, folder: Path, sink: LocalSink) -> list[AgentProcess]:
    """REAL_AGENTS `edgefleet agent run` processes, enrolled like any gateway."""
    agents = []
    try:
        for number in range(REAL_AGENTS):
            device = f"gw-real-{number}"
            enrolled = plane.api.post("/v1/enroll", json={
                "token": plane.enrollment_token({"site": "real"}), "device": device})
            assert enrolled.status_code == 201, enrolled.text
            home = folder / device
            home.mkdir(parents=True)
            token_file = home / "device.token"
            token_file.write_text(enrolled.json()["token"] + "\n")
            token_file.chmod(0o600)
            config = write_agent_config(
                home, fog_url=sink.url, sources=[REAL_SOURCE], device=device,
                state_dir=str(home / "state"),
                fleet={"url": plane.control.url, "token_file": str(token_file),
                       "public_keys": [plane.control.public_key_text()],
                       "poll_min_s": POLL_S, "poll_max_s": POLL_S, "backoff_cap_s": 1.0})
            agents.append(AgentProcess(config).start())
            plane.real[device] = home / "state" / "models"
    except BaseException:
        for agent in agents:
            agent.stop()
        raise
    return agents


def _converge(plane: Plane, model: str, timeout_s: float = 90.0) -> dict[str, Any]:
    deployment = plane.deploy(model)
    view = plane.wait_ended(deployment, timeout_s)
    assert view["state"] == "succeeded", view["progress"]
    waves = view["progress"]["per_wave"]
    assert len(waves) == 4 and waves[0]["devices"] == 1
    assert all(w["started"] and w["passed"] == w["devices"] for w in waves), waves
    plane.wait_all_on(model)
    return view


# --- PostgreSQL: one scenario (first, so the stack starts before the SQLite fleet runs) ---


@pytest.fixture
def pg_database(stack_env: dict[str, str]) -> Iterator[str]:
    import psycopg

    name = f"rollout_{secrets.token_hex(4)}"
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlunsplit(urlsplit(stack_env["EDGEFLEET_PG_URL"])._replace(path=f"/{name}"))
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_rollout_converges_on_postgresql(pg_database: str, registry: str,
                                           tmp_path: Path) -> None:
    control, fleet, api = _start_plane(tmp_path, registry, pg_database, PG_AGENTS)
    plane = Plane(control, fleet, api)
    try:
        first = plane.wait_ended(plane.deploy(V1, "100%"), 90)
        assert first["state"] == "succeeded", first["progress"]
        plane.wait_all_on(V1)
        _converge(plane, V2)
    finally:
        fleet.stop()
        api.close()
        control.stop()
        shutil.rmtree(fleet.root, ignore_errors=True)


# --- SQLite: the scenarios, on one control plane and one fleet ----------------------------


@pytest.fixture(scope="module")
def plane(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """The fleet enrolled (simulated: site=plant-a/plant-b; real: site=real) and running
    v1 (one wave of 100 %)."""
    folder = tmp_path_factory.mktemp("rollout-sqlite")
    control, fleet, api = _start_plane(folder, registry, None, AGENTS)
    plane = Plane(control, fleet, api)
    real: list[AgentProcess] = []
    with LocalSink() as sink:
        try:
            real = _start_real_agents(plane, folder / "real", sink)
            first = plane.wait_ended(plane.deploy(V1, "100%"), 180)
            assert first["state"] == "succeeded", first["progress"]
            plane.wait_all_on(V1)
            yield plane
        finally:
            for agent in real:
                agent.stop()
            fleet.stop()
            api.close()
            control.stop()
            shutil.rmtree(fleet.root, ignore_errors=True)


def test_a_good_model_converges_through_four_waves(plane: Plane) -> None:
    assert plane.baseline() == V1
    before = plane.counters()
    _converge(plane, V2)
    after = plane.counters()
    # Every agent downloaded, shadowed and swapped exactly once.
    for name, counts in after.items():
        for key in ("downloads", "shadows", "swaps"):
            assert counts[key] - before[name][key] == 1, (name, key, counts)


def _rolled_back_in_wave_one(plane: Plane, deployment: str, before: dict[str, dict[str, int]],
                             previous: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The deployment ended rolled back by its first wave's gate; only that wave's device
    ever did anything about the model; every device runs `previous` again."""
    view = plane.wait_ended(deployment, timeout_s)
    progress = view["progress"]
    assert view["state"] == "rolled_back", progress
    assert progress["reasons"] and progress["reasons"][0].startswith(
        "wave 1 of 4 failed its gate"), progress["reasons"]
    assert [w["started"] for w in progress["per_wave"]] == [True, False, False, False]
    failed = set(progress["failures"])
    assert len(failed) == 1, progress["failures"]
    plane.wait_all_on(previous)
    assert _touched(before, plane.counters()) <= failed
    return view


def test_a_corrupted_artifact_is_stopped_in_the_first_wave(plane: Plane) -> None:
    """The control plane refuses to serve an artifact that no longer matches its signed
    manifest (410, and it logs the damage): the first wave's agent reports the failure,
    keeps its model, and the deployment rolls back at once, without waiting for the
    apply timeout."""
    previous = plane.baseline()
    published = plane.api.post("/v1/models/publish", json={"model": CORRUPT})
    assert published.status_code == 201, published.text
    artifact = plane.control.artifact_root / NAME / "3" / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    artifact.write_bytes(bytes(data))
    before = plane.counters()
    deployment = plane.deploy(CORRUPT, apply_timeout_s=600.0)
    view = _rolled_back_in_wave_one(plane, deployment, before, previous)
    (device, reason), = view["progress"]["failures"].items()
    assert "answer 410" in reason, reason
    assert CORRUPT not in plane.installed(device)
    assert "damaged or missing" in plane.control.log()


def test_a_model_for_another_feature_spec_is_refused_and_rolled_back(plane: Plane) -> None:
    previous = plane.baseline()
    before = plane.counters()
    deployment = plane.deploy(WRONG_SHAPE)
    view = _rolled_back_in_wave_one(plane, deployment, before, previous)
    (device, reason), = view["progress"]["failures"].items()
    assert reason.startswith(f"refused {WRONG_SHAPE} (wrong_schema:"), reason
    assert WRONG_SHAPE not in plane.installed(device)
    if device not in plane.real:
        assert plane.fleet.agents[device].updater.counters["refusals"] == \
            before[device]["refusals"] + 1


def test_a_model_that_turns_nan_on_live_data_fails_its_shadow(plane: Plane) -> None:
    """Model 5 passes publishing and the agent's probe batch; on live data with a spike
    row every third batch it scores NaN on those batches only. The agent's own rule
    (fail only when every batch failed) lets it swap it in; the control plane's gate sees
    error_rate ≈ 1/3 > 0.01 and rolls back; the agent goes back to its previous model
    from disk, without a download."""
    previous = plane.baseline()
    plane.fleet.set_spikes(None, True)
    try:
        before = plane.counters()
        deployment = plane.deploy(NAN)
        view = _rolled_back_in_wave_one(plane, deployment, before, previous)
    finally:
        plane.fleet.set_spikes(None, False)
    (device, reason), = view["progress"]["failures"].items()
    if device in plane.real:  # NaN on every live window: the agent itself refuses the swap
        assert f"candidate {NAN} failed every one of" in reason, reason
        return
    assert "error_rate" in reason, reason
    counters = plane.fleet.agents[device].updater.counters
    assert counters["shadows"] == before[device]["shadows"] + 1
    assert counters["rollbacks"] == before[device]["rollbacks"] + 1  # it ran model 5
    assert counters["downloads"] == before[device]["downloads"] + 1  # and not v2 again


def test_agents_offline_during_a_rollout_catch_up_when_back(plane: Plane) -> None:
    previous = plane.baseline()
    offline = [plane.fleet.name_of(i) for i in range(AGENTS - 3, AGENTS)]
    plane.fleet.set_offline(offline, True)
    try:
        gone = plane.counters()
        # One wave: the waves were shown above; what matters here is the wait and the
        # catch-up, and one wave of the whole fleet takes a third of the time of four.
        deployment = plane.deploy(V6, "100%", apply_timeout_s=120.0)

        def stuck_on_offline() -> bool:
            """An offline agent's wave started; every online device told V6 runs it."""
            devices = plane.devices()
            told = {n for n, d in devices.items() if d["desired_model"] == V6}
            if not told & set(offline):
                return False
            return all(devices[n]["current_model"] == V6 for n in told - set(offline))

        wait_for(stuck_on_offline, "the rollout to wait on an offline agent", 90,
                 every_s=0.3, details=(plane.control.log,))
        view = plane.view(deployment)
        assert view["state"] == "rolling", view["progress"]
        assert plane.counters()[offline[0]]["polls"] == gone[offline[0]]["polls"]
        assert all(plane.fleet.models()[n] == previous for n in offline)
    finally:
        plane.fleet.set_offline(offline, False)
    view = plane.wait_ended(deployment, 90)
    assert view["state"] == "succeeded", view["progress"]
    plane.wait_all_on(V6)
    after = plane.counters()
    for name in offline:
        assert after[name]["downloads"] == gone[name]["downloads"] + 1
