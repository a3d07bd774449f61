"""The control plane's device CA: client certificates for enrolled devices.

```
POST /v1/enroll {token, device, csr} ─► check_csr: PEM, its signature, CN == device, key type
    ─► issue_device_certificate: CN=device, clientAuth, ≤ 1 year, random serial
    ─► signed by <state_dir>/device-ca/ca.key; the answer carries the certificate and ca.pem
```

Contracts
---------
* **One CA per state folder.** `ensure_device_ca` loads `<state_dir>/device-ca/` (`ca.pem`,
  `ca.key` mode 0600, the folder 0700) or, when there is none, makes one with the
  project's CA helper (`deploy/services/pki.py`, EC P-256, 10 years) in a fresh temporary
  folder and renames it into place: concurrent first uses, threads or processes, end with
  one CA, and an existing CA is never replaced. A key that does not match its
  certificate raises `DeviceCAError`.
* **The CA decides.** A CSR proves possession of its private key (its signature is
  checked) and names the device (exactly one CN, equal to the device); only its public key
  is used. Subject attributes and extensions it asks for are ignored: the certificate is
  CN=device with the subject alternative name URI `urn:edgefleet:device:<device>` (RFC
  5280 verifiers want a SAN), not a CA, digital-signature key usage, clientAuth EKU, a
  random 159-bit serial, valid from 5 minutes ago for `days` (1..`MAX_DEVICE_CERT_DAYS`),
  never past the CA's own expiry.
* **Keys accepted**: EC P-256 / P-384, RSA of 2048 bits or more. Anything else, or a CSR
  that does not parse or verify, raises `CsrError` (a ValueError) whose text is the reason,
  meant for a 400 answer.
* Nothing is stored here about issued certificates: the caller records the serial and
  expiry (the enrollment's audit event).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_FOLDER",
    "DEVICE_CERT_DAYS",
    "DEVICE_URI_PREFIX",
    "MAX_CSR_CHARS",
    "MAX_DEVICE_CERT_DAYS",
    "CsrError",
    "DeviceCA",
    "DeviceCAError",
    "IssuedCertificate",
    "check_csr",
    "ensure_device_ca",
    "issue_device_certificate",
    "public_key_pem",
]

CA_FOLDER: Final = "device-ca"
CA_COMMON_NAME: Final = "edgefleet device CA"
DEVICE_CERT_DAYS: Final = 365
MAX_DEVICE_CERT_DAYS: Final = 397
MAX_CSR_CHARS: Final = 8192  # an RSA-4096 CSR is about 1.7 KB of PEM
_MIN_RSA_BITS: Final = 2048
_EC_CURVES: Final = ("secp256r1", "secp384r1")
_BACKDATE: Final = dt.timedelta(minutes=5)  # devices whose clock is slightly behind
DEVICE_URI_PREFIX: Final = "urn:edgefleet:device:"


class CsrError(ValueError):
    """A certificate signing request that is refused; the text says why."""


class DeviceCAError(RuntimeError):
    """The device CA on disk cannot be used (mismatched key, expired, unreadable)."""


@dataclass(frozen=True)
class DeviceCA:
    folder: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: int
    not_after: dt.datetime

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


def ensure_device_ca(state_dir: Path) -> DeviceCA:
    """The device CA of `state_dir`, made there at first use (see the module contracts)."""
    folder = state_dir / CA_FOLDER
    if not (folder / "ca.pem").exists():
        _create(folder)
    return _load(folder)


def _create(folder: Path) -> None:
    from edgefleet.deploy.services.pki import ensure_ca

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CA_FOLDER}-", dir=folder.parent))  # mode 0700
    try:
        ensure_ca(staging, common_name=CA_COMMON_NAME)
        os.rename(staging, folder)  # atomic; fails when another caller's CA is in place
        return
    except OSError:
        if not (folder / "ca.pem").exists():
            raise
    finally:
        if staging.exists():
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()


def _load(folder: Path) -> DeviceCA:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise DeviceCAError(f"device CA {folder}: cannot load: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeviceCAError(f"device CA {folder}: ca.key is not an EC private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise DeviceCAError(f"device CA {folder}: ca.key does not match ca.pem")
    return DeviceCA(folder, cert, key)


def check_csr(pem: str, device: str) -> x509.CertificateSigningRequest:
    """The CSR in `pem`, checked (signature, CN == `device`, key type); CsrError if not."""
    if len(pem) > MAX_CSR_CHARS:
        raise CsrError(f"csr: longer than {MAX_CSR_CHARS} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8"))
        signed = csr.is_signature_valid
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeError) as err:
        raise CsrError(f"csr: not a PEM certificate signing request ({err})") from err
    if not signed:
        raise CsrError("csr: its signature does not verify")
    common_names = [n.value for n in names]
    if common_names != [device]:
        found = ", ".join(repr(n) for n in common_names) or "none"
        raise CsrError(f"csr: the subject's CN must be the device name {device!r} "
                       f"(found {found})")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _EC_CURVES:
            raise CsrError(f"csr: EC curve {public_key.curve.name} is not accepted "
                           f"(use {' or '.join(_EC_CURVES)})")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MIN_RSA_BITS:
            raise CsrError(f"csr: an RSA key of {public_key.key_size} bits is too small "
                           f"(at least {_MIN_RSA_BITS})")
    else:
        raise CsrError("csr: the key must be EC (P-256, P-384) or RSA (>= 2048 bits), "
                       f"not {type(public_key).__name__}")
    return csr


def issue_device_certificate(
    ca: DeviceCA,
    csr: x509.CertificateSigningRequest,
    device: str,
    *,
    days: int = DEVICE_CERT_DAYS,
    now: dt.datetime | None = None,
) -> IssuedCertificate:
    """A client certificate for `device` over the key of `csr` (checked by `check_csr`)."""
    if not 1 <= days <= MAX_DEVICE_CERT_DAYS:
        raise ValueError(f"days: {days} is not within 1..{MAX_DEVICE_CERT_DAYS}")
    now = now or dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    if not_after <= now:
        raise DeviceCAError(f"device CA {ca.folder} expired at {not_after.isoformat()}; "
                            "move the folder aside to make a new one (devices enroll again)")
    serial = x509.random_serial_number()
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CsrError("csr: the key must be EC or RSA")  # check_csr refused it already
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                DEVICE_URI_PREFIX + device)]),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return IssuedCertificate(pem, serial, cert.not_valid_after_utc)  # whole seconds


def public_key_pem(key: Ed25519PrivateKey) -> str:
    """The PEM (SubjectPublicKeyInfo) of the fleet signing key's public half."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
