"""The forwarder: buffered rows → the fog gateway, acknowledged before they are deleted.

Contracts
---------
**At-least-once, in seq order.** Workers (`fog.in_flight` of them) claim contiguous
batches of unacknowledged committed rows from the buffer (`SqliteBuffer.claim_batch`),
encode them, send them, and `ack` each batch's exact seq range only when the fog has
answered 2xx (HTTP) or the broker has sent PUBACK (MQTT QoS 1). Anything else releases
the claim: the rows stay in the buffer and are sent again. A crash between the fog's
answer and the ack sends the batch twice; the fog deduplicates on `(device, seq)`.

**What each answer does** (HTTP; MQTT has only "acknowledged" and "not reached"):

=====================================  ================================================
answer                                 forwarder
=====================================  ================================================
2xx; 409 (the fog already has them)    ack: the rows leave the buffer
408, 425, 429, 5xx, network errors     release; retry after a capped, fully jittered
                                       exponential delay (`backoff_initial_s` …
                                       `backoff_cap_s`); a 429/503 `Retry-After` is
                                       honoured (up to 10 × `backoff_cap_s`)
401, 403, 404                          hold: the token or URL is wrong, not the batch.
                                       Nothing is dead-lettered (that would empty the
                                       buffer into the DLQ); the forwarder retries at
                                       the backoff cap and logs the fault at ERROR once
413 (too large)                        the batch is split in two and each half sent; a
                                       single row refused as too large is dead-lettered
any other 4xx (400, 422, …)            dead-lettered: the batch, exactly as sent, moves to
                                       the buffer's dead-letter table
                                       (`edgefleet agent dlq`), counted, logged at ERROR;
                                       never retried forever, never dropped silently
=====================================  ================================================

**Live first after an outage.** While the fog is unreachable, rows pile up. When the
first send succeeds again, the seq committed at that moment marks the boundary: rows
above it are *live* and go first (workers claim them with `min_seq`), rows below are the
*backlog*, sent whenever no live batch is waiting, at most `backlog_rows_per_s` rows per
second if that is set (else as fast as the fog takes them). Rows buffered by an earlier
run count as backlog too.

**Batches** are bounded by `batch_max_rows` rows, `batch_max_bytes` encoded bytes (the
row count adapts to the measured bytes per row; an oversized batch is released and
claimed again smaller) and `batch_max_wait_s`: a worker claims as soon as `batch_max_rows`
rows are waiting, or `batch_max_wait_s` after the first new row was announced
(`notify`), so a quiet line still forwards within that wait.

**Bodies.** HTTP: `POST <url>` with the binary wire encoding (`protocols/wire.py`,
`Content-Type: application/vnd.edgefleet.wire`) or wire JSON (`encoding: json`),
gzip-compressed unless `gzip: false` (`Content-Encoding: gzip`), `Authorization: Bearer
<token>`; TLS with `ca_file`, mTLS with `client_cert` and `client_key`. Heartbeats go to
the same URL as binary `H` messages (or wire JSON). MQTT (`mqtt(s)://host:port/prefix`):
batches are published to `<prefix>/<device>/batch`, heartbeats to
`<prefix>/<device>/heartbeat`, QoS 1, the binary encoding, not compressed; the token,
if any, is the MQTT password with the device as user name.

**Threading.** Every buffer call goes through `BufferExecutor`, one worker thread that
owns the buffer's I/O for the agent; encoding and gzip run in the default executor.
Nothing here blocks the event loop on disk or CPU-heavy work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gzip
import logging
import math
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from edgefleet.protocols.source import Backoff
from edgefleet.protocols.wire import (
    MAX_BATCH_READINGS,
    Batch,
    Heartbeat,
    encode_binary,
    encode_json,
)

if TYPE_CHECKING:
    from .buffer import SqliteBuffer

__all__ = [
    "BufferExecutor",
    "FogConfig",
    "Forwarder",
    "ForwarderStats",
    "HttpTransport",
    "MqttTransport",
    "SendOutcome",
    "Transport",
    "build_transport",
]

log = logging.getLogger(__name__)

WIRE_CONTENT_TYPE: Final = "application/vnd.edgefleet.wire"
GZIP_LEVEL: Final = 1  # edge CPU is scarce; level 1 gets most of the ratio on this data
_RETRY_AFTER_FACTOR: Final = 10  # a fog's Retry-After is honoured up to 10 × backoff_cap_s

_P = ParamSpec("_P")
_T = TypeVar("_T")


class FogConfig(BaseModel):
    """Where and how the forwarder sends (see the module docstring and docs/agent.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(min_length=1)]
    token: SecretStr | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    encoding: Literal["binary", "json"] = "binary"
    gzip: bool = True
    batch_max_rows: Annotated[int, Field(ge=1, le=MAX_BATCH_READINGS)] = 5000
    batch_max_bytes: Annotated[int, Field(ge=1024, le=64 * 1024**2)] = 1024**2
    batch_max_wait_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    backoff_cap_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    in_flight: Annotated[int, Field(ge=1, le=16)] = 2
    backlog_rows_per_s: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _check(self) -> FogConfig:
        problems = []
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https", "mqtt", "mqtts") or not parts.hostname:
            problems.append(
                f"url: expected http(s)://host[:port]/path or mqtt(s)://host[:port]/prefix, "
                f"got {self.url!r}"
            )
        if self.token is not None and self.token_file is not None:
            problems.append("token_file: set together with token (choose one)")
        if (self.client_cert is None) != (self.client_key is None):
            problems.append("client_cert, client_key: set both for mTLS, or neither")
        if parts.scheme in ("http", "mqtt") and (self.ca_file or self.client_cert):
            problems.append("ca_file, client_cert: TLS files need an https:// or mqtts:// url")
        if self.backoff_cap_s < self.backoff_initial_s:
            problems.append("backoff_cap_s: must be >= backoff_initial_s")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def transport_kind(self) -> Literal["http", "mqtt"]:
        return "mqtt" if urlsplit(self.url).scheme.startswith("mqtt") else "http"

    def read_token(self) -> str | None:
        """The bearer token: `token`, or the first line of `token_file` (read now, so a
        rotated file is picked up at the next start)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            text = self.token_file.read_text(encoding="utf-8").strip()
            if not text:
                raise ValueError(f"fog.token_file {self.token_file} is empty")
            return text.splitlines()[0]
        return None


# ---- the buffer's thread --------------------------------------------------------------


class BufferExecutor:
    """One thread that makes every buffer call, so SQLite I/O never runs on the event loop
    and calls are served in order."""

    def __init__(self, buffer: SqliteBuffer) -> None:
        self.buffer = buffer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer")

    async def call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


# ---- transports -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SendOutcome:
    """What the fog made of one message. `status` is the HTTP status (MQTT: 200 on PUBACK,
    0 when the broker could not be reached); `retry_after` a Retry-After in seconds."""

    status: int
    detail: str = ""
    retry_after: float | None = None

    @property
    def reached(self) -> bool:
        return self.status != 0


class Transport(Protocol):
    async def send(self, body: bytes, *, kind: Literal["batch", "heartbeat"]) -> SendOutcome:
        """Deliver one encoded message. Never raises for network faults: they come back
        as status 0 with the reason in `detail`."""
        ...

    async def close(self) -> None: ...


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from a fog; the backoff applies
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class HttpTransport:
    """POST to the fog's ingest URL over one keep-alive httpx client."""

    def __init__(self, config: FogConfig, *, client: Any = None) -> None:
        import httpx

        self.config = config
        headers = {"User-Agent": "edgefleet-agent"}
        token = config.read_token()
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self._content_type = (
            WIRE_CONTENT_TYPE if config.encoding == "binary" else "application/json"
        )
        if config.gzip:
            headers["Content-Encoding"] = "gzip"
        verify: ssl.SSLContext | bool = True
        if config.ca_file is not None or config.client_cert is not None:
            context = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None
            )
            if config.client_cert is not None and config.client_key is not None:
                context.load_cert_chain(str(config.client_cert), str(config.client_key))
            verify = context
        self._client = client or httpx.AsyncClient(
            headers=headers,
            timeout=config.timeout_s,
            verify=verify,
            limits=httpx.Limits(max_connections=config.in_flight + 1),
        )
        self._httpx = httpx

    async def send(self, body: bytes, *, kind: Literal["batch", "heartbeat"]) -> SendOutcome:
        try:
            response = await self._client.post(
                self.config.url, content=body, headers={"Content-Type": self._content_type}
            )
        except self._httpx.HTTPError as err:
            reason = type(err).__name__
            return SendOutcome(0, f"{reason}: {err}" if str(err) else reason)
        detail = ""
        if response.status_code >= 300:
            detail = response.text[:300].strip()
        return SendOutcome(
            response.status_code, detail, _retry_after(response.headers.get("Retry-After"))
        )

    async def close(self) -> None:
        await self._client.aclose()


