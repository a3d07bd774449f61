"""Tokens and roles of the control plane API.

Every caller presents `Authorization: Bearer <token>`. Tokens are 32 random bytes
(URL-safe base64) shown once when made; the database keeps only their SHA-256, which is
enough for 256-bit secrets (there is nothing to brute-force). Roles:

* `admin`: everything, including operator tokens, revocation and the audit log;
* `operator`: enrollment tokens, publishing, deployments, fleet views;
* `device`: its own desired state, its reports, and the artifacts of models it is told
  to run; nothing about other devices.

The first admin token is made at first start (`bootstrap_admin`) and written to a 0600
file beside the database, or taken from $EDGEFLEET_CONTROL_ADMIN_TOKEN; there is no
default password anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from .db import Principal

__all__ = [
    "ROLES",
    "bearer_key",
    "bootstrap_admin",
    "hash_token",
    "make_principal",
    "new_token",
    "principal_for",
]

ROLES: Final = ("admin", "operator", "device")
_BEARER: Final = re.compile(r"^Bearer ([A-Za-z0-9_\-]{16,128})$")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def make_principal(session: Session, *, name: str, role: str, device_id: str | None = None,
                   token: str | None = None) -> tuple[Principal, str]:
    """A new principal and its token (shown once; only the hash is stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    token = token or new_token()
    principal = Principal(name=name, role=role, token_sha256=hash_token(token),
                          device_id=device_id)
    session.add(principal)
    session.flush()
    return principal, token


def bearer_key(header: str | None) -> str | None:
    """The stored hash of the token in a well-formed `Authorization: Bearer` header."""
    if not header:
        return None
    match = _BEARER.match(header.strip())
    return hash_token(match.group(1)) if match else None


def principal_for(session: Session, header: str | None) -> Principal | None:
    """The live principal a bearer header names, or None."""
    key = bearer_key(header)
    if key is None:
        return None
    principal = session.scalar(select(Principal).where(Principal.token_sha256 == key))
    if principal is None or principal.revoked_at is not None:
        return None
    return principal


def bootstrap_admin(session: Session, token_file: Path) -> str | None:
    """Make the first admin when there is none. The token comes from
    $EDGEFLEET_CONTROL_ADMIN_TOKEN, else is generated and written to `token_file` (0600).
    Returns where the token is, or None when an admin already existed."""
    if session.scalar(select(Principal.id).where(Principal.role == "admin")) is not None:
        return None
    token = os.environ.get("EDGEFLEET_CONTROL_ADMIN_TOKEN") or None
    if token is not None and not _BEARER.match(f"Bearer {token}"):
        raise ValueError("EDGEFLEET_CONTROL_ADMIN_TOKEN must be 16-128 URL-safe characters")
    _, token = make_principal(session, name="admin", role="admin", token=token)
    if os.environ.get("EDGEFLEET_CONTROL_ADMIN_TOKEN"):
        return "$EDGEFLEET_CONTROL_ADMIN_TOKEN"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return str(token_file)
