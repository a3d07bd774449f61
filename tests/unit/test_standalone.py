"""Standalone model mode against a fake MLflow tracking server (`httpx.MockTransport`
answering the REST calls the agent makes, in the shapes a real MLflow 3 server gives —
tests/integration/test_standalone_mlflow.py checks them against the real one), a real
`ModelStore` in tmp_path and real ONNX models. Shadows and polls are short: the whole file
runs in a few seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.edge_agent.config import AgentConfigError, parse_agent_config
from edgefleet.edge_agent.fleet import (
    ArtifactTooLarge,
    FleetAuthError,
    FleetProtocolError,
    FleetUnavailable,
    ModelUpdater,
)
from edgefleet.edge_agent.inference import ModelBundle
from edgefleet.edge_agent.model_manager import ModelRefused, ModelStore
from edgefleet.edge_agent.standalone import (
    ARTIFACTS_API,
    MlflowApiError,
    MlflowRestClient,
    MlflowSourceConfig,
    UnusableArtifact,
    artifact_dir,
    build_follower,
    parse_model_uri,
)
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import ModelManifest, public_key_text, sha256_hex

SPEC = FeatureSpec(tags=("temp", "flow"), window=4, stats=("mean", "std", "max", "last"))
WIDTH = len(SPEC.feature_names())
MEANS = [float(i) for i in range(WIDTH)]
STDS = [0.5 + i / 4 for i in range(WIDTH)]
OTHER_SPEC = FeatureSpec(tags=("temp",), window=4, stats=("mean", "std"))
BASE = "http://mlflow.test"
NAME = "line-anomaly"
ALIAS = "champion"


def zscore_bytes(folder: Path, version: str, spec: FeatureSpec = SPEC) -> bytes:
    width = len(spec.feature_names())
    path = build_zscore_model(folder / f"build-{version}.onnx", spec, means=MEANS[:width],
                              stds=STDS[:width], version=version)
    return path.read_bytes()


def mlmodel(data_file: str = "model.onnx", flavor: str = "onnx") -> bytes:
    doc = {"artifact_path": "mlflow-artifacts:/1/models/m-x/artifacts",
           "flavors": {flavor: {"data": data_file}, "python_function": {"data": data_file}},
           "mlflow_version": "3.17.2"}
    return yaml.safe_dump(doc).encode()


# ---- the fake tracking server ----------------------------------------------------------------


class Mlflow:
    """The registry and artifact-proxy endpoints the agent calls, state in attributes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.versions: dict[str, dict[str, Any]] = {}
        self.aliases: dict[str, str] = {}
        self.files: dict[str, bytes] = {}  # path under the artifact proxy -> bytes
        self.requests: list[httpx.Request] = []
        self.down = False
        self.artifacts_down = False
        self.expect_auth: str | None = None
        self.fail: list[httpx.Response] = []  # served (once each) before the real answers
        self.stream_artifacts = False  # no Content-Length: the size is only known by reading

    def register(self, data: bytes, *, tag: str | None = "auto", served: bytes | None = None,
                 uri: str | None = None, model_file: bytes | None = None) -> str:
        """A new version of NAME; `tag` None leaves out onnx_sha256, `served` replaces the
        bytes the proxy serves (a tampered or swapped artifact)."""
        version = str(len(self.versions) + 1)
        folder = f"1/models/m-{version}abc/artifacts"
        tags = [] if tag is None else [
            {"key": "onnx_sha256", "value": sha256_hex(data) if tag == "auto" else tag}]
        self.versions[version] = {
            "name": NAME, "version": version, "creation_timestamp": 1_795_450_891_386,
            "last_updated_timestamp": 1_795_450_891_386, "current_stage": "None",
            "description": "", "source": f"models:/m-{version}abc", "run_id": "r" * 32,
            "status": "READY", "tags": tags, "run_link": "", "aliases": [],
            "uri": uri or f"mlflow-artifacts:/{folder}",
        }
        self.files[f"{folder}/MLmodel"] = model_file if model_file is not None else mlmodel()
        self.files[f"{folder}/model.onnx"] = served if served is not None else data
        return version

    def set_tag(self, version: str, value: str) -> None:
        self.versions[version]["tags"] = [{"key": "onnx_sha256", "value": value}]

    def point(self, version: str, alias: str = ALIAS) -> None:
        self.aliases[alias] = version

    def artifact_requests(self, version: str | None = None) -> list[str]:
        paths = [r.url.path for r in self.requests if r.url.path.startswith(ARTIFACTS_API)]
        return [p for p in paths if version is None or f"/m-{version}abc/" in p]

    @staticmethod
    def error(status: int, code: str, message: str) -> httpx.Response:
        return httpx.Response(status, json={"error_code": code, "message": message})

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, params = request.url.path, request.url.params
        if self.down or (self.artifacts_down and path.startswith(ARTIFACTS_API)):
            raise httpx.ConnectError("connection refused", request=request)
        if self.expect_auth is not None and request.headers.get("Authorization") \
                != self.expect_auth:
            return self.error(401, "UNAUTHENTICATED", "You are not authenticated.")
        if self.fail:
            return self.fail.pop(0)
        if path == "/api/2.0/mlflow/registered-models/alias":
            if params.get("name") != NAME:
                return self.error(404, "RESOURCE_DOES_NOT_EXIST",
                                  f"Registered Model with name={params.get('name')} not found")
            version = self.aliases.get(params.get("alias", ""))
            if version is None:
                return self.error(400, "INVALID_PARAMETER_VALUE",
                                  f"Registered model alias {params.get('alias')} not found.")
            view = {k: v for k, v in self.versions[version].items() if k != "uri"}
            view["aliases"] = [a for a, v in self.aliases.items() if v == version]
            return httpx.Response(200, json={"model_version": view})
        if path == "/api/2.0/mlflow/model-versions/get-download-uri":
            found = self.versions.get(params.get("version", ""))
            if found is None or params.get("name") != NAME:
                return self.error(404, "RESOURCE_DOES_NOT_EXIST", "Model Version not found")
            return httpx.Response(200, json={"artifact_uri": found["uri"]})
        if path.startswith(ARTIFACTS_API + "/"):
            data = self.files.get(path.removeprefix(ARTIFACTS_API + "/"))
            if data is None:
                return self.error(404, "RESOURCE_DOES_NOT_EXIST", "File not found")
            if self.stream_artifacts:
                return httpx.Response(200, content=chunks(data))
            return httpx.Response(200, content=data)
        return self.error(404, "ENDPOINT_NOT_FOUND", f"no endpoint {path}")


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 256):
        yield data[start:start + 256]


