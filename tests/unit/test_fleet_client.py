"""The agent's fleet client and model updater against a fake control plane
(`httpx.MockTransport` implementing the device API contract), a real `ModelStore` in
tmp_path and real signed ONNX models (cloud/reference_models.py, Ed25519 keys made here).
Shadows and polls are short: the whole file runs in a few seconds."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from edgefleet.cloud.reference_models import METADATA_KEY, build_zscore_model
from edgefleet.edge_agent.fleet import (
    ArtifactTooLarge,
    FleetAuthError,
    FleetClient,
    FleetConfig,
    FleetProtocolError,
    FleetUnavailable,
    ModelUpdater,
    Report,
    build_updater,
    inferencer_for,
)
from edgefleet.edge_agent.inference import Inferencer, ModelBundle
from edgefleet.edge_agent.model_manager import ModelStore
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import (
    ModelManifest,
    public_key_text,
    sha256_hex,
    sign_manifest,
)
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

SPEC = FeatureSpec(tags=("temp", "flow"), window=4, stats=("mean", "std", "max", "last"))
WIDTH = len(SPEC.feature_names())  # 8
MEANS = [float(i) for i in range(WIDTH)]
STDS = [0.5 + i / 4 for i in range(WIDTH)]
T0 = 1_795_000_000_000_000_000
BASE = "http://cp.test"
TOKEN = "device-token-1"
ARTIFACTS = "/v1/device/artifacts"


# ---- models -------------------------------------------------------------------------------


def zscore_bytes(folder: Path, version: str, threshold: float = 3.0) -> bytes:
    path = build_zscore_model(folder / f"build-{version}.onnx", SPEC, means=MEANS, stds=STDS,
                              version=version, threshold=threshold)
    return path.read_bytes()


def fragile_bytes(version: str) -> bytes:
    """Scores sqrt(1000 - max|x|): finite on the store's probe batch, NaN (a ScoringError)
    on any row holding a value beyond ±1000."""
    nodes = [
        helper.make_node("Abs", ["features"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["biggest"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["limit", "biggest"], ["room"]),
        helper.make_node("Sqrt", ["room"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "fragile",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=[helper.make_tensor("limit", TensorProto.FLOAT, [], [1000.0])],
    )
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    metadata = {"name": "zscore", "version": version, "threshold": 30.0,
                "features": SPEC.model_dump(mode="json"), "score_output": "score",
                "score_sign": 1}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def manifest_for(data: bytes, version: str, key: Ed25519PrivateKey) -> ModelManifest:
    manifest = ModelManifest.model_validate({
        "model_name": "zscore", "version": version, "sha256": sha256_hex(data),
        "size": len(data), "feature_schema_hash": SPEC.schema_hash(), "created_at": T0,
        "source": f"models:/zscore/{version}",
    })
    return sign_manifest(manifest, key)


def rows(n: int = 4, seed: int = 1, scale: float = 0.1) -> np.ndarray[Any, Any]:
    return np.asarray(MEANS) + np.random.default_rng(seed).standard_normal((n, WIDTH)) * scale


# ---- the fake control plane -----------------------------------------------------------------


class ControlPlane:
    """The device API of the contract, with its state in plain attributes."""

    def __init__(self, folder: Path, key: Ed25519PrivateKey) -> None:
        self.folder = folder
        self.key = key
        self.token = TOKEN
        self.generation = 1
        self.model: dict[str, Any] | None = None
        self.shadow_s = 0.1
        self.poll_s = 0.01
        self.artifacts: dict[str, bytes] = {}
        self.reports: list[dict[str, Any]] = []
        self.report_times: list[float] = []
        self.requests: list[httpx.Request] = []
        self.down = False  # every endpoint: connection refused
        self.artifacts_down = False
        self.reports_down = False
        self.report_answer: httpx.Response | None = None  # served instead of 204
        self.fail_desired: list[httpx.Response] = []  # answers served before the real ones

    def publish(self, version: str, data: bytes | None = None, *, served: bytes | None = None,
                manifest: ModelManifest | None = None) -> int:
        """A new generation naming `version`; `served` replaces the bytes on the wire."""
        data = data if data is not None else zscore_bytes(self.folder, version)
        manifest = manifest if manifest is not None else manifest_for(data, version, self.key)
        path = f"{ARTIFACTS}/zscore/{version}"
        self.artifacts[path] = served if served is not None else data
        self.model = {"manifest": json.loads(manifest.to_json()), "artifact_url": path}
        self.generation += 1
        return self.generation

    def artifact_requests(self) -> list[str]:
        return [r.url.path for r in self.requests if r.url.path.startswith(ARTIFACTS)]

    def states(self, generation: int | None = None) -> list[str]:
        return [r["state"] for r in self.reports
                if generation is None or r["generation"] == generation]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.down or (self.artifacts_down and path.startswith(ARTIFACTS)) or (
            self.reports_down and path == "/v1/device/report"
        ):
            raise httpx.ConnectError("connection refused", request=request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"detail": "unknown device token"})
        if path == "/v1/device/desired" and request.method == "GET":
            if self.fail_desired:
                return self.fail_desired.pop(0)
            etag = f'"{self.generation}"'
            if request.headers.get("If-None-Match") == etag:
                return httpx.Response(304)
            return httpx.Response(200, headers={"ETag": etag}, json={
                "device": "edge-01", "generation": self.generation, "model": self.model,
                "shadow_s": self.shadow_s, "poll_s": self.poll_s,
            })
        if path.startswith(ARTIFACTS) and request.method == "GET":
            data = self.artifacts.get(path)
            if data is None:
                return httpx.Response(404, json={"detail": "no such artifact"})
            return httpx.Response(200, content=data)
        if path == "/v1/device/report" and request.method == "POST":
            if self.report_answer is not None:
                return self.report_answer
            self.reports.append(json.loads(request.content))
            self.report_times.append(time.monotonic())
            return httpx.Response(204)
        return httpx.Response(404)


class Device:
    """What the agent does with a swap: serve the new bundle from the next cycle on."""

    def __init__(self, store: ModelStore) -> None:
        bundle = store.current_bundle()
        self.running = bundle.version if bundle is not None else None
        self.swaps: list[str] = []

    def swap(self, bundle: ModelBundle) -> None:
        self.swaps.append(bundle.version)
        self.running = bundle.version


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ModelStore:
    """A store running v1 (installed and activated)."""
    store = ModelStore(tmp_path / "models", [key.public_key()], SPEC)
    data = zscore_bytes(tmp_path, "v1")
    store.install(manifest_for(data, "v1", key), data)
    store.activate("zscore", "v1")
    return store


@pytest.fixture
def cp(tmp_path: Path, key: Ed25519PrivateKey, store: ModelStore) -> ControlPlane:
    """A control plane whose generation 2 names v1 (what the device runs)."""
    plane = ControlPlane(tmp_path, key)
    plane.publish("v1", (store.root / "zscore" / "v1" / "model.onnx").read_bytes())
    return plane


def make_updater(store: ModelStore, cp: ControlPlane, device: Device, *,
                 max_artifact_bytes: int = 1024**2, base: str = BASE) -> ModelUpdater:
    http = httpx.AsyncClient(transport=httpx.MockTransport(cp.handler))
    client = FleetClient(base, TOKEN, http, max_artifact_bytes)
    return ModelUpdater(store, client, device.swap, poll_min_s=0.005, poll_max_s=0.05,
                        backoff_initial_s=0.005, backoff_cap_s=0.03, rng=random.Random(7))


async def feed(updater: ModelUpdater, stop: asyncio.Event, scale: float = 0.1) -> None:
    """The agent's inference cycles: one live feature matrix every 5 ms."""
    seed = 0
    while not stop.is_set():
        seed += 1
        updater.observe(rows(4, seed, scale))
        await asyncio.sleep(0.005)


