"""The agent's side of fleet model rollouts: poll the control plane's desired state, fetch
and verify the model it names, shadow it on live windows, then swap it in — or roll back,
offline, to the previous model.

```
GET {url}/v1/device/desired (If-None-Match: "<generation>") ─► 304: nothing to do
  └► 200 DesiredState ─► model is current          ─► report "applied" (once)
                      ─► model is the store's previous ─► ModelStore.rollback (no network)
                                                      ─► swap ─► report "rolled_back"
                      ─► model null                ─► keep the current model, "applied"
                      ─► a new model ─► "downloading" ─► GET artifact (size-capped)
                           ─► ModelStore.install (signature, hash, schema, probe)
                              └► ModelRefused ─► "refused" (never retried for that generation)
                           ─► ShadowRun on observed live windows for shadow_s ─► "shadowing"
                              └► newer generation meanwhile ─► abandon, follow the new one
                           ─► ModelStore.activate ─► swap(bundle) ─► "applied" + shadow stats
POST {url}/v1/device/report ◄─ the latest unsent report (one kept, retried every poll)
```

Contracts
---------
* **Independent of the Agent.** `ModelUpdater` takes a `ModelStore`, a `FleetClient` and a
  `swap(bundle)` callback; the real agent and the control plane's simulated agents run the
  same code. Live windows come in through `ModelUpdater.observe(X)` (an `[n, F]` feature
  matrix), which the agent calls once per inference cycle — `observed_scorer` /
  `inferencer_for` build an `OnnxScorer` that does it for every matrix the agent scores,
  so `Inferencer` is used unchanged. `observe` costs nothing when no shadow runs and
  never raises.
* **The swap is atomic.** `swap(bundle)` is called on the event loop, from the updater's
  task, so it can only run between two ingest cycles (`Inferencer.run` and `to_samples`
  run without an await between them). The store is activated first, then `swap` is
  called; if `swap` raises, the store is rolled back to the model the agent still runs,
  "failed" is reported and the generation is not retried.
* **The updater does not judge gates**; the control plane does, from the reported shadow
  stats (and rolls back with a new generation). One rule is the updater's own: a
  candidate that failed *every* shadow batch (at least one) is never swapped in — it is
  reported "failed" and the current model stays. A shadow that saw no windows (an agent
  without a model, or with its sources down) scores nothing and the model is applied;
  the report says `rows: 0`.
* **Generations.** The `If-None-Match` generation is the last one *settled*: applied,
  rolled back, refused or failed. A refused or failed generation is not retried; a new
  generation (even naming the same model) is followed afresh. A generation interrupted by
  an outage, an auth error, a server fault or a stop is not settled, so the next poll gets
  it again (an agent that was offline catches up with the latest generation directly;
  intermediate ones are skipped). Settled generations live in memory: after a restart the
  first poll gets a 200, and a model that is already current is just reported "applied".
* **Errors never stop the loop.** 401/403: logged at ERROR once per episode, polled again
  every `poll_max_s`. 5xx, 408, 429, network faults and off-contract answers: retried
  after a fully jittered exponential backoff (`backoff_initial_s` … `backoff_cap_s`, 60 s
  by default; a `Retry-After` is honoured up to the cap). In every case the agent keeps
  running its current model. `run` returns when `stop` is set and raises only on
  cancellation.
* **Bounded.** The artifact is streamed with a byte cap (`max_artifact_bytes`, and never
  more than the manifest's `size`); a manifest declaring more than the cap is refused
  before any download. At most one unsent report is kept (the latest). One shadow run at
  a time. Disk, hashing and ONNX session work run in a worker thread, never on the loop.
  A report the control plane refuses as such (a 4xx other than 401/403) is logged and
  dropped, not retried; a reason is cut to `MAX_REASON` characters.
* **Tokens stay home.** The bearer token is sent to the control plane's origin only; an
  absolute `artifact_url` on another origin (a presigned object-store URL) is fetched
  without it. The artifact's integrity comes from the signed manifest, not the transport.
* **Pluggable source, fixed trust.** The updater reads desired states, artifacts and
  reports through a `ModelSource`: `FleetClient` here, `standalone.MlflowModelSource` for
  an agent following an MLflow alias without a control plane (edge-agent/standalone.py).
  What makes a model installable is the updater's `trust`, set by whoever builds it, never
  by what a source sends: "signature" (the default, the fleet's) installs through
  `ModelStore.install` (Ed25519 signature, hash, schema, probe); "checksum" through
  `ModelStore.install_checksummed` (an unsigned manifest the source built from a checksum
  it fetched). A source may refuse a generation itself before any download or install
  (`CandidateRefused`: e.g. an MLflow version without its recorded checksum); the
  updater settles it as "refused" like a refusal of the store.
* **Cheap to import**: httpx, onnxruntime (through the model manager) and cryptography are
  imported when first used, so `config.py` can import `FleetConfig` without slowing the
  CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from edgefleet.protocols.manifest import (
    ManifestError,
    ModelManifest,
    load_public_key,
    parse_manifest,
    sha256_hex,
)
from edgefleet.protocols.source import Backoff

if TYPE_CHECKING:
    from collections.abc import Sequence

    import httpx
    import numpy.typing as npt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgefleet.protocols.features import FeatureSpec

    from .inference import Inferencer, ModelBundle, OnnxScorer
    from .model_manager import ModelStore, ShadowReport, ShadowRun

__all__ = [
    "COUNTERS",
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "REPORT_STATES",
    "ArtifactTooLarge",
    "CandidateRefused",
    "DesiredModel",
    "DesiredState",
    "FleetAuthError",
    "FleetClient",
    "FleetConfig",
    "FleetError",
    "FleetProtocolError",
    "FleetUnavailable",
    "ModelSource",
    "ModelUpdater",
    "Report",
    "ShadowStats",
    "build_updater",
    "inferencer_for",
    "observed_scorer",
]

log = logging.getLogger(__name__)

DESIRED_PATH: Final = "/v1/device/desired"
REPORT_PATH: Final = "/v1/device/report"
DEFAULT_MAX_ARTIFACT_BYTES: Final = 64 * 1024**2
MAX_SHADOW_S: Final = 7 * 86_400.0
MAX_REASON: Final = 2000  # characters of a report's reason (the control plane's limit)
POLL_JITTER: Final = 0.1  # a poll interval is drawn from ±10 % of the interval
USER_AGENT: Final = "edgefleet-agent"
Trust = Literal["signature", "checksum"]  # how a ModelUpdater's installs are verified
ReportState = Literal["downloading", "shadowing", "applied", "refused", "rolled_back", "failed"]
REPORT_STATES: Final = ("downloading", "shadowing", "applied", "refused", "rolled_back",
                        "failed")
COUNTERS: Final = (
    "polls",  # desired-state requests sent (including those made during a shadow)
    "not_modified",  # of those, answered 304
    "downloads",  # artifacts downloaded whole
    "installs",  # models the store accepted
    "refusals",  # generations refused (ModelRefused, too large, conflicting manifest)
    "shadows",  # shadow runs started
    "shadows_abandoned",  # shadow runs cut short by a newer generation, a stop or an auth error
    "failures",  # generations reported "failed" (candidate failed every batch, swap failed, …)
    "rollbacks",  # offline rollbacks to the store's previous model
    "swaps",  # models handed to `swap`
    "errors",  # failed exchanges with the control plane and unexpected faults
    "auth_errors",  # of those, 401/403
    "reports_sent",
    "reports_failed",  # report POSTs that failed (the report is kept for the next poll)
)


# ---- errors -------------------------------------------------------------------------------


class FleetError(Exception):
    """An exchange with the control plane failed."""


class FleetAuthError(FleetError):
    """The control plane refused the device token (401/403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class FleetUnavailable(FleetError):
    """The control plane could not be reached or is failing (network, timeout, 5xx, 408,
    429); `retry_after` is its Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FleetProtocolError(FleetError):
    """An answer outside the contract (unexpected status, bad JSON, a bad field); the
    message names the problem."""


class ArtifactTooLarge(FleetProtocolError):
    """An artifact bigger than the cap (`max_artifact_bytes`, or the manifest's size);
    the download was aborted."""


class CandidateRefused(FleetError):
    """A source resolved `generation` to a model this agent must not install, before the
    store saw it (standalone mode: an MLflow version without a recorded checksum, bytes
    that do not match it, an artifact over the cap). The updater settles the generation
    as "refused" (`refusals`) and keeps the current model. `reason` is a short code
    ("unverifiable", "hash_mismatch", "too_large", …); the message says which model and
    why."""

    def __init__(self, generation: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.generation = generation
        self.reason = reason
        self.message = message


# ---- wire shapes ----------------------------------------------------------------------------


class _ModelWire(BaseModel):
    model_config = ConfigDict(extra="ignore")

    manifest: dict[str, Any]
    artifact_url: Annotated[str, Field(min_length=1, max_length=4096)]


class _DesiredWire(BaseModel):
    # Unknown keys are ignored: a newer control plane may add fields older agents skip.
    model_config = ConfigDict(extra="ignore")

    device: str
    generation: Annotated[int, Field(ge=0, strict=True)]
    model: _ModelWire | None
    shadow_s: Annotated[float, Field(ge=0, le=MAX_SHADOW_S, allow_inf_nan=False)]
    poll_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]


@dataclasses.dataclass(frozen=True, slots=True)
class DesiredModel:
    manifest: ModelManifest
    artifact_url: str


@dataclasses.dataclass(frozen=True, slots=True)
class DesiredState:
    """What the control plane wants this device to run (`GET /v1/device/desired`)."""

    device: str
    generation: int
    model: DesiredModel | None
    shadow_s: float
    poll_s: float


def parse_desired(data: Any) -> DesiredState:
    """A desired state from decoded JSON; FleetProtocolError names the bad field."""
    try:
        wire = _DesiredWire.model_validate(data)
    except ValidationError as err:
        raise FleetProtocolError(f"desired state: {_describe(err)}") from None
    model = None
    if wire.model is not None:
        try:
            manifest = parse_manifest(wire.model.manifest)
        except ManifestError as err:
            raise FleetProtocolError(f"desired state: model.manifest: {err}") from None
        model = DesiredModel(manifest, wire.model.artifact_url)
    return DesiredState(wire.device, wire.generation, model, wire.shadow_s, wire.poll_s)


@dataclasses.dataclass(frozen=True, slots=True)
class ShadowStats:
    """The shadow figures a report carries (a `ShadowReport`, in the contract's keys)."""

    rows: int
    errors: int
    error_rate: float
    latency_p99_us: float | None
    anomaly_rate_current: float | None
    anomaly_rate_candidate: float | None
    anomaly_rate_shift: float | None

    @classmethod
    def of(cls, report: ShadowReport) -> ShadowStats:
        return cls(report.rows, report.errors, report.error_rate, report.latency_p99_us,
                   report.anomaly_rate_current, report.anomaly_rate_candidate,
                   report.anomaly_rate_shift)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """One `POST /v1/device/report`: where this device is with `generation`."""

    generation: int
    state: ReportState
    reason: str = ""
    current: str | None = None
    previous: str | None = None
    shadow: ShadowStats | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "current": self.current,
            "previous": self.previous,
            "state": self.state,
            "reason": self.reason,
            "shadow": self.shadow.to_json() if self.shadow is not None else None,
        }


def _describe(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: "
        f"{error['msg'].removeprefix('Value error, ')}"
        for error in err.errors()
    )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _check_base_url(url: str) -> str | None:
    """None when `url` is a usable control-plane base URL, else the problem."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected http(s)://host[:port][/prefix], got {url!r}"
    if parts.query or parts.fragment:
        return f"a base URL has no query or fragment, got {url!r}"
    return None


# ---- sources ------------------------------------------------------------------------------


class ModelSource(Protocol):
    """Where a `ModelUpdater` learns which model to run, fetches its bytes and tells how it
    went (see the module contracts). `desired(etag)` returns None while generation `etag`
    is still the latest; it raises `CandidateRefused` for a generation the source already
    knows must not be installed, and a `FleetError` for any failed exchange. `url` is where
    the source is (for the log), `max_artifact_bytes` caps every download."""

    @property
    def url(self) -> str: ...

    @property
    def max_artifact_bytes(self) -> int: ...

    def describe(self) -> str: ...

    async def desired(self, etag: int | None) -> DesiredState | None: ...

    async def download(self, artifact_url: str, *, max_bytes: int | None = None) -> bytes: ...

    async def report(self, report: Report) -> None: ...

    async def aclose(self) -> None: ...


# ---- the client ---------------------------------------------------------------------------


class FleetClient:
    """The device API of the control plane over one `httpx.AsyncClient` (its timeouts,
    TLS and connection pool are the caller's). `url` is the base: requests go to
    `{url}/v1/device/...`, and an `artifact_url` that is a path is taken relative to it."""

    def __init__(
        self,
        url: str,
        token: str,
        http: httpx.AsyncClient,
        max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
    ) -> None:
        problem = _check_base_url(url)
        if problem is not None:
            raise ValueError(f"control plane url: {problem}")
        if not token or any(c in token for c in "\r\n"):
            raise ValueError("the device token must be a non-empty single line")
        if max_artifact_bytes < 1:
            raise ValueError("max_artifact_bytes must be at least 1")
        self.url = url.rstrip("/")
        self.http = http
        self.max_artifact_bytes = max_artifact_bytes
        self._auth = {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}

    async def aclose(self) -> None:
        """Close the httpx client (only when this client owns it)."""
        await self.http.aclose()

    def describe(self) -> str:
        return f"the desired state at {self.url}"

    def artifact_address(self, artifact_url: str) -> tuple[str, bool]:
        """The absolute URL of an artifact and whether it is on the control plane's origin
        (only then is the token sent)."""
        parts = urlsplit(artifact_url)
        if parts.scheme or parts.netloc:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FleetProtocolError(
                    f"artifact_url {artifact_url!r}: expected an http(s) URL or a path")
            address = artifact_url
        else:
            address = f"{self.url}/{artifact_url.lstrip('/')}"
        return address, _origin(address) == _origin(self.url)

    @staticmethod
    def _raise_for(status: int, what: str, headers: Any, detail: str = "") -> None:
        suffix = f": {detail[:200]}" if detail else ""
        if status in (401, 403):
            raise FleetAuthError(f"{what}: the control plane refused the device token "
                                 f"({status}){suffix}", status)
        if status >= 500 or status in (408, 425, 429):
            raise FleetUnavailable(f"{what}: answered {status}{suffix}",
                                   _retry_after(headers.get("Retry-After")))
        raise FleetProtocolError(f"{what}: unexpected answer {status}{suffix}")

    async def desired(self, etag: int | None) -> DesiredState | None:
        """The desired state, or None when it is still generation `etag` (304)."""
        import httpx

        headers = dict(self._auth)
        if etag is not None:
            headers["If-None-Match"] = f'"{etag}"'
        what = f"GET {DESIRED_PATH}"
        try:
            response = await self.http.get(self.url + DESIRED_PATH, headers=headers)
        except httpx.RequestError as err:
            raise FleetUnavailable(f"{what}: {type(err).__name__}: {err}") from err
        if response.status_code == 304:
            if etag is None:
                raise FleetProtocolError(f"{what}: 304 to a request without If-None-Match")
            return None
        if response.status_code != 200:
            self._raise_for(response.status_code, what, response.headers, response.text)
        try:
            data = json.loads(response.content)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FleetProtocolError(f"{what}: the body is not JSON ({err})") from None
        return parse_desired(data)

    async def download(self, artifact_url: str, *, max_bytes: int | None = None) -> bytes:
        """The artifact's bytes, streamed and aborted beyond `max_artifact_bytes` (or
        `max_bytes`, if smaller) with ArtifactTooLarge."""
        import httpx

        limit = self.max_artifact_bytes if max_bytes is None else min(max_bytes,
                                                                      self.max_artifact_bytes)
        address, home = self.artifact_address(artifact_url)
        headers = self._auth if home else {"User-Agent": USER_AGENT}
        what = f"GET {artifact_url}"
        data = bytearray()
        try:
            async with self.http.stream("GET", address, headers=headers) as response:
                if response.status_code != 200:
                    self._raise_for(response.status_code, what, response.headers)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ArtifactTooLarge(f"{what}: {int(declared)} bytes announced, more "
                                           f"than the {limit}-byte cap; not downloaded")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ArtifactTooLarge(f"{what}: more than the {limit}-byte cap; "
                                               "download aborted")
        except httpx.DecodingError as err:
            raise FleetProtocolError(f"{what}: undecodable body ({err})") from err
        except httpx.RequestError as err:
            raise FleetUnavailable(f"{what}: {type(err).__name__}: {err}") from err
        return bytes(data)

    async def report(self, report: Report) -> None:
        """POST one report; any 2xx is success."""
        import httpx

        what = f"POST {REPORT_PATH}"
        try:
            response = await self.http.post(self.url + REPORT_PATH, json=report.to_json(),
                                            headers=self._auth)
        except httpx.RequestError as err:
            raise FleetUnavailable(f"{what}: {type(err).__name__}: {err}") from err
        if not 200 <= response.status_code < 300:
            self._raise_for(response.status_code, what, response.headers, response.text)


# ---- feeding the shadow from the agent's inference ----------------------------------------


@functools.cache
def _observed_scorer_type() -> type[Any]:
    from .inference import OnnxScorer

    class ObservedScorer(OnnxScorer):
        """An OnnxScorer that hands every matrix it was asked to score to `observe`
        (after scoring, even when scoring failed: the candidate is measured anyway)."""

        def __init__(self, bundle: ModelBundle,
                     observe: Callable[[npt.ArrayLike], None]) -> None:
            super().__init__(bundle)
            self.observe = observe

        def score(self, features: npt.ArrayLike) -> Any:
            try:
                return super().score(features)
            finally:
                self.observe(features)

    return ObservedScorer


def observed_scorer(bundle: ModelBundle,
                    observe: Callable[[npt.ArrayLike], None]) -> OnnxScorer:
    """An `OnnxScorer` for `bundle` that also calls `observe(X)` (normally
    `ModelUpdater.observe`) with every feature matrix it scores."""
    scorer: OnnxScorer = _observed_scorer_type()(bundle, observe)
    return scorer


def inferencer_for(
    bundle: ModelBundle,
    observe: Callable[[npt.ArrayLike], None],
    *,
    assets: Sequence[str] | None = None,
    previous: Inferencer | None = None,
) -> Inferencer:
    """The `Inferencer` a swap installs: an observed scorer for `bundle`, and the windows
    of `previous` when they have the same feature spec (partial windows survive the swap),
    else fresh windows for `assets` (default: any asset), as `Inferencer.from_bundle`."""
    from edgefleet.protocols.features import FeatureWindows

    from .inference import Inferencer

    scorer = observed_scorer(bundle, observe)
    windows = previous.windows if previous is not None else None
    if windows is None or windows.spec != bundle.features:
        allowed = frozenset(assets) if assets is not None else None
        max_assets = max(10_000, len(allowed)) if allowed is not None else 10_000
        windows = FeatureWindows(bundle.features, max_assets=max_assets, assets=allowed)
    return Inferencer(scorer, windows)


# ---- the updater ----------------------------------------------------------------------------


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `stop` is set; True when stopped."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    return stop.is_set()


class _Stopped(Exception):
    """Internal: `stop` was set during a shadow."""


class ModelUpdater:
    """Follows a source's desired state: the control plane's, or an MLflow alias in
    standalone mode (see the module's contracts).

    `swap(bundle)` replaces the model the device serves; it is called on the event loop.
    `poll_min_s`/`poll_max_s` clamp the server's suggested interval (`poll_max_s` is also
    the slow retry after an auth error); `backoff_*` shape the retries after failures.
    `trust` chooses the store's install ("signature": `install`, the fleet's;
    "checksum": `install_checksummed`, for a source that builds unsigned manifests);
    `label` prefixes the log lines.
    """

    def __init__(
        self,
        store: ModelStore,
        client: ModelSource,
        swap: Callable[[ModelBundle], None],
        *,
        poll_min_s: float = 10.0,
        poll_max_s: float = 300.0,
        backoff_initial_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        rng: random.Random | None = None,
        trust: Trust = "signature",
        label: str = "fleet",
    ) -> None:
        if not 0 < poll_min_s <= poll_max_s:
            raise ValueError("poll intervals need 0 < poll_min_s <= poll_max_s")
        if trust not in ("signature", "checksum"):
            raise ValueError(f"trust must be 'signature' or 'checksum', not {trust!r}")
        self.store = store
        self.client = client
        self.swap = swap
        self.trust = trust
        self.label = label
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self._rng = rng or random.Random()
        self._backoff = Backoff(backoff_initial_s, backoff_cap_s, self._rng)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.generation: int | None = None  # the last settled generation (sent as ETag)
        self.poll_s = poll_min_s  # the server's suggestion, clamped
        self.last_error: str | None = None
        self._pending: Report | None = None  # the latest report not yet sent
        self._shadow: ShadowRun | None = None
        self._failing: str | None = None  # "auth" / "unavailable" / "protocol" episode

    # ---- what the agent calls -----------------------------------------------------------

    @property
    def shadowing(self) -> bool:
        return self._shadow is not None

    @property
    def pending_report(self) -> Report | None:
        return self._pending

    def observe(self, features: npt.ArrayLike) -> None:
        """One cycle's live feature matrix `[n, F]`: scored by the candidate (and the
        current model, for the comparison) while a shadow runs; ignored otherwise. Never
        raises: a failing candidate is counted by the shadow run."""
        run = self._shadow
        if run is None:
            return
        try:
            run.feed(features)
        except Exception as err:  # noqa: BLE001 - the agent's cycle must not break here
            log.debug("%s: shadow feed: %s", self.label, err)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and follow the desired state until `stop` is set."""
        log.info("%s: following %s", self.label, self.client.describe())
        while not stop.is_set():
            delay = await self.poll_once(stop)
            if await _wait(stop, delay):
                break

    async def poll_once(self, stop: asyncio.Event | None = None) -> float:
        """Send the pending report, poll once, follow what changed (a shadow included);
        return the delay before the next poll. Never raises but on cancellation."""
        stop = stop if stop is not None else asyncio.Event()
        try:
            await self._flush_report()
            desired = await self._poll(self.generation)
            while desired is not None:
                desired = await self._follow(desired, stop)
        except _Stopped:
            return 0.0
        except CandidateRefused as err:  # the source's own refusal: settled like the store's
            self.counters["refusals"] += 1
            await self._settle(err.generation, "refused", f"{err.reason}: {err.message}")
        except FleetAuthError as err:
            self._count_error(err)
            self.counters["auth_errors"] += 1
            if self._failing != "auth":
                log.error("%s: %s; keeping the current model, retrying every %.3g s "
                          "(check the token)", self.label, err, self.poll_max_s)
            self._failing = "auth"
            return self._jitter(self.poll_max_s)
        except FleetError as err:
            self._count_error(err)
            kind = "unavailable" if isinstance(err, FleetUnavailable) else "protocol"
            if self._failing != kind:
                level = logging.WARNING if kind == "unavailable" else logging.ERROR
                log.log(level, "%s: %s; keeping the current model, retrying with backoff",
                        self.label, err)
            self._failing = kind
            delay = self._backoff.next_delay()
            if isinstance(err, FleetUnavailable) and err.retry_after is not None:
                delay = max(delay, min(err.retry_after, self._backoff.cap_s))
            return delay
        except Exception as err:  # the updater must outlive any one fault (logged, counted)
            self._count_error(err)
            log.exception("%s: unexpected fault; keeping the current model", self.label)
            self._failing = "fault"
            return self._backoff.next_delay()
        if self._failing is not None:
            log.info("%s: %s reachable again", self.label, self.client.url)
            self._failing = None
        self._backoff.reset()
        return self._jitter(self.poll_s)

    # ---- helpers ------------------------------------------------------------------------

    def _count_error(self, err: BaseException) -> None:
        self.counters["errors"] += 1
        self.last_error = str(err)

    def _jitter(self, seconds: float) -> float:
        return seconds * self._rng.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)

    def _clamp(self, seconds: float) -> float:
        return min(self.poll_max_s, max(self.poll_min_s, seconds))

    async def _poll(self, etag: int | None) -> DesiredState | None:
        self.counters["polls"] += 1
        desired = await self.client.desired(etag)
        if desired is None:
            self.counters["not_modified"] += 1
        else:
            self.poll_s = self._clamp(desired.poll_s)
        return desired

    def _state(self) -> tuple[str | None, str | None]:
        from .model_manager import ModelStoreError

        try:
            return self.store.state()
        except ModelStoreError:
            return None, None

    async def _report(self, generation: int, state: ReportState, reason: str,
                      shadow: ShadowStats | None = None) -> None:
        current, previous = self._state()
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON - 1] + "…"
        self._pending = Report(generation, state, reason, current, previous, shadow)
        await self._flush_report()

    async def _settle(self, generation: int, state: ReportState, reason: str,
                      shadow: ShadowStats | None = None) -> None:
        self.generation = generation
        level = logging.WARNING if state in ("refused", "failed") else logging.INFO
        log.log(level, "%s: generation %d %s: %s", self.label, generation, state, reason)
        await self._report(generation, state, reason, shadow)

    async def _flush_report(self) -> None:
        report = self._pending
        if report is None:
            return
        try:
            await self.client.report(report)
        except FleetProtocolError as err:  # refused as such (422, …): sending again is futile
            self.counters["reports_failed"] += 1
            log.error("%s: report %s (generation %d) refused, dropped: %s", self.label,
                      report.state, report.generation, err)
            if self._pending is report:
                self._pending = None
            return
        except FleetError as err:  # unreachable, or the token: kept for the next poll
            self.counters["reports_failed"] += 1
            log.debug("%s: report %s (generation %d) not sent: %s", self.label,
                      report.state, report.generation, err)
            return
        self.counters["reports_sent"] += 1
        if self._pending is report:
            self._pending = None

    def _installed(self, ref: str) -> ModelManifest | None:
        from .model_manager import ModelStoreError

        try:
            return self.store.manifest_of(ref)
        except ModelStoreError:
            return None

    def _local_bytes(self, manifest: ModelManifest) -> bytes | None:
        """The artifact from the store's own copy, when it is intact (no download)."""
        from .model_manager import MODEL_FILE, ModelStoreError

        try:
            path = self.store.path_of(manifest.model_name, manifest.version) / MODEL_FILE
            data = path.read_bytes()
        except (OSError, ModelStoreError):
            return None
        return data if len(data) == manifest.size and sha256_hex(data) == manifest.sha256 \
            else None

    def _install(self, manifest: ModelManifest, data: bytes) -> ModelBundle:
        if self.trust == "checksum":
            return self.store.install_checksummed(manifest, data)
        return self.store.install(manifest, data)

    def _swap(self, bundle: ModelBundle) -> None:
        self.swap(bundle)
        self.counters["swaps"] += 1

    async def _undo(self, why: str) -> None:
        """After a failed swap: the store back to the model the agent still runs."""
        from .model_manager import ModelStoreError

        try:
            await asyncio.to_thread(self.store.rollback)
        except ModelStoreError as err:
            log.error("%s: %s, and the store could not be put back (%s)", self.label, why, err)

    # ---- following one desired state ----------------------------------------------------

    async def _follow(self, desired: DesiredState, stop: asyncio.Event) -> DesiredState | None:
        """Act on `desired`; return a newer desired state that arrived meanwhile, if any."""
        try:
            return await self._follow_one(desired, stop)
        except (FleetAuthError, FleetUnavailable, CandidateRefused, _Stopped):
            raise  # the control plane is out of reach, or poll_once settles the refusal
        except Exception as err:
            # An off-contract answer (a 404 artifact) or a local fault (disk): not settled,
            # so retried after a backoff; the control plane hears why meanwhile.
            await self._report(desired.generation, "failed", f"{err} (will retry)")
            raise

    async def _follow_one(self, desired: DesiredState, stop: asyncio.Event
                          ) -> DesiredState | None:
        from .model_manager import ModelStoreError

        generation, model = desired.generation, desired.model
        current, previous = self.store.state()
        if model is None:
            if generation != self.generation:
                await self._settle(generation, "applied", "the desired state names no model; "
                                   f"keeping {current or 'no model'}")
            return None
        manifest = model.manifest
        ref = manifest.ref
        installed = self._installed(ref)
        if installed is not None and installed != manifest:
            self.counters["refusals"] += 1
            await self._settle(generation, "refused", f"conflict: model {ref} is installed "
                               "with a different manifest (a published version never changes)")
            return None
        if ref == current:
            if generation != self.generation:
                await self._settle(generation, "applied", f"model {ref} is current")
            return None
        if ref == previous:
            try:
                await asyncio.to_thread(self.store.rollback)
            except ModelStoreError as err:
                log.warning("%s: offline rollback to %s impossible (%s); installing it "
                            "again", self.label, ref, err)
            else:
                self.counters["rollbacks"] += 1
                try:
                    bundle = await asyncio.to_thread(self.store.current_bundle)
                    if bundle is None:
                        raise ModelStoreError("no current model after the rollback")
                    self._swap(bundle)
                except Exception as err:  # noqa: BLE001 - any swap fault: undo, report
                    await self._undo("swap after rollback failed")
                    self.counters["failures"] += 1
                    await self._settle(generation, "failed", f"rollback to {ref}: {err}")
                    return None
                await self._settle(generation, "rolled_back",
                                   f"rolled back to {ref} from disk (no download)")
                return None
        return await self._deploy(desired, model, local=installed is not None, stop=stop)

    async def _deploy(self, desired: DesiredState, model: DesiredModel, *, local: bool,
                      stop: asyncio.Event) -> DesiredState | None:
        from .model_manager import ModelRefused

        generation, manifest = desired.generation, model.manifest
        ref = manifest.ref
        cap = self.client.max_artifact_bytes
        if manifest.size > cap:
            self.counters["refusals"] += 1
            await self._settle(generation, "refused", f"too_large: model {ref} is "
                               f"{manifest.size} bytes, more than the {cap}-byte cap")
            return None
        data = await asyncio.to_thread(self._local_bytes, manifest) if local else None
        if data is None:
            await self._report(generation, "downloading",
                               f"downloading {ref} ({manifest.size} bytes)")
            try:
                data = await self.client.download(model.artifact_url, max_bytes=manifest.size)
            except ArtifactTooLarge as err:
                self.counters["refusals"] += 1
                await self._settle(generation, "refused", f"too_large: {err}")
                return None
            self.counters["downloads"] += 1
        try:
            bundle = await asyncio.to_thread(self._install, manifest, data)
        except ModelRefused as err:
            self.counters["refusals"] += 1
            await self._settle(generation, "refused", f"{err.reason}: {err.message}")
            return None
        self.counters["installs"] += 1

        outcome = await self._shadow_run(desired, bundle, stop)
        if not isinstance(outcome, ShadowStats):
            return outcome  # a newer generation to follow, or nothing (already settled)
        if outcome.rows and outcome.errors and outcome.error_rate >= 1.0:
            self.counters["failures"] += 1
            await self._settle(generation, "failed", f"candidate {ref} failed every one of "
                               f"its shadow batches ({outcome.errors}); not swapped in",
                               outcome)
            return None
        old = self._state()[0]
        await asyncio.to_thread(self.store.activate, manifest.model_name, manifest.version)
        try:
            self._swap(bundle)
        except Exception as err:  # noqa: BLE001 - any swap fault: undo, report
            if old is not None:
                await self._undo("swap failed")
            self.counters["failures"] += 1
            await self._settle(generation, "failed", f"swap to {ref} failed: {err}", outcome)
            return None
        await self._settle(generation, "applied",
                           f"{ref} active after a {desired.shadow_s:g} s shadow", outcome)
        return None

    async def _shadow_run(self, desired: DesiredState, bundle: ModelBundle,
                          stop: asyncio.Event) -> ShadowStats | DesiredState | None:
        """Shadow `bundle` for `desired.shadow_s` s on observed windows, polling meanwhile.
        Returns the stats, a newer desired state (shadow abandoned), or None (settled as
        failed). Raises _Stopped, and FleetAuthError (abandoned, not settled)."""
        from .inference import ModelLoadError, OnnxScorer
        from .model_manager import ModelStoreError, ShadowRun

        generation, ref = desired.generation, f"{bundle.name}/{bundle.version}"

        def build() -> ShadowRun:
            candidate = OnnxScorer(bundle)
            try:
                current_bundle = self.store.current_bundle()
            except (ModelStoreError, ModelLoadError) as err:
                log.warning("%s: the current model cannot be loaded for the shadow "
                            "comparison (%s); shadowing the candidate alone", self.label, err)
                current_bundle = None
            current = OnnxScorer(current_bundle) if current_bundle is not None else None
            return ShadowRun(current, candidate)

        try:
            run = await asyncio.to_thread(build)
        except (ModelLoadError, ValueError) as err:
            self.counters["failures"] += 1
            await self._settle(generation, "failed", f"cannot shadow {ref}: {err}")
            return None
        self.counters["shadows"] += 1
        self._shadow = run
        finished = False
        try:
            deadline = time.monotonic() + desired.shadow_s
            await self._report(generation, "shadowing", f"shadowing {ref} for "
                               f"{desired.shadow_s:g} s", ShadowStats.of(run.report()))
            while (remaining := deadline - time.monotonic()) > 0:
                if await _wait(stop, min(remaining, self.poll_s)):
                    raise _Stopped
                if time.monotonic() >= deadline:
                    break
                try:
                    newer = await self._poll(generation)
                except (FleetAuthError, CandidateRefused):
                    raise  # a newer generation the source refused: this shadow is moot
                except FleetError as err:  # offline mid-shadow: the shadow goes on
                    self._count_error(err)
                    continue
                if newer is not None and newer.generation != generation:
                    log.info("%s: generation %d arrived while shadowing %s (generation "
                             "%d): shadow abandoned", self.label, newer.generation, ref,
                             generation)
                    return newer
                await self._report(generation, "shadowing", f"shadowing {ref}",
                                   ShadowStats.of(run.report()))
            finished = True
            return ShadowStats.of(run.report())
        finally:
            self._shadow = None
            if not finished:
                self.counters["shadows_abandoned"] += 1


