"""Published artifacts in the launcher's real S3 server (SeaweedFS), fetched through
pre-signed URLs: genuine ONNX models registered in the launcher's MLflow server, published
with `publish_model(..., artifacts=S3Artifacts)`, fetched by plain GETs without any key,
and every way to stretch a URL (another key, a changed signature or lifetime, an expired
one, no signature, another key pair) refused by the server itself."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.control.artifacts import (
    ENV_SECRET_KEY,
    ArtifactConfigError,
    ArtifactConflict,
    ArtifactError,
    ArtifactMissing,
    ArtifactUnavailable,
    S3Artifacts,
)
from edgefleet.cloud.control.publish import (
    ARTIFACT_FILE,
    MANIFEST_FILE,
    Published,
    load_published,
    publish_model,
)
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import (
    ModelManifest,
    sha256_hex,
    sign_manifest,
    verify_artifact,
    verify_manifest,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SPEC = FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
TTL_S = 300


@dataclass(frozen=True)
class Fleet:
    store: S3Artifacts
    key: Ed25519PrivateKey
    tracking_uri: str
    name: str
    published: dict[str, Published]  # version -> published (locally and in S3)


def _register(tracking_uri: str, name: str, folder: Path, means: list[float]) -> list[str]:
    """Versions 1..n of `name` in the MLflow server, one genuine ONNX model each; through
    an explicit client, so no global MLflow state is touched."""
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.create_experiment(name)
    client.create_registered_model(name)
    versions = []
    for index, mean in enumerate(means):
        path = build_zscore_model(folder / f"{index}.onnx", SPEC, means=[mean] * WIDTH,
                                  stds=[2.0] * WIDTH, name=name, version=str(index + 1))
        run = client.create_run(experiment)
        model_dir = folder / f"model-{index}"
        # Explicit requirements: inferring them runs a subprocess (seconds per model).
        mlflow.onnx.save_model(onnx.load(path), model_dir, save_as_external_data=False,
                               pip_requirements=["onnx", "onnxruntime"])
        client.log_artifacts(run.info.run_id, str(model_dir), "model")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version(name, f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id, await_creation_for=0)
        client.set_model_version_tag(name, version.version, "onnx_sha256",
                                     sha256_hex(path.read_bytes()))
        versions.append(str(version.version))
    return versions


@pytest.fixture(scope="module")
def fleet(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    folder = tmp_path_factory.mktemp("s3-artifacts")
    tag = secrets.token_hex(4)
    name = f"s3-it-{tag}"
    store = S3Artifacts.from_env(f"s3://{stack_env['EDGEFLEET_S3_BUCKET_MODELS']}/it-{tag}",
                                 stack_env)
    key = Ed25519PrivateKey.generate()
    tracking_uri = stack_env["MLFLOW_TRACKING_URI"]
    versions = _register(tracking_uri, name, folder, means=[1.0, 3.0])
    assert versions == ["1", "2"]
    # Version 2 is first published without S3 (as before S3 was configured, or when the
    # upload failed): publishing it again with the store completes it.
    local_only = publish_model(tracking_uri=tracking_uri, ref=f"{name}/2", signing_key=key,
                               store_root=folder / "store")
    with pytest.raises(ArtifactMissing):
        store.check(name, "2", local_only.manifest.sha256)
    published = {
        version: publish_model(tracking_uri=tracking_uri, ref=f"{name}/{version}",
                               signing_key=key, store_root=folder / "store", artifacts=store)
        for version in versions
    }
    assert published["2"].manifest == local_only.manifest  # not re-signed
    store.check(name, "2", local_only.manifest.sha256, size=local_only.manifest.size)
    return Fleet(store, key, tracking_uri, name, published)


@pytest.fixture
def requests_sent(fleet: Fleet) -> Iterator[list[str]]:
    """The URL of every HTTP request the store's client sends from now on."""
    sent: list[str] = []

    def record(request: Any, **_: Any) -> None:
        sent.append(request.url)

    events = fleet.store.client.meta.events
    events.register("before-send.s3", record)
    yield sent
    events.unregister("before-send.s3", record)


def _head(fleet: Fleet, version: str) -> dict[str, Any]:
    answer: dict[str, Any] = fleet.store.client.head_object(
        Bucket=fleet.store.config.location.bucket, Key=fleet.store.key(fleet.name, version))
    return answer


