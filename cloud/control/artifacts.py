"""Published model artifacts in S3, handed to devices as pre-signed GET URLs.

```
publish_model ─► <store_root>/<name>/<version>/model.onnx + manifest.json (the local store)
    └─► S3Artifacts.upload ─► s3://BUCKET/PREFIX/<name>/<version>/model.onnx
                              (x-amz-meta-sha256: the manifest's sha256; HEAD-verified)
desired state ─► S3Artifacts.presign(name, version, ttl) ─► http(s)://ENDPOINT/BUCKET/…?X-Amz-…
agent ─► plain GET of that URL (no bearer token) ─► bytes verified against the signed manifest
```

Configuration
-------------
One URL, `s3://BUCKET/PREFIX` (`PREFIX` optional: zero or more safe names joined by `/`),
plus the environment the project's launcher exports (`edgefleet services`):
`EDGEFLEET_S3_ENDPOINT` (`http(s)://host[:port]`), `EDGEFLEET_S3_ACCESS_KEY`,
`EDGEFLEET_S3_SECRET_KEY`, and optionally `EDGEFLEET_S3_REGION` (default `us-east-1`).
All three are required: there is no default credential, and boto3's own credential chain
(`~/.aws`, instance metadata, `AWS_*`) is never consulted. Requests are signed with
signature v4 and address the bucket path-style (`ENDPOINT/BUCKET/KEY`), which S3-compatible
servers without per-bucket DNS (SeaweedFS, MinIO) need.

Contracts
---------
* **Keys cannot escape the prefix.** The key of a version is
  `PREFIX/<name>/<version>/model.onnx`; `name` and `version` must pass `is_safe_name`
  (checked before any request), as must every part of `PREFIX`.
* **Immutable, idempotent upload.** An object already holding the version with the same
  sha256 (its `sha256` metadata) and size is left as is; one with other bytes, or without
  the metadata, is an `ArtifactConflict` and is never overwritten. The write is
  conditional (`If-None-Match: *`), so two publishers racing cannot replace each other's
  object; the loser compares what won. Every upload is verified with a HEAD (size and
  metadata) before it is reported done. Only bytes that match their signed manifest are
  uploaded.
* **Pre-signing is local.** `presign` makes no request (an HMAC over the URL); it does not
  check that the object exists (`check` does). `expires_s` is bounded to
  [`MIN_URL_TTL_S`, `MAX_URL_TTL_S`] (60 s .. 7 days, the longest SigV4 allows). The URL
  is signed for the endpoint's host: devices must reach the same endpoint.
* **Errors** are converted at this boundary: `ArtifactConfigError` (also a `ValueError`:
  bad URL or settings), `ArtifactMissing`, `ArtifactConflict`, `ArtifactUnavailable`
  (network, timeouts, 5xx: worth retrying), and `ArtifactError` for the rest (access
  denied, no such bucket). Messages name the store (`s3://BUCKET/PREFIX at ENDPOINT`),
  never a secret.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from edgefleet.protocols.manifest import ManifestError, is_safe_name, verify_artifact

from .publish import ARTIFACT_FILE

if TYPE_CHECKING:
    from .publish import Published

__all__ = [
    "DEFAULT_REGION",
    "ENV_ACCESS_KEY",
    "ENV_ENDPOINT",
    "ENV_REGION",
    "ENV_SECRET_KEY",
    "MAX_URL_TTL_S",
    "MIN_URL_TTL_S",
    "SHA256_METADATA",
    "ArtifactConfigError",
    "ArtifactConflict",
    "ArtifactError",
    "ArtifactMissing",
    "ArtifactUnavailable",
    "S3Artifacts",
    "S3Config",
    "S3Location",
    "StoredArtifact",
    "check_url_ttl",
]

ENV_ENDPOINT: Final = "EDGEFLEET_S3_ENDPOINT"
ENV_ACCESS_KEY: Final = "EDGEFLEET_S3_ACCESS_KEY"
ENV_SECRET_KEY: Final = "EDGEFLEET_S3_SECRET_KEY"  # noqa: S105 - a variable name
ENV_REGION: Final = "EDGEFLEET_S3_REGION"
DEFAULT_REGION: Final = "us-east-1"
MIN_URL_TTL_S: Final = 60.0
MAX_URL_TTL_S: Final = 7 * 24 * 3600.0  # SigV4's limit for a pre-signed URL
SHA256_METADATA: Final = "sha256"  # user metadata: x-amz-meta-sha256
_CONTENT_TYPE: Final = "application/octet-stream"
# S3 bucket naming rules (lowercase, 3..63, letters/digits at both ends); a dot-free
# subset would be stricter than S3, so dots are allowed but not two in a row.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_PREFIX: Final = 512
_CREDENTIAL = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces
_REGION = re.compile(r"^[a-z0-9-]{1,32}$")


class ArtifactError(Exception):
    """The artifact store refused or failed an operation; the message says why."""


class ArtifactConfigError(ArtifactError, ValueError):
    """The store's URL or settings are unusable (raised before any request)."""


