"""The fog gateway's Kafka path against real servers: KafkaPublisher → tansu → SinkWorker →
PostgreSQL; the MQTT bridge from Mosquitto into Kafka; and Kafka outages, on a private
tansu that the tests stop and start (the shared stack's broker is never stopped)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.deploy.services import Launcher
from edgefleet.deploy.services.base import StackContext
from edgefleet.deploy.services.kafka import KafkaService
from edgefleet.fog_gateway.bridge import MqttBridge
from edgefleet.fog_gateway.kafka import (
    ALERTS_TOPIC,
    HEARTBEATS_TOPIC,
    READINGS_TOPIC,
    KafkaPublisher,
    KafkaUnavailable,
    ensure_topics,
    heartbeat_message,
    kafka_messages,
)
from edgefleet.fog_gateway.sink import SinkWorker
from edgefleet.fog_gateway.store import Store, StoreUnavailable, open_store
from edgefleet.protocols.wire import Batch, Heartbeat, Quality, Reading, encode_binary

from ..waiting import wait_for

pytestmark = pytest.mark.integration

T0 = 1_795_000_000_000_000_000
def make_batch(device: str, first: int, n: int, anomaly_at: int | None = None) -> Batch:
    readings = []
    for i in range(n):
        seq = first + i
        if anomaly_at is not None and seq == anomaly_at:
            readings.append(Reading(device, "pump-01", "ml:1.0:is_anomaly", T0 + seq * 1000,
                                    1.0, Quality.GOOD, seq))
        else:
            readings.append(Reading(device, "pump-01", "flow", T0 + seq * 1000, float(seq),
                                    Quality.GOOD, seq))
    return Batch(device=device, first_seq=first, last_seq=first + n - 1,
                 readings=tuple(readings), sent_at=T0)


def make_heartbeat(device: str) -> Heartbeat:
    return Heartbeat(device=device, ts=T0, agent_version="0.1.0", buffer_depth=0,
                     dropped_total=0, compacted_total=0, uptime_s=1.0)


def read_back(bootstrap: str, topic: str, key: bytes, count: int,
              timeout_s: float = 20.0) -> list[bytes]:
    """The values of the first `count` messages keyed `key` in `topic`, from the start.
    Partitions are assigned directly: joining a group takes tansu session.timeout.ms / 2."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None and message.key() == key:
                    found.append(message.value() or b"")
    finally:
        consumer.close()
    return found


def start_group_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    """Commit the current end of `topics` for `group`, so it reads only what comes next
    (the shared broker holds other tests' messages)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        offsets = []
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            for partition in metadata.partitions:
                tp = TopicPartition(topic, partition)
                _low, high = consumer.get_watermark_offsets(tp, timeout=10)
                offsets.append(TopicPartition(topic, partition, max(high, 0)))
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


class FlakyStore:
    """A real store whose first `failures` writes raise StoreUnavailable."""

    def __init__(self, store: Store, failures: int) -> None:
        self.store = store
        self.failures = failures

    def write(self, batches: Sequence[Batch], heartbeats: Sequence[Heartbeat] = ()) -> Any:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("injected outage")
        return self.store.write(batches, heartbeats)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class PrivateKafka:
    """A tansu of this test alone, started like the launcher starts it, and killed like a
    crashed broker (SIGKILL); restarted on the same port it is empty."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.service = KafkaService()
        self.ctx = StackContext(root, {"kafka": port}, {}, {})
        self.bootstrap = f"127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        spec = self.service.launch_spec(self.ctx)
        with open(self.ctx.dir_for("kafka") / "service.log", "ab") as log:
            self.process = subprocess.Popen(spec.argv, cwd=spec.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ready, "the private tansu", timeout_s=15)

    def _ready(self) -> bool:
        try:
            return self.service.is_ready(self.ctx)
        except Exception:  # not listening yet
            return False

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateKafka]:
    kafka = PrivateKafka(tmp_path)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.kill()


def device_client(stack_env: dict[str, str], device: str, password: str) -> mqtt.Client:
    url = urlsplit(stack_env["EDGEFLEET_MQTT_URL"])
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device}-agent",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(device, password)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    return client


# ---- publisher → tansu → sink → PostgreSQL ---------------------------------------------


