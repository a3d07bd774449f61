"""The control plane's tables (SQLAlchemy 2.0), on PostgreSQL or, embedded, SQLite.

The schema is created and upgraded by Alembic (`migrate`, revisions in `migrations/`);
these classes are the ORM view of it and must match the newest revision (a test compares
them). Times are epoch seconds as floats; JSON columns hold small documents only.

Tables
------
* `principals`: every token that can call the API: role `admin`, `operator` or `device`,
  the SHA-256 of the token (tokens are 32 random bytes: nothing to brute-force), revoked
  time. A device's principal names its device.
* `enrollment_tokens`: one-time tokens an operator creates for a new gateway, with the
  labels and groups the gateway gets; used once, then dead; they also expire.
* `devices`: labels, groups, the pinned model (if any), the desired model and its
  `generation` (bumped whenever the desired state changes: it is the ETag agents poll
  with), and what the device last reported (current/previous model, state, shadow stats,
  buffer depth and age, when it reported), and when it was last seen (polls keep that
  in memory; the tick writes it).
* `models`: published, signed model versions (the manifest; the artifact is on disk or
  in S3, see `publish.py`).
* `deployments`: one rollout each; `plan` is the rollout engine's JSON state
  (`rollout.Deployment.to_dict()`); `active` is true until it succeeds, rolls back or is
  aborted (one active deployment per target selector).
* `audit_events`: who did what, when, to what.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AuditEvent",
    "Base",
    "DeploymentRow",
    "Device",
    "EnrollmentToken",
    "ModelVersion",
    "Principal",
]


class Base(DeclarativeBase):
    pass


def _now() -> float:
    return time.time()


class Principal(Base):
    __tablename__ = "principals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    device_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("devices.id", ondelete="CASCADE"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    enrolled_at: Mapped[float] = mapped_column(Float, default=_now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    pinned_model: Mapped[str | None] = mapped_column(String(260), nullable=True)
    desired_model: Mapped[str | None] = mapped_column(String(260), nullable=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    current_model: Mapped[str | None] = mapped_column(String(260), nullable=True)
    previous_model: Mapped[str | None] = mapped_column(String(260), nullable=True)
    reported_generation: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(32), default="enrolled")
    reason: Mapped[str] = mapped_column(Text, default="")
    shadow: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    buffer_depth: Mapped[int | None] = mapped_column(Integer, nullable=True)
    buffer_age_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    reported_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelVersion(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(512), default="")
    published_by: Mapped[str] = mapped_column(String(128))
    published_at: Mapped[float] = mapped_column(Float, default=_now)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (Index("ix_deployments_active_target", "active", "target"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(260))
    target: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float, default=_now)
    updated_at: Mapped[float] = mapped_column(Float, default=_now)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, default=_now, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
