"""Enrollment from the device's side (edge-agent/enroll.py, `edgefleet agent enroll`) and
the control plane's device CA (cloud/control/certs.py).

`enroll()` talks to the control plane in process (FastAPI TestClient behind an httpx
transport that also records every request body); the command line runs against a real
`edgefleet control run` on a loopback port (`ControlProcess`), as a user types it."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi.testclient import TestClient

from edgefleet.cloud.control.app import ControlSettings, create_app
from edgefleet.cloud.control.certs import CA_FOLDER
from edgefleet.cloud.control.harness import ControlProcess, free_port
from edgefleet.deploy.cli import main
from edgefleet.edge_agent.enroll import EnrollError, enroll
from edgefleet.edge_agent.fleet import FleetConfig
from edgefleet.protocols.manifest import key_id, load_signing_key


@dataclass
class Plane:
    """The control plane in process; `transport()` reaches it from `enroll()`."""

    http: TestClient
    admin: dict[str, str]
    state_dir: Path
    bodies: list[bytes] = field(default_factory=list)  # every request enroll() sent

    def token(self) -> str:
        made = self.http.post("/v1/enrollment-tokens", json={"labels": {"site": "a"}},
                              headers=self.admin)
        assert made.status_code == 201, made.text
        token: str = made.json()["token"]
        return token

    def transport(self) -> httpx.MockTransport:
        def forward(request: httpx.Request) -> httpx.Response:
            self.bodies.append(request.content)
            answer = self.http.request(request.method, request.url.path,
                                       content=request.content,
                                       headers={"Content-Type": "application/json"})
            return httpx.Response(answer.status_code, content=answer.content,
                                  headers={"Content-Type": answer.headers["content-type"]})

        return httpx.MockTransport(forward)

    def fleet_key_id(self) -> str:
        return key_id(load_signing_key(self.state_dir / "fleet-signing-key.pem").public_key())


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    folder = tmp_path_factory.mktemp("control")
    settings = ControlSettings(database_url=f"sqlite:///{folder}/control.db",
                               state_dir=folder / "state", tick_s=3600.0)
    app = create_app(settings)
    admin = (folder / "state" / "admin.token").read_text().strip()
    with TestClient(app) as http:
        yield Plane(http, {"Authorization": f"Bearer {admin}"}, folder / "state")


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlProcess]:
    with ControlProcess(tmp_path_factory.mktemp("control-process")) as process:
        yield process


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---- enroll() in process -----------------------------------------------------------------


def test_enroll_writes_the_token_and_the_fleet_key_and_the_token_works(
    plane: Plane, tmp_path: Path
) -> None:
    result = enroll("http://control.test", plane.token(), "gw-plain", tmp_path / "state",
                    transport=plane.transport())
    state = tmp_path / "state"
    assert result.token_file == state / "device.token"
    assert _mode(state / "device.token") == 0o600
    assert _mode(state) == 0o700  # made here
    assert not (state / "device.key").exists() and not (state / "device.crt").exists()
    assert result.key_id == plane.fleet_key_id()  # the key that signs the fleet's models
    assert (state / "fleet-public-key.pem").read_text().startswith("-----BEGIN PUBLIC KEY")
    assert sorted(p.name for p in state.iterdir()) == ["device.token", "fleet-public-key.pem"]

    token = (state / "device.token").read_text().strip()
    desired = plane.http.get("/v1/device/desired", headers={"Authorization": f"Bearer {token}"})
    assert desired.status_code == 200, desired.text
    assert desired.json()["device"] == "gw-plain"


def test_with_cert_the_key_stays_here_and_the_certificate_is_a_client_cert_of_the_ca(
    plane: Plane, tmp_path: Path
) -> None:
    plane.bodies.clear()
    before = dt.datetime.now(dt.UTC)
    result = enroll("http://control.test", plane.token(), "gw-cert", tmp_path,
                    cert=True, transport=plane.transport())

    assert _mode(tmp_path / "device.key") == 0o600
    key = serialization.load_pem_private_key((tmp_path / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    # The private key never left: one request, holding a CSR and no private material.
    assert len(plane.bodies) == 1
    sent = plane.bodies[0]
    assert b"CERTIFICATE REQUEST" in sent and b"PRIVATE" not in sent
    scalar = key.private_numbers().private_value
    for form in (scalar.to_bytes(32, "big"), f"{scalar:x}".encode(), str(scalar).encode(),
                 (tmp_path / "device.key").read_bytes()):
        assert form not in sent

    cert = x509.load_pem_x509_certificate((tmp_path / "device.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    # RFC 5280 path validation as a TLS server would do it for a client certificate.
    verifier = (x509.verification.PolicyBuilder()
                .store(x509.verification.Store([ca])).build_client_verifier())
    verified = verifier.verify(cert, [])
    assert verified.subjects == [x509.UniformResourceIdentifier("urn:edgefleet:device:gw-cert")]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-cert"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    lifetime = cert.not_valid_after_utc - before
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365, minutes=1)
    assert cert.serial_number.bit_length() > 64  # random, not a counter

    # The CA lives in the control plane's state folder, its key readable by it alone; the
    # serial and expiry are in the enrollment's audit event.
    assert _mode(plane.state_dir / CA_FOLDER / "ca.key") == 0o600
    assert (plane.state_dir / CA_FOLDER / "ca.pem").read_bytes() == (tmp_path / "ca.pem") \
        .read_bytes()
    events = plane.http.get("/v1/audit", params={"limit": 1000},
                            headers=plane.admin).json()["events"]
    detail = next(e["detail"] for e in events
                  if e["action"] == "device.enroll" and e["target"] == "gw-cert")
    assert detail["certificate_serial"] == f"{cert.serial_number:x}" == result.cert_serial
    assert dt.datetime.fromisoformat(detail["certificate_not_after"]) \
        == cert.not_valid_after_utc


def _csr(common_names: list[str], curve: ec.EllipticCurve | None = None) -> str:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key,
                                                                             hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("csr", "reason"), [
    (_csr(["gw-other"]), "CN must be the device name 'gw-bad' (found 'gw-other')"),
    (_csr(["gw-bad", "gw-other"]), "CN must be the device name"),
    (_csr([]), "(found none)"),
    (_csr(["gw-bad"], ec.SECP256K1()), "EC curve secp256k1 is not accepted"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate signing request"),
    ("hello", "not a PEM certificate signing request"),
])
def test_a_csr_that_does_not_check_out_is_refused_and_the_token_is_not_spent(
    plane: Plane, csr: str, reason: str
) -> None:
    token = plane.token()
    refused = plane.http.post("/v1/enroll", json={"token": token, "device": "gw-bad",
                                                  "csr": csr})
    assert refused.status_code == 400, refused.text
    assert reason in refused.json()["detail"]
    listed = plane.http.get("/v1/devices", params={"target": "device=gw-bad"},
                            headers=plane.admin)
    assert listed.json()["devices"] == [], listed.text
    assert plane.http.post("/v1/enroll", json={"token": token, "device": f"gw-bad-{id(csr)}"}) \
        .status_code == 201  # the refusal did not use the token


def test_a_csr_with_a_broken_signature_is_refused(plane: Plane) -> None:
    pem = _csr(["gw-forged"])
    request = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    refused = plane.http.post("/v1/enroll", json={"token": plane.token(), "device": "gw-forged",
                                                  "csr": forged.decode()})
    assert refused.status_code == 400
    assert "signature does not verify" in refused.json()["detail"], refused.text


def test_a_used_token_an_enrolled_device_and_bad_arguments_are_told_apart(
    plane: Plane, tmp_path: Path
) -> None:
    token = plane.token()
    enroll("http://control.test", token, "gw-twice", tmp_path / "a", transport=plane.transport())
    with pytest.raises(EnrollError, match=r"token was refused: .*used or expired") as used:
        enroll("http://control.test", token, "gw-twice-2", tmp_path / "b",
               transport=plane.transport())
    with pytest.raises(EnrollError, match="gw-twice is already enrolled") as enrolled:
        enroll("http://control.test", plane.token(), "gw-twice", tmp_path / "c",
               transport=plane.transport())
    assert "the token was not spent" in str(enrolled.value)
    assert used.value.exit_code == enrolled.value.exit_code == 1
    assert not (tmp_path / "b" / "device.token").exists()  # nothing written on a refusal
    sent = len(plane.bodies)
    for url, device, problem in (("ftp://x", "gw", "--url"), ("http://x", "-gw", "--device"),
                                 ("http://x", "gw/../x", "--device")):
        with pytest.raises(EnrollError, match=problem) as bad:
            enroll(url, token, device, tmp_path / "d", transport=plane.transport())
        assert bad.value.exit_code == 2
    assert len(plane.bodies) == sent  # nothing was sent


# ---- the command line against `edgefleet control run` -----------------------------------


def _token(control: ControlProcess) -> str:
    made = httpx.post(f"{control.url}/v1/enrollment-tokens", json={"groups": ["pumps"]},
                      headers=control.operator_headers(), timeout=10)
    assert made.status_code == 201, made.text
    token: str = made.json()["token"]
    return token


def test_the_command_prints_a_fleet_section_that_the_agent_config_accepts(
    control: ControlProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    assert main(["agent", "enroll", "--url", control.url, "--token", _token(control),
                 "--device", "gw-cli", "--state-dir", str(state), "--cert"]) == 0
    out, err = capsys.readouterr()
    assert "enrolled gw-cli" in err and "trusted on first use" in err
    fleet = FleetConfig.model_validate(yaml.safe_load(out)["fleet"])
    assert fleet.url == control.url
    assert fleet.token_file == state / "device.token"
    assert [key_id(k) for k in fleet.load_public_keys()] == [
        key_id(load_signing_key(control.state_dir / "fleet-signing-key.pem").public_key())]
    desired = httpx.get(f"{control.url}/v1/device/desired", timeout=10,
                        headers={"Authorization": f"Bearer {fleet.read_token()}"})
    assert desired.status_code == 200 and desired.json()["device"] == "gw-cli"
    assert {p.name for p in state.iterdir()} == {"device.token", "fleet-public-key.pem",
                                                 "device.key", "device.crt", "ca.pem"}

    # As installed: the `edgefleet` entry point, the token on stdin, the section to a file.
    written = tmp_path / "fleet.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "agent", "enroll", "--url", control.url,
         "--token", "-", "--device", "gw-cli-2", "--state-dir", str(tmp_path / "s2"),
         "--write-config", str(written)],
        input=_token(control) + "\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and f"wrote the fleet: section to {written}" in done.stderr
    fleet = FleetConfig.model_validate(yaml.safe_load(written.read_text())["fleet"])
    assert fleet.token_file == tmp_path / "s2" / "device.token"


def test_the_command_says_why_and_exits_1_when_refused_or_unreachable(
    control: ControlProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(control)
    args = ["agent", "enroll", "--url", control.url, "--state-dir", str(tmp_path / "s")]
    assert main([*args, "--token", token, "--device", "gw-reuse"]) == 0
    capsys.readouterr()
    assert main([*args, "--token", token, "--device", "gw-reuse-2"]) == 1
    err = capsys.readouterr().err
    assert "enrollment token was refused" in err and "used or expired" in err

    assert main([*args, "--token", _token(control), "--device", "gw-reuse"]) == 1
    assert "gw-reuse is already enrolled" in capsys.readouterr().err

    nobody = f"http://127.0.0.1:{free_port()}"
    assert main(["agent", "enroll", "--url", nobody, "--token", token, "--device", "gw-x",
                 "--state-dir", str(tmp_path / "s")]) == 1
    assert "cannot connect" in capsys.readouterr().err


def test_a_server_certificate_from_an_unknown_ca_is_a_tls_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet.deploy.services.pki import ensure_ca, ensure_server_cert

    ca = ensure_ca(tmp_path / "pki")
    server_cert = ensure_server_cert(ca, tmp_path / "pki", "control")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert, server_cert.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection, pytest.raises(ssl.SSLError):
            context.wrap_socket(connection, server_side=True)  # the client gives up

    server = threading.Thread(target=serve_one, daemon=True)
    server.start()
    try:
        assert main(["agent", "enroll", "--url", f"https://127.0.0.1:{port}",
                     "--token", "t" * 43, "--device", "gw-tls",
                     "--state-dir", str(tmp_path / "s")]) == 1
    finally:
        server.join(timeout=10)
        listener.close()
    err = capsys.readouterr().err
    assert "TLS failure" in err and "certificate" in err, err
    assert not (tmp_path / "s" / "device.token").exists()


@pytest.mark.parametrize(("extra", "problem"), [
    (["--url", "http://127.0.0.1:1", "--ca-file", "ca.pem"], "--ca-file: set for a plain"),
    (["--url", "https://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"], "is not a file"),
    (["--url", "127.0.0.1:8700"], "--url: expected http(s)://"),
])
def test_bad_arguments_exit_2_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], problem: str
) -> None:
    assert main(["agent", "enroll", "--token", "t" * 43, "--device", "gw",
                 "--state-dir", str(tmp_path / "s"), *extra]) == 2
    assert problem in capsys.readouterr().err
