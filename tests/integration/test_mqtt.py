"""MQTT end to end against the launcher's Mosquitto: the simulator's JSON and Sparkplug B
streams decoded by MqttSource into the plant's values, interop with mosquitto_pub and
mosquitto_sub, TLS with the stack's CA, a late host asking for a rebirth, bad input over
the wire, and a broker that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from edgefleet.deploy.services import Launcher
from edgefleet.deploy.services.pki import ensure_ca
from edgefleet.firmware_sim.model import TAGS, AssetKind, Plant
from edgefleet.firmware_sim.mqtt_publisher import MqttSimConfig, MqttSimPublisher
from edgefleet.protocols.mqtt import MqttSource, MqttSourceConfig
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

from ..conftest import make_stack_dir

pytestmark = pytest.mark.integration

START_NS = 1_795_000_000_000_000_000
ASSETS = [("pump-01", AssetKind.PUMP), ("comp-01", AssetKind.COMPRESSOR)]
DEADLINE_S = 30.0


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Harness:
    """A plant ticking 100 ms (simulated and wall), its MQTT publisher, sources under test,
    and the plant's values at every tick, to compare samples with."""

    def __init__(self, publisher_config: MqttSimConfig | None) -> None:
        self.plant = Plant(ASSETS, seed=3, anomaly_rate=0.0, start_ns=START_NS)
        self.publisher = (MqttSimPublisher(publisher_config, self.plant)
                          if publisher_config is not None else None)
        self.history: dict[tuple[str, int], dict[str, float]] = {}
        self.samples: list[Sample] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _record(self) -> None:
        for asset, _ in ASSETS:
            self.history[(asset, self.plant.now_ns)] = self.plant.values(asset)

    async def tick_forever(self) -> None:
        while True:
            self.plant.advance_to(self.plant.now_ns + self.plant.tick_ns)
            self._record()
            if self.publisher is not None:
                self.publisher.update(self.plant)
            await asyncio.sleep(0.1)

    async def start(self) -> None:
        self._record()
        if self.publisher is not None:
            await self.publisher.start()
            self.publisher.update(self.plant)
        self._tasks.append(asyncio.create_task(self.tick_forever()))

    def run_source(self, source: MqttSource) -> None:
        self._tasks.append(asyncio.create_task(source.run(self.samples.append)))

    def good(self, asset: str | None = None) -> list[Sample]:
        return [s for s in self.samples if s.quality is Quality.GOOD
                and (asset is None or s.asset == asset)]

    def check_against_plant(self, samples: list[Sample]) -> int:
        """Every sample of a plant tag equals the plant's value at its timestamp."""
        checked = 0
        for sample in samples:
            if sample.tag not in {spec.name for spec in TAGS[AssetKind.PUMP]}:
                continue
            expected = self.history[(sample.asset, sample.ts_ns)][sample.tag]
            assert sample.value == pytest.approx(expected, rel=1e-12, abs=1e-12), sample
            checked += 1
        return checked

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.publisher is not None:
            await self.publisher.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def json_source(url: str, prefix: str, **extra: Any) -> MqttSource:
    return MqttSourceConfig.model_validate({
        "name": unique("json"), "broker": url, "client_id": unique("src"),
        "subscriptions": [{"format": "json", "topic": f"{prefix}/+/telemetry",
                           "asset": {"topic_segment": 1}, "values_path": "values",
                           "tags": {"anomaly_code": "$.status.code"},
                           "timestamp_path": "ts"}],
        **extra,
    }).build()


def sparkplug_source(url: str, group: str, **extra: Any) -> MqttSource:
    return MqttSourceConfig.model_validate({
        "name": unique("spb"), "broker": url, "client_id": unique("src"),
        "subscriptions": [{"format": "sparkplug", "group_id": group}], **extra,
    }).build()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---- the simulator's streams ------------------------------------------------------------------