def test_publisher_to_sink_to_postgres_stores_each_row_once(stack_env: dict[str, str]) -> None:
    bootstrap = stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap)
    ensure_topics(bootstrap)  # idempotent
    run = uuid.uuid4().hex[:8]
    devices = [f"it-sink-{run}-{i}" for i in range(2)]
    batches = [make_batch(device, 1 + k * 250, 250, anomaly_at=k * 250 + 7)
               for device in devices for k in range(8)]  # 2 x 2,000 rows
    group = f"it-sink-{run}"
    start_group_at_end(bootstrap, group, [READINGS_TOPIC, HEARTBEATS_TOPIC])

    async def publish() -> None:
        with KafkaPublisher(bootstrap) as publisher:
            for _ in range(2):  # every batch twice: at-least-once upstream
                for batch in batches:
                    await publisher.publish_all(kafka_messages(batch, encode_binary(batch)))
            for device in devices:
                heartbeat = make_heartbeat(device)
                await publisher.publish_all([heartbeat_message(heartbeat,
                                                               encode_binary(heartbeat))])
            assert publisher.stats.failed == 0

    asyncio.run(publish())
    store_url = stack_env["EDGEFLEET_PG_URL"]
    store = open_store(store_url)
    store.setup()  # the sink would do it on its first write; the queries below need it now
    store.close()
    # The store is down for the first three writes: the worker pauses and retries.
    # tansu answers a JoinGroup after session.timeout.ms / 2: keep the group join short.
    worker = SinkWorker(bootstrap, lambda: FlakyStore(open_store(store_url), failures=3),
                        group_id=group, extra={"session.timeout.ms": 6000})
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with psycopg.connect(store_url, autocommit=True) as conn:
            def stored() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM readings WHERE device = ANY(%s)", (devices,)
                ).fetchone()
                return row is not None and row[0] >= 4000 and worker.stats.heartbeats >= 2

            wait_for(stored, "4,000 rows in PostgreSQL", timeout_s=30)
            per_device = conn.execute(
                "SELECT device, count(*), count(DISTINCT seq), min(seq), max(seq) "
                "FROM readings WHERE device = ANY(%s) GROUP BY device ORDER BY device",
                (devices,),
            ).fetchall()
            statuses = conn.execute(
                "SELECT count(*) FROM device_status WHERE device = ANY(%s)", (devices,)
            ).fetchone()
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert per_device == [(device, 2000, 2000, 1, 2000) for device in devices]  # no duplicates
    assert statuses == (2,)
    assert worker.stats.duplicates >= 4000  # the second copies, deduplicated by the store
    assert worker.stats.undecodable == 0 and worker.stats.db_errors == 3
    assert worker.stats.commits >= 1 and not worker.stats.paused
    # The anomalies became alert messages, one per flagged reading.
    alerts = read_back(bootstrap, ALERTS_TOPIC, devices[0].encode(), count=16)
    assert len(alerts) == 16  # 8 batches, each sent twice


# ---- the MQTT bridge -------------------------------------------------------------------


def test_mqtt_bridge_forwards_valid_messages_and_acks_invalid_ones(
    stack: Launcher, stack_env: dict[str, str]
) -> None:
    bootstrap = stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap)
    run = uuid.uuid4().hex[:8]
    device = f"it-bridge-{run}"
    password = stack.add_mqtt_device(device)
    publisher = KafkaPublisher(bootstrap)
    publisher.start()
    # Devices may only publish under edgefleet/devices/<their name>/ (the stack's ACL).
    bridge = MqttBridge(stack_env["EDGEFLEET_MQTT_URL"], publisher, prefix="edgefleet/devices",
                        shared_group=f"it-{run}", client_id=f"it-bridge-{run}",
                        session_expiry_s=60)
    bridge.start()
    agent = None
    try:
        assert bridge.wait_subscribed(10), "the bridge did not subscribe"
        agent = device_client(stack_env, device, password)
        topic = f"edgefleet/devices/{device}"
        bodies = [encode_binary(make_batch(device, 1 + k * 100, 100)) for k in range(5)]
        infos = [agent.publish(f"{topic}/batch", body, qos=1) for body in bodies]
        infos.append(agent.publish(f"{topic}/heartbeat", encode_binary(make_heartbeat(device)),
                                   qos=1))
        infos.append(agent.publish(f"{topic}/batch",
                                   encode_binary(make_batch("someone-else", 1, 3)), qos=1))
        infos.append(agent.publish(f"{topic}/batch", b"not a wire message", qos=1))
        for info in infos:
            info.wait_for_publish(10)
        wait_for(lambda: bridge.stats.forwarded == 6 and bridge.stats.rejected == 2,
                 "the bridge to settle every message", timeout_s=20)
        assert bridge.stats.rejected_by_reason == {"device mismatch": 1, "invalid batch": 1}
        assert bridge.stats.in_flight == 0 and bridge.stats.kafka_failures == 0
        forwarded = read_back(bootstrap, READINGS_TOPIC, device.encode(), count=5)
        assert sorted(forwarded) == sorted(bodies)  # byte for byte, as the agent sent them
        assert len(read_back(bootstrap, HEARTBEATS_TOPIC, device.encode(), count=1)) == 1
    finally:
        if agent is not None:
            agent.disconnect()
            agent.loop_stop()
        bridge.stop()
        publisher.close()