class ArtifactMissing(ArtifactError):
    """The store holds no object for that version."""


class ArtifactConflict(ArtifactError):
    """The store holds other bytes (or an object without a sha256) for that version."""


class ArtifactUnavailable(ArtifactError):
    """The store could not be reached or answered with a server error; worth retrying."""


def check_url_ttl(expires_s: float) -> int:
    """`expires_s` as the whole seconds of a pre-signed URL's lifetime; ValueError unless
    it is finite and within [MIN_URL_TTL_S, MAX_URL_TTL_S]."""
    if not math.isfinite(expires_s) or not MIN_URL_TTL_S <= expires_s <= MAX_URL_TTL_S:
        raise ValueError(f"a pre-signed URL's lifetime must be between {MIN_URL_TTL_S:.0f} s "
                         f"and {MAX_URL_TTL_S:.0f} s (7 days), not {expires_s!r}")
    return int(expires_s)


@dataclass(frozen=True)
class S3Location:
    """Where artifacts go: a bucket and a key prefix ('' or safe names joined by '/')."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """The location of `s3://BUCKET` or `s3://BUCKET/PREFIX` (a trailing '/' is
        ignored); ArtifactConfigError names what is wrong with anything else."""
        def bad(reason: str) -> ArtifactConfigError:
            return ArtifactConfigError(f"artifact store URL {url!r}: {reason}")

        try:
            parts = urlsplit(url)
        except ValueError as err:
            raise bad(str(err)) from None
        if parts.scheme != "s3" or not url.startswith("s3://"):
            raise bad("expected s3://BUCKET/PREFIX")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise bad("a query or fragment has no meaning here")
        if "@" in parts.netloc or ":" in parts.netloc:
            raise bad("credentials and ports do not belong in the URL (the endpoint and keys "
                      f"come from ${ENV_ENDPOINT}, ${ENV_ACCESS_KEY}, ${ENV_SECRET_KEY})")
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise bad(f"bucket {bucket!r} is not a valid S3 bucket name (3..63 lowercase "
                      "letters, digits, '.', '-')")
        prefix = parts.path.strip("/")
        if len(prefix) > _MAX_PREFIX:
            raise bad(f"the prefix is longer than {_MAX_PREFIX} characters")
        for part in prefix.split("/") if prefix else ():
            if not is_safe_name(part):
                raise bad(f"prefix part {part!r} is not a safe name (letters, digits, '_', "
                          "'.', '-', not starting with a symbol, no empty parts)")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str, version: str) -> str:
        """The object key of a version's artifact; ArtifactConfigError for unsafe names."""
        for label, part in (("model name", name), ("version", version)):
            if not is_safe_name(part):
                raise ArtifactConfigError(f"{label} {part!r} is not a safe name; no key in "
                                          f"{self.url} is made from it")
        key = f"{name}/{version}/{ARTIFACT_FILE}"
        return f"{self.prefix}/{key}" if self.prefix else key


