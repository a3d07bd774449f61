"""`bench_modbus`: how fast one `ModbusSource` polls a fleet of simulated PLCs.

50 simulated devices (the firmware simulator's Modbus TCP server, one port per device) run
in a child process, so `modbus_cpu_percent` is this process's CPU time, i.e. the source's
own cost (pymodbus client, planning, decoding), not the simulator's. One source polls all
50 devices concurrently, back to back, for `duration_s`; each device poll is one read of
holding registers 0-99 decoded into 93 points (6 float32, 6 scaled int16, 2 uint16 label
registers, the uint32 update counter and 78 uint16 padding registers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from typing import Any

from .modbus import ModbusSourceConfig

__all__ = ["bench_modbus", "bench_points", "start_simulator", "stop_simulator"]

DEVICES = 50
HOLDING_REGISTERS = 100
_TAGS = ("speed", "flow", "pressure", "current", "temperature", "vibration")
_CHILD_START_TIMEOUT_S = 60.0
_CHILD_STOP_GRACE_S = 10.0


def bench_points(asset: str) -> list[dict[str, Any]]:
    """The 93 points of holding registers 0-99 of one simulated device (see module doc)."""
    points: list[dict[str, Any]] = []
    for index, tag in enumerate(_TAGS):
        points.append({"asset": asset, "tag": tag, "address": 2 * index,
                       "data_type": "float32"})
        points.append({"asset": asset, "tag": f"{tag}_raw", "address": 12 + index,
                       "data_type": "int16"})
    points.append({"asset": asset, "tag": "anomaly_kind", "address": 18})
    points.append({"asset": asset, "tag": "anomaly_active", "address": 19})
    points.append({"asset": asset, "tag": "update_counter", "address": 20,
                   "data_type": "uint32"})
    points += [{"asset": asset, "tag": f"reg{address}", "address": address}
               for address in range(22, HOLDING_REGISTERS)]
    return points


async def start_simulator(devices: int) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgefleet.firmware_sim.modbus_server",
        "--assets", str(devices), "--prefix", "plc",
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), _CHILD_START_TIMEOUT_S)
        ready: dict[str, Any] = json.loads(line)
    except BaseException:
        await stop_simulator(child)
        raise
    return child, ready


async def stop_simulator(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(child.wait(), _CHILD_STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()


def _child_cpu_s(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


async def bench_modbus(duration_s: float = 5.0) -> dict[str, float]:
    """Poll 50 simulated devices × 100 holding registers as fast as possible.

    Returns `modbus_readings_per_s` (good points decoded per second), `modbus_cpu_percent`
    (this process's CPU time over wall time × 100; the simulator is a child process),
    polls and read requests per second, poll latency percentiles, bad samples and the
    simulator's own CPU percent (when psutil is installed).
    """
    child, ready = await start_simulator(DEVICES)
    try:
        endpoints: dict[str, list[Any]] = ready["endpoints"]
        config = ModbusSourceConfig.model_validate({
            "name": "bench",
            "devices": [{"name": name, "host": host, "port": port, "timeout_s": 5.0}
                        for name, (host, port) in endpoints.items()],
            "points": [p for name in endpoints for p in bench_points(name)],
        })
        source = config.build()
        try:
            await source.poll()  # connect every device before the clock starts
            child_cpu_start = _child_cpu_s(child.pid)
            good = bad = polls = 0
            latencies: list[float] = []
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            deadline = wall_start + duration_s
            while True:
                poll_start = time.perf_counter()
                samples = await source.poll()
                now = time.perf_counter()
                latencies.append(now - poll_start)
                polls += 1
                for sample in samples:
                    if sample.value is None:
                        bad += 1
                    else:
                        good += 1
                if now >= deadline:
                    break
            wall = time.perf_counter() - wall_start
            cpu = time.process_time() - cpu_start
            child_cpu_end = _child_cpu_s(child.pid)
        finally:
            await source.close()
    finally:
        await stop_simulator(child)
    latencies.sort()
    result = {
        "modbus_readings_per_s": good / wall,
        "modbus_cpu_percent": cpu / wall * 100,
        "modbus_polls_per_s": polls / wall,
        "modbus_reads_per_s": polls * source.reads_per_poll / wall,
        "modbus_devices": float(DEVICES),
        "modbus_points_per_poll": float(len(config.points)),
        "modbus_poll_p50_ms": statistics.median(latencies) * 1000,
        "modbus_poll_max_ms": latencies[-1] * 1000,
        "modbus_bad_samples": float(bad),
        "modbus_duration_s": wall,
    }
    if child_cpu_start is not None and child_cpu_end is not None:
        result["modbus_sim_cpu_percent"] = (child_cpu_end - child_cpu_start) / wall * 100
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(bench_modbus()), indent=2))
