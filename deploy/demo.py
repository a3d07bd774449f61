"""`edgefleet demo`: what exists so far, run end to end on real services.

Until the full demo lands (agents, fog gateway, training, rollout), this shows the
pieces that exist working together:

1. the real-services stack starts in a private folder (`edgefleet services`);
2. the simulated plant runs: assets served over Modbus TCP, OPC UA and MQTT, with
   labelled anomaly episodes written to a JSONL file;
3. a gateway reads it through the real sources (ModbusSource, OpcUaSource, MqttSource),
   stamps every sample with its device name and a gap-free seq, and ships contiguous
   batches in the binary wire format over MQTT, on its own ACL-confined account;
4. a bridge validates each batch and produces it to Kafka (idempotent, acks=all, keyed by
   device); a sink lands the batches in PostgreSQL, deduplicated on `(device, seq)`,
   committing Kafka offsets only after the database commit. One batch is sent twice (an
   edge retry after a lost acknowledgement) and one message is garbage;
5. the report shows every reading landed exactly once, the garbage rejected and counted.

The gateway here is a stand-in that holds samples in memory: the real edge agent, with
its durable SQLite buffer, is the next component to land.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

DEVICE = "demo-gateway-1"
TOPIC = f"edgefleet/devices/{DEVICE}/batches"
KAFKA_TOPIC = "edgefleet.readings"
SHIP_EVERY_S = 0.5
MAX_BATCH = 1000
MAX_PENDING = 200_000  # the stand-in gateway's bound; the demo's rates stay far below it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--assets", type=int, default=6,
                        help="simulated assets, spread over Modbus, OPC UA, MQTT (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long the gateway reads the plant (%(default)s)")
    parser.add_argument("--time-scale", type=float, default=60.0,
                        help="simulated seconds per wall second (%(default)s)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")


@dataclass
class BridgeCounters:
    received: int = 0
    rejected: int = 0
    produced: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Gateway:
    """Stamps samples with the device and a gap-free seq, and ships contiguous batches."""

    def __init__(self, device_client: Any) -> None:
        self.client = device_client
        self.pending: list[Any] = []  # Samples, in arrival order
        self.next_seq = 0
        self.by_protocol: Counter[str] = Counter()
        self.payloads: list[bytes] = []
        self.overflow = 0

    def emitter(self, protocol: str) -> Any:
        def emit(sample: Any) -> None:
            if len(self.pending) >= MAX_PENDING:
                self.overflow += 1  # counted, never silent; the demo's rates never get here
                return
            self.pending.append(sample)
            self.by_protocol[protocol] += 1

        return emit

    def ship(self) -> None:
        from edgefleet.protocols.wire import Batch, Reading, encode_binary

        samples, self.pending = self.pending, []
        for start in range(0, len(samples), MAX_BATCH):
            chunk = samples[start:start + MAX_BATCH]
            readings = tuple(
                Reading(DEVICE, s.asset, s.tag, s.ts_ns, s.value, s.quality, self.next_seq + i)
                for i, s in enumerate(chunk)
            )
            batch = Batch(device=DEVICE, first_seq=self.next_seq,
                          last_seq=self.next_seq + len(chunk) - 1, readings=readings,
                          sent_at=time.time_ns())
            self.next_seq += len(chunk)
            payload = encode_binary(batch)
            self.payloads.append(payload)
            self.client.publish(TOPIC, payload, qos=1)


def _mqtt_client(url: str, username: str | None = None, password: str | None = None) -> Any:
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
    import logging
    import signal

    from edgefleet.deploy.services import Launcher

    def stop_on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through `finally`: the stack is stopped

    signal.signal(signal.SIGTERM, stop_on_sigterm)

    # asyncua warns about its own defaults (plaintext-password endpoints on the simulator's
    # None-security endpoint, session timeouts the server shortened): not the demo's news.
    logging.getLogger("asyncua").setLevel(logging.ERROR)

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-", dir="/tmp"))
    workdir.chmod(0o755)  # the services' system users must reach the stack folder
    launcher = Launcher(workdir / "stack")
    print("1/5 starting the real-services stack")
    try:
        env = launcher.up(progress=True)
        password = launcher.add_mqtt_device(DEVICE)
        code = _stream(env, password, args, workdir)
        gc.collect()  # Kafka clients are gone before the broker stops: no reconnect noise
        return code
    finally:
        if args.keep:
            print(f"stack left running: eval \"$(edgefleet services --dir {launcher.root} env)\"")
        else:
            launcher.down()
            shutil.rmtree(workdir, ignore_errors=True)


async def _read_plant(
    env: dict[str, str], gateway: Gateway, args: argparse.Namespace, labels: Path
) -> dict[str, int]:
    """Run the simulated plant and the gateway's three sources for `args.seconds`."""
    from edgefleet.firmware_sim.mqtt_publisher import MqttSimConfig
    from edgefleet.firmware_sim.opcua_server import node_id
    from edgefleet.firmware_sim.runner import LabelWriter, SimRunner
    from edgefleet.firmware_sim.scenario import Scenario
    from edgefleet.firmware_sim.sim import build_servers
    from edgefleet.protocols.mqtt import MqttSourceConfig
    from edgefleet.protocols.opcua import OpcUaSourceConfig

    scenario = Scenario.generate(
        args.assets, ["modbus", "opcua", "mqtt"], anomaly_rate=0.3, seed=7,
        time_scale=args.time_scale,
        mqtt=MqttSimConfig.model_validate({"broker": env["EDGEFLEET_MQTT_URL"]}),
    )
    writer = LabelWriter(labels)
    plant = scenario.build_plant(label_sink=writer)
    servers = build_servers(scenario, plant)
    runner = SimRunner(plant, servers, time_scale=scenario.time_scale)
    stop = asyncio.Event()
    sim_task = asyncio.create_task(runner.run(stop), name="plant")
    await runner.started.wait()
    by_name = {server.name: server for server in servers}

    modbus = by_name["modbus"].source_config(timeout_s=1.0).build()  # type: ignore[attr-defined]
    opcua = OpcUaSourceConfig.model_validate({
        "endpoint": by_name["opcua"].endpoint,  # type: ignore[attr-defined]
        "nodes": [{"asset": asset, "tag": tag, "node_id": node_id(asset, tag)}
                  for asset in scenario.assets_on("opcua")
                  for tag in ("speed", "flow", "pressure", "current", "temperature",
                              "vibration")],
    }).build()
    mqtt = MqttSourceConfig.model_validate({
        "broker": env["EDGEFLEET_MQTT_URL"],
        "subscriptions": [{"format": "json", "topic": "plant/+/telemetry",
                           "asset": {"topic_segment": 1}, "values_path": "values",
                           "timestamp_path": "ts"}],
    }).build()

    async def poll_modbus() -> None:
        emit = gateway.emitter("modbus")
        while True:
            for sample in await modbus.poll():
                emit(sample)
            await asyncio.sleep(SHIP_EVERY_S)

    tasks = [
        asyncio.create_task(poll_modbus(), name="modbus"),
        asyncio.create_task(opcua.run(gateway.emitter("opcua")), name="opcua"),
        asyncio.create_task(mqtt.run(gateway.emitter("mqtt")), name="mqtt"),
    ]
    deadline = time.monotonic() + args.seconds
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(SHIP_EVERY_S)
            gateway.ship()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await modbus.close()
        gateway.ship()
        stop.set()
        await sim_task
        writer.close()
    return {"episodes": sum(1 for e in plant.labels if e.event == "start"),
            "assets": len(scenario.assets)}


