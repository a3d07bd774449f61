"""MQTT as a streaming source: plain JSON telemetry and Sparkplug B, over paho-mqtt.

`MqttSourceConfig` is the registered unit (`type: mqtt`); `build()` turns it into an
`MqttSource`, whose `run(emit)` connects and pushes `Sample`s until cancelled.

Subscriptions
-------------
Each subscription is one of two formats.

`format: json` — `topic` is an MQTT topic filter; each message is a JSON object. The
asset comes from exactly one of `asset.topic_segment` (0-based index into the topic
levels: `plant/+/telemetry` with `topic_segment: 1`), `asset.fixed` (a name) or
`asset.path` (a string in the payload). Values come from `tags` (tag → path) and/or
`values_path` (a path to an object whose every member is a tag). The timestamp comes
from `timestamp_path` (`timestamp_unit`: `auto`, `iso8601`, `s`, `ms`, `us`, `ns`; `auto`
reads a string as ISO 8601 — naive means UTC — and a number by its magnitude), else it is
the time of receipt.

Path syntax (JSON): an optional `$`, then steps: `.name` (or a bare `name` first),
`['name']` / `["name"]` for a key with any characters, `[3]` for a list index:
`values.flow`, `$.values.flow`, `readings[0].v`, `$['flow.m3h']`.

`format: sparkplug` — Sparkplug B under `spBv1.0/<group_id>/…/<edge_node_id>` (`+` for
every edge node): each device is an asset and each device metric named `<tag>` a tag.
`tags` restricts the accepted metric names (default: every name that is a valid tag
identifier). Births define aliases; DDATA by alias is resolved with them; DDEATH and a
matching NDEATH (same bdSeq) emit every known tag of the affected devices once as bad.

Bad input never raises (every case counted in `stats.errors[reason]` and logged the
first time a reason occurs, then at most once a minute with the count):

- payload over `max_payload_bytes`: message rejected (`stats.rejected`), `oversize`;
- not JSON / not an object: rejected, `not_json` / `not_object`;
- asset missing or not a valid name: rejected, `no_asset`;
- timestamp missing or unreadable: rejected, `bad_timestamp`;
- `values_path` missing or not an object: rejected, `no_values`;
- a tag's path missing: that tag is emitted with quality bad and value None,
  `missing_value`;
- a value that is not a finite number (strings are not parsed; true/false are 1/0): a
  bad-quality sample with value None, `not_a_number`;
- Sparkplug bytes unreadable: rejected, `bad_sparkplug`;
- a Sparkplug metric not configured, or not a tag name: that metric dropped and counted
  in `rejected`, `unknown_metric`;
- DDATA of a device without DBIRTH, or with an alias its DBIRTH did not define: message
  dropped (`rejected`), `no_birth`, and a rebirth requested from the edge node as the
  specification says (NCMD `Node Control/Rebirth` = true, at most once per
  `rebirth_interval_s` per node; counted as `rebirth_requested`);
- a Sparkplug seq that is not the previous + 1 (mod 256): accepted, counted, `seq_gap`.

Threads and queues
------------------
paho's network loop runs in one thread per session. Its message callback hands the raw
message to the event loop with `loop.call_soon_threadsafe` into a bounded queue of
`queue_size` messages (decoding happens on the event loop, so `stats` is only touched
there). When the queue is full the paho thread waits up to `full_wait_s` for room — with
QoS 1 this is backpressure: the broker holds further messages in the session — and then
drops the message, counted in `stats.errors["queue_full"]` and `stats.rejected` and logged
once per episode. Capacity is reserved in the paho thread, so callbacks scheduled but not
yet run count against the bound too.

Sessions
--------
QoS `qos` (default 1); `clean_session: false` by default, with a stable client id, so the
broker keeps subscriptions and queues QoS 1 messages while the source is away. TLS for
`mqtts://` (CA file, optional client certificate). A failed connect or a lost session is
retried after a `Backoff` delay by the same source object; the outage is logged once
when it starts and once when it ends; `stats.reconnects` counts sessions re-established
after a loss, and `stats.errors` counts `connect`, `auth`, `lost`, `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .source import Backoff, Sample, SourceStats, finite_number
from .sparkplug import (
    REBIRTH_METRIC,
    DataType,
    Metric,
    Payload,
    SparkplugDecodeError,
    SparkplugTopic,
    decode_payload,
    encode_payload,
    parse_topic,
)
from .wire import Quality

__all__ = [
    "AssetRule",
    "BrokerAddress",
    "JsonPath",
    "JsonSubscription",
    "MessageInbox",
    "MqttSource",
    "MqttSourceConfig",
    "SparkplugSubscription",
    "compile_path",
    "parse_broker_url",
]

log = logging.getLogger(__name__)

_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"  # wire.IDENTIFIER_PATTERN
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
_LOG_EVERY_S: Final = 60.0
_MISSING: Final = object()


# ---- broker addresses ----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker is and how to log in: from `mqtt://user:password@host:port`."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:  # never shows the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def configure(self, client: Any, *, ca_file: Path | None = None,
                  cert_file: Path | None = None, key_file: Path | None = None) -> None:
        """Set credentials and TLS on a paho client before it connects."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            context = ssl.create_default_context(
                cafile=str(ca_file) if ca_file is not None else None)
            if cert_file is not None:
                context.load_cert_chain(str(cert_file),
                                        str(key_file) if key_file is not None else None)
            client.tls_set_context(context)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]host[:port]` (1883) or `mqtts://…` (8883). Raises
    ValueError naming the problem (never quoting the password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"broker URL scheme must be mqtt:// or mqtts://, not {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"broker URL port: {err}") from None
    if not parts.hostname:
        raise ValueError("broker URL has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("broker URL must be scheme://[user:password@]host[:port] only")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(parts.hostname, port or (8883 if tls else 1883), tls,
                         unquote(parts.username) if parts.username is not None else None,
                         unquote(parts.password) if parts.password is not None else None)


def _check_topic_filter(value: str) -> str:
    if not value or len(value.encode()) > 65535 or "\0" in value:
        raise ValueError(f"topic filter {value!r} is empty or too long")
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"topic filter {value!r}: '#' must be a whole, last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {value!r}: '+' must be a whole level")
    return value


