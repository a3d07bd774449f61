"""How fast `MqttSource` decodes JSON telemetry from a real broker.

A child process (`python -m edgefleet.protocols.bench_mqtt flood …`) floods one topic with
simulator-shaped JSON messages (six values each) at QoS 1 with a wide in-flight window for
`duration_s`; in this process an `MqttSource` subscribed at QoS 1 decodes them. The rate is
messages decoded per second between the first and the last decoded message, so connection
set-up is not counted. The publisher runs in its own process so that its work does not
share this interpreter's GIL with the decoder.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

from .mqtt import MqttSourceConfig, parse_broker_url
from .source import Sample

__all__ = ["bench_mqtt"]

_TAGS = ("speed", "flow", "pressure", "current", "temperature", "vibration")


async def bench_mqtt(broker_url: str, duration_s: float = 5.0) -> dict[str, float]:
    """Flood JSON messages through the broker at `broker_url` (mqtt://user:pw@host:port)
    for `duration_s` and decode them with an `MqttSource`. Returns `mqtt_msgs_per_s`
    (messages decoded per second), `mqtt_samples_per_s`, `mqtt_published`, `mqtt_decoded`,
    `mqtt_rejected` and `mqtt_queue_full`."""
    parse_broker_url(broker_url)  # fail early on a bad URL
    topic_root = f"bench-{uuid.uuid4().hex[:8]}"
    source = MqttSourceConfig.model_validate({
        "name": "bench", "broker": broker_url, "client_id": f"{topic_root}-src",
        "clean_session": True, "queue_size": 50_000,
        "subscriptions": [{"format": "json", "topic": f"{topic_root}/+/telemetry",
                           "asset": {"topic_segment": 1}, "values_path": "values",
                           "timestamp_path": "ts"}],
    }).build()
    times: list[float] = []
    count = 0

    def emit(sample: Sample) -> None:
        nonlocal count
        count += 1
        if count % len(_TAGS) == 0:
            if len(times) < 2:
                times.append(time.perf_counter())
            else:
                times[1] = time.perf_counter()

    task = asyncio.create_task(source.run(emit), name="bench-mqtt-source")
    try:
        deadline = time.monotonic() + 30
        while not source.connected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench: no connection to the broker ({source.last_error})")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the SUBACK land before the flood starts
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgefleet.protocols.bench_mqtt", "flood", broker_url,
            f"{topic_root}/pump-01/telemetry", str(duration_s),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(child.communicate(), timeout=duration_s + 60)
        if child.returncode != 0:
            raise RuntimeError(f"bench publisher failed: {err.decode()[-500:]}")
        published = int(out.decode().split()[-1])
        # Drain: wait until every message arrived or nothing arrives for 2 s.
        last_count, idle_since = -1, time.monotonic()
        while count // len(_TAGS) < published and time.monotonic() - idle_since < 2.0:
            if count != last_count:
                last_count, idle_since = count, time.monotonic()
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    decoded = count // len(_TAGS)
    span = times[1] - times[0] if len(times) == 2 else 0.0
    rate = (decoded - 1) / span if span > 0 else 0.0
    return {
        "mqtt_msgs_per_s": rate,
        "mqtt_samples_per_s": rate * len(_TAGS),
        "mqtt_published": float(published),
        "mqtt_decoded": float(decoded),
        "mqtt_rejected": float(source.stats.rejected),
        "mqtt_queue_full": float(source.stats.errors.get("queue_full", 0)),
    }


def _flood(broker_url: str, topic: str, duration_s: float) -> int:
    """Publish JSON messages at QoS 1 for `duration_s`; return how many were acknowledged."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    address = parse_broker_url(broker_url)
    parts = urlsplit(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2,
                         client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    address.configure(client)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(5000)
    acked = 0

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: object,
                   properties: object) -> None:
        nonlocal acked
        acked += 1

    client.on_publish = on_publish
    client.connect(str(parts.hostname), address.port)
    client.loop_start()
    ts_ms = 1_795_000_000_000
    end = time.monotonic() + duration_s
    sent = 0
    while time.monotonic() < end:
        payload = json.dumps({"ts": ts_ms + sent, "values": {
            tag: 100.0 + (sent % 97) * 0.5 + i for i, tag in enumerate(_TAGS)},
            "status": {"anomaly": False, "code": 0}}, separators=(",", ":"))
        info = client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            time.sleep(0.001)  # the in-flight window is full: let the acks catch up
            continue
        sent += 1
    deadline = time.monotonic() + 30
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.01)
    client.disconnect()
    client.loop_stop()
    return acked


if __name__ == "__main__":  # pragma: no cover - the child of bench_mqtt
    if len(sys.argv) == 5 and sys.argv[1] == "flood":
        print(_flood(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    elif len(sys.argv) == 3:
        print(json.dumps(asyncio.run(bench_mqtt(sys.argv[1], float(sys.argv[2])))))
    else:
        print("usage: python -m edgefleet.protocols.bench_mqtt BROKER_URL [DURATION_S]",
              file=sys.stderr)
        sys.exit(2)