class MqttTransport:
    """Publish to the fog's broker with QoS 1; delivered when PUBACK arrives."""

    def __init__(self, config: FogConfig, device: str) -> None:
        from edgefleet.protocols.mqtt import parse_broker_url

        self.config = config
        parts = urlsplit(config.url)
        self._address = parse_broker_url(f"{parts.scheme}://{parts.netloc}")
        prefix = parts.path.strip("/") or "edgefleet/devices"
        self._topics = {kind: f"{prefix}/{device}/{kind}" for kind in ("batch", "heartbeat")}
        self._device = device
        self._client: Any = None
        self._connected = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error = "not connected yet"

    def _connect(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        loop = asyncio.get_running_loop()
        self._loop = loop
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-fwd-{self._device}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        token = self.config.read_token()
        if token is not None:
            client.username_pw_set(self._device, token)
        elif self._address.username is not None:
            client.username_pw_set(self._address.username, self._address.password)
        if self._address.tls:
            client.tls_set(
                ca_certs=str(self.config.ca_file) if self.config.ca_file else None,
                certfile=str(self.config.client_cert) if self.config.client_cert else None,
                keyfile=str(self.config.client_key) if self.config.client_key else None,
            )
        client.max_inflight_messages_set(self.config.in_flight + 1)

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self._last_error = f"broker refused the session: {reason}"
            else:
                loop.call_soon_threadsafe(self._connected.set)

        def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._last_error = f"disconnected: {reason}"
            loop.call_soon_threadsafe(self._lost)

        def on_publish(_c: Any, _u: Any, mid: int, _r: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._acked, mid)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.connect_async(self._address.host, self._address.port, keepalive=30)
        client.loop_start()
        self._client = client

    def _lost(self) -> None:
        self._connected.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(self._last_error))
        self._pending.clear()

    def _acked(self, mid: int) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def send(self, body: bytes, *, kind: Literal["batch", "heartbeat"]) -> SendOutcome:
        if self._client is None:
            self._connect()
        try:
            await asyncio.wait_for(self._connected.wait(), self.config.timeout_s)
        except TimeoutError:
            return SendOutcome(0, self._last_error)
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        info = self._client.publish(self._topics[kind], body, qos=1)
        if info.rc != 0:
            return SendOutcome(0, f"publish failed (rc {info.rc})")
        self._pending[info.mid] = future
        if info.is_published():  # PUBACK raced ahead of the registration
            self._acked(info.mid)
        try:
            await asyncio.wait_for(future, self.config.timeout_s)
        except (TimeoutError, ConnectionError) as err:
            self._pending.pop(info.mid, None)
            return SendOutcome(0, str(err) or "no PUBACK in time")
        return SendOutcome(200)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)


