"""`edgefleet bench protocols`: the three field-protocol sources against the simulators.

Each figure comes from its protocol's own bench (see `bench_modbus`, `bench_opcua`,
`bench_mqtt` for what exactly is measured); the MQTT one needs a real broker, so this
starts a private Mosquitto through the project's launcher and stops it afterwards.
`EDGEFLEET_BENCH_SECONDS` sets each bench's duration (default 5 s).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["bench_protocols"]


def bench_protocols() -> dict[str, Any]:
    from edgefleet.deploy.services import Launcher

    from .bench_modbus import bench_modbus
    from .bench_mqtt import bench_mqtt
    from .bench_opcua import bench_opcua

    duration_s = float(os.environ.get("EDGEFLEET_BENCH_SECONDS", "5"))
    figures: dict[str, Any] = {"duration_s": duration_s}
    figures.update(asyncio.run(bench_modbus(duration_s)))
    figures.update(asyncio.run(bench_opcua(duration_s)))

    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    launcher = Launcher(workdir / "stack")
    try:
        env = launcher.up(only=["mosquitto"])
        figures.update(asyncio.run(bench_mqtt(env["EDGEFLEET_MQTT_URL"], duration_s)))
    finally:
        launcher.down()
        shutil.rmtree(workdir, ignore_errors=True)
    return figures
