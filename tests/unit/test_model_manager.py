"""The edge model manager against real ONNX Runtime sessions of real models (built in
tmp_path by cloud/reference_models.py or onnx.helper) and real Ed25519 signatures."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from edgefleet.cloud.reference_models import METADATA_KEY, build_zscore_model
from edgefleet.edge_agent.inference import ModelBundle, OnnxScorer
from edgefleet.edge_agent.model_manager import (
    ACTIVE_FILE,
    ModelRefused,
    ModelStore,
    ModelStoreError,
    ShadowRun,
    probe_batch,
)
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import ModelManifest, sha256_hex, sign_manifest

SPEC = FeatureSpec(tags=("temp", "flow"), window=4, stats=("mean", "std", "max", "last"))
OTHER_SPEC = FeatureSpec(tags=("temp",), window=4, stats=("mean", "std", "max"))
WIDTH = len(SPEC.feature_names())  # 8
MEANS = [float(i) for i in range(WIDTH)]
STDS = [0.5 + i / 4 for i in range(WIDTH)]
T0 = 1_795_000_000_000_000_000


# ---- helpers --------------------------------------------------------------------------------


def zscore_bytes(tmp_path: Path, version: str, *, spec: FeatureSpec = SPEC,
                 threshold: float = 3.0) -> bytes:
    width = len(spec.feature_names())
    path = build_zscore_model(tmp_path / f"build-{version}.onnx", spec,
                              means=[float(i) for i in range(width)],
                              stds=[0.5 + i / 4 for i in range(width)],
                              version=version, threshold=threshold)
    return path.read_bytes()


def nan_model_bytes(version: str = "nan-1") -> bytes:
    """A valid ONNX model with the reference metadata whose every score is 0/0 = NaN."""
    nodes = [
        helper.make_node("Sub", ["features", "features"], ["zeros"]),
        helper.make_node("Div", ["zeros", "zeros"], ["nans"]),
        helper.make_node("ReduceMean", ["nans"], ["score"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "nan",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
    )
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets))
    metadata = {"name": "zscore", "version": version, "threshold": 3.0,
                "features": SPEC.model_dump(mode="json"), "score_output": "score",
                "score_sign": 1}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def wrong_width_bytes(tmp_path: Path, version: str) -> bytes:
    """A valid ONNX graph for OTHER_SPEC (3 inputs) whose metadata claims SPEC (8)."""
    model = onnx.load_from_string(zscore_bytes(tmp_path, version, spec=OTHER_SPEC))
    metadata = {"name": "zscore", "version": version, "threshold": 3.0,
                "features": SPEC.model_dump(mode="json"), "score_output": "score",
                "score_sign": 1}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    data: bytes = model.SerializeToString()
    return data


def manifest_for(data: bytes, version: str, key: Ed25519PrivateKey | None, *,
                 schema_hash: str | None = None, name: str = "zscore") -> ModelManifest:
    manifest = ModelManifest.model_validate({
        "model_name": name, "version": version, "sha256": sha256_hex(data), "size": len(data),
        "feature_schema_hash": schema_hash or SPEC.schema_hash(), "created_at": T0,
        "source": f"models:/{name}/{version}",
    })
    return sign_manifest(manifest, key) if key is not None else manifest


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path, key: Ed25519PrivateKey) -> ModelStore:
    return ModelStore(tmp_path / "models", [key.public_key()], SPEC)


def install_and_activate(store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey,
                         version: str) -> None:
    data = zscore_bytes(tmp_path, version)
    store.install(manifest_for(data, version, key), data)
    store.activate("zscore", version)


def rows(n: int, seed: int = 1) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(MEANS) + np.random.default_rng(seed).standard_normal((n, WIDTH)) * 0.1


# ---- install, activate, score -------------------------------------------------------------


def test_good_model_installs_activates_and_scores(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    data = zscore_bytes(tmp_path, "v1")
    bundle = store.install(manifest_for(data, "v1", key), data)
    assert bundle.path == store.root / "zscore" / "v1" / "model.onnx"
    assert (store.root / "zscore" / "v1" / "manifest.json").is_file()
    assert store.current is None  # installing is not activating
    store.activate("zscore", "v1")
    assert store.state() == ("zscore/v1", None)
    loaded = store.current_bundle()
    assert loaded is not None and loaded.version == "v1"
    scores = OnnxScorer(loaded).score(rows(5))
    assert scores.shape == (5,) and np.isfinite(scores).all()
    # Idempotent: the identical version again installs nothing new and changes no state.
    again = store.install(manifest_for(data, "v1", key), data)
    assert again.version == "v1" and store.installed() == ["zscore/v1"]
    assert store.state() == ("zscore/v1", None)


def test_same_version_with_other_bytes_is_a_conflict(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    other = zscore_bytes(tmp_path, "v1", threshold=4.0)
    with pytest.raises(ModelStoreError, match="different manifest"):
        store.install(manifest_for(other, "v1", key), other)
    assert store.current_bundle() is not None


def _refused_case(kind: str, tmp_path: Path, key: Ed25519PrivateKey
                  ) -> tuple[ModelManifest, bytes, str]:
    good = zscore_bytes(tmp_path, "v2")
    if kind == "unsigned":
        return manifest_for(good, "v2", None), good, "unsigned"
    if kind == "artifact_byte_flipped":
        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0x01
        return manifest_for(good, "v2", key), bytes(flipped), "hash_mismatch"
    if kind == "field_changed_after_signing":
        signed = manifest_for(good, "v2", key)
        return signed.model_copy(update={"source": "models:/zscore/evil"}), good, \
            "bad_signature"
    if kind == "other_key":
        return manifest_for(good, "v2", Ed25519PrivateKey.generate()), good, "bad_signature"
    if kind == "manifest_wrong_schema":
        other = zscore_bytes(tmp_path, "v2", spec=OTHER_SPEC)
        return manifest_for(other, "v2", key, schema_hash=OTHER_SPEC.schema_hash()), other, \
            "wrong_schema"
    if kind == "model_for_other_spec_with_fleet_hash":
        other = zscore_bytes(tmp_path, "v2", spec=OTHER_SPEC)
        return manifest_for(other, "v2", key), other, "wrong_schema"
    if kind == "input_width_wrong":
        data = wrong_width_bytes(tmp_path, "v2")
        return manifest_for(data, "v2", key), data, "unloadable"
    if kind == "corrupt_bytes":
        data = b"\x08\x07not an onnx model at all" * 8
        return manifest_for(data, "v2", key), data, "unloadable"
    if kind == "nan_output":
        data = nan_model_bytes("v2")
        return manifest_for(data, "v2", key), data, "bad_output"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "unsigned", "artifact_byte_flipped", "field_changed_after_signing", "other_key",
    "manifest_wrong_schema", "model_for_other_spec_with_fleet_hash", "input_width_wrong",
    "corrupt_bytes", "nan_output",
])
def test_refused_models_leave_the_old_model_running(
    kind: str, store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    active_before = (store.root / ACTIVE_FILE).read_bytes()
    v1_files = {p.name: p.read_bytes() for p in (store.root / "zscore" / "v1").iterdir()}
    manifest, data, reason = _refused_case(kind, tmp_path, key)

    with pytest.raises(ModelRefused) as refused:
        store.install(manifest, data)

    assert refused.value.reason == reason, refused.value.message
    assert "zscore/v2" in str(refused.value)
    assert (store.root / ACTIVE_FILE).read_bytes() == active_before
    assert not (store.root / "zscore" / "v2").exists()
    assert sorted(p.name for p in (store.root / "zscore").iterdir()) == ["v1"]  # no staging
    assert {p.name: p.read_bytes() for p in (store.root / "zscore" / "v1").iterdir()} \
        == v1_files
    bundle = store.current_bundle()
    assert bundle is not None and bundle.version == "v1"


def test_refused_first_model_leaves_an_empty_store(
    store: ModelStore, key: Ed25519PrivateKey
) -> None:
    data = nan_model_bytes("v1")
    with pytest.raises(ModelRefused) as refused:
        store.install(manifest_for(data, "v1", key), data)
    assert refused.value.reason == "bad_output"
    assert list(store.root.iterdir()) == []  # no model folder, no active.json
    assert store.state() == (None, None) and store.current_bundle() is None


def test_probe_batch_is_fixed_and_plausible() -> None:
    batch = probe_batch(WIDTH)
    assert batch.shape == (64, WIDTH)
    assert (batch[0] == 0).all() and (batch[1] == 1).all()
    assert np.array_equal(batch, probe_batch(WIDTH))


def test_store_without_a_fleet_spec_still_checks_the_model_against_its_manifest(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    store = ModelStore(tmp_path / "models", [key.public_key()], None)
    other = zscore_bytes(tmp_path, "v1", spec=OTHER_SPEC)
    store.install(manifest_for(other, "v1", key, schema_hash=OTHER_SPEC.schema_hash()), other)
    with pytest.raises(ModelRefused) as refused:
        store.install(manifest_for(other, "v2", key), other)  # SPEC's hash, OTHER's model
    assert refused.value.reason == "wrong_schema"


# ---- rollback, pruning, crash safety ------------------------------------------------------


def test_rollback_brings_back_v1_without_network(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    install_and_activate(store, tmp_path, key, "v2")
    assert store.state() == ("zscore/v2", "zscore/v1")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("rollback touched the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    reopened = ModelStore(store.root, store.public_keys, SPEC)  # e.g. after a restart
    assert reopened.rollback() == "zscore/v1"
    assert reopened.state() == ("zscore/v1", "zscore/v2")
    bundle = reopened.current_bundle()
    assert bundle is not None and bundle.version == "v1"


def test_rollback_without_previous_is_an_error(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with pytest.raises(ModelStoreError, match="no previous"):
        store.rollback()
    install_and_activate(store, tmp_path, key, "v1")
    with pytest.raises(ModelStoreError, match="no previous"):
        store.rollback()
    with pytest.raises(ModelStoreError, match="not installed"):
        store.activate("zscore", "v9")


def test_damaged_file_on_disk_is_not_activated(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    data = zscore_bytes(tmp_path, "v2")
    store.install(manifest_for(data, "v2", key), data)
    (store.root / "zscore" / "v2" / "model.onnx").write_bytes(b"bit rot")
    with pytest.raises(ModelStoreError, match="damaged"):
        store.activate("zscore", "v2")
    assert store.current == "zscore/v1"
    store.install(manifest_for(data, "v2", key), data)  # re-installing repairs it
    store.activate("zscore", "v2")
    assert store.current == "zscore/v2"


def test_pruning_keeps_current_and_previous(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    install_and_activate(store, tmp_path, key, "v2")
    store.rollback()  # current v1 (the oldest install), previous v2
    for version in ("v3", "v4", "v5"):
        data = zscore_bytes(tmp_path, version)
        store.install(manifest_for(data, version, key), data)
    assert sorted(store.installed()) == ["zscore/v1", "zscore/v2", "zscore/v5"]
    store.activate("zscore", "v5")  # current v5, previous v1
    data = zscore_bytes(tmp_path, "v6")
    store.install(manifest_for(data, "v6", key), data)
    assert sorted(store.installed()) == ["zscore/v1", "zscore/v5", "zscore/v6"]
    assert store.state() == ("zscore/v5", "zscore/v1")
    assert store.rollback() == "zscore/v1"


def test_active_json_survives_a_crash_mid_write(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    data = zscore_bytes(tmp_path, "v2")
    store.install(manifest_for(data, "v2", key), data)

    def crash(*args: object) -> None:
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        store.activate("zscore", "v2")
    monkeypatch.undo()
    leftovers = [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the half-done write left its temp file behind
    (store.root / leftovers[0]).write_text('{"current": "zscore/v', encoding="utf-8")

    restarted = ModelStore(store.root, store.public_keys, SPEC)
    assert restarted.state() == ("zscore/v1", None)
    restarted.activate("zscore", "v2")
    assert restarted.state() == ("zscore/v2", "zscore/v1")


def test_stale_staging_is_removed_and_never_listed(
    store: ModelStore, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    install_and_activate(store, tmp_path, key, "v1")
    staging = store.root / "zscore" / ".staging-v2-123"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half")
    assert store.installed() == ["zscore/v1"]
    ModelStore(store.root, store.public_keys, SPEC)
    assert not staging.exists()


# ---- shadow runs ----------------------------------------------------------------------------


def scorer(tmp_path: Path, version: str, threshold: float = 3.0) -> OnnxScorer:
    data = zscore_bytes(tmp_path, version, threshold=threshold)
    path = tmp_path / f"{version}.onnx"
    path.write_bytes(data)
    return OnnxScorer(ModelBundle.load(path))


def test_shadow_same_model_twice_has_no_shift_and_passes(tmp_path: Path) -> None:
    current, candidate = scorer(tmp_path, "a"), scorer(tmp_path, "b")
    shadow = ShadowRun(current, candidate)
    batch = rows(20)
    batch[:3] += 50.0  # three clear anomalies
    for _ in range(5):
        used = shadow.feed(batch)
        assert used is not None
        np.testing.assert_array_equal(used, current.score(batch))
    report = shadow.report()
    assert (report.rows, report.batches, report.errors) == (100, 5, 0)
    assert report.anomaly_rate_current == report.anomaly_rate_candidate == 0.15
    assert report.anomaly_rate_shift == 0.0
    assert report.latency_p99_us is not None and report.latency_p99_us > 0
    assert report.passes(0.0, 1e6, 0.01) == (True, [])


def test_shadow_candidate_flagging_everything_fails_the_shift_gate(tmp_path: Path) -> None:
    shadow = ShadowRun(scorer(tmp_path, "a"), scorer(tmp_path, "b", threshold=-1.0))
    shadow.feed(rows(50))
    report = shadow.report()
    assert report.anomaly_rate_current == 0.0 and report.anomaly_rate_candidate == 1.0
    ok, reasons = report.passes(0.0, 1e6, 0.05)
    assert not ok
    assert len(reasons) == 1 and "anomaly rate shift 1.0000" in reasons[0]


def test_shadow_counts_candidate_errors_and_never_raises_them(tmp_path: Path) -> None:
    path = tmp_path / "nan.onnx"
    path.write_bytes(nan_model_bytes())
    current = scorer(tmp_path, "a")
    shadow = ShadowRun(current, OnnxScorer(ModelBundle.load(path)))
    for seed in range(4):
        assert shadow.feed(rows(10, seed)) is not None  # the current model still serves
    report = shadow.report()
    assert (report.rows, report.batches, report.errors, report.error_rate) == (40, 4, 4, 1.0)
    assert report.latency_p99_us is None and report.compared_rows == 0
    ok, reasons = report.passes(0.01, 1e6, 0.05)
    assert not ok and any("error rate 1.0000" in reason for reason in reasons)
    assert shadow.last_error is not None and "not finite" in shadow.last_error


def test_shadow_without_current_model_measures_the_candidate_only(tmp_path: Path) -> None:
    shadow = ShadowRun(None, scorer(tmp_path, "b"))
    assert shadow.feed(rows(8)) is None
    report = shadow.report()
    assert report.anomaly_rate_current is None and report.anomaly_rate_shift is None
    assert report.anomaly_rate_candidate == 0.0
    assert report.passes(0.0, 1e6, 0.0) == (True, [])
    assert not ShadowRun(None, scorer(tmp_path, "c")).report().passes(0.0, 1e6, 0.0)[0]


# ---- standalone mode: MLflow alias over REST ----------------------------------------------
