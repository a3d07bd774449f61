"""The S3 artifact store's settings and logic (cloud/control/artifacts.py) with an injected
fake S3 client: URL and environment parsing errors, URL lifetimes, names checked before any
request, the idempotent and immutable upload (a racing publisher included), and botocore's
errors converted at the boundary. The real server is in tests/integration/test_control_s3.py."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.cloud.control import cli
from edgefleet.cloud.control.artifacts import (
    ENV_ACCESS_KEY,
    ENV_ENDPOINT,
    ENV_REGION,
    ENV_SECRET_KEY,
    MAX_URL_TTL_S,
    MIN_URL_TTL_S,
    ArtifactConfigError,
    ArtifactConflict,
    ArtifactError,
    ArtifactMissing,
    ArtifactUnavailable,
    S3Artifacts,
    S3Config,
    S3Location,
    check_url_ttl,
)
from edgefleet.cloud.control.publish import (
    ARTIFACT_FILE,
    MANIFEST_FILE,
    Published,
    load_published,
)
from edgefleet.cloud.reference_models import build_zscore_model
from edgefleet.deploy.cli import CliError
from edgefleet.protocols.features import FeatureSpec
from edgefleet.protocols.manifest import ModelManifest, sha256_hex, sign_manifest

SECRET = "sEcReT-never-shown-0123456789"
ENV = {ENV_ENDPOINT: "http://127.0.0.1:9000", ENV_ACCESS_KEY: "edgefleet-key",
       ENV_SECRET_KEY: SECRET}
SPEC = FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))
WIDTH = len(SPEC.feature_names())
KEY = Ed25519PrivateKey.generate()


# --- URL and environment --------------------------------------------------------------------


@pytest.mark.parametrize(("url", "bucket", "prefix"), [
    ("s3://edgefleet-models", "edgefleet-models", ""),
    ("s3://edgefleet-models/", "edgefleet-models", ""),
    ("s3://edgefleet-models/fleet", "edgefleet-models", "fleet"),
    ("s3://my.models-1/plant-a/v2.models/", "my.models-1", "plant-a/v2.models"),
])
def test_good_urls_parse(url: str, bucket: str, prefix: str) -> None:
    location = S3Location.parse(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert S3Location.parse(location.url) == location
    expected = f"{prefix}/pump/3/{ARTIFACT_FILE}" if prefix else f"pump/3/{ARTIFACT_FILE}"
    assert location.key("pump", "3") == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("", "expected s3://"),
    ("edgefleet-models/fleet", "expected s3://"),
    ("http://edgefleet-models/fleet", "expected s3://"),
    ("S3://edgefleet-models", "expected s3://"),
    ("s3:/edgefleet-models", "expected s3://"),
    ("s3://", "not a valid S3 bucket name"),
    ("s3://ab", "not a valid S3 bucket name"),
    ("s3://Edgefleet-Models", "not a valid S3 bucket name"),
    ("s3://edgefleet_models", "not a valid S3 bucket name"),
    ("s3://-models", "not a valid S3 bucket name"),
    ("s3://models..x", "not a valid S3 bucket name"),
    ("s3://" + "a" * 64, "not a valid S3 bucket name"),
    ("s3://key:secret@edgefleet-models/fleet", "credentials and ports"),
    ("s3://edgefleet-models:9000/fleet", "credentials and ports"),
    ("s3://edgefleet-models/fleet?versionId=1", "query or fragment"),
    ("s3://edgefleet-models/fleet#x", "query or fragment"),
    ("s3://edgefleet-models/fleet/../other", "'..' is not a safe name"),
    ("s3://edgefleet-models/a//b", "'' is not a safe name"),
    ("s3://edgefleet-models/.hidden", "'.hidden' is not a safe name"),
    ("s3://edgefleet-models/with space", "'with space' is not a safe name"),
    ("s3://edgefleet-models/" + "a/" * 300, "longer than 512"),
])
def test_bad_urls_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ArtifactConfigError, match="artifact store URL") as err:
        S3Location.parse(url)
    assert reason in str(err.value)
    assert isinstance(err.value, ValueError)  # callers converting ValueError catch it too


def test_settings_come_from_the_environment_given() -> None:
    config = S3Config.from_env("s3://edgefleet-models/fleet",
                               {**ENV, ENV_ENDPOINT: "https://s3.example:8333/"})
    assert config.endpoint == "https://s3.example:8333"
    assert (config.access_key, config.secret_key, config.region) \
        == ("edgefleet-key", SECRET, "us-east-1")
    assert config.describe() == "s3://edgefleet-models/fleet at https://s3.example:8333"
    assert S3Config.from_env("s3://b-1", {**ENV, ENV_REGION: "eu-west-3"}).region == "eu-west-3"
    store = S3Artifacts(config)
    for text in (repr(config), repr(store)):
        assert SECRET not in text and "edgefleet-key" not in text


def test_every_missing_setting_is_named_and_there_is_no_default_credential() -> None:
    with pytest.raises(ArtifactConfigError) as err:
        S3Config.from_env("s3://edgefleet-models/fleet", {})
    message = str(err.value)
    assert message.startswith("artifact store s3://edgefleet-models/fleet: ")
    for name in (ENV_ENDPOINT, ENV_ACCESS_KEY, ENV_SECRET_KEY):
        assert name in message
    assert "no default credential" in message

    # Blank counts as missing; the others present are not named.
    with pytest.raises(ArtifactConfigError) as err:
        S3Config.from_env("s3://edgefleet-models", {**ENV, ENV_SECRET_KEY: "  "})
    assert ENV_SECRET_KEY in str(err.value)
    assert ENV_ACCESS_KEY not in str(err.value) and ENV_ENDPOINT not in str(err.value)


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert S3Config.from_env("s3://edgefleet-models").endpoint == ENV[ENV_ENDPOINT]
    monkeypatch.delenv(ENV_ACCESS_KEY)
    with pytest.raises(ArtifactConfigError, match=ENV_ACCESS_KEY):
        S3Artifacts.from_env("s3://edgefleet-models")


@pytest.mark.parametrize(("setting", "value", "reason"), [
    (ENV_ENDPOINT, "127.0.0.1:9000", "not an http(s)://host[:port] URL"),
    (ENV_ENDPOINT, "ftp://127.0.0.1:9000", "not an http(s)://host[:port] URL"),
    (ENV_ENDPOINT, "http://", "not an http(s)://host[:port] URL"),
    (ENV_ENDPOINT, "http://127.0.0.1:99999", "out of range"),
    (ENV_ENDPOINT, "http://user:pw@127.0.0.1:9000", "no credentials, path or query"),
    (ENV_ENDPOINT, "http://127.0.0.1:9000/s3", "no credentials, path or query"),
    (ENV_ENDPOINT, "http://127.0.0.1:9000?x=1", "no credentials, path or query"),
    (ENV_ACCESS_KEY, "two words", "not a single printable word"),
    (ENV_SECRET_KEY, "line\nbreak", "not a single printable word"),
    (ENV_REGION, "Mars Base", "not a region name"),
])
def test_malformed_settings_are_named(setting: str, value: str, reason: str) -> None:
    with pytest.raises(ArtifactConfigError) as err:
        S3Config.from_env("s3://edgefleet-models", {**ENV, setting: value})
    assert setting in str(err.value) and reason in str(err.value)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("seconds", [0, 59.9, MAX_URL_TTL_S + 1, -60, math.nan, math.inf])
def test_url_lifetimes_out_of_bounds_are_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="between 60 s and 604800 s"):
        check_url_ttl(seconds)


def test_url_lifetimes_within_bounds_are_whole_seconds() -> None:
    assert check_url_ttl(MIN_URL_TTL_S) == 60
    assert check_url_ttl(3600.9) == 3600
    assert check_url_ttl(MAX_URL_TTL_S) == 7 * 24 * 3600


def test_the_real_client_signs_path_style_v4_urls_with_the_given_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # boto3's own credential chain must not be used, even when the environment offers one.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NOT-OURS")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-ours")
    store = S3Artifacts.from_env("s3://edgefleet-models/fleet", ENV)
    url = store.presign("pump", "3", 600)  # local: nothing listens on the endpoint
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == ENV[ENV_ENDPOINT]
    assert parts.path == f"/edgefleet-models/fleet/pump/3/{ARTIFACT_FILE}"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-Credential"][0].startswith("edgefleet-key/")
    assert "/us-east-1/s3/aws4_request" in query["X-Amz-Credential"][0]
    assert SECRET not in url


# --- the operations, on a fake S3 -----------------------------------------------------------


def _client_error(code: str, status: int, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"fake {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


class FakeS3:
    """The S3 client calls S3Artifacts makes, over a dict; `racer` is an object another
    publisher puts between our HEAD and our PUT; `fail` is raised by every call."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.calls: list[tuple[str, str]] = []
        self.racer: tuple[bytes, dict[str, str]] | None = None
        self.fail: Exception | None = None
        self.keep_metadata = True

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self.calls.append(("head", f"{Bucket}/{Key}"))
        if self.fail is not None:
            raise self.fail
        if Key not in self.objects:
            raise _client_error("404", 404, "HeadObject")
        data, metadata = self.objects[Key]
        return {"ContentLength": len(data), "Metadata": dict(metadata)}

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, ContentType: str,
                   Metadata: dict[str, str], IfNoneMatch: str) -> dict[str, Any]:
        self.calls.append(("put", f"{Bucket}/{Key}"))
        assert ContentType == "application/octet-stream" and IfNoneMatch == "*"
        if self.racer is not None:
            self.objects[Key], self.racer = self.racer, None
        if Key in self.objects:
            raise _client_error("PreconditionFailed", 412, "PutObject")
        self.objects[Key] = (Body, dict(Metadata) if self.keep_metadata else {})
        return {}

    def generate_presigned_url(self, operation: str, *, Params: dict[str, str],
                               ExpiresIn: int) -> str:
        self.calls.append(("presign", f"{Params['Bucket']}/{Params['Key']}"))
        assert operation == "get_object" and isinstance(ExpiresIn, int)
        return f"http://s3.test/{Params['Bucket']}/{Params['Key']}?X-Amz-Expires={ExpiresIn}"


