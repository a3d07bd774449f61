"""Standalone model mode: the agent follows `models:/NAME@ALIAS` on an MLflow tracking
server by itself, over MLflow's REST API — no control plane, no `mlflow` package on the
edge — and runs each new version through the fleet's verified store, shadow and swap.

```
every poll_s: GET /api/2.0/mlflow/registered-models/alias?name=NAME&alias=ALIAS
  └► model_version {version, tags}: same version and onnx_sha256 tag ─► nothing to do
  └► changed: generation + 1
       ─► no (valid) onnx_sha256 tag       ─► refused "unverifiable" (never downloaded)
       ─► version already in the store     ─► its stored manifest (no download: offline)
       ─► GET /api/2.0/mlflow/model-versions/get-download-uri ─► mlflow-artifacts:/<dir>
       ─► GET /api/2.0/mlflow-artifacts/artifacts/<dir>/MLmodel ─► the onnx flavor's file
       ─► GET /api/2.0/mlflow-artifacts/artifacts/<dir>/<file> (size-capped)
       ─► sha256 == tag?  no ─► refused "hash_mismatch"
       ─► the model's own feature spec ─► an unsigned ModelManifest built here
  ModelUpdater(trust="checksum"): ModelStore.install_checksummed (hash, schema, load,
  probe) ─► shadow on live windows for shadow_s ─► activate ─► swap   (edge-agent/fleet.py)
```

Contracts
---------
* **The trust anchor is the tracking server the user configured.** A version is installed
  only when the bytes served for it hash to its `onnx_sha256` tag (the sha256 of the exact
  ONNX file, recorded by cloud/training/registry.py at registration); a version without
  that tag is refused, never trusted. Whoever can set tags on that server can deploy a
  model, so use `https://` (and `ca_file`) and a token in production. The fleet's signed
  path (`ModelStore.install`) is not involved and not weakened: this mode installs through
  `ModelStore.install_checksummed`, into its own store folder (`<state_dir>/mlflow-models`).
* **Follows the alias like a fleet generation.** Each change of (version the alias names,
  its `onnx_sha256` tag) is a new generation of `ModelUpdater` (a counter starting at 1 in
  each run). The version is shadowed beside the current model on live windows for
  `shadow_s`, then swapped in between two ingest cycles; a candidate that fails every
  shadow batch is not. A refused generation (no tag, wrong bytes, wrong feature schema, an
  artifact over the cap, a file that does not load) is logged at WARNING, counted
  (`refusals`) and not retried while the alias and the tag stay as they are; the agent
  keeps running its model. Moving the alias, or fixing the tag, is a new generation.
* **Offline rollback.** The store keeps the previous model (and `keep` versions): an alias
  moved back to a version on disk needs nothing but the alias lookup — no download.
* **What the server must give.** MLflow 3 registry answers, and artifacts through the
  tracking server's proxy (`mlflow server --serve-artifacts`: download URIs are
  `mlflow-artifacts:`). A version stored elsewhere (`s3://`, `file://`: the server does not
  serve it, and the edge holds no object-store credentials) is refused "not_served",
  naming the URI. Whatever a version's source (MLflow 3 logged models, `models:/m-…`, are
  what cloud/training/registry.py registers), its folder comes from `get-download-uri`
  and its ONNX file from the onnx flavor of its `MLmodel`, as cloud/control/publish.py
  finds it with the mlflow client.
* **Errors** are fleet errors, so `ModelUpdater` handles them as it does the control
  plane's: 401/403 `FleetAuthError`; network faults, timeouts, 5xx, 408, 425, 429
  `FleetUnavailable` (a `Retry-After` is honoured); any other answer `MlflowApiError`
  (a `FleetProtocolError`) with the HTTP status, MLflow's `error_code` and its message,
  e.g. `GET …/registered-models/alias (models:/m@champion): 404 RESOURCE_DOES_NOT_EXIST:
  Registered Model with name=m not found`. Logged once per episode, retried with backoff.
* **Credentials** (optional): a bearer token from `token_file`, else `MLFLOW_TRACKING_TOKEN`,
  else HTTP basic from `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` — the names
  the MLflow client uses. Every request goes to the tracking server (redirects are not
  followed), so credentials never leave for another host.
* **Bounded.** A JSON answer is read up to `MAX_JSON_BYTES`, an `MLmodel` file up to
  `MAX_MLMODEL_BYTES`, an error body up to `MAX_ERROR_BYTES`; an artifact up to
  `max_artifact_bytes` (a larger `Content-Length` is refused before the download, a longer
  stream aborted). One resolved version and at most one artifact are held in memory (the
  artifact is handed to the updater once). Hashing, disk and ONNX work run in a thread.
* **Cheap to import**: httpx, onnxruntime and yaml parsing are loaded when first used.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.protocols.manifest import ModelManifest, is_safe_name, sha256_hex

from .fleet import (
    DEFAULT_MAX_ARTIFACT_BYTES,
    MAX_SHADOW_S,
    USER_AGENT,
    ArtifactTooLarge,
    CandidateRefused,
    DesiredModel,
    DesiredState,
    FleetAuthError,
    FleetProtocolError,
    FleetUnavailable,
    ModelUpdater,
    Report,
    _check_base_url,
    _describe,
    _retry_after,
)

if TYPE_CHECKING:
    import httpx

    from edgefleet.protocols.features import FeatureSpec

    from .inference import ModelBundle
    from .model_manager import ModelStore

__all__ = [
    "MAX_ERROR_BYTES",
    "MAX_JSON_BYTES",
    "MAX_MLMODEL_BYTES",
    "PASSWORD_ENV",
    "SHA256_TAG",
    "TOKEN_ENV",
    "USERNAME_ENV",
    "MlflowApiError",
    "MlflowModelSource",
    "MlflowRestClient",
    "MlflowSourceConfig",
    "ModelSourceConfig",
    "ModelVersion",
    "OnnxArtifact",
    "UnusableArtifact",
    "artifact_dir",
    "build_follower",
    "onnx_data_file",
    "parse_model_uri",
]

log = logging.getLogger(__name__)

SHA256_TAG: Final = "onnx_sha256"  # model version tag: sha256 of the registered ONNX file
TOKEN_ENV: Final = "MLFLOW_TRACKING_TOKEN"  # noqa: S105 - the variable's name
USERNAME_ENV: Final = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV: Final = "MLFLOW_TRACKING_PASSWORD"  # noqa: S105 - the variable's name
REGISTRY_API: Final = "/api/2.0/mlflow"
ARTIFACTS_API: Final = "/api/2.0/mlflow-artifacts/artifacts"
MAX_JSON_BYTES: Final = 1024**2  # one registry answer
MAX_MLMODEL_BYTES: Final = 256 * 1024
MAX_ERROR_BYTES: Final = 64 * 1024  # of an error answer's body, read for its message
MAX_DETAIL: Final = 300  # characters of a server's message kept in an error
LABEL: Final = "standalone"  # the updater's log prefix in this mode
_URI_PREFIX: Final = "models:/"
_PROXY_SCHEME: Final = "mlflow-artifacts"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---- model references ---------------------------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str]:
    """`(name, alias)` of `models:/NAME@ALIAS`. Both parts must be safe names (they become
    folder names in the store); ValueError says what is wrong."""
    if not uri.startswith(_URI_PREFIX):
        raise ValueError(f"expected models:/NAME@ALIAS, got {uri!r}")
    body = uri.removeprefix(_URI_PREFIX)
    if "@" not in body:
        raise ValueError(f"{uri!r} names no alias: expected models:/NAME@ALIAS (an alias is "
                         "what the agent follows, e.g. models:/NAME@champion)")
    name, _, alias = body.partition("@")
    for label, part in (("name", name), ("alias", alias)):
        if not is_safe_name(part):
            raise ValueError(f"{uri!r}: the {label} {part!r} is not a safe name (letters, "
                             "digits, '_', '.', '-', not starting with a symbol, ≤ 128)")
    return name, alias


# ---- errors ---------------------------------------------------------------------------------


class MlflowApiError(FleetProtocolError):
    """The tracking server answered with an error the agent cannot wait out (a 4xx other
    than 401/403/408/425/429, or a 3xx): an unknown model or alias, a bad request.
    `status` is the HTTP status, `error_code` MLflow's (e.g. RESOURCE_DOES_NOT_EXIST)."""

    def __init__(self, message: str, status: int, error_code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class UnusableArtifact(FleetProtocolError):
    """A version whose model cannot be fetched as an ONNX file through the tracking server:
    `reason` "not_served" (stored where the server does not proxy) or "not_onnx" (its
    MLmodel has no onnx flavor, or names a file outside the model)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---- the REST client ------------------------------------------------------------------------


class _TagWire(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str
    value: str = ""


class _VersionWire(BaseModel):
    # Unknown keys are ignored: newer MLflow versions add fields.
    model_config = ConfigDict(extra="ignore")

    name: str
    version: Annotated[str, Field(min_length=1)]
    source: str = ""
    run_id: str = ""
    creation_timestamp: int = 0
    tags: list[_TagWire] = []


@dataclasses.dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered model version, as the registry describes it."""

    name: str
    version: str
    source: str
    run_id: str
    creation_timestamp_ms: int
    tags: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class OnnxArtifact:
    """A version's ONNX file: where the server keeps it, and its bytes."""

    uri: str
    data: bytes = dataclasses.field(repr=False)


def _error_detail(body: bytes) -> tuple[str, str]:
    """`(error_code, message)` of an MLflow error body (JSON), or ("", its text)."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        code = doc.get("error_code")
        return (code if isinstance(code, str) else ""), doc["message"][:MAX_DETAIL]
    text = body.decode("utf-8", errors="replace").strip()
    return "", " ".join(text.split())[:MAX_DETAIL]


def artifact_dir(uri: str) -> str:
    """The path, under the tracking server's artifact proxy, of an `mlflow-artifacts:`
    URI (`mlflow-artifacts:/1/models/m-…/artifacts` or `mlflow-artifacts://host/…`);
    UnusableArtifact("not_served") for any other URI."""
    parts = urlsplit(uri)
    if parts.scheme != _PROXY_SCHEME:
        raise UnusableArtifact(
            "not_served",
            f"the model is stored at {uri!r}, which the tracking server does not serve; "
            "the agent fetches models through its artifact proxy only (mlflow server "
            "--serve-artifacts, models logged to mlflow-artifacts:/ locations)")
    path = PurePosixPath(parts.path)
    if ".." in path.parts or not parts.path.strip("/"):
        raise UnusableArtifact("not_served", f"artifact URI {uri!r} has no usable path")
    return parts.path.strip("/")


def onnx_data_file(mlmodel: bytes, where: str) -> str:
    """The ONNX file an `MLmodel` document names (its onnx flavor's `data`), a relative
    path inside the model folder; UnusableArtifact("not_onnx") otherwise."""
    import yaml

    try:
        doc = yaml.safe_load(mlmodel)
    except yaml.YAMLError as err:
        raise UnusableArtifact("not_onnx", f"{where}: MLmodel is not YAML ({err})") from None
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    if not isinstance(flavors, dict):
        raise UnusableArtifact("not_onnx", f"{where}: MLmodel has no flavors")
    onnx = flavors.get("onnx")
    data = onnx.get("data") if isinstance(onnx, dict) else None
    if not isinstance(data, str):
        raise UnusableArtifact("not_onnx", f"{where}: not an ONNX model (MLmodel flavors: "
                                           f"{', '.join(map(str, flavors)) or 'none'})")
    path = PurePosixPath(data)
    if path.is_absolute() or ".." in path.parts or path.suffix != ".onnx" or not path.parts:
        raise UnusableArtifact("not_onnx", f"{where}: the onnx flavor names {data!r}, not "
                                           "an .onnx file inside the model")
    return str(path)


class MlflowRestClient:
    """The part of MLflow's REST API standalone mode needs, over one `httpx.AsyncClient`
    (its timeouts, TLS and pool are the caller's; see the module contracts for errors,
    credentials and bounds). `tracking_uri` is the server's base URL, with a path prefix
    if it sits behind a reverse proxy."""

    def __init__(
        self,
        tracking_uri: str,
        http: httpx.AsyncClient,
        *,
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        problem = _check_base_url(tracking_uri)
        if problem is not None:
            raise ValueError(f"tracking_uri: {problem}")
        if max_artifact_bytes < 1:
            raise ValueError("max_artifact_bytes must be at least 1")
        headers = {"User-Agent": USER_AGENT}
        if token is not None:
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("the tracking token must be a non-empty single line")
            headers["Authorization"] = f"Bearer {token}"
        elif basic_auth is not None:
            login = f"{basic_auth[0]}:{basic_auth[1]}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(login).decode()}"
        self.url = tracking_uri.rstrip("/")
        self.http = http
        self.max_artifact_bytes = max_artifact_bytes
        self._headers = headers
        self.requests = 0  # requests sent
        self.artifact_bytes = 0  # artifact bytes downloaded whole

    async def aclose(self) -> None:
        """Close the httpx client (only when this client owns it)."""
        await self.http.aclose()

    # ---- registry -------------------------------------------------------------------------

    async def version_by_alias(self, name: str, alias: str) -> ModelVersion:
        """The version `name@alias` names (`GET …/registered-models/alias`)."""
        path = "/registered-models/alias"
        what = f"GET {REGISTRY_API}{path} (models:/{name}@{alias})"
        doc = await self._json(what, path, {"name": name, "alias": alias})
        try:
            wire = _VersionWire.model_validate(doc.get("model_version"))
        except ValidationError as err:
            raise FleetProtocolError(f"{what}: model_version: {_describe(err)}") from None
        if not is_safe_name(wire.version):  # an integer in MLflow; never trust a path part
            raise FleetProtocolError(f"{what}: version {wire.version!r} is not a safe name")
        return ModelVersion(wire.name, wire.version, wire.source, wire.run_id,
                            wire.creation_timestamp, {t.key: t.value for t in wire.tags})

    async def download_uri(self, name: str, version: str) -> str:
        """Where the registry keeps the model of `name` `version`."""
        path = "/model-versions/get-download-uri"
        what = f"GET {REGISTRY_API}{path} ({name} v{version})"
        doc = await self._json(what, path, {"name": name, "version": version})
        uri = doc.get("artifact_uri")
        if not isinstance(uri, str) or not uri:
            raise FleetProtocolError(f"{what}: no artifact_uri in the answer")
        return uri

    # ---- artifacts ------------------------------------------------------------------------

    async def onnx_model(self, name: str, version: str, *, max_bytes: int | None = None
                         ) -> OnnxArtifact:
        """The ONNX file of `name` `version`, byte for byte as MLflow stored it: the
        download URI, its `MLmodel`, then the file its onnx flavor names, capped at
        `max_artifact_bytes` (or `max_bytes`, if smaller) with ArtifactTooLarge."""
        limit = self.max_artifact_bytes if max_bytes is None else min(max_bytes,
                                                                      self.max_artifact_bytes)
        uri = await self.download_uri(name, version)
        where = f"model {name} v{version}"
        folder = artifact_dir(uri)
        mlmodel = await self._get(f"GET {uri}/MLmodel", self._artifact_url(folder, "MLmodel"),
                                  None, MAX_MLMODEL_BYTES, artifact=False)
        data_file = onnx_data_file(mlmodel, where)
        file_uri = f"{uri.rstrip('/')}/{data_file}"
        data = await self._get(f"GET {file_uri}", self._artifact_url(folder, data_file), None,
                               limit, artifact=True)
        self.artifact_bytes += len(data)
        return OnnxArtifact(file_uri, data)

    def _artifact_url(self, folder: str, file: str) -> str:
        return f"{self.url}{ARTIFACTS_API}/{quote(f'{folder}/{file}')}"

    # ---- plumbing -------------------------------------------------------------------------

    async def _json(self, what: str, path: str, params: dict[str, str]) -> dict[str, Any]:
        body = await self._get(what, f"{self.url}{REGISTRY_API}{path}", params,
                               MAX_JSON_BYTES, artifact=False)
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FleetProtocolError(f"{what}: the body is not JSON ({err})") from None
        if not isinstance(doc, dict):
            raise FleetProtocolError(f"{what}: expected a JSON object")
        return doc

    async def _get(self, what: str, url: str, params: dict[str, str] | None, limit: int, *,
                   artifact: bool) -> bytes:
        """The body of a 200 answer, read up to `limit` bytes (beyond: ArtifactTooLarge for
        an artifact, FleetProtocolError otherwise); any other answer raised as an error."""
        import httpx

        too_large = ArtifactTooLarge if artifact else FleetProtocolError
        data = bytearray()
        self.requests += 1
        try:
            async with self.http.stream("GET", url, params=params,
                                        headers=self._headers) as response:
                if response.status_code != 200:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= MAX_ERROR_BYTES:
                            break
                    raise self._error(what, response.status_code, response.headers,
                                      bytes(body[:MAX_ERROR_BYTES]))
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise too_large(f"{what}: {int(declared)} bytes announced, more than the "
                                    f"{limit}-byte cap; not downloaded")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise too_large(f"{what}: more than the {limit}-byte cap; download "
                                        "aborted")
        except httpx.DecodingError as err:
            raise FleetProtocolError(f"{what}: undecodable body ({err})") from err
        except httpx.RequestError as err:
            raise FleetUnavailable(f"{what}: {type(err).__name__}: {err}") from err
        return bytes(data)

    @staticmethod
    def _error(what: str, status: int, headers: Any, body: bytes) -> Exception:
        code, message = _error_detail(body)
        detail = f"{status} {code}: {message}" if code else f"{status}: {message}" if message \
            else str(status)
        if status in (401, 403):
            return FleetAuthError(f"{what}: the tracking server refused the credentials "
                                  f"({detail})", status)
        if status >= 500 or status in (408, 425, 429):
            return FleetUnavailable(f"{what}: {detail}", _retry_after(headers.get("Retry-After")))
        return MlflowApiError(f"{what}: {detail}", status, code)


# ---- the source -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    message: str


def _feature_schema_hash(data: bytes) -> str:
    """The feature schema hash of the model in `data` (loaded as the store would, alone in
    a folder, without a sidecar); ModelLoadError when it does not load."""
    from .inference import ModelBundle

    with tempfile.TemporaryDirectory(prefix="edgefleet-standalone-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        return ModelBundle.load(path).features.schema_hash()


class MlflowModelSource:
    """A `fleet.ModelSource` that follows `models:/NAME@ALIAS` (module contracts): each
    change of the version the alias names (or of its checksum tag) is a new generation,
    resolved into an unsigned manifest built from the version's `onnx_sha256` tag.
    `store` is the updater's: a version on disk is served from there."""

    def __init__(
        self,
        client: MlflowRestClient,
        name: str,
        alias: str,
        store: ModelStore,
        *,
        poll_s: float,
        shadow_s: float,
    ) -> None:
        if not (is_safe_name(name) and is_safe_name(alias)):
            raise ValueError(f"models:/{name}@{alias}: name and alias must be safe names")
        self.client = client
        self.name = name
        self.alias = alias
        self.store = store
        self.poll_s = poll_s
        self.shadow_s = shadow_s
        self.generation = 0  # bumped at each change of (version, onnx_sha256 tag)
        self.last_report: Report | None = None
        self._key: tuple[str, str | None] | None = None
        self._resolved: DesiredState | _Refusal | None = None
        self._artifact: tuple[str, bytes] | None = None  # (artifact_url, bytes), handed once

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def max_artifact_bytes(self) -> int:
        return self.client.max_artifact_bytes

    @property
    def model_uri(self) -> str:
        return f"{_URI_PREFIX}{self.name}@{self.alias}"

    def describe(self) -> str:
        return f"{self.model_uri} on {self.url}"

    async def aclose(self) -> None:
        await self.client.aclose()

    async def desired(self, etag: int | None) -> DesiredState | None:
        """What the alias names now, as a desired state; None while it is still generation
        `etag`. CandidateRefused for a version that must not be installed."""
        version = await self.client.version_by_alias(self.name, self.alias)
        key = (version.version, version.tags.get(SHA256_TAG))
        if key != self._key:
            if self._key is not None:
                log.info("%s: %s now names version %s (was %s)", LABEL, self.model_uri,
                         version.version, self._key[0])
            self._key, self._resolved, self._artifact = key, None, None
            self.generation += 1
        if self.generation == etag:
            return None
        if self._resolved is None:
            self._resolved = await self._resolve(version, self.generation)
        if isinstance(self._resolved, _Refusal):
            raise CandidateRefused(self.generation, self._resolved.reason,
                                   self._resolved.message)
        return self._resolved

    async def download(self, artifact_url: str, *, max_bytes: int | None = None) -> bytes:
        """The ONNX file of `artifact_url` (`models:/NAME/VERSION`): the bytes fetched while
        resolving it, the first time; else fetched again (a damaged copy on disk)."""
        cached = self._artifact
        if cached is not None and cached[0] == artifact_url:
            self._artifact = None
            return cached[1]
        name, _, version = artifact_url.removeprefix(_URI_PREFIX).partition("/")
        if not artifact_url.startswith(_URI_PREFIX) or not (
            is_safe_name(name) and is_safe_name(version)
        ):
            raise FleetProtocolError(f"not a models:/NAME/VERSION reference: {artifact_url!r}")
        return (await self.client.onnx_model(name, version, max_bytes=max_bytes)).data

    async def report(self, report: Report) -> None:
        """No control plane to tell: the shadow's figures of a settled generation go to
        the log (its state and reason are logged by the updater)."""
        self.last_report = report
        shadow = report.shadow
        if shadow is not None and report.state in ("applied", "failed"):
            log.info("%s: shadow of generation %d: %d rows, %d errors, p99 %s µs, anomaly "
                     "rate %s (current %s)", LABEL, report.generation, shadow.rows,
                     shadow.errors, _figure(shadow.latency_p99_us),
                     _figure(shadow.anomaly_rate_candidate),
                     _figure(shadow.anomaly_rate_current))

    # ---- resolving a version --------------------------------------------------------------

    async def _resolve(self, version: ModelVersion, generation: int) -> DesiredState | _Refusal:
        """The desired state for `version`, or why it must not be installed. Failed
        exchanges raise (not cached: the next poll tries again)."""
        from .inference import ModelLoadError

        label = f"model {self.name} v{version.version} ({self.model_uri})"
        tag = version.tags.get(SHA256_TAG)
        if tag is None:
            return _Refusal("unverifiable", f"{label} has no {SHA256_TAG} tag (the sha256 of "
                            "its ONNX file, recorded at registration); an unverifiable model "
                            "is not installed")
        expected = tag.strip().lower()
        if not _SHA256.fullmatch(expected):
            return _Refusal("unverifiable", f"{label}: its {SHA256_TAG} tag {tag[:80]!r} is "
                            "not a hex sha256; refused")
        installed = await asyncio.to_thread(self._installed, version.version)
        if installed is not None:
            if installed.sha256 == expected:
                return self._desired(generation, installed)
            return _Refusal("conflict", f"{label}: installed here with sha256 "
                            f"{installed.sha256[:16]}…, the registry now records "
                            f"{expected[:16]}…; a registered version never changes "
                            "(register a new one)")
        try:
            artifact = await self.client.onnx_model(self.name, version.version)
        except ArtifactTooLarge as err:
            return _Refusal("too_large", f"{label}: {err}")
        except UnusableArtifact as err:
            return _Refusal(err.reason, f"{label}: {err}")
        digest = await asyncio.to_thread(sha256_hex, artifact.data)
        if digest != expected:
            return _Refusal("hash_mismatch", f"{label}: the ONNX file the tracking server "
                            f"serves ({artifact.uri}) has sha256 {digest[:16]}…, its "
                            f"{SHA256_TAG} tag says {expected[:16]}…; refused")
        try:
            schema = await asyncio.to_thread(_feature_schema_hash, artifact.data)
        except ModelLoadError as err:
            problem = str(err).split(": ", 1)[-1]
            return _Refusal("unloadable", f"{label}: {problem}; refused")
        manifest = ModelManifest.model_validate({
            "model_name": self.name,
            "version": version.version,
            "sha256": expected,
            "size": len(artifact.data),
            "feature_schema_hash": schema,
            "source": f"{_URI_PREFIX}{self.name}/{version.version}",
            "created_at": max(0, version.creation_timestamp_ms) * 1_000_000,
        })
        desired = self._desired(generation, manifest)
        assert desired.model is not None
        self._artifact = (desired.model.artifact_url, artifact.data)
        return desired

    def _installed(self, version: str) -> ModelManifest | None:
        from .model_manager import ModelStoreError

        try:
            return self.store.manifest_of(f"{self.name}/{version}")
        except ModelStoreError:
            return None

    def _desired(self, generation: int, manifest: ModelManifest) -> DesiredState:
        model = DesiredModel(manifest, f"{_URI_PREFIX}{manifest.model_name}/{manifest.version}")
        return DesiredState(self.model_uri, generation, model, self.shadow_s, self.poll_s)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# ---- configuration ------------------------------------------------------------------------


class MlflowSourceConfig(BaseModel):
    """`model_source.mlflow`: follow `model` (`models:/NAME@ALIAS`) on the MLflow tracking
    server at `tracking_uri` (see the module docstring). Credentials: `token_file`, or the
    environment (`MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME`/`…_PASSWORD`).
    `models_dir` defaults to `<state_dir>/mlflow-models`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    poll_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    shadow_s: Annotated[float, Field(ge=0, le=MAX_SHADOW_S)] = 60.0
    token_file: Path | None = None
    ca_file: Path | None = None  # https only: the tracking server's CA (default: the system's)
    models_dir: Path | None = None
    keep: Annotated[int, Field(ge=2, le=20)] = 3  # model versions kept on disk
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_cap_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    max_artifact_bytes: Annotated[int, Field(ge=1024, le=1024**3)] = DEFAULT_MAX_ARTIFACT_BYTES

    @model_validator(mode="after")
    def _check(self) -> MlflowSourceConfig:
        problems = []
        problem = _check_base_url(self.tracking_uri)
        if problem is not None:
            problems.append(f"tracking_uri: {problem}")
        elif self.ca_file is not None and not self.tracking_uri.startswith("https://"):
            problems.append("ca_file: set for a plain http:// tracking_uri (use https://)")
        try:
            parse_model_uri(self.model)
        except ValueError as err:
            problems.append(f"model: {err}")
        if self.backoff_cap_s < self.backoff_initial_s:
            problems.append("backoff_cap_s: must be >= backoff_initial_s")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def name_and_alias(self) -> tuple[str, str]:
        return parse_model_uri(self.model)

    def credentials(self, environ: Mapping[str, str]) -> tuple[str | None, tuple[str, str] | None]:
        """`(bearer token, basic login)`, at most one set: `token_file` (read now), else
        `MLFLOW_TRACKING_TOKEN`, else `MLFLOW_TRACKING_USERNAME`/`…_PASSWORD`."""
        if self.token_file is not None:
            text = self.token_file.read_text(encoding="utf-8").strip()
            if not text:
                raise ValueError(f"model_source.mlflow.token_file {self.token_file} is empty")
            return text.splitlines()[0].strip(), None
        if environ.get(TOKEN_ENV, "").strip():
            return environ[TOKEN_ENV].strip(), None
        username, password = environ.get(USERNAME_ENV), environ.get(PASSWORD_ENV)
        if username and password is not None:
            return None, (username, password)
        if username or password:
            raise ValueError(f"{USERNAME_ENV} and {PASSWORD_ENV} go together; only one is set")
        return None, None

    def models_path(self, state_dir: Path) -> Path:
        return self.models_dir if self.models_dir is not None else state_dir / "mlflow-models"

    def http_client(self) -> httpx.AsyncClient:
        """An httpx client with this config's timeout and TLS settings (no redirects)."""
        import ssl

        import httpx

        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), verify=verify,
                                 follow_redirects=False)