@dataclass(frozen=True)
class S3Config:
    """A validated artifact store: location, endpoint, region and key pair (the keys are
    kept out of `repr`)."""

    location: S3Location
    endpoint: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = DEFAULT_REGION

    @classmethod
    def from_env(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Config:
        """The store at `url` with the endpoint, keys and region of `environ` (default
        `os.environ`); ArtifactConfigError names every missing or malformed setting."""
        import os

        env = os.environ if environ is None else environ
        location = S3Location.parse(url)
        where = f"artifact store {location.url}"
        missing = [name for name in (ENV_ENDPOINT, ENV_ACCESS_KEY, ENV_SECRET_KEY)
                   if not env.get(name, "").strip()]
        if missing:
            raise ArtifactConfigError(
                f"{where}: {', '.join(missing)} not set (the endpoint and key pair are "
                "required; no default credential is used)")
        endpoint = _check_endpoint(where, env[ENV_ENDPOINT].strip())
        for name in (ENV_ACCESS_KEY, ENV_SECRET_KEY):
            if not _CREDENTIAL.fullmatch(env[name].strip()):
                raise ArtifactConfigError(f"{where}: {name} is not a single printable word")
        region = env.get(ENV_REGION, "").strip() or DEFAULT_REGION
        if not _REGION.fullmatch(region):
            raise ArtifactConfigError(f"{where}: {ENV_REGION} {region!r} is not a region name")
        return cls(location, endpoint, env[ENV_ACCESS_KEY].strip(),
                   env[ENV_SECRET_KEY].strip(), region)

    def describe(self) -> str:
        return f"{self.location.url} at {self.endpoint}"


def _check_endpoint(where: str, endpoint: str) -> str:
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as err:
        raise ArtifactConfigError(f"{where}: {ENV_ENDPOINT} {endpoint!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ArtifactConfigError(f"{where}: {ENV_ENDPOINT} {endpoint!r} is not an "
                                  "http(s)://host[:port] URL")
    if parts.username is not None or parts.query or parts.fragment or parts.path not in ("",
                                                                                        "/"):
        raise ArtifactConfigError(f"{where}: {ENV_ENDPOINT} {endpoint!r} must be only "
                                  "scheme://host[:port] (no credentials, path or query)")
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact object as the store holds it. `uploaded` is False when `upload` found
    it already there (and for `check`)."""

    name: str
    version: str
    key: str
    size: int
    sha256: str
    uploaded: bool = False


class S3Artifacts:
    """Published artifacts in one S3 location (see the module's contracts).

    The boto3 client is made on first use (or injected as `client`, which must then be a
    path-style, SigV4 S3 client for `config.endpoint`); boto3 clients are thread-safe."""

    def __init__(self, config: S3Config, *, client: Any | None = None) -> None:
        self.config = config
        self._client = client
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, url: str, environ: Mapping[str, str] | None = None) -> S3Artifacts:
        """The store at `s3://BUCKET/PREFIX` configured from the environment (see
        `S3Config.from_env`); raises ArtifactConfigError, makes no request."""
        return cls(S3Config.from_env(url, environ))

    def __repr__(self) -> str:
        return f"S3Artifacts({self.config.describe()})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (made on first use)."""
        with self._lock:
            if self._client is None:
                self._client = _make_client(self.config)
            return self._client

    def key(self, name: str, version: str) -> str:
        return self.config.location.key(name, version)

    # ---- operations ---------------------------------------------------------------------

    def upload(self, published: Published) -> StoredArtifact:
        """Put the artifact of `published` (its local file, checked against its manifest)
        at its key, unless the same bytes are already there; verify it with a HEAD.
        Raises ArtifactConflict when the store holds other bytes for that version."""
        manifest = published.manifest
        name, version = manifest.model_name, manifest.version
        key = self.key(name, version)
        label = f"model {manifest.ref}"
        try:
            data = published.artifact_path.read_bytes()
            verify_artifact(manifest, data)
        except OSError as err:
            raise ArtifactError(f"{label}: cannot read {published.artifact_path} "
                                f"({err.strerror})") from err
        except ManifestError as err:
            raise ArtifactError(f"{label}: the local artifact does not match its manifest; "
                                f"not uploaded ({err})") from err
        digest = manifest.sha256

        existing = self._head(key, label)
        if existing is not None:
            return self._same(name, version, key, existing, digest, len(data))
        try:
            self._call(f"{label}: PUT {key}", self.client.put_object, Bucket=self._bucket,
                       Key=key, Body=data, ContentType=_CONTENT_TYPE,
                       Metadata={SHA256_METADATA: digest}, IfNoneMatch="*")
        except _PreconditionFailed:
            # Another publisher's object appeared since the HEAD: it must be these bytes.
            existing = self._head(key, label)
            if existing is None:
                raise ArtifactError(f"{label}: {key} in {self.config.describe()} was "
                                    "created and removed during the upload; try again") from None
            return self._same(name, version, key, existing, digest, len(data))

        stored = self._head(key, label)
        if stored is None:
            raise ArtifactError(f"{label}: {key} is missing from {self.config.describe()} "
                                "right after its upload")
        size, found = _size(stored), _metadata_sha256(stored)
        if size != len(data) or found != digest:
            raise ArtifactError(
                f"{label}: verification after upload failed for {key} in "
                f"{self.config.describe()}: {size} bytes with sha256 {found!r}, expected "
                f"{len(data)} bytes with {digest}")
        return StoredArtifact(name, version, key, size, digest, uploaded=True)

    def check(self, name: str, version: str, sha256: str, *,
              size: int | None = None) -> StoredArtifact:
        """The stored artifact of `name`/`version` if its metadata says `sha256` (and its
        size is `size`, when given). Raises ArtifactMissing, ArtifactConflict, or another
        ArtifactError when the store cannot say (one HEAD request)."""
        key = self.key(name, version)
        label = f"model {name}/{version}"
        stored = self._head(key, label)
        if stored is None:
            raise ArtifactMissing(f"{label}: no {key} in {self.config.describe()}")
        return self._same(name, version, key, stored, sha256.lower(), size)

    def presign(self, name: str, version: str, expires_s: float) -> str:
        """A GET URL of the artifact of `name`/`version`, valid for `expires_s` seconds
        (bounded, see `check_url_ttl`). Local: no request is made, nothing is checked."""
        key = self.key(name, version)
        expires = check_url_ttl(expires_s)
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self._bucket, "Key": key}, ExpiresIn=expires)
        return url

    # ---- helpers ------------------------------------------------------------------------

    @property
    def _bucket(self) -> str:
        return self.config.location.bucket

    def _head(self, key: str, label: str) -> dict[str, Any] | None:
        """The HEAD answer of `key`, None when there is no such object."""
        try:
            answer: dict[str, Any] = self._call(f"{label}: HEAD {key}", self.client.head_object,
                                                Bucket=self._bucket, Key=key)
        except ArtifactMissing:
            return None
        return answer

    def _same(self, name: str, version: str, key: str, stored: dict[str, Any], digest: str,
              size: int | None) -> StoredArtifact:
        found, found_size = _metadata_sha256(stored), _size(stored)
        if found != digest or (size is not None and found_size != size):
            what = (f"sha256 {found[:16]}…" if found else "no sha256 metadata")
            raise ArtifactConflict(
                f"model {name}/{version}: {key} in {self.config.describe()} holds other "
                f"bytes ({found_size} bytes, {what}; expected sha256 {digest[:16]}…); a "
                "published version is immutable (publish a new version instead)")
        return StoredArtifact(name, version, key, found_size, found)

    def _call(self, what: str, operation: Any, **params: Any) -> Any:
        """`operation(**params)` with botocore's errors converted (see the module doc)."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.config.describe()
        try:
            return operation(**params)
        except ClientError as err:
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            answer = code if code in ("", str(status)) else f"{status} {code}"
            detail = f"{what} in {where}: {answer or status} {error.get('Message', '')}".strip()
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactMissing(detail) from err
            if code in ("412", "PreconditionFailed", "ConditionalRequestConflict"):
                raise _PreconditionFailed(detail) from err
            if code == "NoSuchBucket":
                raise ArtifactError(f"{detail} (create the bucket first)") from err
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ArtifactError(f"{detail} (check {ENV_ACCESS_KEY} and {ENV_SECRET_KEY} "
                                    "and the key's rights on the bucket)") from err
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling"):
                raise ArtifactUnavailable(detail) from err
            raise ArtifactError(detail) from err
        except BotoCoreError as err:
            raise ArtifactUnavailable(f"{what} in {where}: {err}") from err


class _PreconditionFailed(ArtifactError):
    """A conditional write lost (the object exists); handled inside `upload`."""


def _make_client(config: S3Config) -> Any:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    try:
        # A session of its own, with the keys given: boto3's credential chain is never used.
        session = boto3.session.Session(aws_access_key_id=config.access_key,
                                        aws_secret_access_key=config.secret_key,
                                        region_name=config.region)
        return session.client(
            "s3",
            endpoint_url=config.endpoint,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                retries={"mode": "standard", "max_attempts": 3},
            ),
        )
    except BotoCoreError as err:
        raise ArtifactConfigError(f"artifact store {config.describe()}: {err}") from err


def _metadata_sha256(head: Mapping[str, Any]) -> str:
    metadata = head.get("Metadata") or {}
    value = metadata.get(SHA256_METADATA, "")
    return str(value).strip().lower()


def _size(head: Mapping[str, Any]) -> int:
    return int(head.get("ContentLength", -1))