def test_json_and_sparkplug_streams_equal_the_plant(stack_env: dict[str, str]) -> None:
    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix, group = unique("plant"), unique("grp")

    async def scenario() -> None:
        harness = Harness(MqttSimConfig(
            broker=url, publish_interval_s=0.1, json_topic=prefix + "/{asset}/telemetry",
            sparkplug=True, group_id=group, edge_node_id="gw-1", client_id=unique("sim")))
        json_src, spb_src = json_source(url, prefix), sparkplug_source(url, group)
        json_samples: list[Sample] = []
        spb_samples: list[Sample] = []
        tasks = [asyncio.create_task(json_src.run(json_samples.append)),
                 asyncio.create_task(spb_src.run(spb_samples.append))]
        try:
            await wait_for(lambda: json_src.connected and spb_src.connected, "sources up")
            await harness.start()
            for samples in (json_samples, spb_samples):
                await wait_for(lambda s=samples: {x.asset for x in s if x.tag == "speed"}  # type: ignore[misc]
                               == {"pump-01", "comp-01"} and len(s) > 200, "samples")
            checked_json = harness.check_against_plant(json_samples)
            checked_spb = harness.check_against_plant(spb_samples)
            assert checked_json > 100 and checked_spb > 50
            assert all(s.quality is Quality.GOOD for s in json_samples + spb_samples)
            assert {s.tag for s in json_samples} == {
                spec.name for spec in TAGS[AssetKind.PUMP]} | {"anomaly_code"}
            assert {"anomaly", "anomaly_code"} <= {s.tag for s in spb_samples}
            for source in (json_src, spb_src):
                assert source.stats.rejected == 0, source.stats
                assert source.stats.errors.get("seq_gap", 0) == 0, source.stats
            assert harness.publisher is not None and harness.publisher.dropped == 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await harness.close()

    run(scenario())


def test_late_host_gets_a_rebirth(stack_env: dict[str, str]) -> None:
    """A host that connects after the births sees DDATA it cannot resolve: it drops them,
    asks the edge node for a rebirth, and gets values once the births come."""
    url = stack_env["EDGEFLEET_MQTT_URL"]
    group = unique("grp")

    async def scenario() -> None:
        harness = Harness(MqttSimConfig(
            broker=url, publish_interval_s=0.1, json_enabled=False, sparkplug=True,
            group_id=group, edge_node_id="gw-2", client_id=unique("sim")))
        await harness.start()
        publisher = harness.publisher
        assert publisher is not None
        try:
            await wait_for(lambda: publisher.connects == 1 and publisher.seq > 10, "births sent")
            source = sparkplug_source(url, group)
            harness.run_source(source)
            await wait_for(lambda: publisher.rebirths >= 1, "a rebirth request")
            await wait_for(lambda: len(harness.good("pump-01")) > 20, "samples after rebirth")
            assert source.stats.errors["no_birth"] >= 1
            assert source.stats.errors["rebirth_requested"] >= 1
            assert harness.check_against_plant(harness.samples) > 10
        finally:
            await harness.close()

    run(scenario())


# ---- the Mosquitto command-line clients -------------------------------------------------------


def _cli_auth(url: str) -> list[str]:
    parts = urlsplit(url)
    return ["-h", str(parts.hostname), "-p", str(parts.port), "-u", str(parts.username),
            "-P", str(parts.password)]


