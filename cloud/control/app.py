"""The control plane's HTTP API (FastAPI): enrollment, publishing, deployments, the devices'
desired state and reports, fleet health, metrics and the fleet page.

```
operator ── POST /v1/models/publish ─────────► publish.py: MLflow → signed manifest + file
         ── POST /v1/deployments ────────────► rollout engine: waves, gates, rollback
agent    ── GET  /v1/device/desired (ETag) ──► its model: manifest + artifact URL
         ── GET  /v1/models/{n}/{v}/artifact ► the signed bytes (only a model it is told to run)
         ── POST /v1/device/report ──────────► engine step for its deployment
```

Contracts
---------
* **Auth.** Bearer tokens, roles admin / operator / device (`auth.py`). A device token
  reaches only `/v1/device/*` and the artifact of a model the device is told to run (or
  runs); anything about another device is 403. Missing or unknown token: 401.
* **Bad input** gets a 4xx whose `detail` names the problem: malformed JSON or fields
  (422), an unparsable target selector or model reference (400), an unknown device,
  model or deployment (404), a second active deployment on the same target, or a
  transition the deployment's state does not allow (409).
* **Desired state.** Each device has a `generation`, bumped whenever what it should run
  changes; `GET /v1/device/desired` answers `304` to `If-None-Match: "<generation>"`.
* **Engine steps.** A report only records the device's state. The engine steps every
  active deployment in one transaction (`tick`): within `step_s` of a report, and every
  `tick_s` regardless (timeouts, bake times); the deployment's JSON plan and the devices'
  desired state change together. A step reads every device of the deployment, so it is
  run a few times a second over all reports received, never once per report.
* **Hot path.** Tokens and desired-state answers are served from memory (`hot.py`),
  dropped when a commit changes them; a `304` poll reads no database.
* **Audit.** Every change (token, enrollment, publication, deployment and its
  transitions, revocation) writes an `audit_events` row naming the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, cast

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, Table, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.protocols.manifest import SAFE_NAME, is_safe_name

from . import rollout
from .auth import bearer_key, bootstrap_admin, hash_token, make_principal, new_token
from .db import AuditEvent, DeploymentRow, Device, EnrollmentToken, ModelVersion, Principal
from .hot import DesiredAnswer, HotCache, Identity
from .schema import lock_fleet

if TYPE_CHECKING:
    from .artifacts import S3Artifacts
from .targets import IDENT, TARGET_PATTERN, Target, parse_target

__all__ = ["ControlSettings", "create_app"]

log = logging.getLogger(__name__)

DEVICE_STATES: Final = ("downloading", "shadowing", "applied", "refused", "rolled_back",
                        "failed")
MAX_ENROLL_TTL_S: Final = 30 * 24 * 3600
MAX_INT: Final = 2**62  # integers a client sends must fit the databases' 64-bit columns


@dataclass(frozen=True)
class ControlSettings:
    """Where the control plane keeps things and how it behaves."""

    database_url: str
    state_dir: Path
    tracking_uri: str | None = None
    tick_s: float = 1.0
    step_s: float = 0.2
    poll_s: float = 5.0
    shadow_s: float = 30.0
    offline_after_s: float = 60.0
    policy: rollout.GatePolicy = field(default_factory=rollout.GatePolicy)
    # Artifacts also in S3, served to devices as pre-signed URLs (artifacts.py).
    artifacts_s3: str | None = None
    artifact_url_ttl_s: float = 3600.0

    @property
    def artifact_root(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def signing_key_path(self) -> Path:
        return self.state_dir / "fleet-signing-key.pem"


# --- request bodies -----------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Ident = Annotated[str, Field(pattern=f"^{IDENT}$")]
# Keys are identifiers too: say so in the schema (patternProperties alone would let a
# schema-following client send any other key with any value).
Labels = Annotated[dict[Ident, Ident],
                   Field(max_length=32, json_schema_extra={"additionalProperties": False})]


class EnrollmentTokenRequest(_Body):
    labels: Labels = Field(default_factory=dict)
    groups: list[Ident] = Field(default_factory=list, max_length=32)
    ttl_s: float = Field(24 * 3600, gt=0, le=MAX_ENROLL_TTL_S)


class EnrollRequest(_Body):
    token: str = Field(min_length=16, max_length=128)
    device: str = Field(pattern=SAFE_NAME)
    csr: str | None = Field(None, max_length=8192,
                            description="PEM CSR with CN=device: answered with a client "
                            "certificate from the control plane's device CA (certs.py)")


class OperatorTokenRequest(_Body):
    name: Ident
    role: Literal["admin", "operator"] = "operator"


class DeviceUpdate(_Body):
    labels: Labels | None = None
    groups: list[Ident] | None = Field(None, max_length=32)
    pinned_model: str | None = Field(None, max_length=260,
                                     description="name/version to hold the device on; '' unpins")


class PublishRequest(_Body):
    model: str = Field(min_length=3, max_length=300, description="NAME@ALIAS or NAME/VERSION")


class PolicyBody(_Body):
    apply_timeout_s: float | None = Field(None, gt=0, le=86400)
    bake_s: float | None = Field(None, ge=0, le=7 * 86400)
    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_latency_p99_us: float | None = Field(None, gt=0)
    max_anomaly_rate_shift: float | None = Field(None, ge=0, le=1)
    min_shadow_rows: int | None = Field(None, ge=0, le=MAX_INT)
    min_success_ratio: float | None = Field(None, gt=0, le=1)


class DeploymentRequest(_Body):
    model: str = Field(min_length=3, max_length=300,
                       description="NAME@ALIAS, NAME/VERSION, or NAME@ALIAS with `version`")
    version: str | None = Field(None, pattern=SAFE_NAME)
    target: str = Field("*", max_length=512, pattern=TARGET_PATTERN)
    waves: list[str] | str = Field(default="1,10%,50%,100%")
    policy: PolicyBody | None = None
    requested_by: str = Field("", max_length=200)


class ReportRequest(_Body):
    generation: int = Field(ge=0, le=MAX_INT)
    current: str | None = Field(None, max_length=260)
    previous: str | None = Field(None, max_length=260)
    state: Literal["downloading", "shadowing", "applied", "refused", "rolled_back", "failed"]
    reason: str = Field("", max_length=2000)
    shadow: dict[str, float | int | None] | None = None
    buffer_depth: int | None = Field(None, ge=0, le=MAX_INT)
    buffer_age_s: float | None = Field(None, ge=0)


class ErrorBody(BaseModel):
    detail: str | list[Any]


# Every route may answer these; `detail` says why.
ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "malformed target selector, model reference or policy"),
        (401, "missing, unknown or revoked token"),
        (403, "the caller's role may not do this, or a device acts on another's resources"),
        (404, "no such device, model or deployment"),
        (409, "conflicts with the current state (an active deployment, a transition)"),
        (410, "the stored artifact is damaged or missing; publish the model again"),
        (422, "the request body or parameters do not validate"),
    )
}


# --- the app ------------------------------------------------------------------------------


@dataclass
class _Context:
    settings: ControlSettings
    engine: Engine
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]
    signing_key: Any
    hot: HotCache = field(default_factory=HotCache)
    artifacts: S3Artifacts | None = None
    # Set by a report, cleared by the engine loop when it steps (module doc).
    reported: bool = False
    ticks: int = 0
    reports: int = 0
    desired_requests: int = 0
    artifact_downloads: int = 0
    # Polls only refresh `last_seen`: kept here and written by the tick in one transaction,
    # so that a poll (the hot path: every device, every few seconds) writes nothing.
    seen: dict[str, float] = field(default_factory=dict)
    seen_lock: threading.Lock = field(default_factory=threading.Lock)

    def mark_seen(self, device: str, at: float) -> None:
        with self.seen_lock:
            self.seen[device] = at

    def take_seen(self) -> dict[str, float]:
        with self.seen_lock:
            seen, self.seen = self.seen, {}
        return seen


def create_app(settings: ControlSettings, engine: Engine | None = None) -> FastAPI:
    """The API on `settings.database_url` (migrated at start)."""
    from .publish import ensure_signing_key
    from .schema import connect, migrate, reader

    settings.state_dir.mkdir(parents=True, exist_ok=True)  # the embedded database lives here
    engine = engine or connect(settings.database_url)
    migrate(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    read_sessions = sessionmaker(reader(engine), expire_on_commit=False)
    ctx = _Context(settings, engine, sessions, read_sessions,
                   ensure_signing_key(settings.signing_key_path))
    ctx.hot.watch(sessions)
    from .certs import ensure_device_ca

    ensure_device_ca(settings.state_dir)  # made at first start, like the signing key
    if settings.artifacts_s3 is not None:
        ctx.artifacts = _connect_artifacts(settings, sessions)
    with sessions.begin() as session:
        where = bootstrap_admin(session, settings.state_dir / "admin.token")
        if where:
            log.warning("first start: the admin token is in %s", where)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ticker = asyncio.create_task(_engine_loop(ctx))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    app = FastAPI(title="edgefleet control plane", version="1", lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.state.ctx = ctx
    _routes(app, ctx)
    return app


async def _engine_loop(ctx: _Context) -> None:
    """Step the deployments within `step_s` of a report, and every `tick_s` anyway."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    every = min(ctx.settings.step_s, ctx.settings.tick_s)
    while True:
        await asyncio.sleep(every)
        if not ctx.reported and loop.time() - last < ctx.settings.tick_s:
            continue
        last = loop.time()
        try:
            await asyncio.to_thread(tick, ctx)
        except Exception:  # a bad tick must not stop the next one; it is logged
            log.exception("deployment tick failed")


