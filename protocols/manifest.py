"""Signed model manifests: what the control plane publishes and the edge agent verifies.

A `ModelManifest` names one ONNX artifact by its SHA-256 and size, with the feature schema
it was trained for, and carries an Ed25519 signature of the fleet's signing key over its
canonical bytes. The control plane signs (`sign_manifest`); the agent checks the signature
against the fleet's public key(s) (`verify_manifest`) and the downloaded bytes against the
manifest (`verify_artifact`) before it loads anything.

Contracts
---------
* **Canonical bytes** are the manifest's fields other than `signature`, as JSON with
  sorted keys, no spaces, UTF-8. Any change to any field breaks the signature.
* **Keys.** The private key lives in one PEM file (PKCS#8, mode 0600) made by
  `generate_signing_key`, which never overwrites; the public key is shared as PEM or as
  the base64 of its 32 raw bytes. `key_id` (the first 16 hex digits of the SHA-256 of the
  raw public key) lets a verifier hold several keys during a rotation.
* **Names are safe path parts**: `model_name` and `version` match `SAFE_NAME`, so an
  artifact stored under `<root>/<name>/<version>/` can never escape `<root>`.
* **Errors.** Everything a verifier refuses raises `ManifestError` with the reason (bad
  signature, unknown key, wrong hash or size, bad field).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "MANIFEST_SCHEMA",
    "SAFE_NAME",
    "ManifestError",
    "ModelManifest",
    "generate_signing_key",
    "is_safe_name",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "parse_manifest",
    "public_key_text",
    "sha256_hex",
    "sign_manifest",
    "verify_artifact",
    "verify_manifest",
]

MANIFEST_SCHEMA: Final = "edgefleet.manifest/1"
SAFE_NAME: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_SAFE = re.compile(SAFE_NAME)

SafeName = Annotated[str, Field(pattern=SAFE_NAME)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ManifestError(Exception):
    """A manifest, its signature or its artifact is not acceptable; the reason says why."""


class ModelManifest(BaseModel):
    """One published model version. `signature` is empty until `sign_manifest`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_: str = Field(MANIFEST_SCHEMA, alias="schema")
    model_name: SafeName
    version: SafeName
    sha256: Hex64
    size: int = Field(gt=0)
    feature_schema_hash: str = Field(min_length=1, max_length=128)
    source: str = Field("", max_length=512, description="e.g. models:/NAME/VERSION")
    created_at: int = Field(ge=0, description="epoch ns")
    key_id: str = Field("", max_length=64)
    signature: str = Field("", max_length=256, description="base64 Ed25519")

    def canonical_bytes(self) -> bytes:
        fields = self.model_dump(by_alias=True, exclude={"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @property
    def ref(self) -> str:
        return f"{self.model_name}/{self.version}"


def parse_manifest(data: str | bytes | dict[str, Any]) -> ModelManifest:
    """A manifest from JSON text or a dict; ManifestError names the bad field."""
    try:
        if isinstance(data, dict):
            manifest = ModelManifest.model_validate(data)
        else:
            manifest = ModelManifest.model_validate_json(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}"
            for e in err.errors()
        )
        raise ManifestError(f"invalid manifest: {problems}") from err
    if manifest.schema_ != MANIFEST_SCHEMA:
        raise ManifestError(f"manifest schema {manifest.schema_!r} is not {MANIFEST_SCHEMA!r}")
    return manifest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- keys ---------------------------------------------------------------------------------


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key written to `path` as PKCS#8 PEM, mode 0600. Refuses to overwrite
    an existing file (losing the fleet key means re-keying every device)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise ManifestError(f"signing key {path} exists; refusing to overwrite it") from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise ManifestError(f"cannot read signing key {path}: {err.strerror}") from err
    except (ValueError, TypeError) as err:
        raise ManifestError(f"signing key {path} is not a PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """A public key from PEM text or the base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(stripped.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ManifestError("the public key is not an Ed25519 key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(stripped, validate=True))
    except (ValueError, TypeError) as err:
        raise ManifestError(f"not an Ed25519 public key (PEM or base64 of 32 bytes): {err}") \
            from err


def public_key_text(key: Ed25519PublicKey) -> str:
    """The base64 of the raw public key: one line, easy to put in an agent's config."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def key_id(key: Ed25519PublicKey) -> str:
    return sha256_hex(base64.b64decode(public_key_text(key)))[:16]


# --- signing and verifying ----------------------------------------------------------------


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> ModelManifest:
    """The manifest with `key_id` set and signed."""
    unsigned = manifest.model_copy(update={"key_id": key_id(key.public_key()),
                                           "signature": ""})
    signature = key.sign(unsigned.canonical_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_manifest(manifest: ModelManifest, keys: Iterable[Ed25519PublicKey]) -> None:
    """Raise ManifestError unless one of `keys` (matched by key_id) signed `manifest`."""
    from cryptography.exceptions import InvalidSignature

    if not manifest.signature:
        raise ManifestError(f"model {manifest.ref} is not signed")
    by_id = {key_id(k): k for k in keys}
    key = by_id.get(manifest.key_id)
    if key is None:
        raise ManifestError(f"model {manifest.ref} is signed by key {manifest.key_id or '?'}, "
                            f"which is not a fleet key (known: {', '.join(by_id) or 'none'})")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
        key.verify(signature, manifest.canonical_bytes())
    except (InvalidSignature, ValueError) as err:
        raise ManifestError(f"model {manifest.ref}: the signature does not match the "
                            "manifest (tampered with, or signed by another key)") from err


def verify_artifact(manifest: ModelManifest, data: bytes) -> None:
    """Raise ManifestError unless `data` is exactly the artifact the manifest names."""
    if len(data) != manifest.size:
        raise ManifestError(f"model {manifest.ref}: artifact is {len(data)} bytes, the "
                            f"manifest says {manifest.size}")
    digest = sha256_hex(data)
    if digest != manifest.sha256:
        raise ManifestError(f"model {manifest.ref}: artifact sha256 {digest[:16]}… does not "
                            f"match the manifest's {manifest.sha256[:16]}…")


def is_safe_name(name: str) -> bool:
    """True when `name` may be a model name, a version or one path part of an artifact."""
    return _SAFE.fullmatch(name) is not None