class ModelSourceConfig(BaseModel):
    """`model_source:` in the agent config: where an agent without a control plane gets
    its models. One kind today, `mlflow` (see `MlflowSourceConfig`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mlflow: MlflowSourceConfig


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_follower(
    config: MlflowSourceConfig,
    *,
    state_dir: Path,
    swap: Callable[[ModelBundle], None],
    features: FeatureSpec | None = None,
    http: httpx.AsyncClient | None = None,
    environ: Mapping[str, str] | None = None,
) -> ModelUpdater:
    """A `ModelUpdater` (trust "checksum") following `config.model`: a store without fleet
    keys under `models_path(state_dir)` (every model checked against `features` when
    given), a REST client over `http` (default `config.http_client()`, closed by
    `updater.client.aclose()`), credentials from `environ` (default `os.environ`)."""
    from .model_manager import ModelStore

    name, alias = config.name_and_alias
    token, basic = config.credentials(os.environ if environ is None else environ)
    if (token is not None or basic is not None) and config.tracking_uri.startswith(
        "http://"
    ) and not _is_loopback(config.tracking_uri):
        log.warning("%s: sending MLflow credentials over plain http to %s; use https://",
                    LABEL, config.tracking_uri)
    store = ModelStore(config.models_path(state_dir), (), features, keep=config.keep)
    client = MlflowRestClient(config.tracking_uri,
                              http if http is not None else config.http_client(),
                              token=token, basic_auth=basic,
                              max_artifact_bytes=config.max_artifact_bytes)
    source = MlflowModelSource(client, name, alias, store, poll_s=config.poll_s,
                               shadow_s=config.shadow_s)
    return ModelUpdater(store, source, swap, poll_min_s=config.poll_s,
                        poll_max_s=max(config.poll_s, config.backoff_cap_s),
                        backoff_initial_s=config.backoff_initial_s,
                        backoff_cap_s=config.backoff_cap_s, trust="checksum", label=LABEL)