def test_mosquitto_pub_message_is_decoded(stack_env: dict[str, str]) -> None:
    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix = unique("cli")

    async def scenario() -> None:
        source = json_source(url, prefix)
        samples: list[Sample] = []
        task = asyncio.create_task(source.run(samples.append))
        try:
            await wait_for(lambda: source.connected, "source connected")
            message = {"ts": 1_795_000_000_123, "values": {"flow": 12.5, "speed": 1480},
                       "status": {"anomaly": True, "code": 3}}
            # Retry until decoded: the SUBACK may trail the CONNACK a little.
            deadline = time.monotonic() + DEADLINE_S
            while len(samples) < 3:
                assert time.monotonic() < deadline, "mosquitto_pub message never decoded"
                await asyncio.to_thread(subprocess.run, [
                    "mosquitto_pub", *_cli_auth(url), "-q", "1", "-t",
                    f"{prefix}/press-7/telemetry", "-m", json.dumps(message)],
                    check=True, timeout=30)
                with contextlib.suppress(AssertionError):
                    await wait_for(lambda: len(samples) >= 3, "samples", timeout=2)
            got = {(s.asset, s.tag): (s.ts_ns, s.value, s.quality) for s in samples}
            ts = 1_795_000_000_123_000_000
            assert got[("press-7", "flow")] == (ts, 12.5, Quality.GOOD)
            assert got[("press-7", "speed")] == (ts, 1480.0, Quality.GOOD)
            assert got[("press-7", "anomaly_code")] == (ts, 3.0, Quality.GOOD)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_mosquitto_sub_receives_the_simulator(stack_env: dict[str, str]) -> None:
    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix = unique("sub")
    sub = subprocess.Popen(
        ["mosquitto_sub", *_cli_auth(url), "-q", "1", "-v", "-C", "4", "-W", "60",
         "-t", f"{prefix}/+/telemetry"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def scenario() -> None:
        harness = Harness(MqttSimConfig(broker=url, publish_interval_s=0.1,
                                        json_topic=prefix + "/{asset}/telemetry",
                                        client_id=unique("sim"), json_timestamp="epoch_ms"))
        await harness.start()
        try:
            await wait_for(lambda: sub.poll() is not None, "mosquitto_sub to get 4 messages",
                           timeout=60)
        finally:
            await harness.close()

    try:
        # mosquitto_sub must be subscribed before the simulator publishes anything that
        # matters; the harness keeps publishing, so later messages arrive either way.
        run(scenario())
        out, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        topic, payload = line.split(" ", 1)
        asset = topic.split("/")[1]
        assert asset in {"pump-01", "comp-01"}
        document = json.loads(payload)
        assert set(document["values"]) == {spec.name for spec in TAGS[AssetKind.PUMP]}
        assert document["status"] == {"anomaly": False, "code": 0}
        assert isinstance(document["ts"], int) and document["ts"] >= START_NS // 1_000_000


# ---- TLS -----------------------------------------------------------------------------------


def test_tls_with_the_stack_ca(stack_env: dict[str, str]) -> None:
    url, ca = stack_env["EDGEFLEET_MQTTS_URL"], Path(stack_env["EDGEFLEET_CA_FILE"])
    prefix = unique("tls")

    async def scenario() -> None:
        harness = Harness(MqttSimConfig(broker=url, ca_file=ca, publish_interval_s=0.1,
                                        json_topic=prefix + "/{asset}/telemetry",
                                        client_id=unique("sim")))
        source = json_source(url, prefix, ca_file=str(ca))
        harness.run_source(source)
        try:
            await wait_for(lambda: source.connected, "TLS source connected")
            await harness.start()
            await wait_for(lambda: len(harness.good()) > 30, "samples over TLS")
            assert harness.check_against_plant(harness.samples) > 20
        finally:
            await harness.close()

    run(scenario())


def test_tls_without_the_ca_is_refused_and_counted(stack_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    other_ca = ensure_ca(tmp_path / "pki").cert  # a CA that did not sign the broker's cert

    async def scenario() -> None:
        source = json_source(stack_env["EDGEFLEET_MQTTS_URL"], unique("x"),
                             ca_file=str(other_ca), reconnect_initial_s=0.05,
                             reconnect_cap_s=0.2)
        task = asyncio.create_task(source.run(lambda s: None))
        try:
            await wait_for(lambda: source.stats.errors.get("connect", 0) >= 2,
                           "failed TLS handshakes")
            assert not source.connected
            assert "CERTIFICATE_VERIFY_FAILED" in (source.last_error or "")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())


# ---- bad input over the wire -----------------------------------------------------------------


def test_bad_messages_over_the_wire_are_counted_not_fatal(stack_env: dict[str, str]) -> None:
    import paho.mqtt.client as mqtt

    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix = unique("bad")

    async def scenario() -> None:
        source = json_source(url, prefix, max_payload_bytes=1024)
        samples: list[Sample] = []
        task = asyncio.create_task(source.run(samples.append))
        parts = urlsplit(url)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("bad"))
        client.username_pw_set(parts.username, parts.password)
        client.connect(str(parts.hostname), int(parts.port or 1883))
        client.loop_start()
        try:
            await wait_for(lambda: source.connected, "source connected")
            good = json.dumps({"ts": 1_795_000_000_000, "values": {"flow": 1.0}})
            messages = [b"not json{", b"[1, 2]", b"x" * 2000,
                        json.dumps({"ts": "yesterday", "values": {"flow": 1}}).encode(),
                        json.dumps({"ts": 1_795_000_000_000, "values": {"flow": "high"}}
                                   ).encode(),
                        good.encode()]
            for payload in messages:
                client.publish(f"{prefix}/m-1/telemetry", payload, qos=1).wait_for_publish(10)
            await wait_for(lambda: any(s.quality is Quality.GOOD for s in samples),
                           "the good message after the bad ones")
            errors = source.stats.errors
            for reason in ("not_json", "not_object", "oversize", "bad_timestamp",
                           "not_a_number"):
                assert errors.get(reason) == 1, (reason, errors)
            assert source.stats.rejected == 4
            assert not task.done()
        finally:
            client.loop_stop()
            client.disconnect()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(scenario())


# ---- the broker goes away -------------------------------------------------------------------


@pytest.fixture
def private_broker() -> Iterator[Launcher]:
    root = make_stack_dir("edgefleet-mqtt-")
    launcher = Launcher(root)
    try:
        launcher.up(only=["mosquitto"])
        yield launcher
    finally:
        launcher.down()
        shutil.rmtree(root.parent, ignore_errors=True)


def test_broker_restart_is_survived(private_broker: Launcher) -> None:
    url = private_broker.env()["EDGEFLEET_MQTT_URL"]
    prefix, group = unique("out"), unique("grp")

    async def scenario() -> None:
        harness = Harness(MqttSimConfig(
            broker=url, publish_interval_s=0.1, json_topic=prefix + "/{asset}/telemetry",
            sparkplug=True, group_id=group, client_id=unique("sim")))
        json_src = json_source(url, prefix, reconnect_initial_s=0.1, reconnect_cap_s=1.0)
        spb_src = sparkplug_source(url, group, reconnect_initial_s=0.1, reconnect_cap_s=1.0)
        json_samples: list[Sample] = []
        spb_samples: list[Sample] = []
        tasks = [asyncio.create_task(json_src.run(json_samples.append)),
                 asyncio.create_task(spb_src.run(spb_samples.append))]
        publisher = harness.publisher
        assert publisher is not None
        try:
            await wait_for(lambda: json_src.connected and spb_src.connected, "sources up")
            await harness.start()
            await wait_for(lambda: len(json_samples) > 20 and len(spb_samples) > 20,
                           "samples before the outage")

            await asyncio.to_thread(private_broker.down)
            await wait_for(lambda: not json_src.connected and not spb_src.connected
                           and not publisher.connected, "everyone to notice the outage")
            await asyncio.to_thread(private_broker.up, ["mosquitto"])
            await wait_for(lambda: json_src.connected and spb_src.connected
                           and publisher.connects >= 2, "everyone reconnected", timeout=60)
            json_mark, spb_mark = len(json_samples), len(spb_samples)
            await wait_for(lambda: len(json_samples) > json_mark + 20
                           and sum(s.quality is Quality.GOOD
                                   for s in spb_samples[spb_mark:]) > 20,
                           "samples after the outage", timeout=60)
            assert json_src.stats.reconnects >= 1 and spb_src.stats.reconnects >= 1
            assert json_src.stats.errors.get("lost", 0) >= 1
            assert harness.check_against_plant(json_samples) > 40
            assert harness.check_against_plant(
                [s for s in spb_samples if s.quality is Quality.GOOD]) > 40
            assert not any(task.done() for task in tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await harness.close()

    run(scenario())


def test_simulator_restart_is_survived(stack_env: dict[str, str]) -> None:
    """The publisher process goes away (its will, NDEATH, marks the tags bad) and a new one
    comes up with a new bdSeq and births: the same sources resume without a restart."""
    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix, group = unique("restart"), unique("grp")

    async def scenario() -> None:
        config = MqttSimConfig(broker=url, publish_interval_s=0.1,
                               json_topic=prefix + "/{asset}/telemetry", sparkplug=True,
                               group_id=group, client_id=unique("sim"))
        harness = Harness(config)
        json_src, spb_src = json_source(url, prefix), sparkplug_source(url, group)
        json_samples: list[Sample] = []
        spb_samples: list[Sample] = []
        tasks = [asyncio.create_task(json_src.run(json_samples.append)),
                 asyncio.create_task(spb_src.run(spb_samples.append))]
        try:
            await wait_for(lambda: json_src.connected and spb_src.connected, "sources up")
            await harness.start()
            await wait_for(lambda: len(json_samples) > 20 and len(spb_samples) > 20,
                           "samples from the first simulator")
            first = harness.publisher
            assert first is not None
            await first.stop()
            await wait_for(lambda: any(s.quality is Quality.BAD for s in spb_samples),
                           "the death to mark the Sparkplug tags bad")

            second = MqttSimPublisher(config, harness.plant)
            harness.publisher = second
            await second.start()
            json_mark, spb_mark = len(json_samples), len(spb_samples)
            await wait_for(lambda: len(json_samples) > json_mark + 20
                           and sum(s.quality is Quality.GOOD
                                   for s in spb_samples[spb_mark:]) > 20,
                           "samples from the restarted simulator", timeout=60)
            assert harness.check_against_plant(json_samples) > 40
            assert harness.check_against_plant(
                [s for s in spb_samples if s.quality is Quality.GOOD]) > 40
            assert not any(task.done() for task in tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await harness.close()

    run(scenario())