def test_mqtt_bridge_leaves_messages_unacked_while_kafka_is_down_and_gets_them_again(
    stack: Launcher, stack_env: dict[str, str], private_kafka: PrivateKafka
) -> None:
    ensure_topics(private_kafka.bootstrap)
    run = uuid.uuid4().hex[:8]
    device = f"it-redeliver-{run}"
    password = stack.add_mqtt_device(device)
    publisher = KafkaPublisher(private_kafka.bootstrap)
    publisher.start()
    bridge = MqttBridge(stack_env["EDGEFLEET_MQTT_URL"], publisher, prefix="edgefleet/devices",
                        shared_group=f"it-{run}", client_id=f"it-redeliver-{run}",
                        session_expiry_s=60)
    bridge.start()
    agent = None
    try:
        assert bridge.wait_subscribed(10)
        agent = device_client(stack_env, device, password)
        topic = f"edgefleet/devices/{device}/batch"
        agent.publish(topic, encode_binary(make_batch(device, 1, 10)), qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.forwarded == 1, "the first batch forwarded")

        private_kafka.kill()  # a crash: tansu comes back empty
        wait_for(lambda: not publisher.available, "the publisher to notice", timeout_s=5)
        bodies = [encode_binary(make_batch(device, 11 + k * 10, 10)) for k in range(3)]
        for body in bodies:
            agent.publish(topic, body, qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.kafka_failures == 3, "three unacked messages")
        assert bridge.stats.forwarded == 1

        private_kafka.start()
        wait_for(lambda: bridge.stats.forwarded == 4, "the redelivered messages forwarded",
                 timeout_s=30)
        assert bridge.stats.redelivered >= 3 and bridge.stats.reconnects >= 1
        # The new (empty) broker got exactly the three messages sent while it was down.
        forwarded = read_back(private_kafka.bootstrap, READINGS_TOPIC, device.encode(), 3)
        assert sorted(forwarded) == sorted(bodies)
    finally:
        if agent is not None:
            agent.disconnect()
            agent.loop_stop()
        bridge.stop()
        publisher.close()


# ---- Kafka outages ----------------------------------------------------------------------


def test_kafka_down_is_reported_within_seconds_and_recovery_is_automatic(
    private_kafka: PrivateKafka,
) -> None:
    ensure_topics(private_kafka.bootstrap)
    batch = make_batch("it-outage", 1, 10)
    messages = kafka_messages(batch, encode_binary(batch))
    outcome: dict[str, Any] = {}

    async def main() -> None:
        with KafkaPublisher(private_kafka.bootstrap) as publisher:
            await publisher.publish_all(messages)
            private_kafka.kill()
            started = time.monotonic()
            with pytest.raises(KafkaUnavailable):
                for _ in range(100):
                    await publisher.publish_all(messages)
                    await asyncio.sleep(0.05)
            outcome["detected_s"] = time.monotonic() - started
            assert not publisher.available
            private_kafka.start()
            started = time.monotonic()
            while not publisher.available and time.monotonic() - started < 15:
                await asyncio.sleep(0.05)
            assert publisher.available
            # The restarted broker is empty: the publisher recreated the topics and took a
            # new producer id, so publishing just works again.
            await asyncio.wait_for(publisher.publish_all(messages), 15)
            outcome["recovered_s"] = time.monotonic() - started
            assert publisher.stats.outages == 1

    asyncio.run(main())
    assert outcome["detected_s"] < 3.0, outcome