def _with_query(url: str, change: Callable[[dict[str, str]], None]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    change(query)
    return parts._replace(query=urlencode(query)).geturl()


def test_a_published_model_is_fetched_through_a_presigned_url(fleet: Fleet) -> None:
    published = fleet.published["1"]
    manifest = published.manifest
    local = published.artifact_path.read_bytes()
    stored = fleet.store.check(fleet.name, "1", manifest.sha256, size=manifest.size)
    assert stored.key.endswith(f"/{fleet.name}/1/{ARTIFACT_FILE}")

    url = fleet.store.presign(fleet.name, "1", TTL_S)
    response = httpx.get(url)  # no key, no token: the URL is the whole authorisation
    assert response.status_code == 200
    assert response.content == local
    assert hashlib.sha256(response.content).hexdigest() == manifest.sha256
    verify_manifest(manifest, [fleet.key.public_key()])  # what an agent checks
    verify_artifact(manifest, response.content)

    # The agent's own client: an absolute URL on another origin, fetched without the token.
    from edgefleet.edge_agent.fleet import FleetClient

    async def download() -> bytes:
        async with httpx.AsyncClient() as http:
            client = FleetClient("http://control.invalid:8700", "device-token", http)
            assert client.artifact_address(url) == (url, False)
            return await client.download(url, max_bytes=manifest.size)

    assert asyncio.run(download()) == local


def test_publishing_again_changes_nothing_and_other_bytes_are_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    first = fleet.published["1"]
    before = _head(fleet, "1")

    # The same control plane again, and one that lost its local store (a new manifest,
    # signed at another time, for the same bytes): the object is left as it is.
    again = publish_model(tracking_uri=fleet.tracking_uri, ref=f"{fleet.name}/1",
                          signing_key=fleet.key, store_root=first.artifact_path.parents[2],
                          artifacts=fleet.store)
    assert again.manifest == first.manifest
    fresh = publish_model(tracking_uri=fleet.tracking_uri, ref=f"{fleet.name}/1",
                          signing_key=fleet.key, store_root=tmp_path / "other-store",
                          artifacts=fleet.store)
    assert fresh.manifest.sha256 == first.manifest.sha256
    assert not fleet.store.upload(first).uploaded

    # Other bytes under the same version, signed as if they belonged there: refused.
    folder = tmp_path / "forged" / fleet.name / "1"
    folder.mkdir(parents=True)
    data = build_zscore_model(folder / ARTIFACT_FILE, SPEC, means=[9.0] * WIDTH,
                              stds=[1.0] * WIDTH, name=fleet.name, version="1").read_bytes()
    manifest = sign_manifest(ModelManifest.model_validate({
        **first.manifest.model_dump(by_alias=True, exclude={"signature", "key_id"}),
        "sha256": sha256_hex(data), "size": len(data)}), fleet.key)
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    forged = load_published(tmp_path / "forged", fleet.name, "1")
    with pytest.raises(ArtifactConflict, match="immutable"):
        fleet.store.upload(forged)
    with pytest.raises(ArtifactConflict):
        fleet.store.check(fleet.name, "1", manifest.sha256)

    after = _head(fleet, "1")
    for field in ("ETag", "LastModified", "ContentLength", "Metadata"):
        assert after[field] == before[field], field
    assert httpx.get(fleet.store.presign(fleet.name, "1", TTL_S)).content \
        == first.artifact_path.read_bytes()


def test_the_server_refuses_stretched_urls(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fleet.store.presign(fleet.name, "1", TTL_S)
    assert httpx.get(url).status_code == 200
    other_url = fleet.store.presign(fleet.name, "2", TTL_S)
    assert httpx.get(other_url).status_code == 200  # the other key exists and is readable

    another_key = url.replace(f"/{fleet.name}/1/", f"/{fleet.name}/2/")
    assert another_key != url
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]

    def tamper(query: dict[str, str]) -> None:
        query["X-Amz-Signature"] = ("1" if signature[0] == "0" else "0") + signature[1:]

    def longer(query: dict[str, str]) -> None:
        query["X-Amz-Expires"] = str(7 * 24 * 3600)

    stretched = {
        "another key": another_key,
        "tampered signature": _with_query(url, tamper),
        "longer lifetime": _with_query(url, longer),
        "no signature": url.split("?", 1)[0],
    }
    for what, bad in stretched.items():
        response = httpx.get(bad)
        assert response.status_code == 403, (what, response.status_code, response.text[:300])
        assert response.content != fleet.published["1"].artifact_path.read_bytes()

    # Signed two hours ago for 60 s (the shortest lifetime allowed): expired.
    import botocore.auth

    signed_at = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) \
        - datetime.timedelta(hours=2)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *_, **__: signed_at)
    expired = fleet.store.presign(fleet.name, "1", 60)
    monkeypatch.undo()
    assert dict(parse_qsl(urlsplit(expired).query))["X-Amz-Date"] \
        == signed_at.strftime("%Y%m%dT%H%M%SZ")
    response = httpx.get(expired)
    assert response.status_code == 403, response.text[:300]
    assert "expired" in response.text.lower()