class Device:
    """What the agent does with a swap: serve the new bundle from the next cycle on."""

    def __init__(self) -> None:
        self.running: str | None = None
        self.swaps: list[str] = []

    def swap(self, bundle: ModelBundle) -> None:
        self.swaps.append(bundle.version)
        self.running = bundle.version


@pytest.fixture
def mlflow(tmp_path: Path) -> Mlflow:
    return Mlflow(tmp_path)


def config(**settings: Any) -> MlflowSourceConfig:
    return MlflowSourceConfig.model_validate({
        "tracking_uri": BASE, "model": f"models:/{NAME}@{ALIAS}", "poll_s": 0.01,
        "shadow_s": 0.1, "backoff_initial_s": 0.005, "backoff_cap_s": 0.03, **settings})


def make_follower(tmp_path: Path, mlflow: Mlflow, device: Device, *,
                  features: FeatureSpec | None = None, **settings: Any) -> ModelUpdater:
    http = httpx.AsyncClient(transport=httpx.MockTransport(mlflow.handler))
    return build_follower(config(**settings), state_dir=tmp_path / "state", swap=device.swap,
                          features=features, http=http, environ={})


def rows(n: int = 4, seed: int = 1) -> np.ndarray[Any, Any]:
    return np.asarray(MEANS) + np.random.default_rng(seed).standard_normal((n, WIDTH)) * 0.1


