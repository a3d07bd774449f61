"""The MQTT bridge: edge agents' MQTT QoS 1 publications → Kafka, acknowledged only after
Kafka has them.

Agents publish binary wire `Batch`es to `<prefix>/<device>/batch` and `Heartbeat`s to
`<prefix>/<device>/heartbeat` (QoS 1, not compressed). The bridge subscribes, QoS 1, to
`$share/<shared_group>/<prefix>/+/batch` and `…/+/heartbeat`, so several gateways share
the load; if the broker refuses shared subscriptions it falls back to the plain filters
(then every bridge receives every message, and the database deduplicates).

Contracts
---------
**Ack after Kafka.** The client runs with `manual_ack=True`. A valid message goes to Kafka
through `kafka_messages` (a heartbeat as one `edgefleet.heartbeats` message), and its
PUBACK is sent from the Kafka delivery callback, only when every Kafka message it produced
was acknowledged by the cluster. PUBACKs may go out of order; brokers accept that.

**Invalid messages are acked.** Undecodable or invalid payloads, a device in the payload
that differs from the one in the topic (`device mismatch`) and unexpected topics are
counted per reason in `stats.rejected_by_reason`, logged when a reason first occurs and
then at most once a minute, and acknowledged: redelivery cannot fix them.

**Kafka failure: leave unacked, reconnect to get them back.** When a Kafka delivery fails
(or `produce` refuses: cluster down, queue full) the message is not acknowledged. MQTT 5
forbids a broker to resend an unacknowledged message on the same connection, and
Mosquitto 2.0 keeps it in flight in our session: measured with Mosquitto 2.0.11, a
persistent session (clean start off, session expiry `session_expiry_s`) that reconnects
gets every unacknowledged message again, with the same packet ids and the DUP flag, before
the messages queued meanwhile. Unacknowledged messages also use up the broker's send
quota (`receive_maximum`), so the bridge stalls if they stay. Hence, after a Kafka
failure the bridge waits until the publisher reports Kafka available again, then
disconnects and reconnects with the same client id to have them redelivered (reconnects
that forwarded nothing since the last one are spaced by a capped, jittered backoff). Acks from
deliveries that complete after that reconnect are dropped (counted in `stale_acks`); those
messages come again and reach Kafka twice, which the database deduplicates.

**Bounded in flight.** MQTT 5 Receive Maximum (`receive_maximum`, sent in CONNECT) caps
how many unacknowledged QoS 1 messages the broker sends us; the rest wait in the broker's
queue for our session. (paho's `max_inflight_messages_set` bounds only our own outgoing
publications, of which the bridge has none.)

**Sessions and shared subscriptions in Mosquitto 2.0.11 (measured).** A persistent
session keeps its share of a shared subscription while it is offline: messages go
round-robin to every session of the group, connected or not, and wait in the offline
session's queue (bounded by the broker's `max_queued_messages`; Mosquitto drops newer
QoS 1 messages beyond it). Unacknowledged messages of a disconnected bridge are *not*
handed to the other members of the group: they come back when a bridge with the same
client id reconnects, or are lost when the session expires. So `client_id` must be stable
per gateway instance (the default is derived from the host name and the group), and a
gateway that is retired for good should be started once more with a short
`session_expiry_s`, or have its session cleared, to hand its backlog over.

**Stop.** `stop()` stops forwarding new messages (they stay unacknowledged and come back
with the session), waits up to `timeout_s` for Kafka deliveries in flight so that their
PUBACKs go out, then disconnects.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.protocols.source import Backoff
from edgefleet.protocols.wire import Batch, Heartbeat, WireError, decode_binary

from .kafka import (
    KafkaPublisher,
    KafkaUnavailable,
    MessageRejected,
    PublishError,
    heartbeat_message,
    kafka_messages,
)

__all__ = ["BridgeStats", "MqttBridge"]

log = logging.getLogger(__name__)

_LOG_EVERY_S: Final = 60.0
_KINDS: Final = ("batch", "heartbeat")
_DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}


@dataclass
class BridgeStats:
    """Counters since start (`in_flight` and `connected` are current values)."""

    received: int = 0  # MQTT messages received
    redelivered: int = 0  # of which the broker marked as redelivered (DUP)
    forwarded: int = 0  # delivered to Kafka and acknowledged
    rejected: int = 0  # invalid, acknowledged without forwarding
    kafka_failures: int = 0  # left unacknowledged for redelivery because Kafka failed
    stale_acks: int = 0  # Kafka confirmed after a reconnect: the broker sends them again
    reconnects: int = 0  # connections after the first
    in_flight: int = 0  # received, waiting for Kafka
    connected: bool = False
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class MqttBridge:
    """Forwards agents' MQTT publications to Kafka; see the module docstring."""

    def __init__(
        self,
        mqtt_url: str,
        publisher: KafkaPublisher,
        *,
        prefix: str = "edgefleet/devices",
        username: str | None = None,
        password: str | None = None,
        shared_group: str = "edgefleet-fog",
        client_id: str | None = None,
        receive_maximum: int = 100,
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive_s: int = 30,
        ca_file: str | None = None,
    ) -> None:
        parts = urlsplit(mqtt_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"MQTT URL {_redacted(mqtt_url)!r}: expected mqtt(s)://host[:port]")
        if not 1 <= receive_maximum <= 65535:
            raise ValueError("receive_maximum must be within 1..65535")
        self.prefix = prefix.strip("/")
        if not self.prefix or any(c in self.prefix for c in "+#\0"):
            raise ValueError(f"MQTT prefix {prefix!r}: expected topic levels without wildcards")
        self.publisher = publisher
        self.shared_group = shared_group
        self.client_id = client_id or f"edgefleet-fog-{shared_group}-{socket.gethostname()}"
        self.stats = BridgeStats()
        self._host = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._tls = parts.scheme == "mqtts"
        self._ca_file = ca_file
        self._username = username if username is not None else _unquoted(parts.username)
        self._password = password if password is not None else _unquoted(parts.password)
        self._receive_maximum = receive_maximum
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._use_shared = bool(shared_group)
        self._client: mqtt.Client | None = None
        self._supervisor: threading.Thread | None = None
        self._lock = threading.Lock()  # stats, generation, in-flight accounting
        self._generation = 0  # acks of messages from an older generation are dropped
        self._connections = 0
        self._stopping = threading.Event()
        self._redeliver = threading.Event()  # a Kafka failure left messages unacked
        self._subscribed = threading.Event()
        self._idle = threading.Condition(self._lock)  # notified when in_flight reaches 0
        self._expected_disconnect = False
        self._connect_error_logged = False
        self._logged: dict[str, tuple[float, int]] = {}

    # ---- topics -------------------------------------------------------------------------

    def subscriptions(self, shared: bool | None = None) -> list[str]:
        """The topic filters the bridge subscribes to."""
        shared = self._use_shared if shared is None else shared
        share = f"$share/{self.shared_group}/" if shared else ""
        return [f"{share}{self.prefix}/+/{kind}" for kind in _KINDS]

    # ---- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background, retrying) and start forwarding."""
        if self._client is not None:
            raise RuntimeError("the bridge was already started")
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        client.username_pw_set(self._username, self._password)
        if self._tls:
            client.tls_set(ca_certs=self._ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        self._connect(client)
        self._supervisor = threading.Thread(target=self._supervise, name="mqtt-bridge",
                                            daemon=True)
        self._supervisor.start()

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Wait until the broker has granted the subscriptions (True) or `timeout_s` passed."""
        return self._subscribed.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop forwarding, wait for deliveries in flight to be acked, disconnect."""
        self._stopping.set()
        self._redeliver.set()  # wake the supervisor
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self.stats.in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            if self.stats.in_flight:
                log.warning("mqtt bridge: stopping with %d messages not confirmed by Kafka; "
                            "the broker redelivers them to this client id",
                            self.stats.in_flight)
        if self._supervisor is not None:
            self._supervisor.join(timeout_s)
            self._supervisor = None
        client = self._client
        if client is not None:
            self._expected_disconnect = True
            client.disconnect()
            client.loop_stop()

    def _connect(self, client: mqtt.Client) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._session_expiry_s
        properties.ReceiveMaximum = self._receive_maximum
        client.connect_async(self._host, self._port, keepalive=self._keepalive_s,
                             clean_start=False, properties=properties)
        client.loop_start()

    def _supervise(self) -> None:
        """After a Kafka failure: wait for Kafka, then reconnect to get the unacked back.

        Successive reconnects without a message forwarded in between are spaced by a
        capped, jittered backoff, so a Kafka that accepts connections but not messages
        does not turn into a reconnect loop."""
        backoff = Backoff(initial_s=0.5, cap_s=30.0)
        forwarded_at_reconnect = -1
        while not self._stopping.is_set():
            if not self._redeliver.wait(1.0) or self._stopping.is_set():
                continue
            while not self.publisher.available and not self._stopping.wait(0.2):
                pass
            if self.stats.forwarded > forwarded_at_reconnect:
                backoff.reset()
            elif self._stopping.wait(backoff.next_delay()):
                return
            # Let deliveries still in flight finish, so that their acks are not wasted.
            with self._idle:
                self._idle.wait_for(lambda: self.stats.in_flight == 0, timeout=2.0)
                self._generation += 1  # acks from now on would go to the next connection
            if self._stopping.is_set():
                return
            self._redeliver.clear()
            forwarded_at_reconnect = self.stats.forwarded
            client = self._client
            assert client is not None
            log.warning("mqtt bridge: Kafka is available; reconnecting so that the broker "
                        "redelivers the messages left unacknowledged")
            self._expected_disconnect = True
            client.disconnect()
            client.loop_stop()
            self._connect(client)

    # ---- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, _properties: Any) -> None:
        if reason_code.is_failure:
            if not self._connect_error_logged:
                log.error("mqtt bridge: %s:%d refused the connection: %s (retrying)",
                          self._host, self._port, reason_code)
                self._connect_error_logged = True
            return
        self._connect_error_logged = False
        self._expected_disconnect = False
        with self._lock:
            self._generation += 1
            self.stats.reconnects += int(self._connections > 0)
            self._connections += 1
            self.stats.connected = True
        log.info("mqtt bridge: connected to %s:%d as %s (session %s)", self._host, self._port,
                 self.client_id, "resumed" if flags.session_present else "new")
        client.subscribe([(topic, 1) for topic in self.subscriptions()])

    def _on_subscribe(self, client: mqtt.Client, _userdata: Any, _mid: int,
                      reason_codes: list[ReasonCode], _properties: Any) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if not refused:
            self._subscribed.set()
            return
        if self._use_shared:
            log.warning("mqtt bridge: the broker refused the shared subscriptions (%s); "
                        "subscribing without $share: every bridge will get every message",
                        ", ".join(str(code) for code in refused))
            self._use_shared = False
            client.subscribe([(topic, 1) for topic in self.subscriptions()])
        else:
            log.error("mqtt bridge: the broker refused the subscriptions %s: %s",
                      self.subscriptions(), ", ".join(str(code) for code in refused))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, _properties: Any) -> None:
        with self._lock:
            self.stats.connected = False
        if not self._expected_disconnect:
            log.warning("mqtt bridge: connection to %s:%d lost (%s); reconnecting",
                        self._host, self._port, reason_code)

    def _on_message(self, client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        if self._stopping.is_set():
            return  # not acked: the broker keeps it for this session
        with self._lock:
            self.stats.received += 1
            self.stats.redelivered += int(message.dup)
            generation = self._generation
        mid, qos = message.mid, message.qos
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers should refuse such topics; never crash on one
            topic = "(not UTF-8)"
        try:
            messages = self._kafka_messages(topic, bytes(message.payload))
        except _Rejected as rejected:
            self._reject(rejected.reason, f"{topic}: {rejected.detail}")
            client.ack(mid, qos)
            return
        self._forward(client, generation, mid, qos, messages)

    # ---- forwarding ---------------------------------------------------------------------

    def _kafka_messages(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bytes]]:
        levels = topic[len(self.prefix) + 1:].split("/") \
            if topic.startswith(self.prefix + "/") else []
        if len(levels) != 2 or levels[1] not in _KINDS:
            raise _Rejected("unexpected topic", "not <prefix>/<device>/batch|heartbeat")
        device, kind = levels
        item: Batch | Heartbeat
        try:
            item = decode_binary(payload, Batch if kind == "batch" else Heartbeat)
        except WireError as err:
            raise _Rejected(f"invalid {kind}", str(err)) from err
        if item.device != device:
            raise _Rejected("device mismatch",
                            f"the {kind} is from {item.device!r}, the topic names {device!r}")
        if isinstance(item, Batch):
            return kafka_messages(item, payload)
        return [heartbeat_message(item, payload)]

    def _forward(self, client: mqtt.Client, generation: int, mid: int, qos: int,
                 messages: list[tuple[str, bytes, bytes]]) -> None:
        state = _Delivery(len(messages))
        with self._lock:
            self.stats.in_flight += 1

        def on_delivery(error: KafkaUnavailable | None) -> None:
            if state.settle(error):
                self._delivered(client, generation, mid, qos, state)

        for index, (topic, key, value) in enumerate(messages):
            try:
                self.publisher.produce(topic, key, value, on_delivery)
            except PublishError as err:
                for _ in messages[index:]:  # never produced: settle them here
                    if state.settle(err):
                        self._delivered(client, generation, mid, qos, state)
                break

    def _delivered(self, client: mqtt.Client, generation: int, mid: int, qos: int,
                   state: _Delivery) -> None:
        """Every Kafka message of one MQTT message is settled (any thread)."""
        error = state.error
        if isinstance(error, MessageRejected):  # cannot ever go: drop it, loudly
            self._reject("refused by kafka", str(error))
        elif error is not None:
            with self._lock:
                self.stats.kafka_failures += 1
            self._note("kafka", f"Kafka did not take a message ({error}); leaving it "
                       "unacknowledged and reconnecting once Kafka is available")
            self._finish()
            self._redeliver.set()
            return
        with self._lock:
            current = generation == self._generation
            if error is None:
                self.stats.forwarded += int(current)
            if not current:
                self.stats.stale_acks += 1
        if current:
            client.ack(mid, qos)
        self._finish()

    def _finish(self) -> None:
        with self._idle:
            self.stats.in_flight -= 1
            if self.stats.in_flight == 0:
                self._idle.notify_all()

    def _reject(self, reason: str, detail: str) -> None:
        with self._lock:
            self.stats.rejected += 1
            counts = self.stats.rejected_by_reason
            counts[reason] = counts.get(reason, 0) + 1
        self._note(reason, f"rejected ({reason}): {detail}; acknowledged, not forwarded")

    def _note(self, reason: str, message: str) -> None:
        """Log `reason`'s first occurrence, then at most once a minute with a count."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._logged.get(reason, (-math.inf, 0))
            due = now - last >= _LOG_EVERY_S
            self._logged[reason] = (now, 0) if due else (last, suppressed + 1)
        if due:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("mqtt bridge: %s%s", message, more)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Delivery:
    """The Kafka outcomes of one MQTT message; `settle` is True for the last one."""

    def __init__(self, count: int) -> None:
        self._remaining = count
        self._lock = threading.Lock()
        self.error: PublishError | None = None

    def settle(self, error: PublishError | None) -> bool:
        with self._lock:
            if error is not None and not isinstance(self.error, KafkaUnavailable):
                self.error = error  # a retryable failure outranks a permanent one
            self._remaining -= 1
            return self._remaining == 0


def _unquoted(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)