def build_transport(config: FogConfig, device: str) -> Transport:
    if config.transport_kind == "mqtt":
        return MqttTransport(config, device)
    return HttpTransport(config)


# ---- the forwarder --------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ForwarderStats:
    """Counters since start (metrics and heartbeats read these)."""

    batches_sent: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    live_rows_sent: int = 0
    backlog_rows_sent: int = 0
    retries: int = 0
    splits: int = 0
    dead_lettered_batches: int = 0
    dead_lettered_rows: int = 0
    heartbeats_sent: int = 0
    heartbeats_failed: int = 0
    outages: int = 0
    connected: bool | None = None  # None until the first send
    last_error: str | None = None
    last_ack_ns: int | None = None


class _Pace:
    """A token bucket for the backlog (`backlog_rows_per_s`); unlimited when rate is None."""

    def __init__(self, rate: float | None, clock: Callable[[], float]) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = 0.0
        self._at = clock()

    def wait_s(self, rows: int) -> float:
        """Seconds until `rows` may be sent (0: now, and they are taken)."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= min(rows, self.rate):
            self._tokens -= rows
            return 0.0
        return (min(rows, self.rate) - self._tokens) / self.rate


class Forwarder:
    """Sends the buffer's rows to the fog (see the module docstring)."""

    def __init__(
        self,
        config: FogConfig,
        bx: BufferExecutor,
        transport: Transport,
        device: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.bx = bx
        self.transport = transport
        self.device = device
        self.stats = ForwarderStats()
        self._clock = clock
        self._sleep = sleep
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_cap_s)
        self._wake = asyncio.Event()
        self._announced = 0  # rows announced by notify() since the last claim
        self._first_announced: float | None = None
        self._live_seq = 0  # rows from here on are live; below: backlog (0: no backlog)
        self._backlog_left = False
        self._pace = _Pace(config.backlog_rows_per_s, clock)
        # HTTP says what it carries (Content-Encoding); an MQTT payload cannot, so it is raw.
        self._gzip = config.gzip and config.transport_kind == "http"
        self._rows_limit = config.batch_max_rows
        self._bytes_per_row: float | None = None
        self._holding = False  # 401/403/404: logged once
        self._paused_until = 0.0

    # ---- called by the agent ------------------------------------------------------------

    def notify(self, rows: int) -> None:
        """`rows` new rows were appended (wakes a worker once a batch is due)."""
        if self._first_announced is None:
            self._first_announced = self._clock()
        self._announced += rows
        if self._announced >= self._rows_limit:
            self._wake.set()

    async def run(self) -> None:
        """Forward until cancelled."""
        committed = await self.bx.call(self.bx.buffer.committed_seq, self.device)
        depth = (await self.bx.call(self.bx.buffer.stats)).depth
        if depth:
            self._live_seq = committed + 1  # an earlier run's rows are backlog
            self._backlog_left = True
            log.info("forwarder: %d rows buffered by an earlier run; sending them behind live "
                     "data", depth)
        async with asyncio.TaskGroup() as group:
            for index in range(self.config.in_flight):
                group.create_task(self._worker(), name=f"forwarder-{index}")

    async def drain(self, timeout_s: float) -> int:
        """Send what is buffered, for at most `timeout_s` (used at shutdown, after the
        sources stopped and `run` was cancelled). Returns the rows left unsent."""
        buffer = self.bx.buffer
        # `run` was cancelled, so nothing is in flight: claims it left (a send or a claim
        # it interrupted) are claimable again now rather than when their lease expires.
        await self.bx.call(buffer.release_all)
        await self.bx.call(buffer.flush)
        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            wait = min(self._paused_until, deadline) - self._clock()
            if wait > 0:
                await self._sleep(wait)
                continue
            batch = await self._claim(live=False)
            if batch is None:
                break
            try:
                await asyncio.wait_for(self._deliver(batch, live=False),
                                       max(0.001, deadline - self._clock()))
            except TimeoutError:
                await self.bx.call(buffer.release, batch.device, batch.first_seq)
                break
        stats = await self.bx.call(buffer.stats)
        return stats.depth + stats.staged

    async def send_heartbeat(self, heartbeat: Heartbeat) -> bool:
        """Best effort: heartbeats are also stored as readings, which are forwarded
        durably. Returns whether the fog accepted it."""
        body = await asyncio.to_thread(self._encode, heartbeat)
        outcome = await self.transport.send(body, kind="heartbeat")
        ok = 200 <= outcome.status < 300
        if ok:
            self.stats.heartbeats_sent += 1
        else:
            self.stats.heartbeats_failed += 1
        return ok

    # ---- workers ------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            now = self._clock()
            if now < self._paused_until:
                await self._sleep(self._paused_until - now)
                continue
            if self._backlog_left and not self._live_due():
                if await self._send_backlog():
                    continue
            else:
                await self._wait_for_rows()
            batch = await self._claim(live=True)
            if batch is None:
                self._first_announced = None
                self._wake.clear()
                await self._idle()
                continue
            await self._deliver(batch, live=True)

    def _live_due(self) -> bool:
        """A live batch is due: full, or its first row waited `batch_max_wait_s`."""
        if self._first_announced is None:
            return False
        return (self._announced >= self._rows_limit
                or self._clock() - self._first_announced >= self.config.batch_max_wait_s)

    async def _send_backlog(self) -> bool:
        """Send one backlog batch, paced; False when the backlog is done."""
        batch = await self._claim(live=False)
        if batch is None:
            self._backlog_left = False
            self._live_seq = 0
            log.info("backlog sent")
            return False
        delay = self._pace.wait_s(len(batch.readings))
        if delay > 0:
            await self.bx.call(self.bx.buffer.release, batch.device, batch.first_seq)
            await self._sleep(min(delay, max(0.01, self._live_wait_left())))
            return True
        await self._deliver(batch, live=False)
        return True

    def _live_wait_left(self) -> float:
        if self._first_announced is None:
            return self.config.batch_max_wait_s
        return self._first_announced + self.config.batch_max_wait_s - self._clock()

    async def _wait_for_rows(self) -> None:
        """Hold a partial batch until it is full or `batch_max_wait_s` old."""
        if self._first_announced is None:
            return
        due = self._first_announced + self.config.batch_max_wait_s
        while self._announced < self._rows_limit and self._clock() < due:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - self._clock()))

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(self.config.batch_max_wait_s, 0.05))

    async def _claim(self, *, live: bool) -> Batch | None:
        min_seq = self._live_seq if live else 0
        if live:
            self._announced = 0
            self._first_announced = None
        return await self.bx.call(
            self.bx.buffer.claim_batch, self.device, self._rows_limit, min_seq=min_seq
        )

    def _encode(self, message: Batch | Heartbeat) -> bytes:
        body = encode_binary(message) if self.config.encoding == "binary" else encode_json(message)
        return gzip.compress(body, GZIP_LEVEL, mtime=0) if self._gzip else body

    async def _deliver(self, batch: Batch, *, live: bool) -> bool:
        """Send one claimed batch and settle it (ack, release, split or dead-letter).
        Returns whether the rows left the forwarding queue."""
        buffer = self.bx.buffer
        rows = len(batch.readings)
        body = await asyncio.to_thread(self._encode, batch)
        if len(body) > self.config.batch_max_bytes and rows > 1:
            self._bytes_per_row = len(body) / rows
            self._rows_limit = max(1, min(rows // 2, self._fitting_rows()))
            await self.bx.call(buffer.release, batch.device, batch.first_seq)
            return False
        outcome = await self.transport.send(body, kind="batch")
        status = outcome.status
        if 200 <= status < 300 or status == 409:
            await self.bx.call(buffer.ack, batch.device, batch.last_seq, first_seq=batch.first_seq)
            if self._sent(batch, len(body), live=live):
                await self._reconnected()
            return True
        if status == 413:
            return await self._split(batch, outcome)
        if status in (401, 403, 404):
            await self.bx.call(buffer.release, batch.device, batch.first_seq)
            self._hold(outcome)
            return False
        if 400 <= status < 500 and status not in (408, 425, 429):
            await self._dead_letter(batch, f"fog answered {status}: {outcome.detail}")
            return True
        await self.bx.call(buffer.release, batch.device, batch.first_seq)
        self._failed(outcome)
        return False

    def _fitting_rows(self) -> int:
        if self._bytes_per_row is None:
            return self.config.batch_max_rows
        return max(1, int(self.config.batch_max_bytes * 0.9 / self._bytes_per_row))

    def _sent(self, batch: Batch, size: int, *, live: bool) -> bool:
        """Count a delivered batch; True if it ended an outage."""
        rows = len(batch.readings)
        stats = self.stats
        stats.batches_sent += 1
        stats.rows_sent += rows
        stats.bytes_sent += size
        if live or batch.first_seq >= self._live_seq:
            stats.live_rows_sent += rows
        else:
            stats.backlog_rows_sent += rows
        stats.last_ack_ns = time.time_ns()
        self._bytes_per_row = size / rows
        self._rows_limit = min(self.config.batch_max_rows, self._fitting_rows())
        self._backoff.reset()
        if self._holding:
            log.info("fog accepts this agent again")
            self._holding = False
        ended_outage = stats.connected is False
        stats.connected = True
        stats.last_error = None
        return ended_outage

    async def _reconnected(self) -> None:
        """The first success after an outage: rows from here on are live."""
        log.info("fog reachable again; live data first, the backlog behind it")
        committed = await self.bx.call(self.bx.buffer.committed_seq, self.device)
        if committed + 1 > self._live_seq:
            self._live_seq = committed + 1
        self._backlog_left = True

    def _failed(self, outcome: SendOutcome) -> None:
        stats = self.stats
        stats.retries += 1
        reason = outcome.detail or f"HTTP {outcome.status}"
        if outcome.reached:
            reason = f"HTTP {outcome.status}: {outcome.detail}" if outcome.detail else reason
        if stats.connected is not False:
            stats.outages += 1
            log.warning("fog unreachable (%s); buffering and retrying with backoff", reason)
        stats.connected = False
        stats.last_error = reason[:200]
        delay = self._backoff.next_delay()
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after,
                                   self.config.backoff_cap_s * _RETRY_AFTER_FACTOR))
        self._paused_until = max(self._paused_until, self._clock() + delay)

    def _hold(self, outcome: SendOutcome) -> None:
        if not self._holding:
            log.error(
                "fog refused this agent (HTTP %d: %s): check fog.url and the token; rows "
                "stay buffered and are retried every %.0f s", outcome.status,
                outcome.detail or "no detail", self.config.backoff_cap_s)
            self._holding = True
        self.stats.connected = False
        self.stats.last_error = f"HTTP {outcome.status}: refused this agent"
        self.stats.retries += 1
        self._paused_until = self._clock() + self.config.backoff_cap_s

    async def _split(self, batch: Batch, outcome: SendOutcome) -> bool:
        rows = len(batch.readings)
        buffer = self.bx.buffer
        if rows == 1:
            await self._dead_letter(batch, f"fog answered 413 for one row: {outcome.detail}")
            return True
        self.stats.splits += 1
        self._rows_limit = max(1, rows // 2)
        await self.bx.call(buffer.release, batch.device, batch.first_seq)
        return False

    async def _dead_letter(self, batch: Batch, reason: str) -> None:
        dlq_id = await self.bx.call(self.bx.buffer.dead_letter, batch, reason[:500])
        self.stats.dead_lettered_batches += 1
        self.stats.dead_lettered_rows += len(batch.readings)
        self.stats.connected = True
        log.error(
            "batch %s:%d-%d dead-lettered as #%d (%s); inspect with `edgefleet agent dlq`",
            batch.device, batch.first_seq, batch.last_seq, dlq_id, reason,
        )