def _store(fake: FakeS3) -> S3Artifacts:
    return S3Artifacts(S3Config.from_env("s3://edgefleet-models/fleet", ENV), client=fake)


def _published(folder: Path, name: str = "pump", version: str = "3",
               mean: float = 1.0) -> Published:
    """A genuine ONNX model and its signed manifest, laid out as publish.py stores them."""
    target = folder / name / version
    target.mkdir(parents=True)
    data = build_zscore_model(target / ARTIFACT_FILE, SPEC, means=[mean] * WIDTH,
                              stds=[1.0] * WIDTH, name=name, version=version).read_bytes()
    manifest = sign_manifest(ModelManifest.model_validate({
        "model_name": name, "version": version, "sha256": sha256_hex(data),
        "size": len(data), "feature_schema_hash": SPEC.schema_hash(),
        "source": f"models:/{name}/{version}", "created_at": 1}), KEY)
    (target / MANIFEST_FILE).write_text(manifest.to_json())
    return load_published(folder, name, version)


def test_upload_puts_verifies_and_is_idempotent(tmp_path: Path) -> None:
    fake = FakeS3()
    store = _store(fake)
    published = _published(tmp_path)
    key = f"fleet/pump/3/{ARTIFACT_FILE}"

    stored = store.upload(published)
    assert stored.uploaded and stored.key == key
    assert (stored.size, stored.sha256) == (published.manifest.size, published.manifest.sha256)
    assert fake.objects[key] == (published.artifact_path.read_bytes(),
                                 {"sha256": published.manifest.sha256})
    assert [op for op, _ in fake.calls] == ["head", "put", "head"]  # verified after the PUT

    fake.calls.clear()
    again = store.upload(published)
    assert not again.uploaded and again.sha256 == stored.sha256
    assert [op for op, _ in fake.calls] == ["head"]  # nothing written
    assert store.check("pump", "3", published.manifest.sha256.upper(),
                       size=published.manifest.size).key == key