async def run_until(updater: ModelUpdater, done: Callable[[], bool], *,
                    timeout: float = 5.0) -> None:
    """Run the follower, with the agent's live windows (one matrix every 5 ms) feeding its
    shadows, until `done()`."""
    stop = asyncio.Event()

    async def feed() -> None:
        seed = 0
        while not stop.is_set():
            seed += 1
            updater.observe(rows(4, seed))
            await asyncio.sleep(0.005)

    task = asyncio.create_task(updater.run(stop))
    feeder = asyncio.create_task(feed())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not task.done(), "the follower's loop ended on its own"
            assert time.monotonic() < deadline, f"timed out; counters {updater.counters}"
            await asyncio.sleep(0.003)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)
        await feeder


def polls_later(updater: ModelUpdater, count: int = 5) -> Callable[[], bool]:
    """A condition: `count` more polls happened (the follower had time to act)."""
    target = updater.counters["polls"] + count
    return lambda: updater.counters["polls"] >= target


@pytest.fixture
def on_v2(tmp_path: Path, mlflow: Mlflow) -> Iterator[tuple[ModelUpdater, Device]]:
    """A follower that installed v1 from @champion, then followed the alias to v2."""
    device = Device()
    updater = make_follower(tmp_path, mlflow, device, features=SPEC)
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-1")))
    asyncio.run(run_until(updater, lambda: device.running == "z-1"))
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-2")))
    asyncio.run(run_until(updater, lambda: device.running == "z-2"))
    yield updater, device


# ---- the REST client ----------------------------------------------------------------------


def client_for(mlflow: Mlflow, **kwargs: Any) -> MlflowRestClient:
    return MlflowRestClient(BASE, httpx.AsyncClient(transport=httpx.MockTransport(
        mlflow.handler)), **kwargs)


def test_alias_lookup_parses_a_model_version(mlflow: Mlflow, tmp_path: Path) -> None:
    data = zscore_bytes(tmp_path, "z-1")
    mlflow.point(mlflow.register(data))

    async def go() -> None:
        client = client_for(mlflow)
        version = await client.version_by_alias(NAME, ALIAS)
        assert (version.name, version.version) == (NAME, "1")
        assert version.tags == {"onnx_sha256": sha256_hex(data)}
        assert version.source == "models:/m-1abc" and version.creation_timestamp_ms > 0
        artifact = await client.onnx_model(NAME, "1")
        assert artifact.data == data
        assert artifact.uri == "mlflow-artifacts:/1/models/m-1abc/artifacts/model.onnx"
        await client.aclose()

    asyncio.run(go())
    assert [r.url.path for r in mlflow.requests][-2:] == [
        f"{ARTIFACTS_API}/1/models/m-1abc/artifacts/MLmodel",
        f"{ARTIFACTS_API}/1/models/m-1abc/artifacts/model.onnx"]


@pytest.mark.parametrize(("answer", "kind", "text"), [
    ("unknown model", MlflowApiError,
     "404 RESOURCE_DOES_NOT_EXIST: Registered Model with name=other not found"),
    ("unknown alias", MlflowApiError,
     "400 INVALID_PARAMETER_VALUE: Registered model alias nope not found."),
    ("401", FleetAuthError, "refused the credentials (401 UNAUTHENTICATED"),
    ("503", FleetUnavailable, "503: upstream down"),
    ("down", FleetUnavailable, "ConnectError: connection refused"),
    ("not json", FleetProtocolError, "the body is not JSON"),
    ("no model_version", FleetProtocolError, "model_version: "),
])
def test_client_errors_carry_the_status_and_the_servers_message(
    answer: str, kind: type[Exception], text: str, mlflow: Mlflow, tmp_path: Path
) -> None:
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-1")))
    name, alias = NAME, ALIAS
    if answer == "unknown model":
        name = "other"
    elif answer == "unknown alias":
        alias = "nope"
    elif answer == "401":
        mlflow.expect_auth = "Bearer right"
    elif answer == "503":
        mlflow.fail = [httpx.Response(503, text="upstream down", headers={"Retry-After": "7"})]
    elif answer == "down":
        mlflow.down = True
    elif answer == "not json":
        mlflow.fail = [httpx.Response(200, text="<html>proxy login</html>")]
    elif answer == "no model_version":
        mlflow.fail = [httpx.Response(200, json={"registered_model": {}})]

    async def go() -> None:
        client = client_for(mlflow, token="wrong")
        with pytest.raises(kind) as raised:
            await client.version_by_alias(name, alias)
        message = str(raised.value)
        assert text in message and "registered-models/alias" in message, message
        assert f"models:/{name}@{alias}" in message
        if answer == "unknown model":
            assert isinstance(raised.value, MlflowApiError)
            assert (raised.value.status, raised.value.error_code) == (
                404, "RESOURCE_DOES_NOT_EXIST")
        if answer == "503":
            assert isinstance(raised.value, FleetUnavailable)
            assert raised.value.retry_after == 7.0
        await client.aclose()

    asyncio.run(go())


