"""Publishing: an MLflow model version becomes a signed artifact the fleet can fetch.

```
models:/NAME@ALIAS or NAME/VERSION ─► MLflow version ─► its ONNX file (the exact bytes)
    ─► ModelBundle.load (refuses what an agent could not serve) ─► tag onnx_sha256 check
    ─► ModelManifest (sha256, size, feature schema hash) ─► Ed25519 signature
    ─► <store_root>/<name>/<version>/model.onnx + manifest.json
    ─► (with `artifacts`) s3://BUCKET/PREFIX/<name>/<version>/model.onnx (artifacts.py)
```

Contracts
---------
* **One fixed version.** An alias is resolved to a version number first; everything after
  that (download, checks, manifest) is about that version, so an alias moving meanwhile
  cannot mix two versions in one manifest. The manifest's `source` is
  `models:/NAME/VERSION`, never the alias.
* **The exact logged bytes.** The ONNX file is the model artifact's data file as MLflow
  stored it (downloaded, named by the `onnx` flavor of its `MLmodel`), never a model
  re-serialised by `onnx.load`/`onnx.save`, whose output is only equal by accident of
  the protobuf and onnx versions. When the version carries the tag `onnx_sha256` (the
  sha256 of the file training registered), the downloaded bytes must hash to it.
* **Only servable models.** The bytes must pass `ModelBundle.load` (graph, embedded
  metadata, `[N, F]` input matching its feature spec, one probe run), checked on a copy
  with no sidecar, as an agent receives it. Anything else is a `PublishError` and nothing
  is stored.
* **Immutable, idempotent store.** `<store_root>/<name>/<version>/` holds `model.onnx`
  and `manifest.json`, each written to a temporary file in that folder, fsynced and
  renamed into place (`os.replace`); the manifest is written last, so it is the commit
  point. Publishing a stored version again with the same bytes returns the stored
  manifest (not re-signed); with other bytes it is a `PublishError`. Names are checked
  with `SAFE_NAME` (whole string) and every path is resolved and checked to stay under `store_root`.
* **S3 after the local store.** With `artifacts` (an `S3Artifacts`), the artifact is
  uploaded once the local store holds the version, also when it was already stored, so
  publishing again completes an upload that failed before. The upload is idempotent and
  never replaces other bytes; a failure is a `PublishError` (the local store keeps the
  version, and callers record the version as published only on success).
* **Errors.** Everything that cannot be published raises `PublishError` naming the model
  and the reason; a malformed reference raises `ValueError` (`parse_model_ref`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edgefleet.protocols.manifest import (
    ManifestError,
    ModelManifest,
    generate_signing_key,
    is_safe_name,
    key_id,
    load_signing_key,
    parse_manifest,
    sha256_hex,
    sign_manifest,
    verify_artifact,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .artifacts import S3Artifacts

__all__ = [
    "ARTIFACT_FILE",
    "MANIFEST_FILE",
    "SHA256_TAG",
    "PublishError",
    "Published",
    "ensure_signing_key",
    "load_published",
    "parse_model_ref",
    "publish_model",
]

log = logging.getLogger(__name__)

ARTIFACT_FILE: Final = "model.onnx"
MANIFEST_FILE: Final = "manifest.json"
SHA256_TAG: Final = "onnx_sha256"  # model version tag: hex sha256 of the registered file
_URI_PREFIX: Final = "models:/"


class PublishError(Exception):
    """A model version cannot be published (or read back); the message says why."""


@dataclass(frozen=True)
class Published:
    """A stored, signed model version: its manifest and where its two files are."""

    manifest: ModelManifest
    artifact_path: Path
    manifest_path: Path


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`(name, version, alias)` of `NAME@ALIAS`, `NAME/VERSION`, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`; exactly one of version and alias is set. Raises ValueError
    with the reason for anything else (empty or unsafe parts, several separators)."""
    body = ref.removeprefix(_URI_PREFIX)
    has_alias, has_version = "@" in body, "/" in body
    if has_alias and has_version:
        raise ValueError(f"model reference {ref!r} mixes '@' and '/' (a path in a name?)")
    if not has_alias and not has_version:
        raise ValueError(
            f"model reference {ref!r} is not NAME@ALIAS or NAME/VERSION "
            "(optionally prefixed with models:/)"
        )
    separator = "@" if has_alias else "/"
    parts = body.split(separator)
    if len(parts) != 2:
        raise ValueError(f"model reference {ref!r} has more than one {separator!r}")
    name, other = parts
    what = "alias" if has_alias else "version"
    for label, part in (("name", name), (what, other)):
        if not part:
            raise ValueError(f"model reference {ref!r} has an empty {label}")
        if not is_safe_name(part):
            raise ValueError(
                f"model reference {ref!r}: {label} {part!r} is not a safe name "
                "(letters, digits, '_', '.', '-', not starting with a symbol, ≤ 128)"
            )
    return (name, None, other) if has_alias else (name, other, None)


