"""The demo's simulated plant, run in a background thread of the `edgefleet demo` process.

`DemoPlant` owns one asyncio loop in one thread. On it run the simulated machines
(`firmware-sim`: Modbus TCP, OPC UA and MQTT servers over one `Plant`) and, in the embedded
stack, an in-process MQTT broker (amqtt, anonymous, loopback only) for the MQTT assets. The
edge agents are separate processes: `agent_sources(protocol)` gives each the `sources:`
section that reads that protocol's share of the plant, exactly as a user would write it.

Ground truth: every anomaly episode is appended to a JSONL label file as it starts and ends,
and `episodes()` summarises what was injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgefleet.firmware_sim.modbus_server import ModbusSimServer
from edgefleet.firmware_sim.model import LabelEvent, Plant
from edgefleet.firmware_sim.mqtt_publisher import MqttSimConfig
from edgefleet.firmware_sim.opcua_server import OpcUaSimServer, node_id
from edgefleet.firmware_sim.runner import LabelWriter, SimRunner
from edgefleet.firmware_sim.scenario import PROTOCOLS, Scenario
from edgefleet.firmware_sim.server import ProtocolServer
from edgefleet.firmware_sim.sim import build_servers

__all__ = ["DemoPlant", "MqttLine", "PlantError", "free_port"]

log = logging.getLogger(__name__)

SENSOR_TAGS: Final = ("speed", "flow", "pressure", "current", "temperature", "vibration")
SAMPLE_PERIOD_S: Final = 0.5  # Modbus poll, OPC UA publishing and MQTT publish interval
# How often the servers get the plant's new state. Readers sample every SAMPLE_PERIOD_S, so
# 0.1 s is plenty, and it leaves the 2-core machine's CPU to the agents and the fog.
UPDATE_PERIOD_S: Final = 0.1


class PlantError(RuntimeError):
    """The plant could not start (a server or the broker failed); the message says which."""


@dataclass(frozen=True)
class MqttLine:
    """Where the plant's MQTT assets publish and how a reader logs in.

    `broker_url` may carry a login (`mqtt://user:password@host:port`): it is a secret.
    `topic` holds `{asset}`; the reader subscribes with `+` in its place.
    """

    broker_url: str
    topic: str

    @property
    def topic_filter(self) -> str:
        return self.topic.replace("{asset}", "+")

    @property
    def asset_segment(self) -> int:
        return self.topic.split("/").index("{asset}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoPlant:
    """The plant's servers (and the embedded broker) on their own loop in one thread."""

    def __init__(self, scenario: Scenario, labels: Path, mqtt: MqttLine,
                 *, embedded_broker_port: int | None = None) -> None:
        self.scenario = scenario
        self.mqtt = mqtt
        self.embedded_broker_port = embedded_broker_port
        self.labels = LabelWriter(labels)
        self.plant: Plant = scenario.build_plant(label_sink=self.labels)
        self._servers: dict[str, ProtocolServer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="demo-plant", daemon=True)

    @classmethod
    def generate(cls, assets: int, labels: Path, mqtt: MqttLine, *, time_scale: float,
                 anomaly_rate: float, seed: int,
                 embedded_broker_port: int | None = None) -> DemoPlant:
        """`assets` machines spread round-robin over Modbus, OPC UA and MQTT."""
        scenario = Scenario.generate(
            assets, list(PROTOCOLS), anomaly_rate=anomaly_rate, seed=seed,
            time_scale=time_scale,
            mqtt=MqttSimConfig.model_validate({
                "broker": mqtt.broker_url, "json_topic": mqtt.topic,
                "publish_interval_s": SAMPLE_PERIOD_S, "client_id": "demo-plant-mqtt"}),
        )
        return cls(scenario, labels, mqtt, embedded_broker_port=embedded_broker_port)

    # ---- lifetime ----------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the thread; return once every server serves (or raise `PlantError`)."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise PlantError(f"the simulated plant did not start within {timeout_s:g} s")
        if self._failure is not None:
            raise PlantError(f"the simulated plant failed to start: {self._failure!r}") \
                from self._failure

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the servers and the broker; idempotent."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.labels.close()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as err:  # noqa: BLE001 - reported to `start`, or logged once if late
            self._failure = err
            if self._ready.is_set():
                log.error("the simulated plant stopped: %r", err)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            if self.embedded_broker_port is not None:
                await stack.enter_async_context(_embedded_broker(self.embedded_broker_port))
            servers = build_servers(self.scenario, self.plant, self.mqtt.broker_url)
            self._servers = {server.name: server for server in servers}
            runner = SimRunner(self.plant, servers, time_scale=self.scenario.time_scale,
                               update_period_s=UPDATE_PERIOD_S)
            task = asyncio.create_task(runner.run(self._stop), name="plant")
            started = asyncio.create_task(runner.started.wait(), name="plant-started")
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if task.done():
                task.result()  # raises why the servers did not start
                raise PlantError("the plant's servers stopped before they started")
            self._ready.set()
            await task

    # ---- what the agents read ----------------------------------------------------------

    def assets_on(self, protocol: str) -> list[str]:
        return self.scenario.assets_on(protocol)

    def agent_sources(self, protocol: str) -> list[dict[str, Any]]:
        """The agent's `sources:` section for this protocol's assets (after `start`)."""
        name = f"plant-{protocol}"
        if protocol == "modbus":
            server = self._servers["modbus"]
            assert isinstance(server, ModbusSimServer)
            config = server.source_config(timeout_s=1.0, name=name,
                                          poll_interval_s=SAMPLE_PERIOD_S)
            return [{"type": "modbus", **config.model_dump(mode="json", exclude_defaults=True)}]
        if protocol == "opcua":
            server = self._servers["opcua"]
            assert isinstance(server, OpcUaSimServer)
            nodes = [{"asset": asset, "tag": tag, "node_id": node_id(asset, tag)}
                     for asset in self.assets_on("opcua") for tag in SENSOR_TAGS]
            return [{"type": "opcua", "name": name, "endpoint": server.endpoint,
                     "publishing_interval_s": SAMPLE_PERIOD_S, "nodes": nodes}]
        if protocol == "mqtt":
            return [{"type": "mqtt", "name": name, "broker": self.mqtt.broker_url,
                     "client_id": "edge-mqtt-plant-reader",
                     "subscriptions": [{
                         "format": "json", "topic": self.mqtt.topic_filter,
                         "asset": {"topic_segment": self.mqtt.asset_segment},
                         "values_path": "values", "timestamp_path": "ts"}]}]
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")

    # ---- ground truth ------------------------------------------------------------------

    def episodes(self) -> list[LabelEvent]:
        """The anomaly episodes started so far (their start events)."""
        return [event for event in self.plant.labels if event.event == "start"]

    def episodes_by_kind(self) -> Counter[str]:
        return Counter(event.kind for event in self.episodes())


@contextlib.asynccontextmanager
async def _embedded_broker(port: int) -> Any:
    """amqtt on 127.0.0.1:`port`, anonymous: the embedded stack's MQTT broker."""
    from amqtt.broker import Broker  # type: ignore[import-untyped]

    for noisy in ("amqtt", "transitions"):  # per-connection INFO lines are not the demo's news
        logging.getLogger(noisy).setLevel(logging.WARNING)
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                    {"allow_anonymous": True}},
    })
    await broker.start()
    try:
        yield broker
    finally:
        await broker.shutdown()