def _stream(env: dict[str, str], password: str, args: argparse.Namespace, workdir: Path) -> int:
    import psycopg
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from edgefleet.protocols.wire import Batch, WireError, decode_binary

    print("2/5 preparing: Kafka topic, PostgreSQL table, device account", DEVICE)
    admin = AdminClient({"bootstrap.servers": env["EDGEFLEET_KAFKA_BOOTSTRAP"]})
    for future in admin.create_topics([NewTopic(KAFKA_TOPIC, num_partitions=3)]).values():
        future.result(timeout=10)
    with psycopg.connect(env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS demo_readings (device text, seq bigint, asset text, "
            "tag text, ts bigint, value double precision, quality text, "
            "PRIMARY KEY (device, seq))"
        )

    counters = BridgeCounters()
    producer = Producer({"bootstrap.servers": env["EDGEFLEET_KAFKA_BOOTSTRAP"],
                         "enable.idempotence": True, "acks": "all",
                         "compression.type": "lz4"})

    def on_message(client: Any, userdata: Any, message: Any) -> None:
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
    device = _mqtt_client(env["EDGEFLEET_MQTT_URL"], DEVICE, password)
    gateway = Gateway(device)

    labels = workdir / "labels.jsonl"
    print(f"3/5 the plant runs ({args.assets} assets over Modbus, OPC UA and MQTT, "
          f"{args.time_scale:g}x simulated time) and gateway {DEVICE} reads it for "
          f"{args.seconds:g} s")
    t0 = time.monotonic()
    plant = asyncio.run(_read_plant(env, gateway, args, labels))
    # An edge retry after a lost acknowledgement, and a garbage message.
    extra = [gateway.payloads[len(gateway.payloads) // 2], b"\x00garbage"]
    for payload in extra:
        device.publish(TOPIC, payload, qos=1)
    sent = len(gateway.payloads) + len(extra)
    deadline = time.monotonic() + 60
    while counters.received < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    producer.flush(15)

    print("4/5 the sink lands Kafka's batches in PostgreSQL")
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
        rows, gaps, assets = conn.execute(
            "SELECT count(*), max(seq) - min(seq) + 1 - count(*), count(DISTINCT asset) "
            "FROM demo_readings"
        ).fetchone() or (0, 0, 0)
    consumer.close()
    for client in (device, bridge):
        client.disconnect()
        client.loop_stop()

    expected = gateway.next_seq
    read = ", ".join(f"{p} {n:,}" for p, n in sorted(gateway.by_protocol.items()))
    print("5/5 report")
    print(f"  readings by protocol     {read}")
    print(f"  assets seen              {assets} of {plant['assets']}")
    print(f"  anomaly episodes         {plant['episodes']} started (ground truth in "
          "labels.jsonl)")
    print(f"  batches sent             {len(gateway.payloads)} + 1 resent + 1 garbage")
    print(f"  rejected as malformed    {counters.rejected}"
          + (f"  ({counters.errors[0]})" if counters.errors else ""))
    print(f"  rows in PostgreSQL       {rows} of {expected} expected, seq gaps {gaps}")
    print(f"  elapsed                  {took:.1f} s")
    ok = (rows == expected > 0 and gaps == 0 and counters.rejected == 1
          and assets == plant["assets"] and gateway.overflow == 0
          and set(gateway.by_protocol) == {"modbus", "opcua", "mqtt"})
    print("  result                   " + ("complete, no loss, no duplicates" if ok
                                         else "INCOMPLETE"))
    return 0 if ok else 1
