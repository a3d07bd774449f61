"""Standalone model mode against a REAL MLflow tracking server (the launcher's: PostgreSQL
backend store, artifacts in S3 behind the server's artifact proxy), with genuine ONNX
models registered and tagged `onnx_sha256` the way training does (cloud/training/registry.py).

Both tests follow an alias through the same four versions: v1 and v2 honest z-score
models, v3 whose `onnx_sha256` tag does not match its file (v1's checksum on v3's bytes),
v4 with no checksum tag at all. First the follower in-process (its counters and store), then
a real `edgefleet agent run` process in standalone mode whose forwarded inference rows
change model version."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.edge_agent.harness import AgentProcess, write_agent_config
from edgefleet.edge_agent.inference import ModelBundle
from edgefleet.edge_agent.sink import LocalSink
from edgefleet.edge_agent.standalone import MlflowSourceConfig, build_follower
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import sha256_hex
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

NAME = f"standalone-{uuid.uuid4().hex[:8]}"  # the stack is shared by the whole session
SPEC = FeatureSpec(tags=("t0", "t1"), window=10, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
SOURCE = {"type": "synthetic", "name": "synthetic", "assets": 2, "tags": ["t0", "t1"],
          "rows_per_s": 50, "poll_interval_s": 0.1}


class Registry:
    """NAME's versions on the launcher's MLflow server, and its alias setter."""

    def __init__(self, uri: str, client: Any, checksums: dict[str, str]) -> None:
        self.uri = uri
        self.client = client
        self.checksums = checksums  # version -> the sha256 of the file MLflow stored

    def point(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(NAME, alias, version)


@pytest.fixture(scope="module")
def registry(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Registry]:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("models")
    uri = stack_env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri()
    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
             if k in os.environ}
    mlflow.set_tracking_uri(uri)
    checksums: dict[str, str] = {}
    try:
        # No artifact_location: the server's default, mlflow-artifacts:/ (its S3 proxy).
        experiment = client.create_experiment(f"{NAME}-training")
        for number, std in enumerate((100.0, 200.0, 300.0, 400.0), start=1):
            path = build_zscore_model(folder / f"v{number}.onnx", SPEC, means=[50.0] * WIDTH,
                                      stds=[std] * WIDTH, name=NAME, version=f"zscore-{number}")
            model = onnx.load(path)
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.onnx.log_model(model, name="model", save_as_external_data=False)
            version = str(mlflow.register_model(info.model_uri, NAME).version)
            assert version == str(number)
            # As cloud/training/registry.py: the sha256 of the file MLflow stored.
            checksums[version] = sha256_hex(model.SerializeToString())
        client.set_model_version_tag(NAME, "1", "onnx_sha256", checksums["1"])
        client.set_model_version_tag(NAME, "2", "onnx_sha256", checksums["2"])
        client.set_model_version_tag(NAME, "3", "onnx_sha256", checksums["1"])  # not its bytes
        yield Registry(uri, client, checksums)  # v4: no tag
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ.update(saved)


def rows(seed: int) -> np.ndarray[Any, Any]:
    return 50.0 + np.random.default_rng(seed).standard_normal((4, WIDTH))


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 20.0,
                     details: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                 f"{details()}")
        await asyncio.sleep(0.02)


def test_follower_tracks_the_alias_of_a_real_mlflow(tmp_path: Path, registry: Registry) -> None:
    alias = "inproc"
    running: list[str] = []

    def swap(bundle: ModelBundle) -> None:
        running.append(bundle.version)

    config = MlflowSourceConfig(tracking_uri=registry.uri, model=f"models:/{NAME}@{alias}",
                                poll_s=0.05, shadow_s=0.3, backoff_initial_s=0.05,
                                backoff_cap_s=0.5)
    updater = build_follower(config, state_dir=tmp_path, swap=swap, features=SPEC, environ={})
    store, source = updater.store, updater.client
    counters = updater.counters

    async def scenario() -> None:
        stop = asyncio.Event()

        async def feed() -> None:  # the agent's live windows, for the shadows
            seed = 0
            while not stop.is_set():
                seed += 1
                updater.observe(rows(seed))
                await asyncio.sleep(0.01)

        async def point(version: str) -> None:
            await asyncio.to_thread(registry.point, alias, version)

        def state() -> str:
            return f"running {running}, counters {counters}, last error {updater.last_error}"

        await point("1")
        loop = asyncio.create_task(updater.run(stop))
        feeder = asyncio.create_task(feed())
        try:
            await wait_until(lambda: running[-1:] == ["zscore-1"], "v1 from the alias",
                             details=state)
            manifest = store.manifest_of(f"{NAME}/1")
            assert manifest.sha256 == registry.checksums["1"] and not manifest.signature

            await point("2")
            await wait_until(lambda: running[-1:] == ["zscore-2"], "v2 swapped in",
                             details=state)
            assert source.last_report.shadow.rows > 0  # type: ignore[attr-defined]

            await point("3")  # its file does not hash to its tag
            await wait_until(lambda: counters["refusals"] == 1, "v3 refused", details=state)
            reason = source.last_report.reason  # type: ignore[attr-defined]
            assert reason.startswith("hash_mismatch: "), reason

            await point("4")  # no tag at all
            await wait_until(lambda: counters["refusals"] == 2, "v4 refused", details=state)
            reason = source.last_report.reason  # type: ignore[attr-defined]
            assert reason.startswith("unverifiable: "), reason
            assert running[-1] == "zscore-2" and store.current == f"{NAME}/2"
            assert not (store.root / NAME / "3").exists()

            downloaded = source.client.artifact_bytes  # type: ignore[attr-defined]
            await point("1")  # back to a version on disk: no download
            await wait_until(lambda: running[-1:] == ["zscore-1"], "back on v1", details=state)
            assert source.client.artifact_bytes == downloaded  # type: ignore[attr-defined]
            assert counters["rollbacks"] == 1
        finally:
            stop.set()
            await asyncio.wait_for(loop, 10)
            await feeder
            await updater.client.aclose()

    asyncio.run(scenario())
    assert running == ["zscore-1", "zscore-2", "zscore-1"]
    assert counters["installs"] == 2 and counters["swaps"] == 3
    assert store.state() == (f"{NAME}/1", f"{NAME}/2")


def model_versions(sink: LocalSink) -> set[str]:
    """Model versions in the inference rows the agent forwarded lately."""
    return {r.tag.split(":")[1] for r in list(sink.readings)[-400:] if r.tag.startswith("ml:")}


def test_an_agent_in_standalone_mode_follows_the_alias(
    tmp_path: Path, registry: Registry
) -> None:
    alias = "champion"
    registry.point(alias, "1")
    (tmp_path / "agent").mkdir()
    with LocalSink(keep_readings=5000) as sink:
        config = write_agent_config(
            tmp_path / "agent", fog_url=sink.url, sources=[SOURCE],
            state_dir=str(tmp_path / "agent" / "state"),
            model_source={"mlflow": {"tracking_uri": registry.uri,
                                     "model": f"models:/{NAME}@{alias}", "poll_s": 0.2,
                                     "shadow_s": 1.0, "backoff_cap_s": 2.0}})
        with AgentProcess(config) as agent:
            def logs() -> str:
                return agent.log()[-3000:]

            wait_for(lambda: model_versions(sink) == {"zscore-1"}, "v1 scoring live data",
                     timeout_s=30, details=[logs])

            registry.point(alias, "2")
            wait_for(lambda: model_versions(sink) == {"zscore-2"}, "v2 scoring live data",
                     timeout_s=30, details=[logs])

            registry.point(alias, "3")
            wait_for(lambda: "refused: hash_mismatch" in agent.log(), "v3 refused",
                     timeout_s=30, details=[logs])
            assert model_versions(sink) == {"zscore-2"}

            registry.point(alias, "1")
            wait_for(lambda: model_versions(sink) == {"zscore-1"}, "back on v1",
                     timeout_s=30, details=[logs])
            assert "rolled_back" in agent.log()
            assert agent.stop() == 0, logs()
    assert (tmp_path / "agent" / "state" / "mlflow-models" / NAME / "2").is_dir()
