"""Enrollment from the device's side: a one-time token becomes the device's credentials.

```
enroll(url, token, device, state_dir, cert=…) ─► check the arguments and that state_dir is
    writable (nothing is sent before) ─► [cert: a new EC P-256 key, in memory; its CSR]
    ─► POST {url}/v1/enroll {token, device[, csr]} ─► check the answer ─► write state_dir:
       device.token (0600), fleet-public-key.pem[, device.key (0600), device.crt, ca.pem]
    ─► EnrollResult: the files, the fleet key's id, `fleet_section()` for the agent config
```

Contracts
---------
* **The private key never leaves the device.** It is generated here, only its CSR is sent,
  and it is written (mode 0600) once the control plane has answered with a certificate
  for exactly that key, CN=device, issued by the CA it returned.
* **Nothing is written unless the enrollment succeeded**, and the state folder is checked
  to be writable before the one-time token is spent. Each file is written to a temporary
  name and renamed over the old one, so enrolling again (after a revocation) replaces the
  previous credentials file by file.
* **Trust on first use.** `fleet-public-key.pem` (the key that signs the fleet's models)
  is what the control plane sent over this channel: as trustworthy as the channel. Use
  https with the control plane's CA (`ca_file`), and compare `EnrollResult.key_id` with
  the control plane's, or pin the key in the config instead (docs/control.md).
* **Errors.** `EnrollError.exit_code` is 2 for bad arguments (nothing was sent) and 1 for
  a refused or failed enrollment: the token unknown, used or expired (401), the device
  already enrolled (409, the token is not spent), a CSR refused (400), the control plane
  unreachable, a TLS failure, an answer that does not check out. The text says which and
  what to do.
* `transport` (an httpx transport) is for tests; `ca_file` and `timeout_s` apply otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import ssl
import tempfile
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.protocols.manifest import SAFE_NAME, ManifestError, key_id, load_public_key

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "PUBLIC_KEY_FILE",
    "TOKEN_FILE",
    "EnrollError",
    "EnrollResult",
    "enroll",
]

ENROLL_PATH: Final = "/v1/enroll"
TOKEN_FILE: Final = "device.token"  # noqa: S105 - a file name
PUBLIC_KEY_FILE: Final = "fleet-public-key.pem"
KEY_FILE: Final = "device.key"
CERT_FILE: Final = "device.crt"
CA_FILE: Final = "ca.pem"
MAX_ANSWER_BYTES: Final = 64 * 1024
_DEVICE = re.compile(SAFE_NAME)


class EnrollError(Exception):
    """A failed enrollment; `exit_code` 2: bad arguments (nothing sent), 1: refused/failed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class EnrollResult:
    device: str
    url: str
    state_dir: Path
    token_file: Path
    public_key_file: Path
    key_id: str  # of the fleet public key, to compare with the control plane's
    poll_s: float | None
    control_ca_file: Path | None = None  # the control plane's TLS CA, as given
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # the device CA that issued `cert_file`
    cert_serial: str | None = None
    cert_not_after: str | None = None

    def fleet_section(self) -> dict[str, Any]:
        """The agent config's `fleet:` mapping for these credentials (FleetConfig keys)."""
        section: dict[str, Any] = {"url": self.url, "token_file": str(self.token_file),
                                   "public_keys_file": str(self.public_key_file)}
        if self.control_ca_file is not None:
            section["ca_file"] = str(self.control_ca_file)
        return section


