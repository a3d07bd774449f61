"""`edgefleet demo`: what exists so far, run end to end on real services.

Until the full demo lands (simulated plant, agents, fog, training, rollout), this shows
the foundation working together: it starts the real-services stack in a private folder,
then a device streams batches in the binary wire format over MQTT (with its own
ACL-confined account), a bridge validates them and produces them to Kafka (idempotent,
acks=all, keyed by device), and a sink lands them in PostgreSQL deduplicated on
`(device, seq)`, committing Kafka offsets only after the database commit. One batch is
sent twice (an edge retry after a lost acknowledgement) and one message is garbage: the
report shows the duplicate absorbed and the garbage rejected and counted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["add_arguments", "run"]

DEVICE = "demo-press-1"
ASSETS = {"pump-1": ("flow", "pressure", "temperature"), "fan-2": ("speed", "vibration")}
TOPIC = f"edgefleet/devices/{DEVICE}/batches"
KAFKA_TOPIC = "edgefleet.readings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", type=int, default=40, help="batches to send (%(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=500, help="readings per batch (%(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the stack running afterwards"
    )


@dataclass
class Counters:
    received: int = 0
    rejected: int = 0
    produced: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _batches(count: int, size: int) -> list[bytes]:
    import math

    from edgefleet.protocols.wire import Batch, Quality, Reading, encode_binary

    series = [(asset, tag) for asset, tags in ASSETS.items() for tag in tags]
    t0 = time.time_ns()
    encoded = []
    seq = 0
    for _ in range(count):
        readings = []
        for _ in range(size):
            asset, tag = series[seq % len(series)]
            value = 50 + 10 * math.sin(seq / 50)
            readings.append(Reading(DEVICE, asset, tag, t0 + seq * 1_000_000, value,
                                    Quality.GOOD, seq))
            seq += 1
        encoded.append(encode_binary(Batch(device=DEVICE, first_seq=readings[0].seq,
                                           last_seq=readings[-1].seq,
                                           readings=tuple(readings), sent_at=time.time_ns())))
    return encoded


def _mqtt_client(url: str, username: str | None = None, password: str | None = None):  # type: ignore[no-untyped-def]
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(username or parts.username, password or parts.password)
    client.connect(str(parts.hostname), int(parts.port or 1883))
    client.loop_start()
    return client


def run(args: argparse.Namespace) -> int:
    import gc

    from edgefleet.deploy.services import Launcher

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-", dir="/tmp"))
    workdir.chmod(0o755)  # the services' system users must reach the stack folder
    launcher = Launcher(workdir / "stack")
    print("1/4 starting the real-services stack")
    try:
        env = launcher.up(progress=True)
        password = launcher.add_mqtt_device(DEVICE)
        code = _stream(env, password, args)
        gc.collect()  # Kafka clients are gone before the broker stops: no reconnect noise
        return code
    finally:
        if args.keep:
            print(f"stack left running: eval \"$(edgefleet services --dir {launcher.root} env)\"")
        else:
            launcher.down()
            shutil.rmtree(workdir, ignore_errors=True)


def _stream(env: dict[str, str], password: str, args: argparse.Namespace) -> int:
    import psycopg
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from edgefleet.protocols.wire import Batch, WireError, decode_binary

    print("2/4 preparing: Kafka topic, PostgreSQL table, device account", DEVICE)
    admin = AdminClient({"bootstrap.servers": env["EDGEFLEET_KAFKA_BOOTSTRAP"]})
    for future in admin.create_topics([NewTopic(KAFKA_TOPIC, num_partitions=3)]).values():
        future.result(timeout=10)
    with psycopg.connect(env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS demo_readings (device text, seq bigint, asset text, "
            "tag text, ts bigint, value double precision, quality text, "
            "PRIMARY KEY (device, seq))"
        )

    counters = Counters()
    producer = Producer({"bootstrap.servers": env["EDGEFLEET_KAFKA_BOOTSTRAP"],
                         "enable.idempotence": True, "acks": "all",
                         "compression.type": "lz4"})

    def on_message(client, userdata, message):  # type: ignore[no-untyped-def]
        with counters.lock:
            counters.received += 1
        try:
            batch = decode_binary(message.payload)
        except WireError as err:
            with counters.lock:
                counters.rejected += 1
                counters.errors.append(str(err))
            return
        producer.produce(KAFKA_TOPIC, value=bytes(message.payload), key=batch.device)
        producer.poll(0)
        with counters.lock:
            counters.produced += 1

    bridge = _mqtt_client(env["EDGEFLEET_MQTT_URL"])
    bridge.on_message = on_message
    bridge.subscribe("edgefleet/devices/+/batches", qos=1)

    payloads = _batches(args.batches, args.batch_size)
    sent = [*payloads, payloads[min(7, len(payloads) - 1)], b"\x00garbage"]
    print(f"3/4 device {DEVICE} sends {len(payloads)} batches x {args.batch_size} "
          "readings (binary wire format), one batch twice, and one garbage message")
    device = _mqtt_client(env["EDGEFLEET_MQTT_URL"], DEVICE, password)
    time.sleep(0.5)  # let both MQTT sessions finish connecting and subscribing
    t0 = time.monotonic()
    for payload in sent:
        device.publish(TOPIC, payload, qos=1).wait_for_publish(10)
    deadline = time.monotonic() + 30
    while counters.received < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    producer.flush(15)

    consumer = Consumer({"bootstrap.servers": env["EDGEFLEET_KAFKA_BOOTSTRAP"],
                         "group.id": "demo-sink", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([KAFKA_TOPIC])
    landed_messages = 0
    with psycopg.connect(env["EDGEFLEET_PG_URL"]) as conn:
        while landed_messages < counters.produced and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() or message.value() is None:
                continue
            batch: Batch = decode_binary(message.value() or b"")
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO demo_readings VALUES (%s,%s,%s,%s,%s,%s,%s) "
                    "ON CONFLICT (device, seq) DO NOTHING",
                    [(r.device, r.seq, r.asset, r.tag, r.ts, r.value, r.quality.value)
                     for r in batch.readings],
                )
            conn.commit()
            consumer.commit(message=message, asynchronous=False)  # only after the DB commit
            landed_messages += 1
        took = time.monotonic() - t0
        rows, gaps = conn.execute(
            "SELECT count(*), max(seq) - min(seq) + 1 - count(*) FROM demo_readings"
        ).fetchone() or (0, 0)
    consumer.close()
    for client in (device, bridge):
        client.disconnect()
        client.loop_stop()

    expected = args.batches * args.batch_size
    print("4/4 report")
    print(f"  messages sent            {len(sent)}")
    print(f"  rejected as malformed    {counters.rejected}"
          + (f"  ({counters.errors[0]})" if counters.errors else ""))
    print(f"  batches through Kafka    {counters.produced}")
    print(f"  rows in PostgreSQL       {rows} of {expected} expected, seq gaps {gaps}")
    print(f"  duplicate rows absorbed  {args.batch_size}")
    print(f"  elapsed                  {took:.1f} s (one DB transaction per batch)")
    ok = rows == expected and gaps == 0 and counters.rejected == 1
    print("  result                   " + ("complete, no loss, no duplicates" if ok
                                         else "INCOMPLETE"))
    return 0 if ok else 1
