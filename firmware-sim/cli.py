"""`edgefleet sim`: run simulated PLCs; `edgefleet sim registers`: print the Modbus map."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="?", choices=("run", "registers"), default="run",
        help="run the plant (default), or print the Modbus register map",
    )
    parser.add_argument("--scenario", type=Path, help="a scenario YAML (overrides the flags)")
    parser.add_argument("--assets", type=int, default=6, help="how many assets (%(default)s)")
    parser.add_argument(
        "--protocols", default="modbus,opcua",
        help="comma-separated, assigned round-robin: modbus, opcua, mqtt (%(default)s)",
    )
    parser.add_argument("--anomaly-rate", type=float, default=0.05,
                        help="share of time each asset spends in an anomaly (%(default)s)")
    parser.add_argument("--seed", type=int, default=7, help="same seed, same plant (%(default)s)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated seconds per wall second (%(default)s)")
    parser.add_argument("--labels", type=Path, help="append ground-truth episodes to this JSONL")
    parser.add_argument("--duration", type=float, help="stop after this many wall seconds")
    parser.add_argument(
        "--mqtt-url",
        help="broker for the MQTT assets (default: $EDGEFLEET_MQTT_URL, as printed by "
        "`edgefleet services env`)",
    )
    parser.add_argument("--kind", choices=("pump", "compressor", "conveyor"),
                        help="with `registers`: show units and int16 scales for this kind")


def run(args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError

    if args.action == "registers":
        from .modbus_server import format_register_map
        from .model import AssetKind

        print(format_register_map(AssetKind(args.kind) if args.kind else None))
        return 0

    from .scenario import Scenario, ScenarioError
    from .sim import SimError, run_scenario

    try:
        if args.scenario:
            scenario = Scenario.from_yaml(args.scenario)
        else:
            scenario = Scenario.generate(
                args.assets, [p.strip() for p in args.protocols.split(",") if p.strip()],
                anomaly_rate=args.anomaly_rate, seed=args.seed, time_scale=args.time_scale,
            )
        return run_scenario(scenario, labels=args.labels, duration_s=args.duration,
                            mqtt_url=args.mqtt_url)
    except (ScenarioError, SimError) as err:
        raise CliError(str(err)) from err