def test_credentials_are_sent_to_the_tracking_server(mlflow: Mlflow, tmp_path: Path) -> None:
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-1")))

    async def go(**kwargs: Any) -> None:
        client = client_for(mlflow, **kwargs)
        await client.version_by_alias(NAME, ALIAS)
        await client.onnx_model(NAME, "1")
        await client.aclose()

    mlflow.expect_auth = "Bearer t0k"
    asyncio.run(go(token="t0k"))
    mlflow.expect_auth = "Basic dXNlcjpwYXNz"  # user:pass
    asyncio.run(go(basic_auth=("user", "pass")))
    assert all(r.headers["User-Agent"] == "edgefleet-agent" for r in mlflow.requests)

    token_file = tmp_path / "mlflow.token"
    token_file.write_text("from-file\n")
    env = {"MLFLOW_TRACKING_TOKEN": "from-env", "MLFLOW_TRACKING_USERNAME": "u",
           "MLFLOW_TRACKING_PASSWORD": "p"}
    assert config(token_file=token_file).credentials(env) == ("from-file", None)
    assert config().credentials(env) == ("from-env", None)
    del env["MLFLOW_TRACKING_TOKEN"]
    assert config().credentials(env) == (None, ("u", "p"))
    assert config().credentials({}) == (None, None)
    with pytest.raises(ValueError, match="go together"):
        config().credentials({"MLFLOW_TRACKING_USERNAME": "u"})


@pytest.mark.parametrize("streamed", [False, True])
def test_oversize_artifact_is_not_downloaded_whole(
    streamed: bool, mlflow: Mlflow, tmp_path: Path
) -> None:
    data = zscore_bytes(tmp_path, "z-1")
    mlflow.point(mlflow.register(data))
    mlflow.stream_artifacts = streamed  # without a Content-Length, the stream is cut

    async def go() -> None:
        client = client_for(mlflow, max_artifact_bytes=len(data) - 1)
        with pytest.raises(ArtifactTooLarge) as raised:
            await client.onnx_model(NAME, "1")
        assert f"{len(data) - 1}-byte cap" in str(raised.value)
        assert ("announced" in str(raised.value)) is not streamed
        assert client.artifact_bytes == 0
        await client.aclose()

    asyncio.run(go())


def test_artifact_locations_the_agent_cannot_use(mlflow: Mlflow, tmp_path: Path) -> None:
    assert artifact_dir("mlflow-artifacts:/1/models/m-1/artifacts") == "1/models/m-1/artifacts"
    assert artifact_dir("mlflow-artifacts://mlflow:5000/1/x") == "1/x"
    for uri in ("s3://bucket/1/models/m-1/artifacts", "file:///srv/mlruns/1/x",
                "mlflow-artifacts:/1/../../etc"):
        with pytest.raises(UnusableArtifact) as raised:
            artifact_dir(uri)
        assert raised.value.reason == "not_served" and repr(uri) in str(raised.value)

    data = zscore_bytes(tmp_path, "z-1")
    mlflow.register(data, model_file=mlmodel(flavor="sklearn"))
    mlflow.register(data, model_file=mlmodel(data_file="../../2/models/m-2abc/model.onnx"))

    async def go() -> None:
        client = client_for(mlflow)
        with pytest.raises(UnusableArtifact, match=r"not an ONNX model .*sklearn"):
            await client.onnx_model(NAME, "1")
        with pytest.raises(UnusableArtifact, match=r"not an \.onnx file inside the model"):
            await client.onnx_model(NAME, "2")
        with pytest.raises(MlflowApiError, match="404 RESOURCE_DOES_NOT_EXIST"):
            await client.onnx_model(NAME, "9")
        await client.aclose()

    asyncio.run(go())