def test_other_bytes_for_a_stored_version_are_refused(tmp_path: Path) -> None:
    fake = FakeS3()
    store = _store(fake)
    first = _published(tmp_path / "a")
    store.upload(first)
    other = _published(tmp_path / "b", mean=5.0)
    assert other.manifest.sha256 != first.manifest.sha256

    with pytest.raises(ArtifactConflict, match="immutable"):
        store.upload(other)
    with pytest.raises(ArtifactConflict):
        store.check("pump", "3", other.manifest.sha256)
    with pytest.raises(ArtifactConflict):
        store.check("pump", "3", first.manifest.sha256, size=first.manifest.size + 1)
    assert fake.objects[store.key("pump", "3")][1] == {"sha256": first.manifest.sha256}
    with pytest.raises(ArtifactMissing):
        store.check("pump", "4", first.manifest.sha256)

    # An object someone put there by hand, without our metadata, is not ours to replace.
    fake.objects[store.key("pump", "3")] = (first.artifact_path.read_bytes(), {})
    with pytest.raises(ArtifactConflict, match="no sha256 metadata"):
        store.upload(first)


def test_a_racing_publisher_is_compared_not_overwritten(tmp_path: Path) -> None:
    fake = FakeS3()
    store = _store(fake)
    published = _published(tmp_path / "a")
    data = published.artifact_path.read_bytes()

    fake.racer = (data, {"sha256": published.manifest.sha256})  # the same bytes won
    stored = store.upload(published)
    assert not stored.uploaded
    assert [op for op, _ in fake.calls] == ["head", "put", "head"]

    other = _published(tmp_path / "b", version="4", mean=7.0)
    fake.racer = (data, {"sha256": published.manifest.sha256})  # other bytes won
    with pytest.raises(ArtifactConflict):
        store.upload(other)
    assert fake.objects[store.key("pump", "4")][0] == data