def enroll(
    url: str,
    token: str,
    device: str,
    state_dir: Path,
    *,
    cert: bool = False,
    ca_file: Path | None = None,
    timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> EnrollResult:
    """Enroll `device` with the one-time `token` at the control plane `url` and write its
    credentials into `state_dir` (see the module contracts). Raises EnrollError."""
    url = url.rstrip("/")
    token = token.strip()
    _check_arguments(url, token, device, ca_file)
    state_dir = state_dir.expanduser().resolve()
    _check_writable(state_dir)
    control_ca = ca_file.expanduser().resolve() if ca_file is not None else None

    key = ec.generate_private_key(ec.SECP256R1()) if cert else None
    body: dict[str, Any] = {"token": token, "device": device}
    if key is not None:
        body["csr"] = _csr(key, device)
    answer = _post(url + ENROLL_PATH, body, control_ca, timeout_s, transport)

    new_token = answer.get("token")
    if not isinstance(new_token, str) or len(new_token.split()) != 1:
        raise EnrollError(f"{url}: the enrollment answer has no usable device token")
    if answer.get("device") != device:
        raise EnrollError(f"{url}: the enrollment answer is for device "
                          f"{answer.get('device')!r}, not {device!r}")
    public_pem = answer.get("public_key")
    if not isinstance(public_pem, str):
        raise EnrollError(f"{url}: the enrollment answer has no fleet public key (a control "
                          "plane older than this agent? pin the key in the config instead)")
    try:
        fleet_key_id = key_id(load_public_key(public_pem))
    except ManifestError as err:
        raise EnrollError(f"{url}: the fleet public key in the answer: {err}") from None
    poll_s = answer.get("poll_s")
    result = EnrollResult(
        device=device, url=url, state_dir=state_dir, token_file=state_dir / TOKEN_FILE,
        public_key_file=state_dir / PUBLIC_KEY_FILE, key_id=fleet_key_id,
        poll_s=float(poll_s) if isinstance(poll_s, int | float) else None,
        control_ca_file=control_ca)
    if key is not None:
        certificate, ca_pem = _check_certificate(url, answer, key, device)
        # The answer checks out: write (the device token last).
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write(state_dir / KEY_FILE, key_pem, 0o600)
        _write(state_dir / CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM),
               0o644)
        _write(state_dir / CA_FILE, ca_pem.encode("utf-8"), 0o644)
        result = dataclasses.replace(
            result, cert_file=state_dir / CERT_FILE, key_file=state_dir / KEY_FILE,
            ca_file=state_dir / CA_FILE, cert_serial=f"{certificate.serial_number:x}",
            cert_not_after=certificate.not_valid_after_utc.isoformat())
    _write(result.public_key_file, public_pem.strip().encode("utf-8") + b"\n", 0o644)
    _write(result.token_file, new_token.strip().encode("utf-8") + b"\n", 0o600)
    return result


# ---- before sending ----------------------------------------------------------------------


def _check_arguments(url: str, token: str, device: str, ca_file: Path | None) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrollError(f"--url: expected http(s)://host[:port][/prefix], got {url!r}", 2)
    if parts.query or parts.fragment:
        raise EnrollError(f"--url: a base URL has no query or fragment, got {url!r}", 2)
    if not _DEVICE.match(device):
        raise EnrollError(f"--device: {device!r} is not a device name (letters, digits, "
                          "'_', '.', '-', not starting with a symbol, at most 128)", 2)
    if not 16 <= len(token) <= 128 or any(c.isspace() for c in token):
        raise EnrollError("--token: an enrollment token is one word of 16 to 128 "
                          "characters (as `POST /v1/enrollment-tokens` gave it)", 2)
    if ca_file is not None:
        if parts.scheme != "https":
            raise EnrollError("--ca-file: set for a plain http:// url (use https://)", 2)
        if not ca_file.expanduser().is_file():
            raise EnrollError(f"--ca-file: {ca_file} is not a file", 2)


