"""A simulated OPC UA server: the plant's assets as an address space.

Address space (namespace `namespace_uri`, default `urn:edgefleet:sim`; `idx` is its index):

| browse path (from Objects) | node id (`ns=idx;s=…`) | type | content |
|---|---|---|---|
| `Plant` | `Plant` | folder | |
| `Plant/<asset>` | `<asset>` | object | one per asset |
| `Plant/<asset>/<tag>` | `<asset>.<tag>` | Double | value; SourceTimestamp = simulated time |
| `Plant/<asset>/anomaly` | `<asset>.anomaly` | Boolean | ground-truth label: in an episode |
| `Plant/<asset>/anomaly_code` | `<asset>.anomaly_code` | Int32 | `AnomalyKind` (0 = normal) |

Node ids are strings derived from names, so they are the same after a restart and clients
can write them down; `node_id(asset, tag)` spells them with the namespace URI (`nsu=…`).

`update(plant)` copies the plant's state without awaiting: it snapshots the values and starts
one write task; if the previous tick's task is still running the tick is skipped and counted
in `skipped_updates` (there is never more than one write task in flight).

Security: `security` lists the endpoints offered (`None`, `Basic256Sha256_Sign`,
`Basic256Sha256_SignAndEncrypt`). Secure endpoints need a certificate: `certificate` and
`private_key` (PEM or DER), or `certificate_dir`, where a self-signed one is generated at
the first start (and reused). `users` (username → password) turns user authentication on and
anonymous sessions off. Client certificates are accepted without a trust list (simulator).

Fault injection (tests and demos), at run time: `restart()` stops and starts the server on
the same port with the same node ids; `delete_tag(asset, tag)` / `restore_tag(asset, tag)`
make one variable disappear (subscribers get `BadNodeIdUnknown`, reads too) and come back;
`read_delay_s` slows every Read service call; `refuse_subscriptions` makes CreateSubscription
answer `BadTooManySubscriptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from asyncua import ua
from asyncua.common.callback import CallbackType
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.protocols.opcua import ensure_certificate

from .model import TAGS, Plant

__all__ = [
    "DEFAULT_NAMESPACE_URI",
    "OpcUaSimConfig",
    "OpcUaSimServer",
    "SecurityOffer",
    "node_id",
]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE_URI = "urn:edgefleet:sim"
SecurityOffer = Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]
_POLICY: dict[str, ua.SecurityPolicyType] = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STATUS_TAGS = ("anomaly", "anomaly_code")


def node_id(asset: str, tag: str, namespace_uri: str = DEFAULT_NAMESPACE_URI) -> str:
    """The node id of one variable, with its namespace URI (independent of the index)."""
    return f"nsu={namespace_uri};s={asset}.{tag}"


def _ns_time(ts_ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ts_ns // 1000)


class OpcUaSimConfig(BaseModel):
    """How the simulated OPC UA server is served (the address space itself is fixed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0 = a free port, kept across restarts
    namespace_uri: str = Field(default=DEFAULT_NAMESPACE_URI, min_length=1)
    application_uri: str = "urn:edgefleet:sim:opcua-server"
    server_name: str = "edgefleet OPC UA simulator"
    security: list[SecurityOffer] = Field(default_factory=lambda: ["None"],  # type: ignore[arg-type]
                                          min_length=1)
    certificate: Path | None = None
    private_key: Path | None = None
    certificate_dir: Path | None = None  # where a self-signed certificate is generated
    users: dict[str, str] = Field(default_factory=dict)  # username -> password
    refuse_subscriptions: bool = False
    read_delay_s: float = Field(default=0.0, ge=0, le=60)

    @model_validator(mode="after")
    def _check_security(self) -> OpcUaSimConfig:
        if len(set(self.security)) != len(self.security):
            raise ValueError("security: an endpoint is listed twice")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key: set both or neither")
        secure = any(offer != "None" for offer in self.security)
        if secure and self.certificate is None and self.certificate_dir is None:
            raise ValueError("security: secure endpoints need certificate + private_key, or "
                             "certificate_dir to generate a self-signed certificate in")
        for name in self.users:
            if not name:
                raise ValueError("users: a username is empty")
        return self

    def certificate_paths(self) -> tuple[Path, Path] | None:
        """The server's certificate and key files, if any endpoint needs them."""
        if self.certificate is not None and self.private_key is not None:
            return self.certificate, self.private_key
        if self.certificate_dir is not None:
            return (self.certificate_dir / "opcua-server-cert.der",
                    self.certificate_dir / "opcua-server-key.pem")
        return None


class _UserManager(UserManager):
    """Username/password check against the configured users; anonymous iff no users."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = dict(users)
        self.rejected = 0

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if not self._users:
            return User(role=UserRole.User)
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        self.rejected += 1
        return None


@dataclass
class _Snapshot:
    ts_ns: int
    values: dict[str, dict[str, float]]
    status: dict[str, int]


class OpcUaSimServer:
    """Serves `assets` of a `Plant` over OPC UA; a `ProtocolServer` for the sim runner."""

    name = "opcua"

    def __init__(self, config: OpcUaSimConfig, plant: Plant, assets: Sequence[str]) -> None:
        unknown = [asset for asset in assets if asset not in plant.assets]
        if unknown:
            raise ValueError(f"opcua server: assets not in the plant: {', '.join(unknown)}")
        self.config = config
        self.assets = list(assets)
        self._kinds = {asset: plant.assets[asset].kind for asset in self.assets}
        self.port = config.port
        self.read_delay_s = config.read_delay_s
        self.refuse_subscriptions = config.refuse_subscriptions
        self.updates = 0  # ticks written to the address space
        self.skipped_updates = 0  # ticks skipped because the previous write was in flight
        self.restarts = 0
        self._server: Server | None = None
        self._users = _UserManager(config.users)
        self._ns = 0
        self._nodes: dict[tuple[str, str], ua.NodeId] = {}
        self._deleted: set[tuple[str, str]] = set()
        self._inflight: asyncio.Task[None] | None = None
        self._last: _Snapshot | None = None
        self._snapshot_of(plant)

    # ---- public surface ------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.config.host}:{self.port}/edgefleet/sim"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def rejected_logins(self) -> int:
        return self._users.rejected

    def node_id(self, asset: str, tag: str) -> str:
        return node_id(asset, tag, self.config.namespace_uri)

    @property
    def certificate_path(self) -> Path | None:
        """The server certificate a client can pin (after `start()` generated it)."""
        paths = self.config.certificate_paths()
        return paths[0] if paths else None

    async def start(self) -> None:
        if self._server is not None:
            return
        if self.port == 0:
            self.port = _free_port(self.config.host)
        server = Server(user_manager=self._users)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(self.config.server_name)
        await server.set_application_uri(self.config.application_uri)
        server.set_security_policy([_POLICY[offer] for offer in self.config.security])
        tokens: list[type] = [ua.UserNameIdentityToken]
        if not self.config.users:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        paths = self.config.certificate_paths()
        if paths is not None and any(offer != "None" for offer in self.config.security):
            cert, key = paths
            await asyncio.to_thread(ensure_certificate, cert, key, self.config.application_uri,
                                    "edgefleet OPC UA simulator", server=True)
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        await self._build_address_space(server)
        server.iserver.callback_service.addListener(
            CallbackType.PreRead, self._pre_read)  # type: ignore[arg-type]  # enum is the key
        server.iserver.max_subscriptions = 0 if self.refuse_subscriptions else 1_000
        await server.start()
        self._server = server
        if self._last is not None:
            await self._write(self._last)
        log.info("OPC UA simulator serving %d assets at %s", len(self.assets), self.endpoint)

    def update(self, plant: Plant) -> None:
        snapshot = self._snapshot_of(plant)
        if self._server is None:
            return
        if self._inflight is not None and not self._inflight.done():
            self.skipped_updates += 1
            return
        self._inflight = asyncio.create_task(self._write(snapshot), name="opcua-sim-update")

    async def stop(self) -> None:
        server, self._server = self._server, None
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight
            self._inflight = None
        if server is not None:
            await server.stop()

    async def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s` seconds, start again on the same port and node ids."""
        await self.stop()
        if down_s > 0:
            await asyncio.sleep(down_s)
        await self.start()
        self.restarts += 1

    def set_refuse_subscriptions(self, refuse: bool) -> None:
        self.refuse_subscriptions = refuse
        if self._server is not None:
            self._server.iserver.max_subscriptions = 0 if refuse else 1_000

    async def delete_tag(self, asset: str, tag: str) -> None:
        """Make one variable disappear, as a reconfigured PLC would."""
        key = self._key(asset, tag)
        self._deleted.add(key)
        server = self._server
        if server is None:
            return
        nodeid = self._nodes[key]
        # asyncua's delete does not notify monitored items (its callback coroutine is never
        # awaited), so tell subscribers first, as the spec requires, then detach them.
        await server.write_attribute_value(nodeid, ua.DataValue(
            StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadNodeIdUnknown))))
        aspace = server.iserver.aspace
        with contextlib.suppress(KeyError):
            callbacks = aspace[nodeid].attributes[AttributeIds.Value].datachange_callbacks
            for handle in list(callbacks):
                aspace.delete_datachange_callback(handle)
        await server.delete_nodes([server.get_node(nodeid)])

    async def restore_tag(self, asset: str, tag: str) -> None:
        key = self._key(asset, tag)
        self._deleted.discard(key)
        server = self._server
        if server is None:
            return
        await self._add_variable(server, asset, tag)
        if self._last is not None:
            await self._write(self._last)

    # ---- internals -----------------------------------------------------------------------

    def _key(self, asset: str, tag: str) -> tuple[str, str]:
        if (asset, tag) not in self._nodes:
            raise KeyError(f"opcua server: no variable {asset}.{tag}")
        return asset, tag

    def _snapshot_of(self, plant: Plant) -> _Snapshot:
        snapshot = _Snapshot(
            plant.now_ns,
            {asset: plant.values(asset) for asset in self.assets},
            {asset: int(plant.status(asset)) for asset in self.assets},
        )
        self._last = snapshot
        return snapshot

    async def _pre_read(self, event: Any, dispatcher: Any) -> None:
        if self.read_delay_s > 0:
            await asyncio.sleep(self.read_delay_s)

    async def _build_address_space(self, server: Server) -> None:
        self._ns = await server.register_namespace(self.config.namespace_uri)
        ns = self._ns
        plant = await server.nodes.objects.add_folder(_nodeid("Plant", ns),
                                                      ua.QualifiedName("Plant", ns))
        for asset in self.assets:
            await plant.add_object(_nodeid(asset, ns), ua.QualifiedName(asset, ns))
            for spec in TAGS[self._kinds[asset]]:
                self._nodes[(asset, spec.name)] = _nodeid(f"{asset}.{spec.name}", ns)
                if (asset, spec.name) not in self._deleted:
                    await self._add_variable(server, asset, spec.name)
            for tag in STATUS_TAGS:
                self._nodes[(asset, tag)] = _nodeid(f"{asset}.{tag}", ns)
                if (asset, tag) not in self._deleted:
                    await self._add_variable(server, asset, tag)

    async def _add_variable(self, server: Server, asset: str, tag: str) -> None:
        parent = server.get_node(_nodeid(asset, self._ns))
        if tag == "anomaly":
            initial = ua.Variant(False, ua.VariantType.Boolean)
        elif tag == "anomaly_code":
            initial = ua.Variant(0, ua.VariantType.Int32)
        else:
            initial = ua.Variant(0.0, ua.VariantType.Double)
        await parent.add_variable(self._nodes[(asset, tag)], ua.QualifiedName(tag, self._ns),
                                  initial)

    async def _write(self, snapshot: _Snapshot) -> None:
        server = self._server
        if server is None:
            return
        source_ts = ua.DateTime.fromtimestamp(0, UTC) + (_ns_time(snapshot.ts_ns) - _EPOCH)
        server_ts = ua.DateTime.now(UTC)
        write = server.write_attribute_value
        nodes = self._nodes
        deleted = self._deleted
        for asset in self.assets:
            for tag, value in snapshot.values[asset].items():
                if (asset, tag) in deleted:
                    continue
                await write(nodes[(asset, tag)], ua.DataValue(
                    ua.Variant(value, ua.VariantType.Double), SourceTimestamp=source_ts,
                    ServerTimestamp=server_ts))
            code = snapshot.status[asset]
            if (asset, "anomaly") not in deleted:
                await write(nodes[(asset, "anomaly")], ua.DataValue(
                    ua.Variant(code != 0, ua.VariantType.Boolean), SourceTimestamp=source_ts,
                    ServerTimestamp=server_ts))
            if (asset, "anomaly_code") not in deleted:
                await write(nodes[(asset, "anomaly_code")], ua.DataValue(
                    ua.Variant(code, ua.VariantType.Int32), SourceTimestamp=source_ts,
                    ServerTimestamp=server_ts))
        self.updates += 1


def _nodeid(identifier: str, namespace: int) -> ua.NodeId:
    return ua.NodeId(ua.String(identifier), ua.Int16(namespace))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
