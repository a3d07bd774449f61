"""Build and run a scenario's protocol servers in one process (`edgefleet sim`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

from .model import Plant
from .runner import LabelWriter, SimRunner
from .scenario import Scenario
from .server import ProtocolServer

__all__ = ["SimError", "build_servers", "run_scenario"]


class SimError(Exception):
    """The simulator cannot start as asked (a missing broker URL, …)."""


def build_servers(
    scenario: Scenario, plant: Plant, mqtt_url: str | None = None
) -> list[ProtocolServer]:
    """One server per protocol that has assets, each serving only its own assets."""
    servers: list[ProtocolServer] = []
    if assets := scenario.assets_on("modbus"):
        from .modbus_server import ModbusSimServer

        servers.append(ModbusSimServer(scenario.modbus, plant, assets))
    if assets := scenario.assets_on("opcua"):
        from .opcua_server import OpcUaSimServer

        servers.append(OpcUaSimServer(scenario.opcua, plant, assets))
    if assets := scenario.assets_on("mqtt"):
        from .mqtt_publisher import MqttSimConfig, MqttSimPublisher

        config = scenario.mqtt
        url = mqtt_url or os.environ.get("EDGEFLEET_MQTT_URL")
        if url:
            config = MqttSimConfig.model_validate(
                {**(config.model_dump() if config else {}), "broker": url}
            )
        if config is None:
            raise SimError(
                "MQTT assets need a broker: pass --mqtt-url, set EDGEFLEET_MQTT_URL "
                "(`eval \"$(edgefleet services env)\"`), or give `mqtt.broker` in the scenario"
            )
        servers.append(MqttSimPublisher(config, plant, assets))
    return servers


def describe(servers: list[ProtocolServer]) -> dict[str, object]:
    """Where each asset is served, for humans and for scripts (printed as JSON)."""
    endpoints: dict[str, object] = {}
    for server in servers:
        found = getattr(server, "endpoints", None) or getattr(server, "endpoint", None)
        if server.name == "mqtt":
            found = {"topics": getattr(getattr(server, "config", None), "json_topic", None)}
        if found is not None:
            endpoints[server.name] = found
    return endpoints


def run_scenario(
    scenario: Scenario,
    *,
    labels: Path | None = None,
    duration_s: float | None = None,
    mqtt_url: str | None = None,
) -> int:
    labels_path = labels or scenario.labels
    writer = LabelWriter(labels_path) if labels_path else None
    plant = scenario.build_plant(label_sink=writer)
    servers = build_servers(scenario, plant, mqtt_url)
    runner = SimRunner(plant, servers, time_scale=scenario.time_scale)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(runner.run(stop, duration_s), name="sim-runner")
        started = asyncio.create_task(runner.started.wait(), name="sim-started")
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if runner.started.is_set():
            print(json.dumps({"assets": len(scenario.assets), "seed": scenario.seed,
                              "endpoints": describe(servers)}, default=str), flush=True)
        started.cancel()
        await task

    try:
        asyncio.run(main())
    finally:
        if writer is not None:
            writer.close()
    return 0