# ---- JSON paths ----------------------------------------------------------------------------

JsonPath = tuple[str | int, ...]
_STEP_RE: Final = re.compile(
    r"""\.?(?P<name>[^.\[\]'"]+)|\[(?P<index>-?\d+)\]|\[(?P<q>['"])(?P<key>.*?)(?P=q)\]""")


def compile_path(text: str) -> JsonPath:
    """Parse the path syntax described in the module docstring into steps (str = object
    key, int = list index). Raises ValueError for anything else."""
    rest = text.strip()
    if rest.startswith("$"):
        rest = rest[1:]
    steps: list[str | int] = []
    position = 0
    while position < len(rest):
        match = _STEP_RE.match(rest, position)
        if match is None or (match.group("name") is not None and position > 0
                             and rest[position] != "."):
            raise ValueError(f"path {text!r}: cannot read {rest[position:]!r}")
        if match.group("name") is not None:
            steps.append(match.group("name"))
        elif match.group("index") is not None:
            steps.append(int(match.group("index")))
        else:
            steps.append(match.group("key"))
        position = match.end()
    if not steps:
        raise ValueError(f"path {text!r} is empty")
    return tuple(steps)


def resolve_path(document: Any, steps: JsonPath) -> Any:
    """The value at `steps` in `document`, or `_MISSING`."""
    node = document
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, list) or not -len(node) <= step < len(node):
                return _MISSING
            node = node[step]
        else:
            if not isinstance(node, dict) or step not in node:
                return _MISSING
            node = node[step]
    return node




_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNIT_NS: Final = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def parse_timestamp(value: Any, unit: str) -> int | None:
    """UTC epoch ns from a JSON timestamp, or None if it is not one."""
    if isinstance(value, str) and unit in ("auto", "iso8601"):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        delta = stamp - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if isinstance(value, bool) or not isinstance(value, int | float) or unit == "iso8601":
        return None
    if not math.isfinite(value) or value < 0:
        return None
    if unit == "auto":
        magnitude = abs(value)
        unit = ("s" if magnitude < 1e11 else "ms" if magnitude < 1e14
                else "us" if magnitude < 1e17 else "ns")
    result = int(value) * _UNIT_NS[unit] if isinstance(value, int) else round(
        value * _UNIT_NS[unit])
    return result if result < 2**63 else None


