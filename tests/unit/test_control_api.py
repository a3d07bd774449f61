"""The control plane's API in process (FastAPI TestClient, SQLite, a local sqlite MLflow
registry of genuine ONNX models): enrollment and roles, publishing, a rollout driven by
device reports, desired state with ETags, and bad input refused with reasons."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.cloud.control import rollout
from edgefleet.cloud.control.app import ControlSettings, create_app, tick
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import (
    load_public_key,
    parse_manifest,
    public_key_text,
    sha256_hex,
    verify_artifact,
    verify_manifest,
)

NAME = "line-anomaly"
SPEC = FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
GOOD_SHADOW = {"rows": 500, "errors": 0, "error_rate": 0.0, "latency_p99_us": 120.0,
               "anomaly_rate_current": 0.05, "anomaly_rate_candidate": 0.06,
               "anomaly_rate_shift": 0.01}


@dataclass(frozen=True)
class Registry:
    tracking_uri: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Versions 1 and 2 of NAME (alias champion on 2), each tagged with its onnx_sha256."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = client.create_experiment(
                "control-tests", artifact_location=(folder / "mlruns").as_uri())
            for version, mean in (("1", 0.0), ("2", 1.0)):
                path = build_zscore_model(folder / f"v{version}.onnx", SPEC,
                                          means=[mean] * WIDTH, stds=[1.0] * WIDTH,
                                          name=NAME, version=f"zscore-{version}")
                with mlflow.start_run(experiment_id=experiment):
                    info = mlflow.onnx.log_model(onnx.load(path), name="model",
                                                 save_as_external_data=False,
                                                 pip_requirements=["onnx", "onnxruntime"])
                registered = str(mlflow.register_model(info.model_uri, NAME).version)
                assert registered == version
                client.set_model_version_tag(NAME, version, "onnx_sha256",
                                             sha256_hex(path.read_bytes()))
            client.set_registered_model_alias(NAME, "champion", "2")
        finally:
            mlflow.set_tracking_uri(previous)
    yield Registry(uri)


@dataclass
class Plane:
    http: TestClient
    admin: dict[str, str]
    state_dir: Path

    def operator(self) -> dict[str, str]:
        answer = self.http.post("/v1/tokens", json={"name": "ops", "role": "operator"},
                                headers=self.admin)
        assert answer.status_code == 201, answer.text
        return {"Authorization": f"Bearer {answer.json()['token']}"}

    def enroll(self, device: str, labels: dict[str, str], by: dict[str, str]) -> dict[str, str]:
        made = self.http.post("/v1/enrollment-tokens", json={"labels": labels}, headers=by)
        assert made.status_code == 201, made.text
        enrolled = self.http.post("/v1/enroll", json={"token": made.json()["token"],
                                                      "device": device})
        assert enrolled.status_code == 201, enrolled.text
        return {"Authorization": f"Bearer {enrolled.json()['token']}"}


@pytest.fixture
def plane(tmp_path: Path, registry: Registry) -> Iterator[Plane]:
    settings = ControlSettings(database_url=f"sqlite:///{tmp_path}/control.db",
                               state_dir=tmp_path / "state", tracking_uri=registry.tracking_uri,
                               tick_s=3600.0, shadow_s=0.0,
                               policy=rollout.GatePolicy(apply_timeout_s=600.0))
    app = create_app(settings)
    token = (tmp_path / "state" / "admin.token").read_text().strip()
    with TestClient(app) as http:
        yield Plane(http, {"Authorization": f"Bearer {token}"}, tmp_path / "state")


def _report(plane: Plane, device: dict[str, str], state: str, current: str | None,
            previous: str | None = None, shadow: dict[str, Any] | None = None) -> None:
    desired = plane.http.get("/v1/device/desired", headers=device).json()
    answer = plane.http.post("/v1/device/report", headers=device, json={
        "generation": desired["generation"], "current": current, "previous": previous,
        "state": state, "shadow": shadow})
    assert answer.status_code == 204, answer.text
    # A report only records; the engine loop steps within step_s. Step now instead.
    tick(plane.http.app.state.ctx)


def test_first_start_makes_an_admin_token_file_readable_only_by_its_owner(plane: Plane) -> None:
    token_file = plane.state_dir / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert plane.http.get("/v1/audit", headers=plane.admin).status_code == 200
    assert plane.http.get("/v1/audit").status_code == 401
    assert plane.http.get("/v1/audit", headers={"Authorization": "Bearer " + "x" * 43}) \
        .status_code == 401


def test_enrollment_tokens_are_single_use_and_devices_see_only_their_own(plane: Plane) -> None:
    ops = plane.operator()
    made = plane.http.post("/v1/enrollment-tokens", json={"labels": {"site": "plant-a"}},
                           headers=ops).json()["token"]
    first = plane.http.post("/v1/enroll", json={"token": made, "device": "gw-01"})
    assert first.status_code == 201
    again = plane.http.post("/v1/enroll", json={"token": made, "device": "gw-02"})
    assert again.status_code == 401 and "used" in again.json()["detail"]
    gw1 = {"Authorization": f"Bearer {first.json()['token']}"}
    # A device token reaches nothing an operator does.
    for method, path in (("GET", "/v1/devices"), ("GET", "/v1/fleet/health"),
                         ("POST", "/v1/deployments"), ("GET", "/v1/audit")):
        assert plane.http.request(method, path, headers=gw1, json={"model": "x/1"}) \
            .status_code in (403, 422)
    assert plane.http.get("/v1/devices", headers=gw1).status_code == 403
    # An operator is not a device.
    assert plane.http.get("/v1/device/desired", headers=ops).status_code == 403
    # Revocation ends the device's access at once.
    assert plane.http.post("/v1/devices/gw-01/revoke", headers=ops).status_code == 403
    assert plane.http.post("/v1/devices/gw-01/revoke", headers=plane.admin).status_code == 200
    assert plane.http.get("/v1/device/desired", headers=gw1).status_code == 401


def test_publishing_signs_the_exact_bytes_and_the_artifact_verifies(plane: Plane) -> None:
    ops = plane.operator()
    answer = plane.http.post("/v1/models/publish", json={"model": f"{NAME}@champion"},
                             headers=ops)
    assert answer.status_code == 201, answer.text
    manifest = parse_manifest(answer.json()["manifest"])
    assert (manifest.model_name, manifest.version) == (NAME, "2")
    from edgefleet.protocols.manifest import load_signing_key

    key = load_public_key(public_key_text(
        load_signing_key(plane.state_dir / "fleet-signing-key.pem").public_key()))
    verify_manifest(manifest, [key])
    body = plane.http.get(f"/v1/models/{NAME}/2/artifact", headers=ops).content
    verify_artifact(manifest, body)
    listed = plane.http.get("/v1/models", headers=ops).json()["models"]
    assert [m["model"] for m in listed] == [f"{NAME}/2"]


@pytest.mark.parametrize(("path", "status"), [
    (f"/v1/models/{NAME}/..%2F..%2Fadmin.token/artifact", 404),
    ("/v1/models/..%2Fstate/1/artifact", 404),
    ("/v1/models/x%0A/1/artifact", 400),
    (f"/v1/models/{NAME}/.hidden/artifact", 400),
])
def test_artifact_names_cannot_leave_the_store(plane: Plane, path: str, status: int) -> None:
    answer = plane.http.get(path, headers=plane.operator())
    assert answer.status_code in (status, 404), answer.text
    assert b"admin" not in answer.content or answer.status_code >= 400


@pytest.mark.parametrize("target", [
    "site=plant-a' OR '1'='1", "site=a;DROP TABLE devices", "site=", "=x", "site=a,site=b",
    "../../etc", "site=" + "a" * 200,
])
def test_malformed_selectors_are_refused_with_the_reason(plane: Plane, target: str) -> None:
    ops = plane.operator()
    answer = plane.http.get("/v1/devices", params={"target": target}, headers=ops)
    assert answer.status_code in (400, 422), answer.text
    assert answer.json()["detail"]
    created = plane.http.post("/v1/deployments", headers=ops,
                              json={"model": f"{NAME}@champion", "target": target})
    assert created.status_code in (400, 422)


def test_malformed_requests_get_4xx_with_a_reason(plane: Plane) -> None:
    ops = plane.operator()
    for body in ({"model": f"{NAME}@champion", "waves": "0,50%"},
                 {"model": f"{NAME}@champion", "waves": "50%,10%"},
                 {"model": "no-such-model@champion"},
                 {"model": f"{NAME}@champion", "policy": {"max_error_rate": 7}},
                 {"model": f"{NAME}@champion", "surprise": 1}):
        answer = plane.http.post("/v1/deployments", json=body, headers=ops)
        assert 400 <= answer.status_code < 500, (body, answer.text)
        assert answer.json()["detail"], body
    raw = plane.http.post("/v1/deployments", content=b"{not json", headers={
        **ops, "Content-Type": "application/json"})
    assert raw.status_code == 422


def test_a_rollout_follows_reports_through_its_waves(plane: Plane) -> None:
    ops = plane.operator()
    devices = {f"gw-{i:02d}": plane.enroll(f"gw-{i:02d}", {"site": "plant-a"}, ops)
               for i in range(1, 5)}
    other = plane.enroll("gw-b1", {"site": "plant-b"}, ops)
    created = plane.http.post("/v1/deployments", headers=ops, json={
        "model": f"{NAME}@champion", "target": "site=plant-a", "waves": "1,50%,100%"})
    assert created.status_code == 201, created.text
    deployment = created.json()["id"]
    # One active deployment per target.
    second = plane.http.post("/v1/deployments", headers=ops, json={
        "model": f"{NAME}/2", "target": "site=plant-a"})
    assert second.status_code == 409
    assert plane.http.get("/v1/device/desired", headers=other).json()["model"] is None

    target = f"{NAME}/2"
    for _ in range(10):
        told = {}
        for name, headers in devices.items():
            desired = plane.http.get("/v1/device/desired", headers=headers)
            etag = desired.headers["ETag"]
            again = plane.http.get("/v1/device/desired",
                                   headers={**headers, "If-None-Match": etag})
            assert again.status_code == 304
            model = desired.json()["model"]
            told[name] = model["manifest"]["version"] if model else None
            if model is not None:
                # The device may fetch what it is told to run, and nothing else.
                artifact = plane.http.get(model["artifact_url"], headers=headers)
                assert artifact.status_code == 200
                _report(plane, headers, "applied", target, None, GOOD_SHADOW)
        view = plane.http.get(f"/v1/deployments/{deployment}", headers=ops).json()
        if view["state"] == "succeeded":
            break
    assert view["state"] == "succeeded", view
    assert set(told.values()) == {"2"}
    health = plane.http.get("/v1/fleet/health", headers=ops).json()
    assert health["model_versions"][target] == 4 and health["online"] == 5
    assert plane.http.get("/v1/models/line-anomaly/2/artifact", headers=other).status_code \
        == 403
    actions = [e["action"] for e in
               plane.http.get("/v1/audit", headers=plane.admin).json()["events"]]
    assert "deployment.create" in actions and "model.publish" in actions
    metrics = plane.http.get("/metrics").text
    assert f'edgefleet_control_device_model{{model="{target}"}} 4' in metrics


def test_a_refused_model_stops_the_first_wave_and_rolls_back(plane: Plane) -> None:
    ops = plane.operator()
    devices = {f"gw-{i}": plane.enroll(f"gw-{i}", {"line": "2"}, ops) for i in range(1, 4)}
    # Everyone runs v1 first.
    plane.http.post("/v1/models/publish", json={"model": f"{NAME}/1"}, headers=ops)
    for headers in devices.values():
        _report(plane, headers, "applied", f"{NAME}/1")
    created = plane.http.post("/v1/deployments", headers=ops, json={
        "model": f"{NAME}/2", "target": "line=2", "waves": "1,100%"}).json()
    first = [n for n, h in devices.items()
             if plane.http.get("/v1/device/desired", headers=h).json()["model"]]
    assert len(first) == 1
    _report(plane, devices[first[0]], "refused", f"{NAME}/1", None, None)
    view = plane.http.get(f"/v1/deployments/{created['id']}", headers=ops).json()
    assert view["state"] in ("rolling_back", "rolled_back"), view
    assert any(first[0] in r for r in view["progress"]["reasons"]), view
    # Nobody else was ever told to run v2; the first device is told v1 again.
    for name, headers in devices.items():
        model = plane.http.get("/v1/device/desired", headers=headers).json()["model"]
        assert model is None or model["manifest"]["version"] == "1", name
    _report(plane, devices[first[0]], "rolled_back", f"{NAME}/1")
    view = plane.http.get(f"/v1/deployments/{created['id']}", headers=ops).json()
    assert view["state"] == "rolled_back"


def test_pause_resume_abort_and_invalid_transitions(plane: Plane) -> None:
    ops = plane.operator()
    for i in range(3):
        plane.enroll(f"gw-{i}", {"site": "x"}, ops)
    dep = plane.http.post("/v1/deployments", headers=ops, json={
        "model": f"{NAME}@champion", "target": "site=x"}).json()["id"]
    assert plane.http.post(f"/v1/deployments/{dep}/pause", headers=ops).json()["state"] \
        == "paused"
    assert plane.http.post(f"/v1/deployments/{dep}/pause", headers=ops).status_code == 409
    assert plane.http.post(f"/v1/deployments/{dep}/resume", headers=ops).json()["state"] \
        == "rolling"
    aborted = plane.http.post(f"/v1/deployments/{dep}/abort", headers=ops).json()
    assert aborted["state"] in ("aborted", "rolling_back")
    assert plane.http.post(f"/v1/deployments/{dep}/explode", headers=ops).status_code == 422
    assert plane.http.post("/v1/deployments/dep-nope/pause", headers=ops).status_code == 404


def test_the_fleet_page_is_served_without_secrets(plane: Plane) -> None:
    page = plane.http.get("/")
    assert page.status_code == 200 and "edgefleet fleet" in page.text
    assert "/v1/fleet/health" in page.text and "sessionStorage" in page.text
    token = (plane.state_dir / "admin.token").read_text().strip()
    assert token not in page.text


def test_a_pinned_device_holds_its_model_and_is_left_out_of_deployments(plane: Plane) -> None:
    ops = plane.operator()
    pinned = plane.enroll("gw-pinned", {"site": "p"}, ops)
    free = plane.enroll("gw-free", {"site": "p"}, ops)
    plane.http.post("/v1/models/publish", json={"model": f"{NAME}/1"}, headers=ops)
    before = plane.http.get("/v1/device/desired", headers=pinned).json()["generation"]
    view = plane.http.patch("/v1/devices/gw-pinned", json={"pinned_model": f"{NAME}/1"},
                            headers=ops)
    assert view.status_code == 200, view.text
    assert view.json()["generation"] == before + 1
    desired = plane.http.get("/v1/device/desired", headers=pinned).json()
    assert desired["model"]["manifest"]["version"] == "1"
    created = plane.http.post("/v1/deployments", headers=ops, json={
        "model": f"{NAME}@champion", "target": "site=p", "waves": "100%"}).json()
    assert created["progress"]["devices"] == 1
    assert plane.http.get("/v1/device/desired", headers=free).json()["model"]["manifest"][
        "version"] == "2"
    assert plane.http.get("/v1/device/desired", headers=pinned).json()["model"]["manifest"][
        "version"] == "1"
    unknown = plane.http.patch("/v1/devices/gw-pinned", json={"pinned_model": f"{NAME}/9"},
                               headers=ops)
    assert unknown.status_code == 404
