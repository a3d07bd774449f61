"""The plant over MQTT: plain JSON per asset, and Sparkplug B as an edge node.

`MqttSimPublisher` is a `ProtocolServer`: the runner calls `update(plant)` every tick and
the publisher sends each asset's values every `publish_interval_s` (wall time).

JSON (`json_topic`, `{asset}` replaced by the asset name, QoS `json_qos`):

    {"ts": "2026-11-22T10:00:00.100000+00:00",        # or epoch ms, see json_timestamp
     "values": {"speed": 2950.1, "flow": 301.2, …},
     "status": {"anomaly": false, "code": 0}}        # code: AnomalyKind, 0 = normal

Sparkplug B (`sparkplug: true`), as edge node `<group_id>/<edge_node_id>` with one device
per asset: NBIRTH (bdSeq, `Node Control/Rebirth`) and a DBIRTH per asset with every
metric (the six tags as Double, `anomaly` Boolean, `anomaly_code` Int32) and its alias,
at every connect and whenever a host sends NCMD `Node Control/Rebirth`; then DDATA with
only the metrics that changed, by alias. seq runs 0..255 and wraps (NBIRTH is 0); bdSeq
goes up by one per MQTT session and is in the NDEATH registered as the MQTT will, so the
broker announces the node's death if the connection is lost; `stop()` publishes NDEATH
itself. Birth and data messages are QoS 0 and the will QoS 1, as the specification says;
while disconnected no Sparkplug data is sent (a host needs births first).

Never blocking the event loop: paho runs its own network thread (`loop_start`, which also
reconnects), `publish` only queues. The outgoing queue is bounded: at most `max_queued`
messages wait unsent (paho's `max_queued_messages_set` for QoS 1, and a count of
unwritten QoS 0 messages); beyond that a message is dropped and counted in `dropped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..protocols.mqtt import BrokerAddress, parse_broker_url
from ..protocols.sparkplug import (
    REBIRTH_METRIC,
    DataType,
    Metric,
    Payload,
    SparkplugDecodeError,
    SparkplugTopic,
    decode_payload,
    encode_payload,
)
from .model import TAGS, AnomalyKind, Plant

__all__ = ["MqttSimConfig", "MqttSimPublisher"]

log = logging.getLogger(__name__)

_STATUS_METRICS = (("anomaly", DataType.BOOLEAN), ("anomaly_code", DataType.INT32))


class MqttSimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    broker: SecretStr  # mqtt://user:password@host:port or mqtts://…
    ca_file: Path | None = None  # TLS: the broker's CA (default: the system's)
    client_id: str | None = None  # default: edgefleet-sim-<edge_node_id>
    publish_interval_s: float = Field(default=1.0, gt=0, le=3600)
    json_enabled: bool = True
    json_topic: str = "plant/{asset}/telemetry"
    json_qos: Literal[0, 1] = 1
    json_timestamp: Literal["iso8601", "epoch_ms"] = "iso8601"
    sparkplug: bool = False
    group_id: str = Field(default="edgefleet", pattern=r"^[^/+#]+$")
    edge_node_id: str = Field(default="sim", pattern=r"^[^/+#]+$")
    max_queued: int = Field(default=1000, ge=1, le=1_000_000)
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: int = Field(default=1, ge=1)  # paho's reconnect delays, whole seconds
    reconnect_max_s: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> MqttSimConfig:
        address = parse_broker_url(self.broker.get_secret_value())
        if self.ca_file is not None and not address.tls:
            raise ValueError("ca_file is set for a plain mqtt:// broker (use mqtts://)")
        if "{asset}" not in self.json_topic or any(c in self.json_topic for c in "+#"):
            raise ValueError("json_topic must contain {asset} and no wildcards")
        if not (self.json_enabled or self.sparkplug):
            raise ValueError("enable json_enabled, sparkplug or both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.broker.get_secret_value())


class MqttSimPublisher:
    """Publishes `assets` of the plant (default: all) as JSON and/or Sparkplug B."""

    name = "mqtt"

    def __init__(self, config: MqttSimConfig, plant: Plant,
                 assets: Sequence[str] | None = None) -> None:
        self.config = config
        self.assets = list(assets) if assets is not None else list(plant.assets)
        unknown = [a for a in self.assets if a not in plant.assets]
        if unknown:
            raise ValueError(f"mqtt publisher: assets not in the plant: {unknown}")
        self._kinds = {a: plant.assets[a].kind for a in self.assets}
        self.published = 0  # messages handed to paho
        self.dropped = 0  # not sent: outgoing queue full
        self.connects = 0  # CONNACKs received
        self.rebirths = 0  # births sent on a host's request
        self.bdseq = 0
        self.seq = 0  # the last Sparkplug seq sent
        self.connected = False
        self._stopping = False
        self._lock = threading.RLock()  # Sparkplug state: seq, births, snapshot
        self._pending_lock = threading.Lock()  # the outgoing-queue bookkeeping only
        self._client: Any = None
        self._pending: dict[int, int] = {}  # mid -> qos, handed to paho and not yet sent
        self._done_early: set[int] = set()
        self._born = False
        self._snapshot: dict[str, tuple[dict[str, float], AnomalyKind, int]] = {}
        self._sent: dict[str, dict[str, float | bool | int]] = {}
        self._next_publish = 0.0

    # ---- ProtocolServer ------------------------------------------------------------------

    async def start(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        config = self.config
        self._stopping = False
        client_id = config.client_id or f"edgefleet-sim-{config.edge_node_id}"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311)
        config.address.configure(client, ca_file=config.ca_file)
        client.max_queued_messages_set(config.max_queued)
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        if config.sparkplug:
            self._set_will(client)
        self._client = client
        address = config.address
        client.connect_async(address.host, address.port, config.keepalive_s)
        client.loop_start()  # paho's thread connects (and reconnects) from here on

    def update(self, plant: Plant) -> None:
        ts_ms = plant.now_ns // 1_000_000
        with self._lock:
            for asset in self.assets:
                self._snapshot[asset] = (plant.values(asset), plant.status(asset), plant.now_ns)
        now = time.monotonic()
        if now < self._next_publish or self._client is None:
            return
        self._next_publish = max(self._next_publish + self.config.publish_interval_s, now)
        if self.config.json_enabled:
            for asset in self.assets:
                values, status, now_ns = self._snapshot[asset]
                self._publish(self.config.json_topic.replace("{asset}", asset),
                              self._json(values, status, now_ns), self.config.json_qos)
        if self.config.sparkplug:
            with self._lock:
                if self._born:
                    for asset in self.assets:
                        self._send_ddata(asset, ts_ms)

    async def stop(self) -> None:
        client = self._client
        if client is None:
            return
        if self.config.sparkplug:
            with self._lock:
                if self._born:
                    info = client.publish(self._topic("NDEATH"), self._ndeath(), qos=1)
                    self._born = False
                else:
                    info = None
            if info is not None:
                await asyncio.to_thread(_wait_published, info, 2.0)
        with self._lock:
            self._stopping = True  # a disconnect from here on is ours, not an outage
        await asyncio.to_thread(client.disconnect)
        await asyncio.to_thread(client.loop_stop)
        self._client = None
        self.connected = False

    # ---- messages ------------------------------------------------------------------------

    def _json(self, values: dict[str, float], status: AnomalyKind, now_ns: int) -> bytes:
        ts: str | int
        if self.config.json_timestamp == "epoch_ms":
            ts = now_ns // 1_000_000
        else:
            ts = datetime.fromtimestamp(now_ns // 1000 / 1e6, UTC).isoformat()
        return json.dumps({"ts": ts, "values": values,
                           "status": {"anomaly": status != AnomalyKind.NONE,
                                      "code": int(status)}},
                          separators=(",", ":")).encode()

    def _topic(self, kind: str, device: str | None = None) -> str:
        return str(SparkplugTopic(self.config.group_id, kind, self.config.edge_node_id, device))

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _metric_values(self, asset: str) -> dict[str, float | bool | int]:
        values, status, _ = self._snapshot[asset]
        result: dict[str, float | bool | int] = {spec.name: values[spec.name]
                                                 for spec in TAGS[self._kinds[asset]]}
        result["anomaly"] = status != AnomalyKind.NONE
        result["anomaly_code"] = int(status)
        return result

    def _datatypes(self, asset: str) -> list[tuple[str, DataType]]:
        return [(spec.name, DataType.DOUBLE) for spec in TAGS[self._kinds[asset]]] + list(
            _STATUS_METRICS)

    def _ndeath(self) -> bytes:
        return encode_payload(Payload(timestamp=time.time_ns() // 1_000_000, metrics=(
            Metric("bdSeq", datatype=DataType.UINT64, value=self.bdseq),)))

    def _set_will(self, client: Any) -> None:
        client.will_set(self._topic("NDEATH"), self._ndeath(), qos=1, retain=False)

    def _send_births(self) -> None:
        """NBIRTH then one DBIRTH per asset. Caller holds the lock."""
        ts_ms = time.time_ns() // 1_000_000
        self.seq = 0
        self._publish(self._topic("NBIRTH"), encode_payload(Payload(timestamp=ts_ms, seq=0,
            metrics=(Metric("bdSeq", datatype=DataType.UINT64, value=self.bdseq),
                     Metric(REBIRTH_METRIC, datatype=DataType.BOOLEAN, value=False)))), 0)
        self._sent.clear()
        for asset in self.assets:
            if asset in self._snapshot:
                self._send_dbirth(asset, ts_ms)
        self._born = True

    def _send_dbirth(self, asset: str, ts_ms: int) -> None:
        _, _, now_ns = self._snapshot[asset]
        values = self._metric_values(asset)
        metrics = tuple(
            Metric(name, alias, now_ns // 1_000_000, datatype, values[name])
            for alias, (name, datatype) in enumerate(self._datatypes(asset), start=1))
        if self._publish(self._topic("DBIRTH", asset), encode_payload(
                Payload(timestamp=ts_ms, seq=self._next_seq(), metrics=metrics)), 0):
            self._sent[asset] = values

    def _send_ddata(self, asset: str, ts_ms: int) -> None:
        if asset not in self._sent:  # no DBIRTH yet (no values at connect, or it was lost)
            self._send_dbirth(asset, ts_ms)
            return
        values = self._metric_values(asset)
        sent = self._sent.get(asset, {})
        _, _, now_ns = self._snapshot[asset]
        metrics = tuple(
            Metric(None, alias, now_ns // 1_000_000, datatype, values[name])
            for alias, (name, datatype) in enumerate(self._datatypes(asset), start=1)
            if sent.get(name) != values[name])
        if not metrics:
            return
        if self._publish(self._topic("DDATA", asset), encode_payload(
                Payload(timestamp=ts_ms, seq=self._next_seq(), metrics=metrics)), 0):
            self._sent[asset] = values

    def _publish(self, topic: str, payload: bytes, qos: int) -> bool:
        """Hand one message to paho unless `max_queued` are already waiting; never blocks."""
        import paho.mqtt.client as mqtt

        client = self._client
        if client is None:
            return False
        # Lock order: paho calls on_publish holding its own mutexes, so `_pending_lock` is
        # never held while calling into paho.
        with self._pending_lock:
            if len(self._pending) >= self.config.max_queued:
                self.dropped += 1
                return False
        info = client.publish(topic, payload, qos=qos)
        with self._pending_lock:
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE or (qos == 0
                                                      and info.rc == mqtt.MQTT_ERR_NO_CONN):
                self.dropped += 1
                return False
            if info.mid in self._done_early:  # written before publish() returned
                self._done_early.discard(info.mid)
            else:
                self._pending[info.mid] = qos
            self.published += 1
            return True

    # ---- paho callbacks (paho's thread) --------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("mqtt publisher: %s refused the session: %s", self.config.address,
                        reason)
            return
        with self._lock:
            self.connects += 1
            self.connected = True
            # QoS 0 messages not written before a loss are gone with the old socket.
            with self._pending_lock:
                self._pending = {mid: qos for mid, qos in self._pending.items() if qos > 0}
            if self.connects > 1:
                log.info("mqtt publisher: connected to %s again", self.config.address)
            if self.config.sparkplug:
                client.subscribe(self._topic("NCMD"), qos=0)
                self._send_births()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        with self._lock:
            if self.connected and not self._stopping:
                log.warning("mqtt publisher: connection to %s lost (%s); paho reconnects",
                            self.config.address, reason)
            self.connected = False
            self._born = False
            if self.config.sparkplug:  # the next session has the next bdSeq in its will
                self.bdseq = (self.bdseq + 1) % 256
                self._set_will(client)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._pending_lock:
            if self._pending.pop(mid, None) is None:
                self._done_early.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            payload = decode_payload(message.payload)
        except SparkplugDecodeError as err:
            log.warning("mqtt publisher: unreadable NCMD on %s: %s", message.topic, err)
            return
        if any(m.name == REBIRTH_METRIC and m.value is True for m in payload.metrics):
            with self._lock:
                if self.connected:
                    self.rebirths += 1
                    self._send_births()


def _wait_published(info: Any, timeout_s: float) -> None:
    with contextlib.suppress(RuntimeError, ValueError):  # not connected: nothing to wait for
        info.wait_for_publish(timeout_s)