def _db(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns, before the response
    is sent (scope "function"), so a client that got its answer sees the change; rolled
    back when the handler raises."""
    ctx: _Context = request.app.state.ctx
    with ctx.sessions.begin() as session:
        yield session


Db = Annotated[Session, Depends(_db, scope="function")]


def _db_read(request: Request) -> Iterator[Session]:
    """A read-only transaction (one consistent snapshot; on SQLite beside the writers)."""
    ctx: _Context = request.app.state.ctx
    with ctx.read_sessions.begin() as session:
        yield session


ReadDb = Annotated[Session, Depends(_db_read, scope="function")]


async def _caller(request: Request,
                  authorization: Annotated[str | None, Header()] = None) -> Identity:
    ctx: _Context = request.app.state.ctx
    key = bearer_key(authorization)
    found = None if key is None else (
        ctx.hot.identity(key) or await run_in_threadpool(_load_identity, ctx, key))
    if found is None:
        raise HTTPException(401, "missing or unknown bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


def _load_identity(ctx: _Context, key: str) -> Identity | None:
    epoch = ctx.hot.epoch()
    with ctx.read_sessions.begin() as db:
        principal = db.scalar(select(Principal).where(Principal.token_sha256 == key))
        if principal is None or principal.revoked_at is not None:
            return None
        found = Identity.of(principal)
    ctx.hot.put_identity(key, found, epoch)
    return found


Caller = Annotated[Identity, Depends(_caller)]


def _routes(app: FastAPI, ctx: _Context) -> None:
    def require(principal: Identity, *roles: str) -> None:
        if principal.role not in roles:
            raise HTTPException(403, f"role {principal.role} may not do this "
                                f"(needs {' or '.join(roles)})")

    # --- tokens and enrollment ----------------------------------------------------------

    @app.post("/v1/tokens", status_code=201)
    def create_operator_token(body: OperatorTokenRequest, who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin")
        principal, token = make_principal(db, name=body.name, role=body.role)
        _audit(db, who, "token.create", body.name, {"role": body.role})
        return {"name": principal.name, "role": principal.role, "token": token}

    @app.post("/v1/enrollment-tokens", status_code=201)
    def create_enrollment_token(body: EnrollmentTokenRequest, who: Caller,
                                db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        token = new_token()
        expires = time.time() + body.ttl_s
        db.add(EnrollmentToken(token_sha256=hash_token(token), labels=body.labels,
                               groups=sorted(set(body.groups)), created_by=who.name,
                               expires_at=expires))
        _audit(db, who, "enrollment_token.create", "", {"labels": body.labels,
                                                         "groups": body.groups})
        return {"token": token, "expires_at": expires}

    @app.post("/v1/enroll", status_code=201)
    def enroll(body: EnrollRequest, db: Db) -> dict[str, Any]:
        row = db.scalar(select(EnrollmentToken).where(
            EnrollmentToken.token_sha256 == hash_token(body.token)).with_for_update())
        now = time.time()
        if row is None or row.used_at is not None or row.expires_at < now:
            raise HTTPException(401, "enrollment token unknown, used or expired")
        existing = db.get(Device, body.device)
        if existing is not None and existing.revoked_at is None:
            raise HTTPException(409, f"device {body.device} is already enrolled; revoke it "
                                "first to enroll it again")
        from . import certs

        certificate: dict[str, str] = {}  # the answer's `certificate` and `ca`, with a CSR
        recorded: dict[str, str] = {}  # its serial and expiry, for the audit event
        if body.csr is not None:
            try:
                csr = certs.check_csr(body.csr, body.device)
            except certs.CsrError as err:
                raise HTTPException(400, str(err)) from None
            ca = certs.ensure_device_ca(ctx.settings.state_dir)
            issued = certs.issue_device_certificate(ca, csr, body.device)
            certificate = {"certificate": issued.pem, "ca": ca.cert_pem}
            recorded = {"certificate_serial": issued.serial_hex,
                        "certificate_not_after": issued.not_after.isoformat()}
        row.used_at, row.device_id = now, body.device
        if existing is None:
            db.add(Device(id=body.device, labels=dict(row.labels), groups=list(row.groups),
                          generation=1, reported_generation=0, state="enrolled", reason=""))
        else:  # a revoked gateway enrolled again: new credential, labels from the token
            existing.revoked_at, existing.labels = None, dict(row.labels)
            existing.groups, existing.state = list(row.groups), "enrolled"
        db.flush()
        _, token = make_principal(db, name=body.device, role="device", device_id=body.device)
        _audit(db, None, "device.enroll", body.device, {"labels": row.labels,
                                                        "enrollment_by": row.created_by,
                                                        **recorded})
        # The fleet's public key rides along: trust on first use over this channel
        # (docs/control.md, "Enrolling a device"); operators can pin it in the config.
        return {"device": body.device, "token": token, "poll_s": ctx.settings.poll_s,
                "public_key": certs.public_key_pem(ctx.signing_key), **certificate}

    # --- devices ------------------------------------------------------------------------

    @app.get("/v1/devices")
    def list_devices(who: Caller, db: Db,
                     target: Annotated[str, Query(max_length=512, pattern=TARGET_PATTERN)] = "*"
                     ) -> dict[str, Any]:
        require(who, "admin", "operator")
        selector = _parse_target(target)
        _flush_seen(ctx, db)
        now = time.time()
        return {"devices": [_device_view(d, now, ctx.settings)
                            for d in _devices(db, selector, include_revoked=True)]}

    @app.patch("/v1/devices/{device_id}")
    def update_device(device_id: str, body: DeviceUpdate, who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        device = _device(db, device_id)
        if body.labels is not None:
            device.labels = dict(body.labels)
        if body.groups is not None:
            device.groups = sorted(set(body.groups))
        if body.pinned_model is not None:
            pin = body.pinned_model or None
            if pin is not None:
                _model_row(db, pin)
            device.pinned_model = pin
            if pin is not None and device.desired_model != pin:
                _set_desired(device, pin)
        _audit(db, who, "device.update", device_id, body.model_dump(exclude_none=True))
        db.flush()  # the generation is bumped in SQL: read it back
        return _device_view(device, time.time(), ctx.settings)

    @app.post("/v1/devices/{device_id}/revoke")
    def revoke_device(device_id: str, who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin")
        device = _device(db, device_id)
        now = time.time()
        device.revoked_at = now
        for principal in db.scalars(select(Principal).where(Principal.device_id == device_id)):
            principal.revoked_at = now
        _audit(db, who, "device.revoke", device_id, {})
        return {"device": device_id, "revoked_at": now}

    # --- models -------------------------------------------------------------------------

    @app.post("/v1/models/publish", status_code=201)
    def publish(body: PublishRequest, who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        row = _publish(ctx, db, who, body.model)
        return {"model": f"{row.name}/{row.version}", "manifest": row.manifest}

    @app.get("/v1/models")
    def list_models(who: Caller, db: ReadDb) -> dict[str, Any]:
        require(who, "admin", "operator")
        rows = db.scalars(select(ModelVersion).order_by(ModelVersion.published_at.desc()))
        return {"models": [{"model": f"{m.name}/{m.version}", "sha256": m.sha256,
                            "size": m.size, "source": m.source, "published_by": m.published_by,
                            "published_at": m.published_at} for m in rows]}

    @app.get("/v1/models/{name}/{version}/artifact")
    def artifact(name: str, version: str, who: Caller, db: ReadDb) -> Response:
        if not (is_safe_name(name) and is_safe_name(version)):
            raise HTTPException(400, "model name and version must be safe names "
                                "(letters, digits, _ . -; no path separators)")
        ref = f"{name}/{version}"
        if who.role == "device":
            device = _device(db, who.device_id or "")
            if ref not in (device.desired_model, device.current_model, device.previous_model):
                raise HTTPException(403, f"device {device.id} is not told to run {ref}")
        _model_row(db, ref)
        from .publish import PublishError, load_published

        try:
            published = load_published(ctx.settings.artifact_root, name, version)
        except PublishError as err:
            # Not a transient fault: a device retrying cannot help, so it reports the
            # failure and the wave's gate stops the rollout.
            log.error("the stored artifact of %s is damaged or missing: %s", ref, err)
            raise HTTPException(410, f"the stored artifact of {ref} is damaged or missing "
                                f"({err}); publish the model again") from err
        ctx.artifact_downloads += 1
        return Response(published.artifact_path.read_bytes(),
                        media_type="application/octet-stream",
                        headers={"X-Edgefleet-Sha256": published.manifest.sha256})

    # --- deployments --------------------------------------------------------------------

    @app.post("/v1/deployments", status_code=201)
    def create_deployment(body: DeploymentRequest, who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        selector = _parse_target(body.target)
        model_ref = body.model if body.version is None else (
            f"{body.model.split('@', 1)[0]}/{body.version}")
        row = _publish(ctx, db, who, model_ref)  # may take seconds: before the lock
        lock_fleet(db)
        if db.scalar(select(DeploymentRow.id).where(
                DeploymentRow.active.is_(True), DeploymentRow.target == selector.text())):
            raise HTTPException(409, f"target {selector.text()} already has an active "
                                "deployment; pause, abort or wait for it first")
        ref = f"{row.name}/{row.version}"
        devices = [d for d in _devices(db, selector) if d.pinned_model is None]
        if not devices:
            raise HTTPException(409, f"no unpinned, enrolled device matches {selector.text()}")
        policy = _policy(ctx.settings.policy, body.policy)
        waves = body.waves if isinstance(body.waves, str) else ",".join(body.waves)
        deployment_id = f"dep-{secrets.token_hex(6)}"
        try:
            plan = rollout.create_deployment(
                deployment_id, ref, {d.id: d.current_model for d in devices}, waves, policy,
                seed=deployment_id, now=time.time())
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        db.add(DeploymentRow(id=deployment_id, model=ref, target=selector.text(),
                             state=plan.state.value, active=True, plan=plan.to_dict(),
                             created_by=who.name))
        _apply_desired(db, plan, [d.id for d in devices])
        _audit(db, who, "deployment.create", deployment_id, {
            "model": ref, "target": selector.text(), "waves": waves,
            "devices": len(devices), "requested_by": body.requested_by})
        return _deployment_view(plan, selector.text())

    @app.get("/v1/deployments")
    def list_deployments(who: Caller, db: ReadDb,
                         active: bool | None = None) -> dict[str, Any]:
        require(who, "admin", "operator")
        query = select(DeploymentRow).order_by(DeploymentRow.created_at.desc()).limit(100)
        if active is not None:
            query = query.where(DeploymentRow.active.is_(active))
        return {"deployments": [_deployment_view(rollout.Deployment.from_dict(r.plan), r.target)
                                for r in db.scalars(query)]}

    @app.get("/v1/deployments/{deployment_id}")
    def get_deployment(deployment_id: str, who: Caller, db: ReadDb) -> dict[str, Any]:
        require(who, "admin", "operator")
        row = _deployment(db, deployment_id)
        return _deployment_view(rollout.Deployment.from_dict(row.plan), row.target)

    @app.post("/v1/deployments/{deployment_id}/{action}")
    def change_deployment(deployment_id: str,
                          action: Literal["pause", "resume", "abort", "rollback"],
                          who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        lock_fleet(db)
        row = _deployment(db, deployment_id, lock=True)
        plan = rollout.Deployment.from_dict(row.plan)
        now = time.time()
        try:
            if action == "pause":
                plan = rollout.pause(plan, now)
            elif action == "resume":
                plan = rollout.resume(plan, now)
            elif action == "abort":
                plan = rollout.abort(plan, now, rollback=True)
            else:
                plan = rollout.rollback(plan, now, f"manual rollback by {who.name}")
        except rollout.InvalidTransition as err:
            raise HTTPException(409, str(err)) from err
        _store_plan(db, row, plan)
        _apply_desired(db, plan, list(plan.previous))
        _audit(db, who, f"deployment.{action}", deployment_id, {"state": plan.state.value})
        return _deployment_view(plan, row.target)

    # --- the devices' side --------------------------------------------------------------

    @app.get("/v1/device/desired", responses={304: {"description": "unchanged since the "
                                                     "generation in If-None-Match"}})
    async def desired(who: Caller,
                      if_none_match: Annotated[str | None, Header()] = None) -> Response:
        if who.role != "device" or who.device_id is None:
            raise HTTPException(403, "only a device token may use /v1/device/*")
        answer = ctx.hot.answer(who.device_id)
        if answer is None:
            answer = await run_in_threadpool(_load_answer, ctx, who.device_id)
        if answer.revoked:
            raise HTTPException(403, f"device {answer.device} is revoked")
        ctx.desired_requests += 1
        ctx.mark_seen(answer.device, time.time())
        if if_none_match is not None and if_none_match.strip() == answer.etag:
            return Response(status_code=304, headers={"ETag": answer.etag})
        return Response(answer.body, media_type="application/json",
                        headers={"ETag": answer.etag})

    @app.post("/v1/device/report", status_code=204)
    def report(body: ReportRequest, who: Caller, db: Db) -> Response:
        if who.role != "device" or who.device_id is None:
            raise HTTPException(403, "only a device token may use /v1/device/*")
        now = time.time()
        values: dict[str, Any] = {
            "last_seen": now, "reported_at": now, "current_model": body.current,
            "previous_model": body.previous, "state": body.state, "reason": body.reason,
            "reported_generation": body.generation}
        for key, value in (("shadow", body.shadow), ("buffer_depth", body.buffer_depth),
                           ("buffer_age_s", body.buffer_age_s)):
            if value is not None:
                values[key] = value
        # One statement: SQLite's write lock is held for as short a time as possible
        # (every device of a wave reports within seconds of the others).
        done = db.execute(update(Device).where(Device.id == who.device_id,
                                               Device.revoked_at.is_(None)).values(values),
                          execution_options={"synchronize_session": False})
        if cast(Any, done).rowcount != 1:
            raise HTTPException(403, f"device {who.device_id} is revoked")
        ctx.reports += 1
        ctx.reported = True  # the engine loop steps the deployments within step_s
        return Response(status_code=204)

    # --- fleet health -------------------------------------------------------------------

    @app.get("/v1/fleet/health")
    def fleet_health(who: Caller, db: Db) -> dict[str, Any]:
        require(who, "admin", "operator")
        _flush_seen(ctx, db)
        return _health(db, ctx.settings)

    @app.get("/v1/audit")
    def audit(who: Caller, db: ReadDb,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        require(who, "admin")
        rows = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
        return {"events": [{"at": e.at, "actor": e.actor, "action": e.action,
                            "target": e.target, "detail": e.detail} for e in rows]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(db: Db) -> str:
        _flush_seen(ctx, db)
        return _metrics(db, ctx)

    @app.get("/", response_class=HTMLResponse)
    def fleet_page(request: Request) -> str:
        from .page import FLEET_PAGE

        return FLEET_PAGE

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}


# --- helpers ------------------------------------------------------------------------------


def _parse_target(text: str) -> Target:
    try:
        return parse_target(text)
    except ValueError as err:
        raise HTTPException(400, str(err)) from err


def _devices(db: Session, selector: Target, *, include_revoked: bool = False) -> list[Device]:
    query = select(Device).order_by(Device.id)
    if not include_revoked:
        query = query.where(Device.revoked_at.is_(None))
    return [d for d in db.scalars(query) if selector.matches(d.id, d.labels, d.groups)]


def _device(db: Session, device_id: str) -> Device:
    device = db.get(Device, device_id)
    if device is None:
        raise HTTPException(404, f"no device {device_id[:128]!r}")
    return device


def _own_device(db: Session, who: Identity) -> Device:
    if who.role != "device" or who.device_id is None:
        raise HTTPException(403, "only a device token may use /v1/device/*")
    device = _device(db, who.device_id)
    if device.revoked_at is not None:
        raise HTTPException(403, f"device {device.id} is revoked")
    return device


def _model_row(db: Session, ref: str) -> ModelVersion:
    name, _, version = ref.partition("/")
    row = db.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                               ModelVersion.version == version))
    if row is None:
        raise HTTPException(404, f"model {ref[:260]} is not published")
    return row


def _deployment(db: Session, deployment_id: str, *, lock: bool = False) -> DeploymentRow:
    query = select(DeploymentRow).where(DeploymentRow.id == deployment_id)
    if lock:
        query = query.with_for_update()
    row = db.scalar(query)
    if row is None:
        raise HTTPException(404, f"no deployment {deployment_id[:64]!r}")
    return row


def _active_deployments(db: Session, *, lock: bool = False) -> list[DeploymentRow]:
    query = select(DeploymentRow).where(DeploymentRow.active.is_(True))
    if lock:
        query = query.with_for_update()
    return list(db.scalars(query))


def _publish(ctx: _Context, db: Session, who: Identity, model: str) -> ModelVersion:
    """The published row of `model` (NAME/VERSION already published, else from MLflow)."""
    from .publish import PublishError, parse_model_ref, publish_model

    try:
        name, version, _alias = parse_model_ref(model)
    except ValueError as err:
        raise HTTPException(400, str(err)) from err
    if version is not None:
        row = db.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                   ModelVersion.version == version))
        if row is not None:
            return row
    if ctx.settings.tracking_uri is None:
        raise HTTPException(409, f"model {model} is not published and no MLflow tracking URI "
                            "is configured to publish it from")
    try:
        published = publish_model(tracking_uri=ctx.settings.tracking_uri, ref=model,
                                  signing_key=ctx.signing_key,
                                  store_root=ctx.settings.artifact_root,
                                  artifacts=ctx.artifacts)
    except PublishError as err:
        from .artifacts import ArtifactUnavailable

        if isinstance(err.__cause__, ArtifactUnavailable):  # S3 down: worth a retry
            raise HTTPException(503, str(err), headers={"Retry-After": "10"}) from err
        raise HTTPException(422, str(err)) from err
    manifest = published.manifest
    row = db.scalar(select(ModelVersion).where(ModelVersion.name == manifest.model_name,
                                               ModelVersion.version == manifest.version))
    if row is None:
        row = ModelVersion(name=manifest.model_name, version=manifest.version,
                           sha256=manifest.sha256, size=manifest.size,
                           manifest=manifest.model_dump(by_alias=True), source=manifest.source,
                           published_by=who.name)
        db.add(row)
        db.flush()
        _audit(db, who, "model.publish", manifest.ref, {"sha256": manifest.sha256,
                                                        "source": manifest.source})
    return row


def _policy(base: rollout.GatePolicy, body: PolicyBody | None) -> rollout.GatePolicy:
    if body is None:
        return base
    from dataclasses import replace

    try:
        return replace(base, **body.model_dump(exclude_none=True))
    except ValueError as err:
        raise HTTPException(400, f"gate policy: {err}") from err


def _set_desired(device: Device, model: str | None) -> None:
    device.desired_model = model
    # In SQL, so that two transactions bumping the same device both count (PostgreSQL's
    # read committed would let a Python-side `+= 1` lose one).
    device.generation = Device.generation + 1


def _apply_desired(db: Session, plan: rollout.Deployment, devices: list[str]) -> None:
    for device_id in devices:
        device = db.get(Device, device_id)
        if device is None or device.pinned_model is not None:
            continue
        wanted = rollout.desired_model(plan, device_id)
        if wanted is rollout.NOT_MANAGED:
            continue
        if wanted != device.desired_model:
            _set_desired(device, wanted if isinstance(wanted, str) else None)


def _reports(db: Session, plan: rollout.Deployment) -> dict[str, rollout.DeviceReport]:
    """The devices' latest reports that answer their current desired state."""
    # Columns, not ORM objects: a step reads every device of the deployment, a few times
    # a second during a rollout, and building entities costs ten times more.
    query = select(Device.id, Device.reported_generation, Device.current_model, Device.state,
                   Device.reason, Device.shadow, Device.reported_at).where(
        Device.reported_generation == Device.generation, Device.reported_at.is_not(None))
    return {row.id: rollout.DeviceReport(device=row.id, generation=row.reported_generation,
                                         current=row.current_model, state=row.state,
                                         reason=row.reason, shadow=row.shadow,
                                         at=row.reported_at)
            for row in db.execute(query) if row.id in plan.previous}


def _step(db: Session, row: DeploymentRow, plan: rollout.Deployment, now: float) -> None:
    result = rollout.step(plan, _reports(db, plan), now)
    if result.changed_devices or result.events or result.deployment.state != plan.state:
        _apply_desired(db, result.deployment, list(result.changed_devices))
        _store_plan(db, row, result.deployment)
        for event in result.events:
            _audit(db, None, "deployment.event", row.id, {"event": event})


def _store_plan(db: Session, row: DeploymentRow, plan: rollout.Deployment) -> None:
    row.plan = plan.to_dict()
    row.state = plan.state.value
    row.active = plan.state.value not in ("succeeded", "rolled_back", "aborted")
    row.updated_at = time.time()


def tick(ctx: _Context) -> None:
    """One engine step for every active deployment (reports, timeouts, bake times, next
    waves), in one transaction."""
    ctx.ticks += 1
    ctx.reported = False  # a report arriving from here on asks for the next step
    now = time.time()
    with ctx.sessions.begin() as db:
        lock_fleet(db)
        _flush_seen(ctx, db)
        for row in _active_deployments(db, lock=True):
            _step(db, row, rollout.Deployment.from_dict(row.plan), now)


def _load_answer(ctx: _Context, device_id: str) -> DesiredAnswer:
    """A device's desired state from the database, kept in `ctx.hot` (see hot.py)."""
    epoch = ctx.hot.epoch()
    fresh_until = float("inf")
    with ctx.read_sessions.begin() as db:
        device = _device(db, device_id)
        model = None
        if device.desired_model:
            row = _model_row(db, device.desired_model)
            url = f"/v1/models/{row.name}/{row.version}/artifact"
            if ctx.artifacts is not None:
                ttl = ctx.settings.artifact_url_ttl_s
                url = ctx.artifacts.presign(row.name, row.version, ttl)
                # Served from memory for half its life, so a device always gets a URL
                # with at least ttl/2 to run.
                fresh_until = time.monotonic() + ttl / 2
            model = {"manifest": row.manifest, "artifact_url": url}
        body = {"device": device.id, "generation": device.generation, "model": model,
                "shadow_s": ctx.settings.shadow_s, "poll_s": ctx.settings.poll_s}
        answer = DesiredAnswer(device.id, device.generation, device.revoked_at is not None,
                               json.dumps(body, separators=(",", ":")).encode(), fresh_until)
    ctx.hot.put_answer(answer, epoch)
    return answer


def _connect_artifacts(settings: ControlSettings,
                       sessions: sessionmaker[Session]) -> S3Artifacts:
    """The S3 store, with every published version in it: versions published before S3
    was configured are uploaded now; a version whose object holds other bytes is logged
    and served from the control plane only (its URL would fail verification anyway)."""
    from .artifacts import ArtifactConflict, ArtifactMissing, S3Artifacts, check_url_ttl
    from .publish import load_published

    check_url_ttl(settings.artifact_url_ttl_s)
    artifacts = S3Artifacts.from_env(settings.artifacts_s3 or "")
    with sessions() as db:
        rows = [(m.name, m.version, m.sha256, m.size) for m in db.scalars(select(ModelVersion))]
    for name, version, sha256, size in rows:
        try:
            artifacts.check(name, version, sha256, size=size)
        except ArtifactMissing:
            artifacts.upload(load_published(settings.artifact_root, name, version))
            log.info("uploaded %s/%s to %s", name, version, settings.artifacts_s3)
        except ArtifactConflict as err:
            log.error("S3 holds other bytes for %s/%s: %s", name, version, err)
    return artifacts


def _flush_seen(ctx: _Context, db: Session) -> None:
    """Write the polls' `last_seen` times kept in memory (see `_Context.seen`): one
    statement, executed for many rows, that never moves a time backwards."""
    seen = ctx.take_seen()
    if not seen:
        return
    lock_fleet(db)
    table = cast(Table, Device.__table__)
    db.execute(
        update(table)
        .where(table.c.id == bindparam("device"),
               or_(table.c.last_seen.is_(None), table.c.last_seen < bindparam("at")))
        .values(last_seen=bindparam("at")),
        [{"device": device, "at": at} for device, at in sorted(seen.items())])


def _audit(db: Session, who: Identity | None, action: str, target: str,
           detail: dict[str, Any]) -> None:
    db.add(AuditEvent(actor=who.name if who else "control-plane", action=action,
                      target=target, detail=detail))


def _online(device: Device, now: float, settings: ControlSettings) -> bool:
    return device.last_seen is not None and now - device.last_seen <= settings.offline_after_s


def _device_view(device: Device, now: float, settings: ControlSettings) -> dict[str, Any]:
    return {
        "device": device.id, "labels": device.labels, "groups": device.groups,
        "online": _online(device, now, settings), "last_seen": device.last_seen,
        "revoked": device.revoked_at is not None, "pinned_model": device.pinned_model,
        "desired_model": device.desired_model, "generation": device.generation,
        "current_model": device.current_model, "previous_model": device.previous_model,
        "state": device.state, "reason": device.reason, "shadow": device.shadow,
        "buffer_depth": device.buffer_depth, "buffer_age_s": device.buffer_age_s,
    }


def _deployment_view(plan: rollout.Deployment, target: str) -> dict[str, Any]:
    return {"id": plan.id, "model": plan.model, "target": target, "state": plan.state.value,
            "progress": rollout.progress(plan)}


def _health(db: Session, settings: ControlSettings) -> dict[str, Any]:
    now = time.time()
    devices = list(db.scalars(select(Device).where(Device.revoked_at.is_(None))))
    versions: dict[str, int] = {}
    for d in devices:
        versions[d.current_model or "none"] = versions.get(d.current_model or "none", 0) + 1
    active = [_deployment_view(rollout.Deployment.from_dict(r.plan), r.target)
              for r in _active_deployments(db)]
    return {
        "devices": len(devices),
        "online": sum(_online(d, now, settings) for d in devices),
        "model_versions": versions,
        "buffer_depth_total": sum(d.buffer_depth or 0 for d in devices),
        "buffer_age_s_max": max((d.buffer_age_s or 0.0 for d in devices), default=0.0),
        "deployments": active,
        "fleet": [_device_view(d, now, settings) for d in devices],
    }


def _metrics(db: Session, ctx: _Context) -> str:
    now = time.time()
    devices = list(db.scalars(select(Device).where(Device.revoked_at.is_(None))))
    online = sum(_online(d, now, ctx.settings) for d in devices)
    lines = [
        "# HELP edgefleet_control_devices Enrolled, unrevoked devices.",
        "# TYPE edgefleet_control_devices gauge",
        f"edgefleet_control_devices {len(devices)}",
        "# HELP edgefleet_control_devices_online Devices seen within offline_after_s.",
        "# TYPE edgefleet_control_devices_online gauge",
        f"edgefleet_control_devices_online {online}",
        "# HELP edgefleet_control_device_model Devices by the model they report running.",
        "# TYPE edgefleet_control_device_model gauge",
    ]
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.current_model or "none"] = counts.get(d.current_model or "none", 0) + 1
    lines += [f'edgefleet_control_device_model{{model="{m}"}} {n}'
              for m, n in sorted(counts.items())]
    lines += [
        "# HELP edgefleet_control_deployments_active Deployments not yet finished.",
        "# TYPE edgefleet_control_deployments_active gauge",
        f"edgefleet_control_deployments_active {len(_active_deployments(db))}",
        "# HELP edgefleet_control_reports_total Device reports received.",
        "# TYPE edgefleet_control_reports_total counter",
        f"edgefleet_control_reports_total {ctx.reports}",
        "# HELP edgefleet_control_desired_requests_total Desired-state requests answered.",
        "# TYPE edgefleet_control_desired_requests_total counter",
        f"edgefleet_control_desired_requests_total {ctx.desired_requests}",
        "# HELP edgefleet_control_artifact_downloads_total Artifacts served by the control "
        "plane itself (not through pre-signed S3 URLs).",
        "# TYPE edgefleet_control_artifact_downloads_total counter",
        f"edgefleet_control_artifact_downloads_total {ctx.artifact_downloads}",
        "# HELP edgefleet_control_engine_ticks_total Engine steps over the deployments.",
        "# TYPE edgefleet_control_engine_ticks_total counter",
        f"edgefleet_control_engine_ticks_total {ctx.ticks}",
        "# HELP edgefleet_control_cache_lookups_total Token and desired-state lookups in "
        "memory, by result (a miss reads the database).",
        "# TYPE edgefleet_control_cache_lookups_total counter",
        f'edgefleet_control_cache_lookups_total{{result="hit"}} {ctx.hot.hits}',
        f'edgefleet_control_cache_lookups_total{{result="miss"}} {ctx.hot.misses}',
        "# HELP edgefleet_control_cache_refused_total Entries not kept: the cache was full.",
        "# TYPE edgefleet_control_cache_refused_total counter",
        f"edgefleet_control_cache_refused_total {ctx.hot.refused}",
    ]
    return "\n".join(lines) + "\n"