# ---- configuration ------------------------------------------------------------------------

_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.DOTALL)


def parse_public_keys(text: str, origin: str) -> list[Ed25519PublicKey]:
    """Every key in `text`: PEM blocks and/or base64 lines (`#` starts a comment).
    ValueError names `origin` and the bad key."""
    keys = []
    for index, block in enumerate(_PEM_BLOCK.findall(text)):
        try:
            keys.append(load_public_key(block))
        except ManifestError as err:
            raise ValueError(f"{origin}: PEM block {index + 1}: {err}") from None
    rest = _PEM_BLOCK.sub("", text)
    for number, line in enumerate(rest.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        try:
            keys.append(load_public_key(stripped))
        except ManifestError as err:
            raise ValueError(f"{origin}: line {number}: {err}") from None
    return keys


class FleetConfig(BaseModel):
    """Where the agent gets its models: the control plane's device API (see the module
    docstring). `token` or `token_file` is required; `public_keys` (PEM or base64 of the
    32 raw bytes) and/or `public_keys_file` give the fleet's manifest-verification keys
    (several during a rotation); `models_dir` defaults to `<state_dir>/models`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(min_length=1)]
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_file: Path | None = None  # https only: the control plane's CA (default: the system's)
    public_keys: tuple[str, ...] = ()
    public_keys_file: Path | None = None
    models_dir: Path | None = None
    keep: Annotated[int, Field(ge=2, le=20)] = 3  # model versions kept on disk
    poll_min_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    poll_max_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    backoff_cap_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    max_artifact_bytes: Annotated[int, Field(ge=1024, le=1024**3)] = DEFAULT_MAX_ARTIFACT_BYTES

    @model_validator(mode="after")
    def _check(self) -> FleetConfig:
        problems = []
        problem = _check_base_url(self.url)
        if problem is not None:
            problems.append(f"url: {problem}")
        elif self.ca_file is not None and not self.url.startswith("https://"):
            problems.append("ca_file: set for a plain http:// url (use https://)")
        if self.token is not None and self.token_file is not None:
            problems.append("token_file: set together with token (choose one)")
        elif self.token is None and self.token_file is None:
            problems.append("token: required, not set (or set token_file)")
        elif self.token is not None:
            secret = self.token.get_secret_value()
            if not secret.strip() or any(c in secret for c in "\r\n"):
                problems.append("token: must be a non-empty single line")
        if not self.public_keys and self.public_keys_file is None:
            problems.append("public_keys: at least one fleet public key is needed "
                            "(or set public_keys_file)")
        for index, text in enumerate(self.public_keys):
            try:
                load_public_key(text)
            except ManifestError as err:
                problems.append(f"public_keys: [{index}]: {err}")
        if self.poll_max_s < self.poll_min_s:
            problems.append("poll_max_s: must be >= poll_min_s")
        if self.backoff_cap_s < self.backoff_initial_s:
            problems.append("backoff_cap_s: must be >= backoff_initial_s")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def read_token(self) -> str:
        """The device token: `token`, or the first line of `token_file` (read now)."""
        if self.token is not None:
            return self.token.get_secret_value().strip()
        assert self.token_file is not None
        text = self.token_file.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"fleet.token_file {self.token_file} is empty")
        return text.splitlines()[0].strip()

    def load_public_keys(self) -> list[Ed25519PublicKey]:
        """The inline keys, then those of `public_keys_file` (read now)."""
        keys = [load_public_key(text) for text in self.public_keys]
        if self.public_keys_file is not None:
            path = self.public_keys_file
            found = parse_public_keys(path.read_text(encoding="utf-8"), str(path))
            if not found:
                raise ValueError(f"fleet.public_keys_file {path} holds no key")
            keys.extend(found)
        return keys

    def models_path(self, state_dir: Path) -> Path:
        return self.models_dir if self.models_dir is not None else state_dir / "models"

    def http_client(self) -> httpx.AsyncClient:
        """An httpx client with this config's timeout and TLS settings (no redirects)."""
        import ssl

        import httpx

        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), verify=verify,
                                 follow_redirects=False)


def build_updater(
    config: FleetConfig,
    *,
    state_dir: Path,
    swap: Callable[[ModelBundle], None],
    features: FeatureSpec | None = None,
    http: httpx.AsyncClient | None = None,
) -> ModelUpdater:
    """A `ModelUpdater` from a `FleetConfig`: the store under `models_path(state_dir)`
    (checking every model against `features` when given), a client over `http` (default:
    `config.http_client()`, closed by `updater.client.aclose()`)."""
    from .model_manager import ModelStore

    store = ModelStore(config.models_path(state_dir), config.load_public_keys(), features,
                       keep=config.keep)
    client = FleetClient(config.url, config.read_token(),
                         http if http is not None else config.http_client(),
                         config.max_artifact_bytes)
    return ModelUpdater(store, client, swap, poll_min_s=config.poll_min_s,
                        poll_max_s=config.poll_max_s,
                        backoff_initial_s=config.backoff_initial_s,
                        backoff_cap_s=config.backoff_cap_s)
