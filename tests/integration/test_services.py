"""Each service of `edgefleet services` round-trips real data, through real clients."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.deploy.services import Launcher, register_target
from edgefleet.deploy.services.s3 import s3_client

from .. import waiting

pytestmark = pytest.mark.integration


def wait_for(check, timeout_s: float, what: str, every_s: float = 0.1):  # type: ignore[no-untyped-def]
    return waiting.wait_for(check, what, timeout_s, every_s=every_s)


def test_status_reports_six_healthy_services(stack: Launcher) -> None:
    statuses = stack.status()
    assert [s.name for s in statuses] == [
        "postgres", "mosquitto", "kafka", "s3", "mlflow", "prometheus"
    ]
    assert all(s.healthy for s in statuses), statuses
    cli = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "services", "--dir", str(stack.root),
         "status"],
        capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert sum(" healthy " in line for line in cli.stdout.splitlines()) == 6, cli.stdout
    assert "TimescaleDB" in cli.stdout  # says whether the extension is there or not


def test_env_prints_shell_exports(stack: Launcher, stack_env: dict[str, str]) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "services", "--dir", str(stack.root),
         "env"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    # Evaluated by a real shell, the exports give back exactly the launcher's values.
    shell = subprocess.run(
        ["bash", "-c", cli.stdout + "\nenv -0"], capture_output=True, timeout=30, check=True
    )
    exported = dict(
        item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item
    )
    for key in ("EDGEFLEET_PG_URL", "EDGEFLEET_MQTT_URL", "EDGEFLEET_KAFKA_BOOTSTRAP",
                "EDGEFLEET_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "EDGEFLEET_PROMETHEUS_URL"):
        assert exported[key] == stack_env[key]


def test_postgres_insert_select(stack_env: dict[str, str]) -> None:
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE t (device text, seq bigint, value double precision)")
        rows = [("dev-1", i, i * 0.5) for i in range(100)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO t VALUES (%s, %s, %s)", rows)
        got = conn.execute("SELECT device, seq, value FROM t ORDER BY seq").fetchall()
    assert got == rows


def test_postgres_refuses_a_wrong_password(stack_env: dict[str, str]) -> None:
    url = urlsplit(stack_env["EDGEFLEET_PG_URL"])
    bad = url._replace(netloc=f"edgefleet:wrong@{url.hostname}:{url.port}").geturl()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


class MqttProbe:
    """A paho client (MQTT v5) that records what it receives and its acks' reason codes."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(username or parts.username, password or parts.password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, ReasonCode] = {}
        self.suback: list[ReasonCode] = []
        self.connect_rc: ReasonCode | None = None
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connect_rc", rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)

        def on_subscribe(c, u, mid, codes, p):  # type: ignore[no-untyped-def]
            self.suback = list(codes)
            self.subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.connect(str(parts.hostname), int(parts.port or 1883))
        self.client.loop_start()
        wait_for(lambda: self.connect_rc is not None, 10, "CONNACK")

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        return wait_for(lambda: self.acks.get(info.mid), 10, f"PUBACK for {topic}")

    def subscribe(self, topic: str) -> list[ReasonCode]:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), "no SUBACK"
        return self.suback

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_device_acl(stack: Launcher, stack_env: dict[str, str]) -> None:
    pw_a = stack.add_mqtt_device("press-a")
    pw_b = stack.add_mqtt_device("press-b")
    assert pw_a != pw_b
    url = stack_env["EDGEFLEET_MQTT_URL"]
    # The passwords work as soon as they are returned (the broker has reloaded).
    device_a = MqttProbe(url, "press-a", pw_a)
    assert device_a.connect_rc is not None and not device_a.connect_rc.is_failure
    device_b = MqttProbe(url, "press-b", pw_b)
    assert device_b.connect_rc is not None and not device_b.connect_rc.is_failure
    watcher = MqttProbe(url)  # the service account sees every topic
    try:
        assert not watcher.subscribe("edgefleet/devices/#")[0].is_failure
        own = device_a.publish("edgefleet/devices/press-a/readings", b"mine")
        assert not own.is_failure
        wait_for(lambda: ("edgefleet/devices/press-a/readings", b"mine") in watcher.messages,
                 10, "device A's own message")

        # Device A may not publish as device B: refused with "Not authorized".
        foreign = device_a.publish("edgefleet/devices/press-b/readings", b"spoofed")
        assert foreign.value == 135, foreign

        # Nor read device B's data. Mosquitto may grant a wildcard SUBSCRIBE, but its read
        # ACL is applied to every message delivered, so nothing of B's reaches A.
        codes = device_a.subscribe("edgefleet/devices/press-b/#")
        assert not device_b.publish("edgefleet/devices/press-b/readings", b"b-data").is_failure
        assert device_a.subscribe("edgefleet/devices/press-a/echo")[0].value == 1
        assert not device_a.publish("edgefleet/devices/press-a/echo", b"after").is_failure
        # A's own echo arrives after B's message was routed, so B's would have arrived too.
        wait_for(lambda: ("edgefleet/devices/press-a/echo", b"after") in device_a.messages,
                 10, "device A's echo")
        wait_for(lambda: ("edgefleet/devices/press-b/readings", b"b-data") in watcher.messages,
                 10, "device B's message at the service account")
        assert [m for m in device_a.messages if m[0].startswith("edgefleet/devices/press-b")] == []
        assert codes  # granted or refused, the SUBACK came back
        assert all(payload != b"spoofed" for _, payload in watcher.messages)
    finally:
        device_a.close()
        device_b.close()
        watcher.close()

    wrong = MqttProbe(url, "press-b", "not-the-password")
    try:
        assert wrong.connect_rc is not None and wrong.connect_rc.is_failure
    finally:
        wrong.close()


