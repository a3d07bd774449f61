"""Signed model manifests (protocols/manifest.py): what a verifier accepts and refuses."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.protocols.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    ModelManifest,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    parse_manifest,
    public_key_text,
    sha256_hex,
    sign_manifest,
    verify_artifact,
    verify_manifest,
)

ARTIFACT = b"not really onnx, but bytes are bytes" * 3


def manifest(**changes: Any) -> ModelManifest:
    fields: dict[str, Any] = {
        "model_name": "pump-anomaly",
        "version": "3",
        "sha256": sha256_hex(ARTIFACT),
        "size": len(ARTIFACT),
        "feature_schema_hash": "ab" * 32,
        "source": "models:/pump-anomaly/3",
        "created_at": 1_700_000_000_000_000_000,
    }
    fields.update(changes)
    return ModelManifest.model_validate(fields)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_sign_verify_roundtrip_through_json(key: Ed25519PrivateKey) -> None:
    signed = sign_manifest(manifest(), key)
    assert signed.key_id == key_id(key.public_key()) and signed.signature
    received = parse_manifest(signed.to_json())
    assert received == signed
    verify_manifest(received, [key.public_key()])
    verify_artifact(received, ARTIFACT)


# One different value per field: every field is covered by the signature.
CHANGES: dict[str, Any] = {
    "model_name": "pump-anomaly2",
    "version": "4",
    "sha256": sha256_hex(b"other"),
    "size": len(ARTIFACT) + 1,
    "feature_schema_hash": "cd" * 32,
    "source": "models:/pump-anomaly/4",
    "created_at": 1_700_000_000_000_000_001,
}


def test_changes_cover_every_signed_field() -> None:
    signed_fields = set(ModelManifest.model_fields) - {"schema_", "key_id", "signature"}
    assert set(CHANGES) == signed_fields


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_any_field_change_breaks_the_signature(key: Ed25519PrivateKey, field: str) -> None:
    data = sign_manifest(manifest(), key).model_dump(by_alias=True)
    data[field] = CHANGES[field]
    tampered = parse_manifest(data)
    with pytest.raises(ManifestError, match="signature does not match"):
        verify_manifest(tampered, [key.public_key()])


def test_signature_from_another_key_under_a_known_key_id(key: Ed25519PrivateKey) -> None:
    forged = sign_manifest(manifest(), Ed25519PrivateKey.generate())
    relabelled = forged.model_copy(update={"key_id": key_id(key.public_key())})
    with pytest.raises(ManifestError, match="signature does not match"):
        verify_manifest(relabelled, [key.public_key()])


def test_unsigned_manifest_refused(key: Ed25519PrivateKey) -> None:
    with pytest.raises(ManifestError, match="not signed"):
        verify_manifest(manifest(), [key.public_key()])


def test_unknown_key_refused_listing_known_ids(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    third = Ed25519PrivateKey.generate()
    signed = sign_manifest(manifest(), other)
    with pytest.raises(ManifestError, match="not a fleet key") as caught:
        verify_manifest(signed, [key.public_key(), third.public_key()])
    message = str(caught.value)
    assert key_id(other.public_key()) in message
    assert key_id(key.public_key()) in message and key_id(third.public_key()) in message
    with pytest.raises(ManifestError, match=r"known: none"):
        verify_manifest(signed, [])


def test_one_of_several_keys_is_enough(key: Ed25519PrivateKey) -> None:
    rotated = Ed25519PrivateKey.generate()
    signed = sign_manifest(manifest(), rotated)
    verify_manifest(signed, [key.public_key(), rotated.public_key()])


def test_wrong_size_refused() -> None:
    with pytest.raises(ManifestError, match=rf"{len(ARTIFACT) + 1} bytes"):
        verify_artifact(manifest(), ARTIFACT + b"x")


def test_wrong_sha_refused() -> None:
    same_size = bytes([ARTIFACT[0] ^ 1]) + ARTIFACT[1:]
    with pytest.raises(ManifestError, match="sha256"):
        verify_artifact(manifest(), same_size)


def test_public_key_pem_and_base64_forms_load(key: Ed25519PrivateKey) -> None:
    public = key.public_key()
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    text = public_key_text(public)
    assert "\n" not in text
    for form in (pem, text, f"  {text}\n"):
        assert key_id(load_public_key(form)) == key_id(public)
    signed = sign_manifest(manifest(), key)
    verify_manifest(signed, [load_public_key(pem)])
    verify_manifest(signed, [load_public_key(text)])


@pytest.mark.parametrize("text", [
    "",
    "not base64 at all!",
    "AAAA",  # valid base64, 3 bytes
    "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----",
])
def test_garbage_public_key_refused(text: str) -> None:
    with pytest.raises(ManifestError, match="public key"):
        load_public_key(text)


def test_generate_signing_key_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "fleet.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_signing_key(path).public_key()) == key_id(key.public_key())
    before = path.read_bytes()
    with pytest.raises(ManifestError, match="refusing to overwrite"):
        generate_signing_key(path)
    assert path.read_bytes() == before


def test_load_signing_key_refuses_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_signing_key(tmp_path / "absent.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(ManifestError, match="not a PEM private key"):
        load_signing_key(garbage)


@pytest.mark.parametrize("field", ["model_name", "version"])
@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a" * 200, ".hidden", "x\n"])
def test_unsafe_names_refused(key: Ed25519PrivateKey, field: str, bad: str) -> None:
    data = sign_manifest(manifest(), key).model_dump(by_alias=True)
    data[field] = bad
    with pytest.raises(ManifestError, match=field):
        parse_manifest(data)


def test_other_schema_refused(key: Ed25519PrivateKey) -> None:
    data = sign_manifest(manifest(), key).model_dump(by_alias=True)
    assert data["schema"] == MANIFEST_SCHEMA
    data["schema"] = "edgefleet.manifest/2"
    with pytest.raises(ManifestError, match=r"edgefleet\.manifest/2"):
        parse_manifest(data)


@pytest.mark.parametrize("text", ["{", "[]", '{"model_name": "x"}'])
def test_malformed_json_refused(text: str) -> None:
    with pytest.raises(ManifestError, match="invalid manifest"):
        parse_manifest(text)


def test_unknown_field_refused(key: Ed25519PrivateKey) -> None:
    data = sign_manifest(manifest(), key).model_dump(by_alias=True)
    data["url"] = "http://elsewhere"
    with pytest.raises(ManifestError, match="url"):
        parse_manifest(data)