def test_an_upload_that_does_not_verify_is_an_error(tmp_path: Path) -> None:
    fake = FakeS3()
    fake.keep_metadata = False  # a server that drops user metadata
    with pytest.raises(ArtifactError, match="verification after upload failed"):
        _store(fake).upload(_published(tmp_path))


def test_a_local_artifact_that_does_not_match_its_manifest_is_not_uploaded(
    tmp_path: Path,
) -> None:
    fake = FakeS3()
    published = _published(tmp_path)
    published.artifact_path.write_bytes(published.artifact_path.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        _store(fake).upload(published)
    published.artifact_path.unlink()
    with pytest.raises(ArtifactError, match="cannot read"):
        _store(fake).upload(published)
    assert fake.calls == []


@pytest.mark.parametrize(("name", "version"), [
    ("../pump", "3"), ("pump", ".."), ("pump/x", "3"), ("", "3"), ("pump", ""),
    (".pump", "3"), ("pump", "3/../../etc"), ("pump", "a" * 129), ("pump\n", "3"),
])
def test_unsafe_names_are_refused_before_any_request(
    tmp_path: Path, name: str, version: str
) -> None:
    fake = FakeS3()
    store = _store(fake)
    with pytest.raises(ArtifactConfigError, match="is not a safe name"):
        store.presign(name, version, 600)
    with pytest.raises(ArtifactConfigError, match="is not a safe name"):
        store.check(name, version, "0" * 64)
    good = _published(tmp_path)
    # A manifest that skipped validation cannot steer the key either.
    forged = Published(good.manifest.model_construct(
        **{**good.manifest.model_dump(), "model_name": name, "version": version}),
        good.artifact_path, good.manifest_path)
    with pytest.raises(ArtifactConfigError, match="is not a safe name"):
        store.upload(forged)
    assert fake.calls == []


def test_presign_passes_a_bounded_lifetime(tmp_path: Path) -> None:
    fake = FakeS3()
    store = _store(fake)
    assert store.presign("pump", "3", 90.5).endswith("X-Amz-Expires=90")
    with pytest.raises(ValueError, match="between 60 s"):
        store.presign("pump", "3", 30)
    assert fake.calls == [("presign", f"edgefleet-models/fleet/pump/3/{ARTIFACT_FILE}")]


@pytest.mark.parametrize(("error", "kind", "says"), [
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9000"), ArtifactUnavailable,
     "Could not connect"),
    (_client_error("ServiceUnavailable", 503, "HeadObject"), ArtifactUnavailable, "503"),
    (_client_error("SlowDown", 503, "HeadObject"), ArtifactUnavailable, "SlowDown"),
    (_client_error("403", 403, "HeadObject"), ArtifactError, ENV_ACCESS_KEY),
    (_client_error("NoSuchBucket", 404, "HeadObject"), ArtifactError, "create the bucket"),
    (_client_error("InvalidRequest", 400, "HeadObject"), ArtifactError, "InvalidRequest"),
])
def test_store_errors_are_converted_and_name_the_store(
    error: Exception, kind: type[ArtifactError], says: str
) -> None:
    fake = FakeS3()
    fake.fail = error
    with pytest.raises(kind) as err:
        _store(fake).check("pump", "3", "0" * 64)
    message = str(err.value)
    assert says in message
    assert "s3://edgefleet-models/fleet at http://127.0.0.1:9000" in message
    assert SECRET not in message
    if kind is ArtifactError:
        assert not isinstance(err.value, ArtifactUnavailable | ArtifactMissing)