# ---- configuration -------------------------------------------------------------------------


class AssetRule(BaseModel):
    """Where a JSON message's asset name comes from: exactly one of the three."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic_segment: int | None = Field(default=None, ge=0)
    fixed: str | None = Field(default=None, pattern=_NAME_PATTERN)
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AssetRule:
        if sum(x is not None for x in (self.topic_segment, self.fixed, self.path)) != 1:
            raise ValueError("asset: set exactly one of topic_segment, fixed or path")
        if self.path is not None:
            compile_path(self.path)
        return self


class JsonSubscription(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["json"] = "json"
    topic: str
    asset: AssetRule
    tags: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], str] = Field(default_factory=dict)
    values_path: str | None = None
    timestamp_path: str | None = None
    timestamp_unit: Literal["auto", "iso8601", "s", "ms", "us", "ns"] = "auto"

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return _check_topic_filter(value)

    @model_validator(mode="after")
    def _check(self) -> JsonSubscription:
        if not self.tags and self.values_path is None:
            raise ValueError(f"subscription {self.topic!r}: set tags and/or values_path")
        for path in (*self.tags.values(), self.values_path, self.timestamp_path):
            if path is not None:
                try:
                    compile_path(path)
                except ValueError as err:
                    raise ValueError(f"subscription {self.topic!r}: {err}") from None
        segment = self.asset.topic_segment
        if segment is not None:
            levels = self.topic.split("/")
            if segment >= len(levels) and levels[-1] != "#":
                raise ValueError(f"subscription {self.topic!r}: asset.topic_segment {segment} "
                                 f"is past the topic's {len(levels)} levels")
        return self


class SparkplugSubscription(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["sparkplug"]
    group_id: str = Field(pattern=r"^[^/+#]+$")
    edge_node_id: str = Field(default="+", pattern=r"^(\+|[^/+#]+)$")
    devices: list[Annotated[str, Field(pattern=_NAME_PATTERN)]] | None = None
    tags: list[Annotated[str, Field(pattern=_NAME_PATTERN)]] | None = None
    request_rebirth: bool = True
    rebirth_interval_s: float = Field(default=5.0, gt=0)

    @property
    def topics(self) -> list[str]:
        base = f"spBv1.0/{self.group_id}/+/{self.edge_node_id}"
        return [base, base + "/+"]


Subscription = Annotated[JsonSubscription | SparkplugSubscription,
                         Field(discriminator="format")]


class MqttSourceConfig(BaseModel):
    """An MQTT source: one broker, its login and TLS, and what to subscribe to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["mqtt"] = "mqtt"
    name: str = Field(default="mqtt", pattern=_NAME_PATTERN)
    broker: SecretStr  # mqtt://user:password@host:port or mqtts://…; secret: it holds one
    username: str | None = None  # overrides the URL's
    password: SecretStr | None = None
    ca_file: Path | None = None  # TLS: the broker's CA (default: the system's)
    cert_file: Path | None = None  # TLS client certificate (and key_file)
    key_file: Path | None = None
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    clean_session: bool = False
    qos: Literal[0, 1, 2] = 1
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    connect_timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_payload_bytes: int = Field(default=256 * 1024, ge=64, le=256 * 1024 * 1024)
    queue_size: int = Field(default=10_000, ge=1, le=1_000_000)
    full_wait_s: float = Field(default=1.0, ge=0, le=10)
    reconnect_initial_s: float = Field(default=0.2, gt=0)
    reconnect_cap_s: float = Field(default=30.0, gt=0)
    subscriptions: list[Subscription] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> MqttSourceConfig:
        problems = []
        try:
            address = parse_broker_url(self.broker.get_secret_value())
        except ValueError as err:
            problems.append(f"broker: {err}")
        else:
            if not address.tls and (self.ca_file or self.cert_file):
                problems.append("ca_file/cert_file: set for a plain mqtt:// broker "
                                "(use mqtts://)")
        if self.key_file is not None and self.cert_file is None:
            problems.append("key_file: set without cert_file")
        if self.password is not None and self.username is None:
            problems.append("password: set without a username")
        if self.reconnect_cap_s < self.reconnect_initial_s:
            problems.append("reconnect_cap_s must be >= reconnect_initial_s")
        if self.clean_session is False and self.client_id is not None and "+" in self.client_id:
            problems.append("client_id: must not contain '+'")
        if problems:
            raise ValueError(f"mqtt source {self.name!r}: " + "; ".join(problems))
        return self

    @property
    def address(self) -> BrokerAddress:
        address = parse_broker_url(self.broker.get_secret_value())
        if self.username is not None:
            password = self.password.get_secret_value() if self.password else None
            address = BrokerAddress(address.host, address.port, address.tls, self.username,
                                    password)
        return address

    def effective_client_id(self) -> str:
        """The configured client id, else a stable one per host and source name (a
        persistent session needs the same id at every connect)."""
        if self.client_id is not None:
            return self.client_id
        host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
        return f"edgefleet-{host}-{self.name}"

    def build(self) -> MqttSource:
        return MqttSource(self)