async def run_until(updater: ModelUpdater, done: Callable[[], bool], *, timeout: float = 5.0,
                    scale: float = 0.1) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(updater.run(stop))
    feeder = asyncio.create_task(feed(updater, stop, scale))
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not task.done(), "the updater's loop ended on its own"
            assert time.monotonic() < deadline, f"timed out; counters {updater.counters}"
            await asyncio.sleep(0.003)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)
        await feeder


# ---- the client ---------------------------------------------------------------------------


def test_not_modified_path_sends_the_generation_and_the_token(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        first = await updater.client.desired(None)
        assert first is not None and first.generation == 2 and first.model is not None
        assert first.model.manifest.ref == "zscore/v1" and first.poll_s == 0.01
        assert await updater.client.desired(2) is None
        for _ in range(3):
            await updater.poll_once()
        return updater

    updater = asyncio.run(main())
    gets = [r for r in cp.requests if r.url.path == "/v1/device/desired"]
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in gets)
    assert "If-None-Match" not in gets[0].headers and gets[1].headers["If-None-Match"] == '"2"'
    # The model named is already current: "applied" once, then only 304s.
    assert cp.states() == ["applied"] and cp.reports[0]["current"] == "zscore/v1"
    assert updater.counters["polls"] == 3 and updater.counters["not_modified"] == 2
    assert updater.generation == 2 and device.swaps == [] and not cp.artifact_requests()