def ensure_signing_key(path: Path) -> Ed25519PrivateKey:
    """The fleet signing key at `path`; on the first run (no file) a new key is generated
    there (PEM, mode 0600) and a warning says so, since every agent must then be given
    its public key. An unreadable or non-Ed25519 file raises ManifestError; an existing
    file is never overwritten."""
    if path.exists():
        return load_signing_key(path)
    try:
        key = generate_signing_key(path)
    except ManifestError:
        if path.exists():  # another process generated it in the meantime
            return load_signing_key(path)
        raise
    log.warning("generated a new fleet signing key %s at %s (mode 0600); give agents its "
                "public key", key_id(key.public_key()), path)
    return key


def publish_model(
    *,
    tracking_uri: str,
    ref: str,
    signing_key: Ed25519PrivateKey,
    store_root: Path,
    now_ns: int | None = None,
    artifacts: S3Artifacts | None = None,
) -> Published:
    """Publish the MLflow model version `ref` (see `parse_model_ref`) into `store_root`
    (and into `artifacts`, when given) and return it; see the module's contracts. `now_ns`
    (epoch ns, default now) is the manifest's `created_at`. Raises ValueError for a
    malformed `ref`, PublishError for everything else (unknown model, alias or version;
    not an ONNX model; unloadable; hash mismatch; a stored version with other bytes, here
    or in `artifacts`; the artifact store failing)."""
    name, version, alias = parse_model_ref(ref)
    client = _client(tracking_uri)
    version, tags = _resolve(client, name, version, alias)
    folder = _version_folder(store_root, name, version)
    model_bytes = _download_onnx(client, tracking_uri, name, version)

    expected = tags.get(SHA256_TAG)
    digest = sha256_hex(model_bytes)
    if expected is not None and expected.strip().lower() != digest:
        raise PublishError(
            f"model {name} v{version}: the downloaded ONNX file has sha256 {digest}, but the "
            f"version's tag {SHA256_TAG} says {expected.strip()!r}; refusing to publish it"
        )

    existing = _existing(store_root, name, version, folder, digest)
    if existing is not None:
        log.info("model %s v%s is already published (sha256 %s…)", name, version, digest[:16])
        _upload(artifacts, existing)
        return existing

    features_hash = _check_loadable(name, version, model_bytes)
    manifest = sign_manifest(
        ModelManifest.model_validate({
            "model_name": name,
            "version": version,
            "sha256": digest,
            "size": len(model_bytes),
            "feature_schema_hash": features_hash,
            "source": f"{_URI_PREFIX}{name}/{version}",
            "created_at": time.time_ns() if now_ns is None else now_ns,
        }),
        signing_key,
    )
    folder.mkdir(parents=True, exist_ok=True)
    artifact_path = folder / ARTIFACT_FILE
    manifest_path = folder / MANIFEST_FILE
    _write_atomic(artifact_path, model_bytes)
    _write_atomic(manifest_path, manifest.to_json().encode("utf-8"))  # the commit point
    log.info("published %s v%s (sha256 %s…, %d bytes, key %s) to %s", name, version,
             digest[:16], len(model_bytes), manifest.key_id, folder)
    published = Published(manifest, artifact_path, manifest_path)
    _upload(artifacts, published)
    return published


def load_published(store_root: Path, name: str, version: str) -> Published:
    """The stored version `name`/`version`: its manifest parsed, its artifact checked
    against the manifest's size and sha256 (the signature is the agent's to check).
    Raises PublishError naming the reason (unsafe name, missing file, invalid manifest,
    a manifest for another version, an artifact that does not match)."""
    folder = _version_folder(store_root, name, version)
    manifest_path = folder / MANIFEST_FILE
    artifact_path = folder / ARTIFACT_FILE
    try:
        manifest = parse_manifest(manifest_path.read_bytes())
        if (manifest.model_name, manifest.version) != (name, version):
            raise ManifestError(f"{manifest_path} is the manifest of {manifest.ref}")
        verify_artifact(manifest, artifact_path.read_bytes())
    except FileNotFoundError as err:
        raise PublishError(
            f"model {name} v{version} is not published in {store_root} "
            f"({Path(err.filename or folder).name} missing)"
        ) from err
    except OSError as err:
        raise PublishError(f"model {name} v{version}: cannot read {folder} "
                           f"({err.strerror})") from err
    except ManifestError as err:
        raise PublishError(f"model {name} v{version} in {store_root}: {err}") from err
    return Published(manifest, artifact_path, manifest_path)