# ---- the bounded hand-off from paho's thread --------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    payload: bytes | None  # None: over max_payload_bytes, dropped in the paho thread
    size: int
    received_ns: int


class MessageInbox:
    """A bounded hand-off from a foreign thread to the event loop.

    `put_threadsafe()` (any thread) reserves one of `capacity` slots, waiting up to
    `full_wait_s` for one, then schedules the item into an `asyncio.Queue` with
    `call_soon_threadsafe`; `get()` (event loop) takes an item and frees its slot. When no
    slot frees up in time the item is dropped and counted in `dropped` (thread-safe), and
    `put_threadsafe` returns False. Scheduled-but-not-run callbacks hold slots, so nothing
    grows without bound even if the event loop stalls.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int,
                 full_wait_s: float) -> None:
        self._loop = loop
        self._slots = threading.BoundedSemaphore(capacity)
        self._queue: asyncio.Queue[RawMessage] = asyncio.Queue(maxsize=capacity)
        self._full_wait_s = full_wait_s
        self._lock = threading.Lock()
        self.dropped = 0
        self.capacity = capacity

    def put_threadsafe(self, item: RawMessage) -> bool:
        if not self._slots.acquire(timeout=self._full_wait_s):
            with self._lock:
                self.dropped += 1
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: we are shutting down
            self._slots.release()
            return False
        return True

    async def get(self) -> RawMessage:
        item = await self._queue.get()
        self._slots.release()
        return item

    def qsize(self) -> int:
        return self._queue.qsize()


# ---- Sparkplug host state ------------------------------------------------------------------


@dataclass
class _Device:
    names: dict[int, str] = field(default_factory=dict)  # alias -> name
    datatypes: dict[str, int] = field(default_factory=dict)  # name -> datatype
    tags: set[str] = field(default_factory=set)  # tags emitted (for the death's bad samples)


@dataclass
class _Node:
    bdseq: int | None = None
    seq: int | None = None
    born: bool = False
    devices: dict[str, _Device] = field(default_factory=dict)
    rebirth_requested_at: float = -math.inf


class _SessionEnded(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


ClientFactory = Callable[[MqttSourceConfig], Any]


def _paho_client(config: MqttSourceConfig) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.effective_client_id(),
                         clean_session=config.clean_session, protocol=mqtt.MQTTv311)
    client.connect_timeout = config.connect_timeout_s
    config.address.configure(client, ca_file=config.ca_file, cert_file=config.cert_file,
                              key_file=config.key_file)
    return client


_AUTH_CODES: Final = frozenset({4, 5, 134, 135})  # bad user name or password, not authorized


class MqttSource:
    """A `StreamingSource` over one MQTT broker; see the module docstring for the contract.

    `client_factory` makes the paho client of each session (tests inject their own)."""

    def __init__(self, config: MqttSourceConfig, *,
                 client_factory: ClientFactory | None = None) -> None:
        self.config = config
        self.name = config.name
        self.stats = SourceStats()
        self.connected = False
        self.sessions = 0
        self.last_error: str | None = None
        self._factory = client_factory or _paho_client
        self._json = [(s, _CompiledJson(s)) for s in config.subscriptions
                      if isinstance(s, JsonSubscription)]
        self._sparkplug = [s for s in config.subscriptions
                           if isinstance(s, SparkplugSubscription)]
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._client: Any = None
        self._outage_since: float | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last log time, count)
        self._queue_full_seen = 0

    # ---- running -------------------------------------------------------------------------

    async def run(self, emit: Callable[[Sample], None]) -> None:
        loop = asyncio.get_running_loop()
        inbox = MessageInbox(loop, self.config.queue_size, self.config.full_wait_s)
        backoff = Backoff(self.config.reconnect_initial_s, self.config.reconnect_cap_s)
        consumer = asyncio.create_task(self._consume(inbox, emit), name=f"mqtt-{self.name}-decode")
        try:
            while True:
                try:
                    await self._session(loop, inbox, backoff)
                except _SessionEnded as err:
                    self._fail(err.reason, str(err))
                except (OSError, ssl.SSLError) as err:
                    self._fail("connect", f"{type(err).__name__}: {err}")
                await asyncio.sleep(backoff.next_delay())
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    async def _consume(self, inbox: MessageInbox, emit: Callable[[Sample], None]) -> None:
        while True:
            message = await inbox.get()
            self._account_queue_full(inbox)
            self.handle(message.topic, message.payload, message.received_ns, emit,
                        size=message.size)

    def _account_queue_full(self, inbox: MessageInbox) -> None:
        dropped = inbox.dropped
        if dropped > self._queue_full_seen:
            delta = dropped - self._queue_full_seen
            self._queue_full_seen = dropped
            self.stats.rejected += delta
            self._note("queue_full", f"receive queue of {inbox.capacity} messages was "
                             f"full for {self.config.full_wait_s} s: dropped {delta} message(s)",
                       count=delta)

    async def _session(self, loop: asyncio.AbstractEventLoop, inbox: MessageInbox,
                       backoff: Backoff) -> None:
        config = self.config
        address = config.address
        client = self._factory(config)
        connected = asyncio.Event()
        ended = asyncio.Event()
        outcome: dict[str, str] = {}
        stop = threading.Event()
        max_bytes = config.max_payload_bytes

        def wake(event: asyncio.Event) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(event.set)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
            if getattr(reason, "is_failure", False):
                code = int(getattr(reason, "value", -1))
                outcome["reason"] = "auth" if code in _AUTH_CODES else "refused"
                outcome["message"] = f"{address} refused the session: {reason}"
                wake(ended)
                return
            topics = [(s.topic, config.qos) for s, _ in self._json]
            topics += [(t, config.qos) for s in self._sparkplug for t in s.topics]
            client.subscribe(topics)
            wake(connected)

        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any,
                          properties: Any) -> None:
            outcome.setdefault("reason", "lost")
            outcome.setdefault("message", f"connection to {address} lost: {reason}")
            wake(ended)

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            payload: bytes = message.payload
            size = len(payload)
            inbox.put_threadsafe(RawMessage(message.topic, payload if size <= max_bytes
                                            else None, size, time.time_ns()))

        def network() -> None:
            import paho.mqtt.client as mqtt

            while not stop.is_set():
                if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                    break
            outcome.setdefault("reason", "lost")
            outcome.setdefault("message", f"connection to {address} lost")
            wake(ended)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        # Set before connecting: messages can be decoded before `connected` is seen here,
        # and a DDATA without birth needs the client to ask for a rebirth.
        self._client = client
        try:
            await asyncio.wait_for(
                asyncio.to_thread(client.connect, address.host, address.port,
                                  config.keepalive_s),
                timeout=config.connect_timeout_s + 5)
        except BaseException:
            self._client = None
            raise
        thread = threading.Thread(target=network, name=f"mqtt-{self.name}-paho", daemon=True)
        thread.start()
        try:
            waiter = asyncio.create_task(connected.wait())
            ender = asyncio.create_task(ended.wait())
            try:
                await asyncio.wait({waiter, ender}, timeout=config.connect_timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                ender.cancel()
            if not connected.is_set():
                if ended.is_set():
                    raise _SessionEnded(outcome["reason"], outcome["message"])
                raise _SessionEnded("timeout", f"no CONNACK from {address} within "
                                    f"{config.connect_timeout_s} s")
            self.connected = True
            if self.sessions > 0:
                self.stats.reconnects += 1
            self.sessions += 1
            backoff.reset()
            if self._outage_since is not None:
                log.info("mqtt source %r: connected to %s again after %.1f s", self.name,
                         address, time.monotonic() - self._outage_since)
                self._outage_since = None
            await ended.wait()
            raise _SessionEnded(outcome["reason"], outcome["message"])
        finally:
            self._client = None
            self.connected = False
            stop.set()
            with contextlib.suppress(Exception):  # best effort: the broker may be gone
                client.disconnect()
            await asyncio.to_thread(thread.join, 5.0)

    def _fail(self, reason: str, message: str) -> None:
        self.stats.count_error(reason)
        self.last_error = message
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            level = logging.ERROR if reason == "auth" else logging.WARNING
            log.log(level, "mqtt source %r: %s (retrying with backoff)", self.name, message)

    # ---- decoding ------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes | None, received_ns: int,
               emit: Callable[[Sample], None], *, size: int | None = None) -> None:
        """Decode one message and emit its samples (public so tests can feed messages
        without a broker). `payload=None` means it was over `max_payload_bytes`."""
        if payload is not None and len(payload) > self.config.max_payload_bytes:
            size, payload = len(payload), None
        if payload is None:
            self._reject("oversize", f"{topic}: {size} bytes is over max_payload_bytes "
                         f"{self.config.max_payload_bytes}")
            return
        sparkplug_topic = parse_topic(topic) if self._sparkplug else None
        if sparkplug_topic is not None:
            for subscription in self._sparkplug:
                if subscription.group_id == sparkplug_topic.group_id and (
                        subscription.edge_node_id in ("+", sparkplug_topic.edge_node_id)):
                    self._handle_sparkplug(subscription, sparkplug_topic, payload, received_ns,
                                           emit)
                    return
        for json_subscription, compiled in self._json:
            if _topic_matches(json_subscription.topic, topic):
                self._handle_json(compiled, topic, payload, received_ns, emit)
                return

    def _handle_json(self, compiled: _CompiledJson, topic: str, payload: bytes,
                     received_ns: int, emit: Callable[[Sample], None]) -> None:
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            self._reject("not_json", f"{topic}: payload is not JSON ({err})")
            return
        if not isinstance(document, dict):
            self._reject("not_object", f"{topic}: payload is JSON but not an object")
            return
        asset = compiled.asset(topic, document)
        if asset is None:
            self._reject("no_asset", f"{topic}: no valid asset name ({compiled.asset_what})")
            return
        ts_ns = received_ns
        if compiled.timestamp is not None:
            stamp = parse_timestamp(resolve_path(document, compiled.timestamp),
                                    compiled.timestamp_unit)
            if stamp is None:
                self._reject("bad_timestamp", f"{topic}: no readable timestamp at "
                             f"{compiled.timestamp_text!r}")
                return
            ts_ns = stamp
        values: list[tuple[str, Any]] = []
        if compiled.values is not None:
            members = resolve_path(document, compiled.values)
            if not isinstance(members, dict):
                self._reject("no_values", f"{topic}: no object at {compiled.values_text!r}")
                return
            for tag, value in members.items():
                if isinstance(tag, str) and _NAME_RE.match(tag):
                    values.append((tag, value))
                else:
                    self._reject("unknown_metric", f"{topic}: member {tag!r} is not a tag name")
        values.extend((tag, resolve_path(document, path)) for tag, path in compiled.tags)
        for tag, value in values:
            self._emit_value(asset, tag, ts_ns, value, topic, emit)

    def _emit_value(self, asset: str, tag: str, ts_ns: int, value: Any, where: str,
                    emit: Callable[[Sample], None]) -> None:
        number = None if value is _MISSING else finite_number(value)
        if number is None:
            reason = "missing_value" if value is _MISSING else "not_a_number"
            shown = "missing" if value is _MISSING else f"{value!r}"[:80]
            self._note(reason, f"{where}: {asset}.{tag} is {shown}; emitted with quality bad")
            sample = Sample(asset, tag, ts_ns, None, Quality.BAD)
            self.stats.bad += 1
        else:
            sample = Sample(asset, tag, ts_ns, number, Quality.GOOD)
        self.stats.samples += 1
        emit(sample)

    def _handle_sparkplug(self, subscription: SparkplugSubscription, topic: SparkplugTopic,
                          raw: bytes, received_ns: int, emit: Callable[[Sample], None]) -> None:
        kind = topic.message_type
        if kind in ("NCMD", "DCMD"):
            return  # commands (our own rebirth requests included) are not telemetry
        try:
            payload = decode_payload(raw)
        except SparkplugDecodeError as err:
            self._reject("bad_sparkplug", f"{topic}: {err}")
            return
        key = (topic.group_id, topic.edge_node_id)
        node = self._nodes.get(key)
        if kind == "NBIRTH":
            node = self._nodes[key] = _Node(bdseq=_bdseq(payload), seq=payload.seq, born=True)
            return
        if kind == "NDEATH":
            if node is not None and (node.bdseq is None or _bdseq(payload) in (None, node.bdseq)):
                for device_id, device in node.devices.items():
                    self._emit_death(device_id, device, payload, received_ns, emit)
                del self._nodes[key]
            return
        if node is None or not node.born:
            if kind in ("DBIRTH", "DDATA", "NDATA"):
                self._no_birth(subscription, topic, "edge node has no NBIRTH")
            return
        self._check_seq(node, payload, topic)
        if topic.device_id is None:
            return  # NDATA: node metrics are not asset tags
        if subscription.devices is not None and topic.device_id not in subscription.devices:
            return
        if not _NAME_RE.match(topic.device_id):
            self._reject("no_asset", f"{topic}: device id is not a valid asset name")
            return
        if kind == "DBIRTH":
            device = node.devices[topic.device_id] = _Device()
            for metric in payload.metrics:
                if metric.name is not None:
                    device.datatypes[metric.name] = metric.datatype
                    if metric.alias is not None:
                        device.names[metric.alias] = metric.name
            self._emit_metrics(subscription, topic, device, payload, received_ns, emit)
        elif kind == "DDATA":
            device_state = node.devices.get(topic.device_id)
            if device_state is None:
                self._no_birth(subscription, topic, "device has no DBIRTH")
                return
            if any(m.name is None and m.alias not in device_state.names
                   for m in payload.metrics):
                self._no_birth(subscription, topic, "metric alias not in the DBIRTH")
                return
            self._emit_metrics(subscription, topic, device_state, payload, received_ns, emit)
        elif kind == "DDEATH":
            dead = node.devices.pop(topic.device_id, None)
            if dead is not None:
                self._emit_death(topic.device_id, dead, payload, received_ns, emit)

    def _emit_metrics(self, subscription: SparkplugSubscription, topic: SparkplugTopic,
                      device: _Device, payload: Payload, received_ns: int,
                      emit: Callable[[Sample], None]) -> None:
        asset = topic.device_id
        assert asset is not None
        allowed = subscription.tags
        for metric in payload.metrics:
            name = metric.name if metric.name is not None else device.names[metric.alias or 0]
            if (allowed is not None and name not in allowed) or (
                    allowed is None and not _NAME_RE.match(name)):
                self._reject("unknown_metric", f"{topic}: metric {name!r} is not a configured "
                             "tag")
                continue
            metric = metric.with_datatype(device.datatypes.get(name, DataType.UNKNOWN))
            ts_ms = metric.timestamp if metric.timestamp is not None else payload.timestamp
            ts_ns = ts_ms * 1_000_000 if ts_ms is not None else received_ns
            value: Any = _MISSING if metric.is_null else metric.value
            device.tags.add(name)
            if metric.is_null:  # an explicit null: the device says it has no value
                self.stats.samples += 1
                self.stats.bad += 1
                emit(Sample(asset, name, ts_ns, None, Quality.BAD))
            else:
                self._emit_value(asset, name, ts_ns, value, str(topic), emit)

    def _emit_death(self, device_id: str, device: _Device, payload: Payload, received_ns: int,
                    emit: Callable[[Sample], None]) -> None:
        ts_ns = payload.timestamp * 1_000_000 if payload.timestamp is not None else received_ns
        for tag in sorted(device.tags):
            self.stats.samples += 1
            self.stats.bad += 1
            emit(Sample(device_id, tag, ts_ns, None, Quality.BAD))

    def _check_seq(self, node: _Node, payload: Payload, topic: SparkplugTopic) -> None:
        if payload.seq is None:
            return
        if node.seq is not None and payload.seq != (node.seq + 1) % 256:
            self._note("seq_gap", f"{topic}: seq {payload.seq} after {node.seq}")
        node.seq = payload.seq

    def _no_birth(self, subscription: SparkplugSubscription, topic: SparkplugTopic,
                  why: str) -> None:
        self._reject("no_birth", f"{topic}: {why}; dropped")
        if not subscription.request_rebirth:
            return
        node = self._nodes.setdefault((topic.group_id, topic.edge_node_id), _Node())
        now = time.monotonic()
        client = self._client
        if client is None or now - node.rebirth_requested_at < subscription.rebirth_interval_s:
            return
        node.rebirth_requested_at = now
        command = SparkplugTopic(topic.group_id, "NCMD", topic.edge_node_id)
        request = encode_payload(Payload(timestamp=time.time_ns() // 1_000_000, metrics=(
            Metric(REBIRTH_METRIC, datatype=DataType.BOOLEAN, value=True),)))
        client.publish(str(command), request, qos=0)
        self.stats.count_error("rebirth_requested")
        log.info("mqtt source %r: asked edge node %s/%s to rebirth (%s)", self.name,
                 topic.group_id, topic.edge_node_id, why)

    # ---- counting and logging ------------------------------------------------------------

    def _reject(self, reason: str, message: str) -> None:
        self.stats.rejected += 1
        self._note(reason, message)

    def _note(self, reason: str, message: str, count: int = 1) -> None:
        """Count `reason`; log its first occurrence, then at most once a minute."""
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + count
        now = time.monotonic()
        last, suppressed = self._logged.get(reason, (-math.inf, 0))
        if now - last >= _LOG_EVERY_S:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("mqtt source %r: %s [%s]%s", self.name, message, reason, more)
            self._logged[reason] = (now, 0)
        else:
            self._logged[reason] = (last, suppressed + 1)


def _bdseq(payload: Payload) -> int | None:
    for metric in payload.metrics:
        if metric.name == "bdSeq" and isinstance(metric.value, int):
            return metric.value
    return None


def _topic_matches(pattern: str, topic: str) -> bool:
    if topic.startswith("$") and not pattern.startswith("$"):
        return False
    levels = topic.split("/")
    for index, part in enumerate(pattern.split("/")):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(levels) == len(pattern.split("/"))


class _CompiledJson:
    """A JSON subscription with its paths parsed once."""

    def __init__(self, subscription: JsonSubscription) -> None:
        rule = subscription.asset
        self.segment = rule.topic_segment
        self.fixed = rule.fixed
        self.asset_path = compile_path(rule.path) if rule.path is not None else None
        self.asset_what = (f"topic segment {rule.topic_segment}" if rule.topic_segment is not None
                           else f"path {rule.path!r}")
        self.tags: Sequence[tuple[str, JsonPath]] = [
            (tag, compile_path(path)) for tag, path in subscription.tags.items()]
        self.values_text = subscription.values_path
        self.values = (compile_path(subscription.values_path)
                       if subscription.values_path is not None else None)
        self.timestamp_text = subscription.timestamp_path
        self.timestamp = (compile_path(subscription.timestamp_path)
                          if subscription.timestamp_path is not None else None)
        self.timestamp_unit = subscription.timestamp_unit

    def asset(self, topic: str, document: dict[str, Any]) -> str | None:
        if self.fixed is not None:
            return self.fixed
        if self.segment is not None:
            levels = topic.split("/")
            name: Any = levels[self.segment] if self.segment < len(levels) else None
        else:
            assert self.asset_path is not None
            name = resolve_path(document, self.asset_path)
        return name if isinstance(name, str) and _NAME_RE.match(name) else None