def _desired(**change: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"device": "edge-01", "generation": 3, "model": None,
                            "shadow_s": 1.0, "poll_s": 5.0}
    body.update(change)
    return {k: v for k, v in body.items() if v != "<drop>"}


@pytest.mark.parametrize(("answer", "error", "match"), [
    (httpx.Response(401), FleetAuthError, "refused the device token"),
    (httpx.Response(403), FleetAuthError, "403"),
    (httpx.Response(503, headers={"Retry-After": "7"}), FleetUnavailable, "503"),
    ("down", FleetUnavailable, "ConnectError"),
    (httpx.Response(404), FleetProtocolError, "unexpected answer 404"),
    (httpx.Response(200, content=b"<html>"), FleetProtocolError, "not JSON"),
    (httpx.Response(200, json=_desired(poll_s="<drop>")), FleetProtocolError, "poll_s"),
    (httpx.Response(200, json=_desired(generation="7")), FleetProtocolError, "generation"),
    (httpx.Response(200, json=_desired(shadow_s=-1)), FleetProtocolError, "shadow_s"),
    (httpx.Response(200, json=_desired(model={"manifest": {"model_name": "x"},
                                              "artifact_url": "/a"})),
     FleetProtocolError, "model.manifest"),
    (httpx.Response(304), FleetProtocolError, "without If-None-Match"),
])
def test_client_errors_are_typed_and_name_the_problem(
    answer: httpx.Response | str, error: type[Exception], match: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if answer == "down":
            raise httpx.ConnectError("connection refused", request=request)
        assert isinstance(answer, httpx.Response)
        return answer

    async def main() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        with pytest.raises(error, match=match) as raised:
            await FleetClient(BASE, TOKEN, http).desired(None)
        if isinstance(raised.value, FleetUnavailable) and answer != "down":
            assert raised.value.retry_after == 7.0

    asyncio.run(main())


def test_download_cap_addresses_and_where_the_token_goes() -> None:
    seen: list[httpx.Request] = []
    big = b"x" * 5000

    async def chunks() -> Any:
        for _ in range(5):
            yield b"y" * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/streamed"):  # no Content-Length
            return httpx.Response(200, content=chunks())
        return httpx.Response(200, content=big if "big" in request.url.path else b"model")

    async def main() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = FleetClient(BASE + "/api/", TOKEN, http, max_artifact_bytes=4096)
        assert await client.download("v1/device/artifacts/m") == b"model"
        assert await client.download("/v1/device/artifacts/m") == b"model"
        assert await client.download("http://cp.test:80/api/x") == b"model"
        assert await client.download("https://bucket.example/m?sig=1") == b"model"
        with pytest.raises(ArtifactTooLarge, match="5000 bytes announced"):
            await client.download("/big")
        with pytest.raises(ArtifactTooLarge, match="aborted"):
            await client.download("/streamed")
        with pytest.raises(ArtifactTooLarge):  # the manifest's size caps it too
            await client.download("/small", max_bytes=3)
        with pytest.raises(FleetProtocolError, match="http"):
            await client.download("ftp://cp.test/m")

    asyncio.run(main())
    assert [str(r.url) for r in seen[:4]] == [
        "http://cp.test/api/v1/device/artifacts/m", "http://cp.test/api/v1/device/artifacts/m",
        "http://cp.test/api/x", "https://bucket.example/m?sig=1"]
    assert [r.headers.get("Authorization") for r in seen[:4]] == [f"Bearer {TOKEN}"] * 3 + [None]


# ---- the updater --------------------------------------------------------------------------


def test_new_model_is_shadowed_activated_swapped_and_reported(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.shadow_s = 0.15
    generation = cp.publish("v2")

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: "applied" in cp.states(generation))
        return updater

    updater = asyncio.run(main())
    states = cp.states(generation)
    assert states[:2] == ["downloading", "shadowing"] and states[-1] == "applied"
    assert set(states[2:-1]) <= {"shadowing"}
    applied = cp.reports[-1]
    assert applied["current"] == "zscore/v2" and applied["previous"] == "zscore/v1"
    shadow = applied["shadow"]
    assert set(shadow) == {"rows", "errors", "error_rate", "latency_p99_us",
                           "anomaly_rate_current", "anomaly_rate_candidate",
                           "anomaly_rate_shift"}
    assert shadow["rows"] > 0 and shadow["errors"] == 0 and shadow["error_rate"] == 0.0
    assert shadow["latency_p99_us"] > 0 and shadow["anomaly_rate_current"] is not None
    assert shadow["anomaly_rate_shift"] == 0.0  # same model, other version: same scores
    first_shadowing = cp.report_times[[r["state"] for r in cp.reports].index("shadowing")]
    assert cp.report_times[-1] - first_shadowing >= 0.15 - 0.01  # shadowed for shadow_s
    assert store.state() == ("zscore/v2", "zscore/v1") and device.swaps == ["v2"]
    assert device.running == "v2" and updater.generation == generation
    counters = updater.counters
    assert (counters["installs"], counters["swaps"], counters["shadows"]) == (1, 1, 1)
    assert counters["refusals"] == counters["errors"] == counters["shadows_abandoned"] == 0


def test_tampered_model_is_refused_once_and_the_current_model_stays(
    store: ModelStore, cp: ControlPlane, tmp_path: Path
) -> None:
    device = Device(store)
    good = zscore_bytes(tmp_path, "v2")
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01
    generation = cp.publish("v2", good, served=bytes(tampered))

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: "refused" in cp.states(generation))
        polls = updater.counters["polls"]
        await run_until(updater, lambda: updater.counters["polls"] >= polls + 10)
        return updater

    updater = asyncio.run(main())
    refused = [r for r in cp.reports if r["state"] == "refused"]
    assert len(refused) == 1 and refused[0]["reason"].startswith("hash_mismatch: ")
    assert refused[0]["current"] == "zscore/v1"
    assert len(cp.artifact_requests()) == 1  # this generation is not retried
    assert store.state() == ("zscore/v1", None) and store.installed() == ["zscore/v1"]
    assert device.swaps == [] and updater.generation == generation
    assert updater.counters["refusals"] == 1 and updater.counters["installs"] == 0


