"""OPC UA as a streaming source: subscriptions first, polling reads as the fallback.

`OpcUaSourceConfig` is the registered unit (`type: opcua`); `build()` turns it into an
`OpcUaSource`, whose `run(emit)` connects and pushes `Sample`s until cancelled. The whole
config is validated up front and every error names the node (or the field) it is about.

Contract of `OpcUaSource.run()`:

* One session at a time, with the configured security policy and mode (`None`, or
  `Basic256Sha256` with `Sign` / `SignAndEncrypt`, client certificate and key generated at
  the first run if the files do not exist yet, server certificate pinned if given) and
  identity (anonymous, or username/password).
* Nodes are named by node id (`ns=2;s=…`, or `nsu=<uri>;s=…`, resolved against the server's
  namespace array at each connect) or by browse path from the Objects folder
  (`Plant/pump-01/speed`; a segment without `<index>:` is in `namespace_uri`).
* `mode: auto` (default) creates one subscription with a data-change monitored item per
  node; if the server refuses (e.g. `BadTooManySubscriptions`, `BadServiceUnsupported`) the
  session falls back to reading every node each `poll_interval_s`, logged once. `mode:
  polling` only reads, `mode: subscription` treats a refusal as a session failure.
* Every value becomes a `Sample` whose `ts_ns` is the server's SourceTimestamp (else its
  ServerTimestamp, else the time of receipt). The status code's class gives the quality
  (`quality_from_status`): Good → good, Uncertain → uncertain, Bad → bad with value None.
  A node that disappears (`BadNodeIdUnknown`), or cannot be resolved or monitored, is
  emitted once as bad and retried every `retry_bad_nodes_s`; it is good again when it is back.
* A lost connection, a server restart or a failed connect (wrong password included) ends
  the session; a new one (new subscription and monitored items) is set up after a `Backoff`
  delay, by the same source object. The outage is logged once when it starts and once when
  it ends; `stats.reconnects` counts sessions re-established after a loss, `stats.errors`
  counts failures by reason (`auth`, `security`, `connect`, `lost`, `subscription_refused`…),
  and `last_error` says what went wrong last in words.
* Notifications wait in asyncua's client-side queue of `queue_size` events; when it is full
  the oldest is dropped (the newest state wins) and counted in `stats.errors["dropped"]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .source import NAME_PATTERN, Backoff, Sample, SourceStats, finite_number
from .wire import Quality

__all__ = [
    "DEFAULT_NAMESPACE_URI",
    "OpcUaNodeConfig",
    "OpcUaSource",
    "OpcUaSourceConfig",
    "ensure_certificate",
    "quality_from_status",
    "sample_from_datavalue",
]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE_URI = "urn:edgefleet:sim"
_NAME_PATTERN = NAME_PATTERN
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
BAD_NODE_ID_UNKNOWN = 0x80340000


# ---- status codes, values and certificates ------------------------------------------------


def quality_from_status(code: int) -> Quality:
    """The quality of an OPC UA status code, from its severity (the top two bits)."""
    severity = (code >> 30) & 0b11
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    return Quality.BAD  # 0b10 bad, 0b11 reserved: treat as bad


def _to_ns(stamp: datetime | None) -> int | None:
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    if stamp <= _EPOCH:  # OPC UA's "no timestamp" (1601) decodes to before 1970
        return None
    return (stamp - _EPOCH) // _MICROSECOND * 1000




def sample_from_datavalue(asset: str, tag: str, datavalue: Any, received_ns: int) -> tuple[
        Sample, bool]:
    """Turn an asyncua `DataValue` into a `Sample`; the flag says the value was undecodable
    (a good or uncertain status with a value that is not a finite number: it becomes bad)."""
    status = getattr(datavalue, "StatusCode", None)
    code = int(getattr(status, "value", 0) or 0)
    quality = quality_from_status(code)
    ts_ns = (_to_ns(getattr(datavalue, "SourceTimestamp", None))
             or _to_ns(getattr(datavalue, "ServerTimestamp", None)) or received_ns)
    if quality is Quality.BAD:
        return Sample(asset, tag, ts_ns, None, Quality.BAD), False
    variant = getattr(datavalue, "Value", None)
    value = finite_number(getattr(variant, "Value", None))
    if value is None:
        return Sample(asset, tag, ts_ns, None, Quality.BAD), True
    return Sample(asset, tag, ts_ns, value, quality), False


def ensure_certificate(
    cert_path: Path,
    key_path: Path,
    application_uri: str,
    common_name: str,
    *,
    server: bool,
    hostname: str | None = None,
    days: int = 3650,
) -> bool:
    """Generate a self-signed OPC UA application certificate (DER) and RSA key (PEM, 0600)
    unless both files exist. Returns True if it generated them.

    The certificate carries what OPC UA checks: the application URI and host names as
    subject alternative names, and server or client authentication as extended key usage.
    """
    if cert_path.exists() and key_path.exists():
        return False
    import ipaddress

    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    host = hostname or socket.gethostname()
    key = cert_gen.generate_private_key()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(application_uri),
        x509.DNSName(host),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {"organizationName": "edgefleet"}, names, [usage], days=days)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(cert_gen.dump_private_key_as_pem(key))
    return True


# ---- configuration -----------------------------------------------------------------------


class OpcUaNodeConfig(BaseModel):
    """One tag of one asset, and the OPC UA node it is read from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    asset: str = Field(pattern=_NAME_PATTERN)
    tag: str = Field(pattern=_NAME_PATTERN)
    node_id: str | None = None  # "ns=2;s=pump-01.speed", "nsu=urn:edgefleet:sim;s=…", "i=2258"
    browse_path: str | None = None  # from Objects: "Plant/pump-01/speed" or "2:Plant/2:…"

    @model_validator(mode="after")
    def _one_address(self) -> OpcUaNodeConfig:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("set exactly one of node_id or browse_path")
        if self.node_id is not None:
            from asyncua import ua
            from asyncua.ua.uaerrors import UaError

            try:
                ua.NodeId.from_string(self.node_id)
            except (ValueError, UaError, IndexError, KeyError) as err:
                raise ValueError(f"node_id {self.node_id!r} is not an OPC UA node id: {err}") \
                    from None
        if self.browse_path is not None:
            segments = self.browse_path.strip("/").split("/")
            for segment in segments:
                prefix, colon, name = segment.rpartition(":")
                if not segment or (colon and (not prefix.isdigit() or not name)):
                    raise ValueError(f"browse_path {self.browse_path!r}: segment {segment!r} "
                                     "is not 'Name' or '<namespace index>:Name'")
        return self