# ---- the follower -----------------------------------------------------------------------------


def test_follower_installs_the_alias_then_shadows_and_swaps_each_new_version(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow
) -> None:
    updater, device = on_v2
    assert device.swaps == ["z-1", "z-2"]
    assert updater.store.state() == (f"{NAME}/2", f"{NAME}/1")
    manifest = updater.store.manifest_of(f"{NAME}/2")
    assert manifest.signature == "" and manifest.source == f"models:/{NAME}/2"
    assert manifest.sha256 == mlflow.versions["2"]["tags"][0]["value"]
    assert manifest.feature_schema_hash == SPEC.schema_hash()
    counters = updater.counters
    assert counters["installs"] == 2 and counters["swaps"] == 2
    assert counters["shadows"] == 2 and counters["refusals"] == 0
    report = updater.client.last_report  # type: ignore[attr-defined]
    assert report.state == "applied" and report.shadow.rows > 0  # v2 ran beside v1
    assert report.shadow.anomaly_rate_shift is not None
    # each version's artifact was fetched once (MLmodel + model.onnx)
    assert len(mlflow.artifact_requests("1")) == 2 and len(mlflow.artifact_requests("2")) == 2
    # the alias unchanged: polls cost one GET each and are "not modified"
    before = len(mlflow.requests)
    asyncio.run(run_until(updater, polls_later(updater)))
    assert counters["not_modified"] >= 5
    assert {r.url.path for r in mlflow.requests[before:]} == {
        "/api/2.0/mlflow/registered-models/alias"}


@pytest.mark.parametrize(("case", "reason"), [
    ("no tag", "unverifiable"),
    ("tag not a sha256", "unverifiable"),
    ("bytes swapped", "hash_mismatch"),
    ("wrong feature schema", "wrong_schema"),
    ("too large", "too_large"),
    ("not served", "not_served"),
    ("not onnx", "not_onnx"),
    ("garbage bytes", "unloadable"),
])
def test_refused_versions_are_counted_once_and_the_running_model_stays(
    case: str, reason: str, on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow, tmp_path: Path
) -> None:
    updater, device = on_v2
    data = zscore_bytes(tmp_path, "z-3")
    if case == "no tag":
        version = mlflow.register(data, tag=None)
    elif case == "tag not a sha256":
        version = mlflow.register(data, tag="sha256:abc")
    elif case == "bytes swapped":
        version = mlflow.register(data, served=zscore_bytes(tmp_path, "z-evil"))
    elif case == "wrong feature schema":
        version = mlflow.register(zscore_bytes(tmp_path, "z-3", OTHER_SPEC))
    elif case == "too large":
        updater.client.client.max_artifact_bytes = 4096  # type: ignore[attr-defined]
        version = mlflow.register(data + b"\0" * 4096)
    elif case == "not served":
        version = mlflow.register(data, uri="s3://edgefleet-mlflow/1/models/m-3/artifacts")
    elif case == "not onnx":
        version = mlflow.register(data, model_file=mlmodel(flavor="sklearn"))
    else:
        version = mlflow.register(b"not an onnx file")
    mlflow.point(version)
    asyncio.run(run_until(updater, lambda: updater.counters["refusals"] == 1))
    asyncio.run(run_until(updater, polls_later(updater)))  # refused once, not retried

    assert updater.counters["refusals"] == 1 and updater.counters["installs"] == 2
    assert device.running == "z-2" and device.swaps == ["z-1", "z-2"]
    assert updater.store.state() == (f"{NAME}/2", f"{NAME}/1")
    assert not (updater.store.root / NAME / version).exists()
    report = updater.client.last_report  # type: ignore[attr-defined]
    assert report.state == "refused" and report.reason.startswith(f"{reason}: "), report.reason
    assert f"{NAME}/{version}" in report.reason or f"{NAME} v{version}" in report.reason
    # Artifact requests (MLmodel, then the ONNX file): none without a usable checksum tag.
    downloads = len(mlflow.artifact_requests(version))
    assert downloads == (0 if case in ("no tag", "tag not a sha256", "not served") else
                         1 if case == "not onnx" else 2), downloads