# --- MLflow -------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    # The registry is the tracking server's: never a registry URI from global state.
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _resolve(
    client: Any, name: str, version: str | None, alias: str | None
) -> tuple[str, dict[str, str]]:
    """(version number, version tags) of `name`@`alias` or `name`/`version`."""
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except MlflowException as err:
        wanted = f"alias {alias!r}" if alias is not None else f"version {version!r}"
        raise PublishError(
            f"model {name}: no {wanted} in the registry ({err.message})"
        ) from err
    number = str(found.version)
    if not is_safe_name(number):  # MLflow versions are integers; never trust a path part
        raise PublishError(f"model {name}: the registry's version {number!r} is not a safe name")
    return number, dict(found.tags or {})


def _download_onnx(client: Any, tracking_uri: str, name: str, version: str) -> bytes:
    """The ONNX data file of the version's MLflow model, byte for byte as logged."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    label = f"model {name} v{version}"
    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as tmp:
        try:
            uri = client.get_model_version_download_uri(name, version)
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
            flavors = Model.load(str(local / "MLmodel")).flavors
        except (MlflowException, OSError) as err:
            raise PublishError(f"{label}: cannot download its MLflow model ({err})") from err
        onnx_flavor = flavors.get("onnx")
        data = onnx_flavor.get("data") if isinstance(onnx_flavor, dict) else None
        if not isinstance(data, str):
            raise PublishError(
                f"{label}: not an ONNX model (MLmodel flavors: {', '.join(flavors) or 'none'})"
            )
        root = local.resolve()
        path = (root / data).resolve()
        if not path.is_relative_to(root) or path.suffix != ".onnx":
            raise PublishError(f"{label}: the onnx flavor names {data!r}, not an .onnx file "
                               "inside the model")
        try:
            return path.read_bytes()
        except OSError as err:
            raise PublishError(f"{label}: cannot read its ONNX file {data!r} "
                               f"({err.strerror})") from err


# --- checks and the store -----------------------------------------------------------------


def _check_loadable(name: str, version: str, model_bytes: bytes) -> str:
    """The feature schema hash of a model an agent can load; PublishError otherwise."""
    from edgefleet.edge_agent.inference import ModelBundle, ModelLoadError

    with tempfile.TemporaryDirectory(prefix="edgefleet-publish-") as tmp:
        path = Path(tmp) / ARTIFACT_FILE  # alone in its folder: no sidecar, as on a device
        path.write_bytes(model_bytes)
        try:
            bundle = ModelBundle.load(path)
        except ModelLoadError as err:
            reason = str(err).removeprefix(f"model {path}: ")
            raise PublishError(
                f"model {name} v{version} cannot be served by an agent: {reason}"
            ) from err
    return bundle.features.schema_hash()


def _version_folder(store_root: Path, name: str, version: str) -> Path:
    for label, part in (("model name", name), ("version", version)):
        if not is_safe_name(part):
            raise PublishError(f"{label} {part!r} is not a safe name")
    root = store_root.resolve()
    folder = (root / name / version).resolve()
    if not folder.is_relative_to(root) or folder == root:
        raise PublishError(f"model {name} v{version}: {folder} is outside {root}")
    return folder


def _existing(
    store_root: Path, name: str, version: str, folder: Path, digest: str
) -> Published | None:
    """The stored version if it holds these bytes, None if nothing is stored (no
    manifest); PublishError if it holds other bytes or is damaged."""
    if not (folder / MANIFEST_FILE).exists():
        return None
    stored = load_published(store_root, name, version)
    if stored.manifest.sha256 != digest:
        raise PublishError(
            f"model {name} v{version} is already published with sha256 "
            f"{stored.manifest.sha256[:16]}…; the registry now gives {digest[:16]}…; a "
            "published version is immutable (register a new version instead)"
        )
    return stored


def _upload(artifacts: S3Artifacts | None, published: Published) -> None:
    """Copy a stored version's artifact to `artifacts` (idempotent); PublishError if not."""
    if artifacts is None:
        return
    from .artifacts import ArtifactError

    try:
        stored = artifacts.upload(published)
    except ArtifactError as err:
        raise PublishError(f"model {published.manifest.ref}: stored locally, but not in the "
                           f"artifact store: {err}") from err
    log.info("model %s %s %s (%s)", published.manifest.ref,
             "uploaded to" if stored.uploaded else "already in", artifacts.config.describe(),
             stored.key)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a fsynced temporary file in the same folder and
    `os.replace`, then fsync the folder: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)