Policy = Literal["None", "Basic256Sha256"]
Mode = Literal["None", "Sign", "SignAndEncrypt"]


class OpcUaSourceConfig(BaseModel):
    """An OPC UA source: one server endpoint, its security, and the nodes read from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["opcua"] = "opcua"
    name: str = Field(default="opcua", pattern=_NAME_PATTERN)
    endpoint: str = Field(pattern=r"^opc\.tcp://[^/\s]+")
    security_policy: Policy = "None"
    security_mode: Mode = "None"
    certificate: Path | None = None  # client certificate (DER or PEM); generated if missing
    private_key: Path | None = None
    server_certificate: Path | None = None  # pin; None = trust what the endpoint advertises
    application_uri: str = "urn:edgefleet:edge-agent:opcua"
    username: str | None = None
    password: SecretStr | None = None
    namespace_uri: str = DEFAULT_NAMESPACE_URI  # for browse-path segments without an index
    mode: Literal["auto", "subscription", "polling"] = "auto"
    publishing_interval_s: float = Field(default=0.5, gt=0, le=3600)
    sampling_interval_s: float | None = Field(default=None, ge=0)  # None = publishing interval
    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)  # polling fallback
    retry_bad_nodes_s: float = Field(default=5.0, gt=0)
    request_timeout_s: float = Field(default=4.0, gt=0, le=300)
    watchdog_interval_s: float = Field(default=1.0, gt=0, le=300)
    queue_size: int = Field(default=10_000, ge=10, le=1_000_000)
    reconnect_initial_s: float = Field(default=0.2, gt=0)
    reconnect_cap_s: float = Field(default=30.0, gt=0)
    nodes: list[OpcUaNodeConfig] = Field(min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _port_in_range(cls, value: str) -> str:
        from urllib.parse import urlparse

        try:
            port = urlparse(value).port
        except ValueError as err:
            raise ValueError(f"endpoint {value!r}: {err}") from None
        if port == 0:
            raise ValueError(f"endpoint {value!r}: port 0")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_node(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        """Re-word field errors so each names its node (asset.tag), not just a list index."""
        try:
            return handler(data)
        except ValidationError as err:
            raise ValueError(_describe_errors(err, data)) from None

    @model_validator(mode="after")
    def _cross_check(self) -> OpcUaSourceConfig:
        problems: list[str] = []
        if (self.security_policy == "None") != (self.security_mode == "None"):
            problems.append(f"security_mode: {self.security_mode} does not go with "
                            f"security_policy {self.security_policy}")
        if self.security_policy != "None" and (self.certificate is None
                                               or self.private_key is None):
            problems.append("certificate and private_key: a secure session needs both "
                            "(they are generated at the first run if the files are missing)")
        if self.password is not None and self.username is None:
            problems.append("password: set without a username")
        if self.username is not None and not self.username:
            problems.append("username: empty")
        if self.reconnect_cap_s < self.reconnect_initial_s:
            problems.append("reconnect_cap_s must be >= reconnect_initial_s")
        seen: dict[tuple[str, str], int] = {}
        for index, node in enumerate(self.nodes):
            first = seen.setdefault((node.asset, node.tag), index)
            if first != index:
                problems.append(f"node {node.asset}.{node.tag} (nodes[{index}]): asset/tag: "
                                f"same as nodes[{first}]")
        if problems:
            raise ValueError(f"opcua source {self.name!r}: " + "; ".join(problems))
        return self

    def build(self) -> OpcUaSource:
        return OpcUaSource(self)


def _describe_errors(err: ValidationError, data: Any) -> str:
    name = data.get("name", "opcua") if isinstance(data, dict) else "opcua"
    messages = []
    for error in err.errors():
        loc = error["loc"]
        message = str(error["msg"]).removeprefix("Value error, ")
        if message.startswith("opcua source "):
            messages.append(message)
            continue
        if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
            items = data.get("nodes") if isinstance(data, dict) else None
            node = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else {}
            node = node if isinstance(node, dict) else {}
            where = f"node {node.get('asset', '?')}.{node.get('tag', '?')} (nodes[{loc[1]}])"
            rest = ".".join(str(part) for part in loc[2:])
            messages.append(f"{where}: {rest}: {message}" if rest else f"{where}: {message}")
        else:
            field_name = ".".join(str(part) for part in loc)
            messages.append(f"{field_name}: {message}" if field_name else message)
    return f"opcua source {name!r}: " + "; ".join(messages)


# ---- the source --------------------------------------------------------------------------


class _SessionEnded(Exception):
    """The session is over (connection lost, subscription dead); set up a new one."""


@dataclass
class _Point:
    config: OpcUaNodeConfig
    nodeid: Any = None  # ua.NodeId once resolved in this session
    handle: int | None = None  # monitored item id in this session
    bad: bool = False  # last emitted quality was bad (emit bad once per change)


def _make_observer() -> Any:
    """An asyncua `Observer` that counts notifications put into the subscriptions' queue
    (compared with those consumed, it gives the number the bounded queue dropped)."""
    from asyncua.observer import Observer

    class _Counter(Observer):
        produced = 0

        def on_notification(self, subscription_id: int | None, event_count: int) -> None:
            self.produced += event_count

    return _Counter()


class OpcUaSource:
    """A `StreamingSource` over one OPC UA server; see the module docstring for the contract."""

    def __init__(self, config: OpcUaSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.stats = SourceStats()
        self.connected = False
        self.mode: Literal["subscription", "polling", "down"] = "down"
        self.last_error: str | None = None
        self.sessions = 0
        self._points = [_Point(node) for node in config.nodes]
        self._outage_since: float | None = None
        self._fallback_logged = False

    async def run(self, emit: Callable[[Sample], None]) -> None:
        backoff = Backoff(self.config.reconnect_initial_s, self.config.reconnect_cap_s)
        while True:
            try:
                await self._session(emit, backoff)
            except _SessionEnded as err:
                self._fail("lost", str(err) or "connection lost")
            except TimeoutError:
                self._fail("timeout", f"no answer within {self.config.request_timeout_s} s")
            except OSError as err:  # ConnectionError included
                self._fail("connect", f"{type(err).__name__}: {err}")
            except _ua_errors() as err:
                self._fail(*_classify(err))
            finally:
                self.connected = False
                self.mode = "down"
            # A cancellation that arrived inside asyncua may come out as one of the errors
            # above: the task is still being cancelled, so stop instead of reconnecting.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise asyncio.CancelledError
            await asyncio.sleep(backoff.next_delay())

    # ---- one session ---------------------------------------------------------------------

    async def _session(self, emit: Callable[[Sample], None], backoff: Backoff) -> None:
        from asyncua.client.client import Client

        config = self.config
        client = Client(config.endpoint, timeout=config.request_timeout_s,
                        watchdog_intervall=config.watchdog_interval_s)
        client.application_uri = config.application_uri
        client.name = client.description = f"edgefleet {config.name}"
        observer = _make_observer()
        client.uaclient.observer = observer
        if config.username is not None:
            client.set_user(config.username)
            if config.password is not None:
                client.set_password(config.password.get_secret_value())
        if config.security_policy != "None":
            await self._set_security(client)
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            lost.set()

        client.connection_lost_callback = on_lost
        await client.connect()
        try:
            if self.sessions > 0:
                self.stats.reconnects += 1
            self.sessions += 1
            self.connected = True
            backoff.reset()
            if self._outage_since is not None:
                log.info("opcua source %r: connected to %s again after %.1f s", self.name,
                         config.endpoint, time.monotonic() - self._outage_since)
                self._outage_since = None
            await self._resolve(client)
            worker = asyncio.create_task(self._serve(client, emit, observer),
                                         name=f"opcua-{self.name}-serve")
            watcher = asyncio.create_task(lost.wait(), name=f"opcua-{self.name}-watch")
            try:
                await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (worker, watcher):
                    task.cancel()
                await asyncio.gather(worker, watcher, return_exceptions=True)
            if worker.done() and not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()  # type: ignore[misc]
            raise _SessionEnded(f"connection to {config.endpoint} lost")
        finally:
            self.connected = False
            with contextlib.suppress(Exception):  # the server may be gone: best effort only
                await asyncio.wait_for(client.disconnect(), timeout=config.request_timeout_s)
            for point in self._points:
                point.nodeid = None
                point.handle = None

    async def _set_security(self, client: Any) -> None:
        from asyncua import ua
        from asyncua.crypto import security_policies

        config = self.config
        assert config.certificate is not None and config.private_key is not None
        await asyncio.to_thread(ensure_certificate, config.certificate, config.private_key,
                                config.application_uri, f"edgefleet {config.name}",
                                server=False)
        mode = (ua.MessageSecurityMode.Sign if config.security_mode == "Sign"
                else ua.MessageSecurityMode.SignAndEncrypt)
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            str(config.certificate), str(config.private_key),
            server_certificate=(str(config.server_certificate)
                                if config.server_certificate is not None else None),
            mode=mode)

    async def _resolve(self, client: Any, points: Sequence[_Point] | None = None) -> None:
        """Turn the points' node ids or browse paths into node ids of this session
        (unresolvable ones keep `nodeid` None)."""
        from asyncua import ua
        from asyncua.ua.object_ids import ObjectIds

        namespaces: list[str] = await client.get_namespace_array()
        default_ns = (namespaces.index(self.config.namespace_uri)
                      if self.config.namespace_uri in namespaces else None)
        paths: list[tuple[_Point, Any]] = []
        for point in self._points if points is None else points:
            point.nodeid = None
            if point.config.node_id is not None:
                parsed = ua.NodeId.from_string(point.config.node_id)
                uri = getattr(parsed, "NamespaceUri", None)
                if uri:
                    if uri in namespaces:
                        point.nodeid = ua.NodeId(parsed.Identifier, ua.Int16(namespaces.index(uri)),
                                             parsed.NodeIdType)
                else:
                    point.nodeid = ua.NodeId(parsed.Identifier, parsed.NamespaceIndex,
                                             parsed.NodeIdType)
                continue
            elements = []
            assert point.config.browse_path is not None
            for segment in point.config.browse_path.strip("/").split("/"):
                prefix, colon, name = segment.rpartition(":")
                index = int(prefix) if colon else default_ns
                if index is None:
                    break
                elements.append(ua.RelativePathElement(
                    ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences)),
                    IsInverse=False, IncludeSubtypes=True,  # type: ignore[arg-type]
                    TargetName=ua.QualifiedName(name, index)))
            else:
                paths.append((point, ua.RelativePath(Elements=elements)))
        if paths:
            results = await client.translate_browsepaths(
                ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)), [path for _, path in paths])
            for (point, _), result in zip(paths, results, strict=True):
                if result.StatusCode.is_good() and result.Targets:
                    target = result.Targets[0].TargetId
                    point.nodeid = ua.NodeId(target.Identifier, target.NamespaceIndex,
                                             target.NodeIdType)

    async def _serve(self, client: Any, emit: Callable[[Sample], None],
                     observer: Any) -> None:
        from asyncua.ua.uaerrors import UaStatusCodeError

        if self.config.mode != "polling":
            try:
                subscription = await client.create_subscription(
                    self.config.publishing_interval_s * 1000, None,
                    queue_maxsize=self.config.queue_size)
            except UaStatusCodeError as err:
                if self.config.mode == "subscription":
                    raise
                self.stats.count_error("subscription_refused")
                if not self._fallback_logged:
                    log.warning("opcua source %r: %s refused a subscription (%s); polling every "
                                "%.3g s instead", self.name, self.config.endpoint,
                                _status_name(err), self.config.poll_interval_s)
                    self._fallback_logged = True
            else:
                self.mode = "subscription"
                await self._consume(client, subscription, emit, observer)
                return
        self.mode = "polling"
        await self._poll(client, emit)

    # ---- subscription path ---------------------------------------------------------------

    async def _monitor(self, subscription: Any, points: Sequence[_Point],
                       emit: Callable[[Sample], None]) -> None:
        """Create monitored items for `points`; the ones that fail are emitted bad."""
        from asyncua.common.node import Node

        sampling_s = self.config.sampling_interval_s
        sampling_ms = (self.config.publishing_interval_s if sampling_s is None
                       else sampling_s) * 1000
        unresolved = [point for point in points if point.nodeid is None]
        resolved = [point for point in points if point.nodeid is not None]
        for point in unresolved:
            self._emit_bad(point, emit, BAD_NODE_ID_UNKNOWN)
        if not resolved:
            return
        nodes = [Node(subscription.server, point.nodeid) for point in resolved]
        results = await subscription.subscribe_data_change(
            nodes, queuesize=1, sampling_interval=sampling_ms)
        for point, result in zip(resolved, results, strict=True):
            if isinstance(result, int):
                point.handle = result
            else:
                point.handle = None
                self._emit_bad(point, emit, int(result.value))

    async def _consume(self, client: Any, subscription: Any, emit: Callable[[Sample], None],
                       observer: Any) -> None:
        from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent

        by_node: dict[Any, list[_Point]] = {}
        for point in self._points:
            if point.nodeid is not None:
                by_node.setdefault(point.nodeid, []).append(point)
        consumed = 0
        dropped_before = 0
        await self._monitor(subscription, self._points, emit)
        next_retry = time.monotonic() + self.config.retry_bad_nodes_s
        while True:
            timeout = max(0.0, next_retry - time.monotonic())
            event = await subscription.next_event(timeout=timeout)
            if event is not None:
                consumed += 1
                if isinstance(event, DataChangeEvent):
                    for point in by_node.get(event.node.nodeid, ()):
                        self._emit_datavalue(point, event.data.monitored_item.Value, emit)
                elif isinstance(event, StatusChangeEvent):
                    raise _SessionEnded(f"subscription status changed to "
                                        f"{_status_name(event.notification.Status)}")
                dropped = observer.produced - consumed - subscription_backlog(subscription)
                if dropped > dropped_before:
                    self.stats.errors["dropped"] = (self.stats.errors.get("dropped", 0)
                                                    + dropped - dropped_before)
                    dropped_before = dropped
            if time.monotonic() >= next_retry:
                next_retry = time.monotonic() + self.config.retry_bad_nodes_s
                await self._retry_bad(client, subscription, emit, by_node)

    async def _retry_bad(self, client: Any, subscription: Any, emit: Callable[[Sample], None],
                         by_node: dict[Any, list[_Point]]) -> None:
        """Re-create the monitored items of bad points (a node that disappeared and may be
        back): asyncua servers, and some others, do not re-attach an item to a new node."""
        retry = [point for point in self._points if point.bad]
        if not retry:
            return
        stale = [point.handle for point in retry if point.handle is not None]
        if stale:
            with contextlib.suppress(_ua_errors()):
                await subscription.unsubscribe(stale)
        for point in retry:
            point.handle = None
        unresolved = [point for point in retry if point.nodeid is None]
        if unresolved:
            await self._resolve(client, unresolved)
            for point in unresolved:
                if point.nodeid is not None:
                    by_node.setdefault(point.nodeid, []).append(point)
        await self._monitor(subscription, retry, emit)

    # ---- polling path --------------------------------------------------------------------

    async def _poll(self, client: Any, emit: Callable[[Sample], None]) -> None:
        from asyncua.common.node import Node

        next_resolve = time.monotonic() + self.config.retry_bad_nodes_s
        while True:
            started = time.monotonic()
            readable = [point for point in self._points if point.nodeid is not None]
            for point in self._points:
                if point.nodeid is None:
                    self._emit_bad(point, emit, BAD_NODE_ID_UNKNOWN, always=True)
            if readable:
                values = await client.read_attributes(
                    [Node(client.uaclient.session, point.nodeid) for point in readable])
                for point, datavalue in zip(readable, values, strict=True):
                    self._emit_datavalue(point, datavalue, emit)
            if started >= next_resolve and any(point.nodeid is None for point in self._points):
                next_resolve = started + self.config.retry_bad_nodes_s
                await self._resolve(client, [p for p in self._points if p.nodeid is None])
            await asyncio.sleep(max(0.0, self.config.poll_interval_s
                                    - (time.monotonic() - started)))

    # ---- emitting and bookkeeping --------------------------------------------------------

    def _emit_datavalue(self, point: _Point, datavalue: Any,
                        emit: Callable[[Sample], None]) -> None:
        sample, undecodable = sample_from_datavalue(
            point.config.asset, point.config.tag, datavalue, time.time_ns())
        if undecodable:
            self.stats.rejected += 1
            self.stats.count_error("undecodable")
            if not point.bad:
                log.warning("opcua source %r: %s.%s sent a value that is not a number: %r",
                            self.name, point.config.asset, point.config.tag,
                            getattr(getattr(datavalue, "Value", None), "Value", None))
        point.bad = sample.quality is Quality.BAD
        self._count(sample)
        emit(sample)

    def _emit_bad(self, point: _Point, emit: Callable[[Sample], None], code: int,
                  *, always: bool = False) -> None:
        if point.bad and not always:
            return
        point.bad = True
        self.stats.count_error(_status_label(code))
        sample = Sample(point.config.asset, point.config.tag, time.time_ns(), None, Quality.BAD)
        self._count(sample)
        emit(sample)

    def _count(self, sample: Sample) -> None:
        self.stats.samples += 1
        if sample.quality is Quality.BAD:
            self.stats.bad += 1

    def _fail(self, reason: str, message: str) -> None:
        self.stats.count_error(reason)
        self.last_error = message
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if reason == "auth":
                log.error("opcua source %r: %s refused the session: %s (retrying with backoff)",
                          self.name, self.config.endpoint, message)
            else:
                log.warning("opcua source %r: %s unavailable: %s (retrying with backoff)",
                            self.name, self.config.endpoint, message)


def subscription_backlog(subscription: Any) -> int:
    """Events waiting in an asyncua subscription's iterator queue (0 if it has none)."""
    queue = getattr(subscription, "_event_queue", None)
    return queue.qsize() if queue is not None else 0


def _ua_errors() -> type[Exception]:
    from asyncua.ua.uaerrors import UaError

    return UaError


_AUTH_CODES = frozenset({0x801F0000, 0x80200000, 0x80210000})  # UserAccessDenied, IdentityToken*
_SECURITY_CODES = frozenset({0x80130000, 0x80550000, 0x80120000, 0x801A0000, 0x80580000})


def _status_label(code: int) -> str:
    from asyncua import ua

    name = ua.StatusCode(ua.UInt32(code)).name
    return name if name else f"0x{code:08X}"


def _status_name(err: Any) -> str:
    code = getattr(err, "code", None)
    if code is None:
        code = getattr(err, "value", None)
    if isinstance(code, int):
        return _status_label(code)
    return str(err) or type(err).__name__


def _classify(err: BaseException) -> tuple[str, str]:
    code = getattr(err, "code", None)
    name = _status_name(err)
    if isinstance(code, int) and code in _AUTH_CODES:
        return "auth", f"user authentication rejected ({name})"
    if isinstance(code, int) and code in _SECURITY_CODES:
        return "security", f"secure channel rejected ({name})"
    if isinstance(code, int):
        return "status", name
    return "ua_error", f"{type(err).__name__}: {err}"