def test_a_fixed_tag_or_a_moved_alias_is_a_new_generation(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow, tmp_path: Path
) -> None:
    updater, device = on_v2
    data = zscore_bytes(tmp_path, "z-3")
    version = mlflow.register(data, tag=None)
    mlflow.point(version)
    asyncio.run(run_until(updater, lambda: updater.counters["refusals"] == 1))
    mlflow.set_tag(version, sha256_hex(data))  # the registry's owner adds the checksum
    asyncio.run(run_until(updater, lambda: device.running == "z-3"))
    assert updater.store.state() == (f"{NAME}/3", f"{NAME}/2")


def test_alias_moved_back_rolls_back_from_disk_with_the_artifacts_unreachable(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow
) -> None:
    updater, device = on_v2
    mlflow.artifacts_down = True
    before = len(mlflow.artifact_requests())
    mlflow.point("1")
    asyncio.run(run_until(updater, lambda: device.running == "z-1"))
    assert updater.counters["rollbacks"] == 1
    assert updater.store.state() == (f"{NAME}/1", f"{NAME}/2")
    assert len(mlflow.artifact_requests()) == before  # no download
    assert updater.client.last_report.state == "rolled_back"  # type: ignore[attr-defined]


def test_restart_serves_the_store_and_treats_the_alias_as_applied(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow, tmp_path: Path
) -> None:
    device = Device()
    again = make_follower(tmp_path, mlflow, device, features=SPEC)
    bundle = again.store.current_bundle()
    assert bundle is not None and bundle.version == "z-2"
    mlflow.artifacts_down = True
    asyncio.run(run_until(again, lambda: again.generation == 1))
    assert device.swaps == [] and again.counters["downloads"] == 0
    assert again.client.last_report.state == "applied"  # type: ignore[attr-defined]