def test_mqtt_over_tls_with_the_stack_ca(stack_env: dict[str, str]) -> None:
    probe = MqttProbe(stack_env["EDGEFLEET_MQTTS_URL"], ca_file=stack_env["EDGEFLEET_CA_FILE"])
    try:
        assert probe.connect_rc is not None and not probe.connect_rc.is_failure
        assert not probe.subscribe("edgefleet/tls-check")[0].is_failure
        assert not probe.publish("edgefleet/tls-check", b"over tls").is_failure
        wait_for(lambda: ("edgefleet/tls-check", b"over tls") in probe.messages, 10, "TLS echo")
    finally:
        probe.close()


def test_kafka_produce_consume(stack_env: dict[str, str]) -> None:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap = stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"]
    topic = f"it-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result(timeout=10)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "compression.type": "lz4"})
    delivered: list[str] = []
    sent = {f"dev-{i % 3}:{i}".encode() for i in range(300)}
    for value in sorted(sent):
        producer.produce(topic, value=value, key=value.split(b":")[0],
                         on_delivery=lambda err, msg: delivered.append(str(err) if err else "ok"))
    assert producer.flush(15) == 0
    assert delivered.count("ok") == len(sent), set(delivered)

    # The broker assigns a new group's partitions after half the session timeout: keep it
    # short (the default 45 s made this test wait 22 s for its first message).
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000})
    consumer.subscribe([topic])
    received: set[bytes] = set()
    deadline = time.monotonic() + 30
    try:
        while received != sent and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                received.add(message.value())
    finally:
        consumer.close()
    assert received == sent


def test_s3_put_get_and_no_anonymous_access(stack_env: dict[str, str]) -> None:
    endpoint = stack_env["EDGEFLEET_S3_ENDPOINT"]
    client = s3_client(endpoint, stack_env["EDGEFLEET_S3_ACCESS_KEY"],
                       stack_env["EDGEFLEET_S3_SECRET_KEY"])
    bucket = stack_env["EDGEFLEET_S3_BUCKET_MODELS"]
    body = bytes(range(256)) * 64
    client.put_object(Bucket=bucket, Key="it/blob.bin", Body=body)
    assert client.get_object(Bucket=bucket, Key="it/blob.bin")["Body"].read() == body
    anonymous = httpx.get(f"{endpoint}/{bucket}/it/blob.bin", timeout=10)
    assert anonymous.status_code == 403, anonymous.text
    stranger = s3_client(endpoint, "not-a-key", "not-a-secret")
    with pytest.raises(Exception, match=r"(?i)access ?denied|InvalidAccessKeyId|Forbidden|403"):
        stranger.get_object(Bucket=bucket, Key="it/blob.bin")


def test_mlflow_run_artifact_lands_in_s3(stack_env: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tracking_uri(stack_env["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("edgefleet-integration")
    with mlflow.start_run() as run:
        mlflow.log_param("trees", 50)
        mlflow.log_metric("f1", 0.91)
        mlflow.log_text("reference statistics", "reference/stats.txt")
    stored = mlflow.get_run(run.info.run_id)
    assert stored.data.metrics["f1"] == pytest.approx(0.91)
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:")

    client = s3_client(stack_env["EDGEFLEET_S3_ENDPOINT"], stack_env["EDGEFLEET_S3_ACCESS_KEY"],
                       stack_env["EDGEFLEET_S3_SECRET_KEY"])
    listing = client.list_objects_v2(Bucket=stack_env["EDGEFLEET_S3_BUCKET_MLFLOW"],
                                     Prefix="artifacts/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    matching = [k for k in keys if run.info.run_id in k and k.endswith("reference/stats.txt")]
    assert matching, keys
    body = client.get_object(Bucket=stack_env["EDGEFLEET_S3_BUCKET_MLFLOW"], Key=matching[0])
    assert body["Body"].read() == b"reference statistics"


def test_prometheus_scrapes_a_registered_target(stack_env: dict[str, str]) -> None:
    from pathlib import Path

    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    counter = Counter("edgefleet_it_probe", "integration probe", registry=registry)
    counter.inc(42)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        register_target(Path(stack_env["EDGEFLEET_PROMETHEUS_TARGETS_DIR"]), "it-probe",
                        f"127.0.0.1:{port}")
        url = f"{stack_env['EDGEFLEET_PROMETHEUS_URL']}/api/v1/query"

        def scraped() -> float | None:
            reply = httpx.get(url, params={"query": 'edgefleet_it_probe_total{job="it-probe"}'},
                              timeout=5).json()
            result = reply["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        assert wait_for(scraped, 60, "Prometheus to scrape the probe", every_s=1) == 42.0
    finally:
        server.shutdown()
        thread.join(5)