def test_rollback_works_from_disk_with_the_artifacts_unreachable(
    store: ModelStore, cp: ControlPlane, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    v2 = zscore_bytes(tmp_path, "v2")
    store.install(manifest_for(v2, "v2", key), v2)
    store.activate("zscore", "v2")  # running v2, v1 is the previous model
    device = Device(store)
    v1 = (store.root / "zscore" / "v1" / "model.onnx").read_bytes()
    generation = cp.publish("v1", v1)  # the control plane rolls back
    cp.artifacts_down = True

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: "rolled_back" in cp.states(generation))
        return updater

    updater = asyncio.run(main())
    assert store.state() == ("zscore/v1", "zscore/v2") and device.swaps == ["v1"]
    assert cp.states(generation) == ["rolled_back"]
    assert cp.reports[-1]["current"] == "zscore/v1" and cp.reports[-1]["shadow"] is None
    assert cp.artifact_requests() == []  # no download, no shadow
    assert updater.counters["rollbacks"] == 1 and updater.counters["shadows"] == 0


def test_a_newer_generation_mid_shadow_abandons_it(store: ModelStore, cp: ControlPlane) -> None:
    device = Device(store)
    cp.shadow_s = 30.0
    shadowed = cp.publish("v2")

    async def main() -> tuple[ModelUpdater, int]:
        updater = make_updater(store, cp, device)
        stop = asyncio.Event()
        task = asyncio.create_task(updater.run(stop))
        feeder = asyncio.create_task(feed(updater, stop))
        while "shadowing" not in cp.states(shadowed):
            await asyncio.sleep(0.003)
        await asyncio.sleep(0.05)
        assert updater.shadowing and device.swaps == []
        cp.shadow_s = 0.05
        newer = cp.publish("v3")
        while "applied" not in cp.states(newer):
            assert not task.done()
            await asyncio.sleep(0.003)
        stop.set()
        await asyncio.wait_for(task, 5.0)
        await feeder
        return updater, newer

    started = time.monotonic()
    updater, newer = asyncio.run(main())
    assert time.monotonic() - started < 5.0  # the 30 s shadow was abandoned
    assert "applied" not in cp.states(shadowed) and device.swaps == ["v3"]
    assert store.state() == ("zscore/v3", "zscore/v1") and updater.generation == newer
    assert updater.counters["shadows_abandoned"] == 1 and updater.counters["shadows"] == 2
    assert not updater.shadowing