def _check_writable(state_dir: Path) -> None:
    """Fail before the token is spent if the credentials could not be written."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir, prefix=".enroll-"):
            pass
    except OSError as err:
        raise EnrollError(f"--state-dir: cannot write in {state_dir}: "
                          f"{err.strerror or err}", 2) from None


def _csr(key: ec.EllipticCurvePrivateKey, device: str) -> str:
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ---- the exchange ------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any], ca_file: Path | None, timeout_s: float,
          transport: httpx.BaseTransport | None) -> dict[str, Any]:
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        try:
            verify = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as err:
            raise EnrollError(f"--ca-file: {ca_file}: not a usable CA file ({err})", 2) from None
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s), verify=verify,
                          follow_redirects=False, transport=transport) as http, \
                http.stream("POST", url, json=body) as response:
            content = bytearray()
            for chunk in response.iter_bytes():
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise EnrollError(f"{url}: the answer is larger than "
                                      f"{MAX_ANSWER_BYTES} bytes")
    except httpx.ConnectError as err:
        if _tls_failure(err):
            raise EnrollError(
                f"{url}: TLS failure: {_tls_reason(err)} (is --ca-file the CA of the control "
                "plane's certificate, and the URL's host the one it names?)") from None
        raise EnrollError(f"{url}: cannot connect: {err} (is the control plane running "
                          "there?)") from None
    except httpx.TimeoutException:
        raise EnrollError(f"{url}: no answer within {timeout_s:g} s") from None
    except httpx.HTTPError as err:
        raise EnrollError(f"{url}: the request failed: {err}") from None

    detail = _detail(bytes(content), response.reason_phrase)
    status = response.status_code
    if status == 201:
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise EnrollError(f"{url}: the answer is not a JSON object")
        return answer
    device = body["device"]
    if status == 401:
        raise EnrollError(f"the enrollment token was refused: {detail}; tokens are single-use "
                          "and expire: ask an operator for a new one")
    if status == 409:
        raise EnrollError(f"the control plane refused: {detail} (an admin: POST "
                          f"/v1/devices/{device}/revoke); the token was not spent")
    if status == 400:
        raise EnrollError(f"the control plane refused the request: {detail}")
    if status == 422 and "csr" in body and "csr" in detail:
        raise EnrollError(f"the control plane does not issue certificates ({detail}); "
                          "enroll without --cert")
    raise EnrollError(f"{url}: HTTP {status}: {detail}")


def _detail(content: bytes, reason: str) -> str:
    """The error body's `detail` (FastAPI's), else its text: one line, at most 500 chars."""
    try:
        found = json.loads(content).get("detail")
    except (ValueError, AttributeError):
        found = None
    if isinstance(found, str):
        text = found
    elif found:
        text = json.dumps(found)
    else:
        text = content.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:500] or reason


def _tls_failure(err: BaseException) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tls_reason(err: BaseException) -> str:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        seen = seen.__cause__ or seen.__context__
    return str(err)


# ---- the answer --------------------------------------------------------------------------


def _check_certificate(url: str, answer: dict[str, Any], key: ec.EllipticCurvePrivateKey,
                       device: str) -> tuple[x509.Certificate, str]:
    """The answer's certificate, checked: for our key, CN=device, clientAuth, issued by the
    CA the answer carries."""
    cert_pem, ca_pem = answer.get("certificate"), answer.get("ca")
    if not isinstance(cert_pem, str) or not isinstance(ca_pem, str):
        raise EnrollError(f"{url}: the answer has no certificate (a control plane that does "
                          "not issue them? enroll without --cert)")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        ca = x509.load_pem_x509_certificate(ca_pem.encode("ascii"))
        certificate.verify_directly_issued_by(ca)
    except InvalidSignature:
        raise EnrollError(f"{url}: the certificate is not signed by the CA in the answer") \
            from None
    except (ValueError, TypeError, UnicodeError) as err:
        raise EnrollError(f"{url}: the certificate in the answer does not check out: "
                          f"{err}") from None
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise EnrollError(f"{url}: the certificate in the answer is not for this device's key")
    names = [n.value for n in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device]:
        raise EnrollError(f"{url}: the certificate in the answer names {names}, not {device!r}")
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise EnrollError(f"{url}: the certificate in the answer is not for client auth")
    return certificate, ca_pem.strip() + "\n"


def _write(path: Path, data: bytes, mode: int) -> None:
    """`data` into `path` with `mode`, atomically (a temporary file renamed over it)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