def test_other_keys_and_missing_versions(fleet: Fleet, stack_env: dict[str, str]) -> None:
    wrong_secret = "x" * 32
    stranger = S3Artifacts.from_env(fleet.store.config.location.url,
                                    {**stack_env, ENV_SECRET_KEY: wrong_secret})
    with pytest.raises(ArtifactError, match=ENV_SECRET_KEY) as err:
        stranger.check(fleet.name, "1", fleet.published["1"].manifest.sha256)
    assert not isinstance(err.value, ArtifactUnavailable | ArtifactMissing)
    assert wrong_secret not in str(err.value)
    assert httpx.get(stranger.presign(fleet.name, "1", TTL_S)).status_code == 403

    with pytest.raises(ArtifactMissing):
        fleet.store.check(fleet.name, "99", "0" * 64)


@pytest.mark.parametrize(("name", "version"), [
    ("../edgefleet-mlflow", "1"), ("{name}", "../../x"), ("{name}/1", "1"),
    ("{name}", ""), ("", "1"), (".{name}", "1"), ("{name}", "1?x=1"),
])
def test_bad_names_are_refused_before_any_request(
    fleet: Fleet, requests_sent: list[str], name: str, version: str
) -> None:
    name = name.format(name=fleet.name)
    sha = fleet.published["1"].manifest.sha256
    with pytest.raises(ArtifactConfigError, match="is not a safe name"):
        fleet.store.presign(name, version, TTL_S)
    with pytest.raises(ArtifactConfigError, match="is not a safe name"):
        fleet.store.check(name, version, sha)
    assert requests_sent == []
    fleet.store.check(fleet.name, "1", sha)  # the hook does see real requests
    assert len(requests_sent) == 1 and requests_sent[0].startswith(
        fleet.store.config.endpoint)


def test_a_control_plane_with_s3_sends_devices_presigned_urls(
        fleet: Fleet, stack_env: dict[str, str], tmp_path: Path) -> None:
    """`edgefleet control run --artifacts-s3`: version 1 is published by the control plane
    itself (into S3), version 2 was in S3 already; simulated agents running the agent's
    own updater get pre-signed URLs on the S3 server's origin, fetch both versions from
    there (verified against the signed manifest) and never from the control plane."""
    import re

    from edgefleet.cloud.control.harness import ControlProcess
    from edgefleet.cloud.control.simfleet import SimulatedFleet

    location = f"s3://{stack_env['EDGEFLEET_S3_BUCKET_MODELS']}/control-{secrets.token_hex(4)}"
    control = ControlProcess(tmp_path / "control", tracking_uri=fleet.tracking_uri,
                             shadow_s=0.5, poll_s=0.5, env=stack_env,
                             extra_args=["--artifacts-s3", location,
                                         "--artifact-url-ttl-s", "600"])
    with control, httpx.Client(base_url=control.url, headers=control.operator_headers(),
                               timeout=60) as api:
        agents = SimulatedFleet(control.url, control.public_key_text(), tmp_path / "agents",
                                3, features=SPEC, poll_s=0.5, observe_s=0.1,
                                means=[1.0] * WIDTH, stds=[2.0] * WIDTH)
        asyncio.run(agents.enroll_all(control.operator_headers()))
        token = next(iter(agents.tokens().values()))
        with agents:
            for version in ("1", "2"):
                made = api.post("/v1/deployments", json={
                    "model": f"{fleet.name}/{version}", "target": "*", "waves": "100%",
                    "policy": {"max_latency_p99_us": 1_000_000.0}})
                assert made.status_code == 201, made.text
                path = f"/v1/deployments/{made.json()['id']}"
                view = wait_for(lambda p=path: _ended(api.get(p).json()), "the rollout to end",
                                timeout_s=60, every_s=0.2, details=(control.log,))
                assert view["state"] == "succeeded", view["progress"]
                assert set(agents.models().values()) == {f"{fleet.name}/{version}"}
                desired = httpx.get(f"{control.url}/v1/device/desired",
                                    headers={"Authorization": f"Bearer {token}"}).json()
                url = desired["model"]["artifact_url"]
                assert url.startswith(stack_env["EDGEFLEET_S3_ENDPOINT"]), url
                assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
        metrics = api.get("/metrics").text
    served = re.search(r"^edgefleet_control_artifact_downloads_total (\d+)", metrics, re.M)
    assert served is not None and served.group(1) == "0", metrics
    assert fleet.store.check(fleet.name, "1", fleet.published["1"].manifest.sha256)



def _ended(view: dict[str, Any]) -> dict[str, Any] | None:
    return view if view["state"] in ("succeeded", "rolled_back", "aborted") else None