def test_auth_error_is_counted_logged_once_and_the_model_kept(
    store: ModelStore, cp: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    device = Device(store)
    generation = cp.publish("v2")
    cp.token = "someone-else"  # the control plane no longer knows this device's token
    cp.shadow_s = 0.02

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        with caplog.at_level(logging.ERROR, logger="edgefleet.edge_agent.fleet"):
            await run_until(updater, lambda: updater.counters["auth_errors"] >= 4)
        assert store.current == "zscore/v1" and device.swaps == []
        assert not cp.artifact_requests()
        cp.token = TOKEN  # fixed: it follows the desired state again
        await run_until(updater, lambda: "applied" in cp.states(generation))
        return updater

    updater = asyncio.run(main())
    refusals = [r for r in caplog.records if "refused the device token" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    assert updater.counters["errors"] >= 4 and device.swaps == ["v2"]


def test_server_errors_back_off_then_recover(store: ModelStore, cp: ControlPlane) -> None:
    device = Device(store)
    generation = cp.publish("v2")
    cp.shadow_s = 0.02
    cp.fail_desired = [httpx.Response(503) for _ in range(5)]
    cp.fail_desired.append(httpx.Response(503, headers={"Retry-After": "0.025"}))

    async def main() -> tuple[ModelUpdater, list[float], float]:
        updater = make_updater(store, cp, device)
        delays = [await updater.poll_once() for _ in range(6)]
        recovered = await updater.poll_once()  # follows generation 3 (shadow, no windows)
        return updater, delays, recovered

    updater, delays, recovered = asyncio.run(main())
    for attempt, delay in enumerate(delays[:5]):  # full jitter under a doubling ceiling
        assert 0 <= delay <= min(0.03, 0.005 * 2**attempt)
    assert delays[5] >= 0.025  # Retry-After honoured (within the cap)
    assert 0.009 <= recovered <= 0.011  # the server's poll_s again, ±10 % jitter
    assert updater.counters["errors"] == 6 and store.current == "zscore/v2"
    assert cp.states(generation)[-1] == "applied" and device.swaps == ["v2"]


def test_offline_agent_keeps_its_model_then_catches_up(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.shadow_s = 0.03

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: updater.generation == 2)
        cp.down = True
        await run_until(updater, lambda: updater.counters["errors"] >= 5)
        cp.publish("v2")  # published while the device is offline …
        latest = cp.publish("v3")  # … and superseded
        await run_until(updater, lambda: updater.counters["errors"] >= 10)
        assert store.current == "zscore/v1" and device.swaps == []
        cp.down = False
        await run_until(updater, lambda: "applied" in cp.states(latest))
        return updater

    updater = asyncio.run(main())
    assert device.swaps == ["v3"] and store.state() == ("zscore/v3", "zscore/v1")
    assert cp.artifact_requests() == [f"{ARTIFACTS}/zscore/v3"]  # v2 never fetched
    assert cp.states(3) == []  # the skipped generation was never acted on
    assert updater.generation == 4


def test_failed_reports_are_retried_and_only_the_latest_is_kept(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.shadow_s = 0.05
    generation = cp.publish("v2")
    cp.reports_down = True

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: store.current == "zscore/v2")
        pending = updater.pending_report
        assert isinstance(pending, Report) and pending.state == "applied"
        assert pending.generation == generation and pending.shadow is not None
        cp.reports_down = False
        await run_until(updater, lambda: bool(cp.reports))
        await run_until(updater, lambda: updater.counters["not_modified"] >= 5)
        return updater

    updater = asyncio.run(main())
    assert cp.states() == ["applied"]  # downloading/shadowing/… were superseded unsent
    assert cp.reports[0]["generation"] == generation and cp.reports[0]["shadow"]["rows"] > 0
    assert updater.counters["reports_failed"] >= 3 and updater.counters["reports_sent"] == 1
    assert updater.pending_report is None and device.swaps == ["v2"]


def test_a_report_the_control_plane_rejects_is_dropped_not_retried(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.report_answer = httpx.Response(422, json={"detail": "reason too long"})

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        for _ in range(4):
            await updater.poll_once()
        return updater

    updater = asyncio.run(main())
    posts = [r for r in cp.requests if r.url.path == "/v1/device/report"]
    assert len(posts) == 1 and updater.pending_report is None
    assert updater.counters["reports_failed"] == 1 and updater.generation == 2


def test_artifact_over_the_size_cap_is_refused(
    store: ModelStore, cp: ControlPlane, tmp_path: Path
) -> None:
    device = Device(store)
    v2 = zscore_bytes(tmp_path, "v2")

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device, max_artifact_bytes=len(v2) - 1)
        declared = cp.publish("v2", v2)  # its manifest declares more than the cap
        await run_until(updater, lambda: "refused" in cp.states(declared))
        assert cp.artifact_requests() == []  # refused before any download
        updater.client.max_artifact_bytes = 1024**2
        v3 = zscore_bytes(tmp_path, "v3")
        padded = cp.publish("v3", v3, served=v3 + b"\0" * 100_000)  # more than it declares
        await run_until(updater, lambda: "refused" in cp.states(padded))
        return updater

    updater = asyncio.run(main())
    reasons = [r["reason"] for r in cp.reports if r["state"] == "refused"]
    assert len(reasons) == 2 and all(reason.startswith("too_large: ") for reason in reasons)
    assert "cap" in reasons[0] and "not downloaded" in reasons[1]
    assert store.state() == ("zscore/v1", None) and device.swaps == []
    assert updater.counters["refusals"] == 2 and updater.counters["installs"] == 0


def test_a_candidate_failing_every_shadow_batch_is_not_swapped_in(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.shadow_s = 0.08
    generation = cp.publish("v2", fragile_bytes("v2"))

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        # Live rows near ±5000: the current model scores them, the candidate cannot.
        await run_until(updater, lambda: "failed" in cp.states(generation), scale=5000.0)
        return updater

    updater = asyncio.run(main())
    failed = cp.reports[-1]
    assert failed["state"] == "failed" and "failed every one" in failed["reason"]
    assert failed["shadow"]["rows"] > 0 and failed["shadow"]["error_rate"] == 1.0
    assert store.state() == ("zscore/v1", None) and device.swaps == []
    assert updater.counters["failures"] == 1 and updater.generation == generation


def test_missing_artifact_is_reported_and_retried_until_it_appears(
    store: ModelStore, cp: ControlPlane
) -> None:
    device = Device(store)
    cp.shadow_s = 0.02
    generation = cp.publish("v2")
    artifact = cp.artifacts.pop(f"{ARTIFACTS}/zscore/v2")  # the control plane answers 404

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await run_until(updater, lambda: len(cp.artifact_requests()) >= 3)
        assert store.current == "zscore/v1" and device.swaps == []
        cp.artifacts[f"{ARTIFACTS}/zscore/v2"] = artifact
        await run_until(updater, lambda: "applied" in cp.states(generation))
        return updater

    updater = asyncio.run(main())
    failed = [r for r in cp.reports if r["state"] == "failed"]
    assert failed and "404" in failed[0]["reason"] and "will retry" in failed[0]["reason"]
    assert device.swaps == ["v2"] and updater.counters["errors"] >= 3


def test_null_model_keeps_the_current_one(store: ModelStore, cp: ControlPlane) -> None:
    device = Device(store)
    cp.model = None
    cp.generation += 1

    async def main() -> ModelUpdater:
        updater = make_updater(store, cp, device)
        await updater.poll_once()
        await updater.poll_once()
        return updater

    updater = asyncio.run(main())
    assert cp.states() == ["applied"] and "names no model" in cp.reports[0]["reason"]
    assert store.current == "zscore/v1" and device.swaps == [] and updater.generation == 3


def test_agent_style_inference_feeds_the_shadow_and_swaps_keep_the_windows(
    store: ModelStore, cp: ControlPlane
) -> None:
    """The agent's wiring: an Inferencer built by `inferencer_for`, replaced by `swap`."""
    cp.shadow_s = 0.1
    generation = cp.publish("v2")
    holder: dict[str, Inferencer] = {}
    swapped: list[tuple[Inferencer, Inferencer]] = []

    def swap(bundle: ModelBundle) -> None:
        old = holder["inferencer"]
        holder["inferencer"] = inferencer_for(bundle, updater.observe, previous=old)
        swapped.append((old, holder["inferencer"]))

    async def ingest(stop: asyncio.Event) -> None:
        rng = np.random.default_rng(3)
        ts = T0
        while not stop.is_set():
            ts += 1_000_000
            samples = [Sample(asset, tag, ts, float(MEANS[0] + rng.standard_normal()),
                              Quality.GOOD) for asset in ("pump-1", "pump-2")
                       for tag in ("temp", "flow")]
            holder["inferencer"].run(samples)
            await asyncio.sleep(0.002)

    async def main() -> ModelUpdater:
        nonlocal updater
        http = httpx.AsyncClient(transport=httpx.MockTransport(cp.handler))
        updater = ModelUpdater(store, FleetClient(BASE, TOKEN, http), swap,
                               poll_min_s=0.005, poll_max_s=0.05)
        bundle = store.current_bundle()
        assert bundle is not None
        holder["inferencer"] = inferencer_for(bundle, updater.observe)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(updater.run(stop)), asyncio.create_task(ingest(stop))]
        while "applied" not in cp.states(generation):
            await asyncio.sleep(0.003)
        stop.set()
        await asyncio.gather(*tasks)
        return updater

    updater: Any = None
    asyncio.run(main())
    assert cp.reports[-1]["shadow"]["rows"] > 0  # windows the inference cycles scored
    (old, new), = swapped
    assert new.scorer is not None and new.scorer.version == "v2"
    assert new.windows is old.windows  # partial windows survive the swap


# ---- configuration --------------------------------------------------------------------------


def test_fleet_config_validation_and_build(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    text = public_key_text(key.public_key())
    other = Ed25519PrivateKey.generate().public_key()
    pem = other.public_bytes(serialization.Encoding.PEM,
                             serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    keys_file = tmp_path / "fleet.pub"
    keys_file.write_text(f"# fleet keys\n{text}\n{pem}")
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    config = FleetConfig(url="https://cp.example:8443/api", token_file=token_file,
                         public_keys_file=keys_file, poll_min_s=5, poll_max_s=60)
    assert config.read_token() == "file-token" and len(config.load_public_keys()) == 2
    assert config.models_path(tmp_path) == tmp_path / "models"
    assert config.max_artifact_bytes == 64 * 1024**2 and config.backoff_cap_s == 60

    def problems(**fields: Any) -> str:
        base: dict[str, Any] = {"url": "http://cp:8000", "token": "t", "public_keys": [text]}
        base.update(fields)
        with pytest.raises(ValueError) as raised:
            FleetConfig.model_validate({k: v for k, v in base.items() if v != "<drop>"})
        return str(raised.value)

    assert "token: required" in problems(token="<drop>")
    assert "choose one" in problems(token_file=str(token_file))
    assert "url: expected http(s)" in problems(url="ftp://cp")
    assert "public_keys: [0]" in problems(public_keys=["not a key"])
    assert "at least one fleet public key" in problems(public_keys=[])
    assert "poll_max_s: must be >= poll_min_s" in problems(poll_min_s=10, poll_max_s=5)
    assert "ca_file: set for a plain http://" in problems(ca_file="/etc/ca.pem")
    assert "extra" in problems(pol_s=3).lower()

    inline = FleetConfig(url="http://cp:8000", token="t", public_keys=(text,),
                         models_dir=tmp_path / "m")

    async def main() -> ModelUpdater:
        http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(304)))
        updater = build_updater(inline, state_dir=tmp_path, swap=lambda b: None, http=http)
        await updater.client.aclose()
        return updater

    updater = asyncio.run(main())
    assert updater.store.root == tmp_path / "m" and updater.client.url == "http://cp:8000"