def test_registry_outage_keeps_the_model_and_is_logged_once(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    updater, device = on_v2
    mlflow.down = True
    with caplog.at_level("INFO", logger="edgefleet.edge_agent.fleet"):
        asyncio.run(run_until(updater, lambda: updater.counters["errors"] >= 4))
        mlflow.down = False
        mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-3")))
        asyncio.run(run_until(updater, lambda: device.running == "z-3"))
    outage = [r for r in caplog.records if "ConnectError" in r.getMessage()]
    assert len(outage) == 1 and outage[0].getMessage().startswith("standalone: ")
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_a_new_alias_target_during_a_shadow_abandons_it(
    on_v2: tuple[ModelUpdater, Device], mlflow: Mlflow, tmp_path: Path
) -> None:
    updater, device = on_v2
    updater.client.shadow_s = 30.0  # type: ignore[attr-defined]
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-3")))
    asyncio.run(run_until(updater, lambda: updater.shadowing))
    mlflow.point(mlflow.register(zscore_bytes(tmp_path, "z-4"), tag=None))  # refused
    asyncio.run(run_until(updater, lambda: updater.counters["refusals"] == 1))
    assert updater.counters["shadows_abandoned"] == 1 and not updater.shadowing
    assert device.running == "z-2" and updater.store.current == f"{NAME}/2"


# ---- the store's checksum install -------------------------------------------------------------


def test_checksum_install_is_separate_from_the_signed_path(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", (), SPEC)  # no fleet keys at all
    data = zscore_bytes(tmp_path, "z-1")
    manifest = ModelManifest.model_validate({
        "model_name": NAME, "version": "1", "sha256": sha256_hex(data), "size": len(data),
        "feature_schema_hash": SPEC.schema_hash(), "created_at": 0})
    with pytest.raises(ModelRefused) as refused:
        store.install(manifest, data)  # the fleet's path: an unsigned manifest, refused
    assert refused.value.reason == "unsigned"
    signed = manifest.model_copy(update={"key_id": "0" * 16, "signature": "c2ln"})
    with pytest.raises(ModelRefused) as refused:
        store.install(signed, data)  # and no key to check a signature with
    assert refused.value.reason == "bad_signature"
    with pytest.raises(ValueError, match="signed manifest"):
        store.install_checksummed(signed, data)
    with pytest.raises(ModelRefused) as refused:
        store.install_checksummed(manifest, data[:-1] + b"\1")
    assert refused.value.reason == "hash_mismatch"
    assert store.installed() == []
    bundle = store.install_checksummed(manifest, data)
    assert bundle.version == "z-1" and store.installed() == [f"{NAME}/1"]


# ---- configuration ------------------------------------------------------------------------


AGENT: dict[str, Any] = {
    "device": "edge-01",
    "sources": [{"type": "synthetic", "name": "s", "assets": 1, "tags": ["temp"]}],
    "buffer": {"path": "buffer.db"},
    "fog": {"url": "http://fog:8080/v1/ingest", "token": "t"},
}


def agent_problems(**settings: Any) -> list[str]:
    with pytest.raises(AgentConfigError) as raised:
        parse_agent_config({**AGENT, **settings}, base_dir=Path("/etc/edgefleet"))
    return raised.value.problems


def test_model_source_config_and_its_errors(tmp_path: Path) -> None:
    source = {"mlflow": {"tracking_uri": "https://mlflow.plant:5000",
                         "model": "models:/line-anomaly@champion", "token_file": "mlflow.token",
                         "ca_file": "certs/ca.pem"}}
    parsed = parse_agent_config({**AGENT, "model_source": source},
                                base_dir=Path("/etc/edgefleet"))
    assert parsed.model_source is not None
    mlflow_config = parsed.model_source.mlflow
    assert mlflow_config.token_file == Path("/etc/edgefleet/mlflow.token")
    assert mlflow_config.ca_file == Path("/etc/edgefleet/certs/ca.pem")
    assert mlflow_config.name_and_alias == ("line-anomaly", "champion")
    assert (mlflow_config.poll_s, mlflow_config.shadow_s) == (30.0, 60.0)
    assert mlflow_config.models_path(tmp_path) == tmp_path / "mlflow-models"

    key = public_key_text(Ed25519PrivateKey.generate().public_key())
    fleet = {"url": "http://cp:8000", "token": "t", "public_keys": [key]}
    assert agent_problems(model_source=source, fleet=fleet) == [
        "model_source: set together with fleet (an agent gets its models from the control "
        "plane or from MLflow by itself: choose one)"]
    assert agent_problems(model_source={"mlflow": {
        "tracking_uri": "mlflow:5000", "model": "models:/line-anomaly/3", "pol_s": 1}}) == [
        "model_source.mlflow.pol_s: unknown key (did you mean 'poll_s'?); allowed: "
        "backoff_cap_s, backoff_initial_s, ca_file, keep, max_artifact_bytes, model, "
        "models_dir, poll_s, shadow_s, timeout_s, token_file, tracking_uri"]
    assert agent_problems(model_source={"mlflow": {
        "tracking_uri": "mlflow:5000", "model": "models:/line-anomaly/3"}}) == [
        "model_source.mlflow.tracking_uri: expected http(s)://host[:port][/prefix], got "
        "'mlflow:5000'",
        "model_source.mlflow.model: 'models:/line-anomaly/3' names no alias: expected "
        "models:/NAME@ALIAS (an alias is what the agent follows, e.g. "
        "models:/NAME@champion)"]
    assert agent_problems(model_source={"mlflow": {
        "tracking_uri": "http://mlflow:5000", "model": "models:/line anomaly@champion",
        "ca_file": "ca.pem"}}) == [
        "model_source.mlflow.ca_file: set for a plain http:// tracking_uri (use https://)",
        "model_source.mlflow.model: 'models:/line anomaly@champion': the name 'line anomaly' "
        "is not a safe name (letters, digits, '_', '.', '-', not starting with a symbol, "
        "≤ 128)"]
    assert parse_model_uri("models:/m@v2.1-rc") == ("m", "v2.1-rc")

