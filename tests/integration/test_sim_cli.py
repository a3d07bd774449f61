"""`edgefleet sim` as a user runs it: a process serving Modbus and OPC UA, read by
independent clients, writing labels, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.firmware_sim.opcua_server import node_id
from edgefleet.protocols.opcua import OpcUaNodeConfig, OpcUaSourceConfig
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

pytestmark = pytest.mark.integration


def test_sim_serves_modbus_and_opcua_and_writes_labels(tmp_path: Path) -> None:
    labels = tmp_path / "labels.jsonl"
    # A high anomaly rate and fast simulated time, so episodes start within the test.
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.deploy.cli", "sim", "--assets", "4",
         "--protocols", "modbus,opcua", "--anomaly-rate", "0.5", "--time-scale", "300",
         "--labels", str(labels), "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["assets"] == 4
        modbus = info["endpoints"]["modbus"]
        opcua_endpoint = info["endpoints"]["opcua"]
        assert set(modbus) == {"pump-01", "conveyor-03"}

        # An independent Modbus client reads a plausible pump speed (float32 ABCD at 0).
        host, port = modbus["pump-01"]
        read = subprocess.run(
            ["mbpoll", "-m", "tcp", "-a", "1", "-0", "-r", "0", "-c", "1", "-t", "3:float",
             "-B", "-1", "-p", str(port), host],
            capture_output=True, text=True, timeout=30,
        )
        assert read.returncode == 0, read.stdout + read.stderr
        found = re.findall(r"^\[0\]:\s+(\S+)", read.stdout, re.MULTILINE)
        assert found, read.stdout
        speed = float(found[0])
        assert 1000 < speed < 3600

        # An OPC UA subscription on the compressor gets good, timestamped values.
        config = OpcUaSourceConfig(
            endpoint=opcua_endpoint,
            nodes=[OpcUaNodeConfig(asset="compressor-02", tag="pressure",
                                   node_id=node_id("compressor-02", "pressure"))],
        )
        samples: list[Sample] = []

        async def collect() -> None:
            task = asyncio.create_task(config.build().run(samples.append))
            for _ in range(300):
                if len(samples) >= 3:
                    break
                await asyncio.sleep(0.1)
            task.cancel()

        asyncio.run(collect())
        assert len(samples) >= 3
        assert all(s.quality == Quality.GOOD and 0 < (s.value or 0) < 16 for s in samples)

        # Simulated time runs 300x: within seconds, labelled episodes have started.
        for _ in range(300):
            if labels.exists() and labels.read_text().count('"start"') >= 1:
                break
            asyncio.run(asyncio.sleep(0.1))
        first = json.loads(labels.read_text().splitlines()[0])
        assert first["event"] == "start" and first["asset"] in {
            "pump-01", "compressor-02", "conveyor-03", "pump-04"}
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_sim_publishes_mqtt_assets_to_the_stack_broker(stack_env: dict[str, str]) -> None:
    from urllib.parse import urlsplit

    url = urlsplit(stack_env["EDGEFLEET_MQTT_URL"])
    # Subscribe with Mosquitto's own client before the simulator starts publishing.
    subscriber = subprocess.Popen(
        ["mosquitto_sub", "-h", str(url.hostname), "-p", str(url.port), "-u",
         str(url.username), "-P", str(url.password), "-t", "plant/+/telemetry", "-C", "3",
         "-W", "60", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sim = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.deploy.cli", "sim", "--assets", "3",
         "--protocols", "mqtt", "--duration", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EDGEFLEET_MQTT_URL": stack_env["EDGEFLEET_MQTT_URL"]},
    )
    try:
        out, err = subscriber.communicate(timeout=90)
        assert subscriber.returncode == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 3
        topic, payload = lines[0].split(" ", 1)
        asset = topic.split("/")[1]
        assert asset in {"pump-01", "compressor-02", "conveyor-03"}
        message = json.loads(payload)
        assert set(message["values"]) == {"speed", "flow", "pressure", "current",
                                          "temperature", "vibration"}
        assert message["status"]["anomaly"] in (True, False)
    finally:
        sim.send_signal(signal.SIGTERM)
        _, sim_err = sim.communicate(timeout=30)
    assert sim.returncode == 0, sim_err


def test_sim_without_a_broker_says_how_to_get_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_MQTT_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "sim", "--assets", "2",
         "--protocols", "mqtt", "--duration", "1"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2
    assert "--mqtt-url" in result.stderr and "EDGEFLEET_MQTT_URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