# --- edgefleet control run ------------------------------------------------------------------


def _run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["run", *argv])


def test_control_run_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_CONTROL_ARTIFACTS_S3", raising=False)
    args = _run_args()
    assert (args.artifacts_s3, args.artifact_url_ttl_s) == (None, 3600.0)
    monkeypatch.setenv("EDGEFLEET_CONTROL_ARTIFACTS_S3", "s3://edgefleet-models/fleet")
    assert _run_args().artifacts_s3 == "s3://edgefleet-models/fleet"
    assert _run_args("--artifacts-s3", "s3://other").artifacts_s3 == "s3://other"


@pytest.mark.parametrize(("argv", "env", "says"), [
    (("--artifacts-s3", "s3://Bad_Bucket"), ENV, "--artifacts-s3: artifact store URL"),
    (("--artifacts-s3", "https://edgefleet-models/fleet"), ENV, "expected s3://"),
    (("--artifacts-s3", "s3://edgefleet-models/fleet"), {}, ENV_SECRET_KEY),
    (("--artifacts-s3", "s3://edgefleet-models", "--artifact-url-ttl-s", "10"), ENV,
     "--artifact-url-ttl-s: a pre-signed URL's lifetime"),
    (("--artifact-url-ttl-s", "inf"), {}, "--artifact-url-ttl-s"),
])
def test_control_run_refuses_bad_artifact_settings_before_starting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: tuple[str, ...],
    env: dict[str, str], says: str,
) -> None:
    for name in (ENV_ENDPOINT, ENV_ACCESS_KEY, ENV_SECRET_KEY):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CliError) as err:
        cli.run(_run_args("--state-dir", str(tmp_path / "state"), *argv))
    assert says in str(err.value)
    assert SECRET not in str(err.value)
    assert not (tmp_path / "state").exists()  # refused before anything was made
