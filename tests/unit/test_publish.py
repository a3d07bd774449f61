"""Publishing MLflow model versions as signed manifests (cloud/control/publish.py), against
a local sqlite MLflow registry holding genuine ONNX reference models."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.control.publish import (
    PublishError,
    ensure_signing_key,
    load_published,
    parse_model_ref,
    publish_model,
)
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.edge_agent.inference import ModelBundle
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import (
    ModelManifest,
    key_id,
    load_public_key,
    parse_manifest,
    public_key_text,
    sha256_hex,
    sign_manifest,
    verify_artifact,
    verify_manifest,
)

NAME = "pump-anomaly"
SPEC = FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
WIDE = FeatureSpec(tags=("temp", "vib", "flow"), window=4, stats=("mean", "std"))
WIDE_WIDTH = len(WIDE.feature_names())
NOW = 1_700_000_000_000_000_000


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    champion_sha256: str  # sha256 of the file training wrote, before MLflow saw it
    champion: str  # a servable version, alias champion, correct onnx_sha256 tag
    bad_tag: str  # servable, but its onnx_sha256 tag names other bytes
    wrong_width: str  # graph input width differs from its own metadata's feature spec


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for the module (creating the sqlite schema costs seconds)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def register(model: onnx.ModelProto) -> str:
        with mlflow.start_run(experiment_id=experiment_id):
            # Explicit requirements: inferring them runs a subprocess (seconds per model).
            info = mlflow.onnx.log_model(model, name="model", save_as_external_data=False,
                                         pip_requirements=["onnx", "onnxruntime"])
        return str(mlflow.register_model(info.model_uri, NAME).version)

    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(uri)  # the registry URI follows it (MLFLOW_REGISTRY_URI unset)
        try:
            experiment_id = client.create_experiment(
                "publish-tests", artifact_location=(folder / "mlruns").as_uri())

            good = build_zscore_model(folder / "good.onnx", SPEC, means=[1.0] * WIDTH,
                                      stds=[2.0] * WIDTH, name=NAME, version="good")
            champion_sha = sha256_hex(good.read_bytes())
            champion = register(onnx.load(good))
            client.set_registered_model_alias(NAME, "champion", champion)
            client.set_model_version_tag(NAME, champion, "onnx_sha256", champion_sha)

            other = build_zscore_model(folder / "other.onnx", SPEC, means=[0.0] * WIDTH,
                                       stds=[1.0] * WIDTH, name=NAME, version="other")
            bad_tag = register(onnx.load(other))
            client.set_model_version_tag(NAME, bad_tag, "onnx_sha256", champion_sha)

            # An export that went wrong: a genuine graph for a wider spec, carrying the
            # metadata (feature spec) of SPEC, as if the wrong spec had been exported.
            wrong = onnx.load(build_zscore_model(folder / "wrong.onnx", WIDE,
                                                 means=[0.0] * WIDE_WIDTH,
                                                 stds=[1.0] * WIDE_WIDTH,
                                                 name=NAME, version="wrong"))
            del wrong.metadata_props[:]
            wrong.metadata_props.extend(onnx.load(good).metadata_props)
            wrong_width = register(wrong)
            client.set_model_version_tag(NAME, wrong_width, "onnx_sha256",
                                         sha256_hex(wrong.SerializeToString()))
        finally:
            mlflow.set_tracking_uri(previous)
    # Global MLflow state is back as it was: publishing must only use its tracking_uri.
    yield Registry(uri, champion_sha, champion, bad_tag, wrong_width)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def stored_files(store: Path) -> list[str]:
    return sorted(str(path.relative_to(store)) for path in store.rglob("*"))


@pytest.mark.parametrize("ref", ["{name}@champion", "models:/{name}/{version}"])
def test_published_artifact_verifies_like_an_agent_would(
    registry: Registry, key: Ed25519PrivateKey, tmp_path: Path, ref: str
) -> None:
    published = publish_model(
        tracking_uri=registry.tracking_uri,
        ref=ref.format(name=NAME, version=registry.champion),
        signing_key=key, store_root=tmp_path, now_ns=NOW,
    )
    folder = tmp_path / NAME / registry.champion
    assert published.artifact_path == folder / "model.onnx"
    assert published.manifest_path == folder / "manifest.json"
    assert stored_files(tmp_path) == [NAME, f"{NAME}/1", f"{NAME}/1/manifest.json",
                                      f"{NAME}/1/model.onnx"]

    # What an agent does: the manifest from JSON, the fleet key from its one-line form.
    manifest = parse_manifest(published.manifest_path.read_text())
    assert manifest == published.manifest
    verify_manifest(manifest, [load_public_key(public_key_text(key.public_key()))])
    data = published.artifact_path.read_bytes()
    verify_artifact(manifest, data)
    # The exact bytes training wrote (the onnx_sha256 tag), not a re-serialisation.
    assert manifest.sha256 == registry.champion_sha256
    assert (manifest.model_name, manifest.version) == (NAME, registry.champion)
    assert manifest.source == f"models:/{NAME}/{registry.champion}"
    assert manifest.created_at == NOW and manifest.size == len(data)

    bundle = ModelBundle.load(published.artifact_path)
    assert bundle.features == SPEC
    assert manifest.feature_schema_hash == SPEC.schema_hash()
    assert load_published(tmp_path, NAME, registry.champion) == published


def test_republish_is_idempotent(registry: Registry, key: Ed25519PrivateKey,
                                 tmp_path: Path) -> None:
    first = publish_model(tracking_uri=registry.tracking_uri, ref=f"{NAME}@champion",
                          signing_key=key, store_root=tmp_path, now_ns=NOW)
    stamp = first.manifest_path.stat().st_mtime_ns
    again = publish_model(tracking_uri=registry.tracking_uri, ref=f"{NAME}/1",
                          signing_key=Ed25519PrivateKey.generate(), store_root=tmp_path,
                          now_ns=NOW + 1)
    assert again == first  # same signature, same key id, same created_at
    assert first.manifest_path.stat().st_mtime_ns == stamp  # not rewritten


def test_published_version_is_immutable(registry: Registry, key: Ed25519PrivateKey,
                                        tmp_path: Path) -> None:
    # The store already holds v1 with other bytes (e.g. the registry was rebuilt and
    # its versions renumbered): the same version must not silently change.
    folder = tmp_path / NAME / registry.champion
    folder.mkdir(parents=True)
    old = b"the bytes published first"
    (folder / "model.onnx").write_bytes(old)
    stale = sign_manifest(ModelManifest.model_validate({
        "model_name": NAME, "version": registry.champion, "sha256": sha256_hex(old),
        "size": len(old), "feature_schema_hash": SPEC.schema_hash(), "created_at": 1,
    }), key)
    (folder / "manifest.json").write_text(stale.to_json())
    with pytest.raises(PublishError, match="immutable"):
        publish_model(tracking_uri=registry.tracking_uri, ref=f"{NAME}@champion",
                      signing_key=key, store_root=tmp_path, now_ns=NOW)
    assert (folder / "model.onnx").read_bytes() == old
    assert parse_manifest((folder / "manifest.json").read_text()) == stale


def test_recorded_sha256_mismatch_refused(registry: Registry, key: Ed25519PrivateKey,
                                          tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="onnx_sha256") as caught:
        publish_model(tracking_uri=registry.tracking_uri,
                      ref=f"models:/{NAME}/{registry.bad_tag}", signing_key=key,
                      store_root=tmp_path, now_ns=NOW)
    assert registry.champion_sha256 in str(caught.value)
    assert stored_files(tmp_path) == []


def test_model_not_matching_its_feature_spec_refused(
    registry: Registry, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    with pytest.raises(PublishError, match=rf"cannot be served.*takes {WIDE_WIDTH} features"):
        publish_model(tracking_uri=registry.tracking_uri,
                      ref=f"{NAME}/{registry.wrong_width}", signing_key=key,
                      store_root=tmp_path, now_ns=NOW)
    assert stored_files(tmp_path) == []


def test_unknown_alias_version_and_model_refused(
    registry: Registry, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    for ref, named in [(f"{NAME}@production", "'production'"), (f"{NAME}/99", "'99'"),
                       ("no-such-model@champion", "no-such-model")]:
        with pytest.raises(PublishError, match=named):
            publish_model(tracking_uri=registry.tracking_uri, ref=ref, signing_key=key,
                          store_root=tmp_path, now_ns=NOW)
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize(("ref", "expected"), [
    ("pump@champion", ("pump", None, "champion")),
    ("pump/12", ("pump", "12", None)),
    ("models:/pump@challenger", ("pump", None, "challenger")),
    ("models:/pump-anomaly.v2/3", ("pump-anomaly.v2", "3", None)),
])
def test_parse_model_ref(ref: str, expected: tuple[str, str | None, str | None]) -> None:
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", [
    "x@", "@champion", "x/", "../x@champion", "name/1/2", "models:/a@b@c", "pump",
    "models:/", "", "runs:/abc/model", "a b@champion", "x\n@champion", "pump@champion\n",
    ".hidden/1", "a" * 200 + "@champion",
])
def test_bad_refs_refused(ref: str) -> None:
    with pytest.raises(ValueError, match="model reference"):
        parse_model_ref(ref)


def test_load_published_refusals(registry: Registry, key: Ed25519PrivateKey,
                                 tmp_path: Path) -> None:
    with pytest.raises(PublishError, match="not published"):
        load_published(tmp_path, NAME, "1")
    for name, version in [("..", "1"), (NAME, "../1"), ("a/b", "1"), (NAME, "")]:
        with pytest.raises(PublishError, match="not a safe name"):
            load_published(tmp_path, name, version)
    published = publish_model(tracking_uri=registry.tracking_uri, ref=f"{NAME}@champion",
                              signing_key=key, store_root=tmp_path, now_ns=NOW)
    data = bytearray(published.artifact_path.read_bytes())
    data[-1] ^= 1
    published.artifact_path.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="sha256"):
        load_published(tmp_path, NAME, "1")
    published.manifest_path.write_text("{}")
    with pytest.raises(PublishError, match="invalid manifest"):
        load_published(tmp_path, NAME, "1")


def test_ensure_signing_key_generates_once(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys" / "fleet.pem"
    with caplog.at_level(logging.WARNING, logger="edgefleet.cloud.control.publish"):
        first = ensure_signing_key(path)
    assert str(path) in caplog.text and key_id(first.public_key()) in caplog.text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgefleet.cloud.control.publish"):
        second = ensure_signing_key(path)
    assert caplog.text == ""
    assert key_id(second.public_key()) == key_id(first.public_key())


def test_manifest_json_is_the_wire_form(registry: Registry, key: Ed25519PrivateKey,
                                        tmp_path: Path) -> None:
    published = publish_model(tracking_uri=registry.tracking_uri, ref=f"{NAME}@champion",
                              signing_key=key, store_root=tmp_path, now_ns=NOW)
    document = json.loads(published.manifest_path.read_text())
    assert document["schema"] == "edgefleet.manifest/1"
    assert document["key_id"] == key_id(key.public_key()) and document["signature"]
    assert not [p for p in published.manifest_path.parent.iterdir() if p.name.startswith(".")]
