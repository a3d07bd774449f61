"""`bench_opcua`: subscription throughput of the OPC UA source against the simulator.

The simulator (20 assets × 6 tags, plus their two status nodes, updated every 100 ms of
wall and simulated time) runs in a child process, so the figures are the source's own: the
parent process holds only the `OpcUaSource` with one subscription over the 120 tag nodes
(publishing interval 100 ms) and counts the samples it emits over `duration_s`, measured
from the first sample on. Figures:

- `opcua_tags_per_s`: samples emitted per second (every tag changes every tick, so the
  ideal is 120 × 10 = 1,200 /s);
- `opcua_expected_tags_per_s`: that ideal, for the ratio;
- `opcua_bad_samples`: samples with quality other than good (0 expected);
- `opcua_client_cpu_pct`: CPU time of this process over the window, per cent of one core;
- `opcua_connect_s`: from `run()` to the first sample (session, subscription, monitored items);
- `opcua_sim_skipped_updates`: ticks the simulator skipped because a write was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any

from .opcua import OpcUaNodeConfig, OpcUaSourceConfig
from .source import Sample
from .wire import Quality

__all__ = ["bench_opcua"]

ASSETS = 20
TICK_S = 0.1
START_NS = 1_795_000_000_000_000_000
_DEADLINE_S = 60.0


def _simulator_main(conn: Connection, assets: int) -> None:
    """Child process: serve the plant until the parent says stop (or goes away)."""
    asyncio.run(_simulate(conn, assets))


async def _simulate(conn: Connection, assets: int) -> None:
    from edgefleet.firmware_sim.model import AssetKind, Plant
    from edgefleet.firmware_sim.opcua_server import OpcUaSimConfig, OpcUaSimServer

    kinds = (AssetKind.PUMP, AssetKind.COMPRESSOR, AssetKind.CONVEYOR)
    names = [(f"asset-{index:02d}", kinds[index % 3]) for index in range(assets)]
    plant = Plant(names, start_ns=START_NS, tick_s=TICK_S, anomaly_rate=0.0)
    server = OpcUaSimServer(OpcUaSimConfig(), plant, [name for name, _ in names])
    await server.start()
    conn.send({"endpoint": server.endpoint,
               "nodes": [(name, tag) for name, kind in names
                         for tag in plant.values(name)]})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(conn.fileno(), stop.set)  # any message (or EOF) from the parent
    started = time.monotonic()
    ticks = 0
    try:
        while not stop.is_set():
            ticks += 1
            plant.advance_to(START_NS + ticks * plant.tick_ns)
            server.update(plant)
            delay = started + ticks * TICK_S - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))
    finally:
        loop.remove_reader(conn.fileno())
        await server.stop()
        with contextlib.suppress(OSError):
            conn.send({"skipped_updates": server.skipped_updates, "updates": server.updates})


async def bench_opcua(duration_s: float = 5.0) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_simulator_main, args=(child, ASSETS), daemon=True,
                              name="opcua-bench-simulator")
    process.start()
    child.close()
    try:
        ready = await asyncio.to_thread(_receive, parent, _DEADLINE_S)
        from edgefleet.firmware_sim.opcua_server import node_id

        config = OpcUaSourceConfig(
            endpoint=ready["endpoint"], publishing_interval_s=TICK_S,
            nodes=[OpcUaNodeConfig(asset=asset, tag=tag, node_id=node_id(asset, tag))
                   for asset, tag in ready["nodes"]])
        source = config.build()
        first = asyncio.Event()
        counted: list[int] = [0, 0]  # samples, bad samples inside the window
        window = {"open": False}

        def emit(sample: Sample) -> None:
            if not first.is_set():
                first.set()
            if window["open"]:
                counted[0] += 1
                if sample.quality is not Quality.GOOD:
                    counted[1] += 1

        t_run = time.monotonic()
        task = asyncio.create_task(source.run(emit), name="opcua-bench-source")
        try:
            await asyncio.wait_for(first.wait(), timeout=_DEADLINE_S)
            connect_s = time.monotonic() - t_run
            window["open"] = True
            cpu0, t0 = time.process_time(), time.monotonic()
            await asyncio.sleep(duration_s)  # the measurement window itself
            window["open"] = False
            elapsed = time.monotonic() - t0
            cpu = time.process_time() - cpu0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        parent.send("stop")
        final = await asyncio.to_thread(_receive, parent, _DEADLINE_S)
    finally:
        parent.close()
        await asyncio.to_thread(process.join, 10)
        if process.is_alive():
            process.kill()
    tags = len(ready["nodes"])
    return {
        "opcua_tags_per_s": counted[0] / elapsed,
        "opcua_expected_tags_per_s": tags / TICK_S,
        "opcua_bad_samples": float(counted[1]),
        "opcua_client_cpu_pct": 100.0 * cpu / elapsed,
        "opcua_connect_s": connect_s,
        "opcua_sim_skipped_updates": float(final.get("skipped_updates", 0)),
    }


def _receive(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"the OPC UA simulator did not answer within {timeout} s")
    return conn.recv()
