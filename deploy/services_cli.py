"""`edgefleet services up|down|status|env|mqtt-device`: the local real-services stack."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

_SERVICE_NAMES = ("postgres", "mosquitto", "kafka", "s3", "mlflow", "prometheus")


def _port_pin(text: str) -> tuple[str, int]:
    name, sep, port = text.partition("=")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PORT (e.g. postgres=15432), got {text!r}"
        )
    return name, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=Path(".edgefleet/services"),
        help="folder holding every service's data, config and logs (default: %(default)s)",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start the services and wait until each is ready")
    up.add_argument(
        "--only", nargs="+", choices=_SERVICE_NAMES, metavar="NAME",
        help=f"start only these (and what they need): {', '.join(_SERVICE_NAMES)}",
    )
    up.add_argument(
        "--port", action="append", type=_port_pin, default=[], metavar="NAME=PORT",
        help="pin a port instead of taking a free one (repeatable)",
    )
    actions.add_parser("down", help="stop every service; data is kept")
    actions.add_parser("status", help="health of each service; exit 1 unless all are healthy")
    actions.add_parser(
        "env", help='print shell exports for clients: eval "$(edgefleet services env)"'
    )
    device = actions.add_parser(
        "mqtt-device", help="create a Mosquitto account confined to one device's topics"
    )
    device.add_argument("device", help="device name; its topics are edgefleet/devices/NAME/#")


def run(args: argparse.Namespace) -> int:
    from edgefleet.deploy.cli import CliError
    from edgefleet.deploy.services import Launcher, LauncherError, format_exports

    launcher = Launcher(args.dir)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            print(f"starting services in {launcher.root}", flush=True)
            launcher.up(only=args.only, ports=dict(args.port), progress=True)
            print(f"all ready in {time.monotonic() - t0:.1f} s; clients: "
                  f"eval \"$(edgefleet services env --dir {launcher.root})\"")
            return 0
        if args.action == "down":
            stopped = launcher.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        if args.action == "status":
            statuses = launcher.status()
            if not statuses:
                print(f"no stack in {launcher.root}")
                return 1
            for status in statuses:
                mark = "healthy" if status.healthy else "UNHEALTHY"
                mark = mark if status.running else "stopped"
                pid = f"pid {status.pid}" if status.pid else "-"
                print(f"{status.name:<11} {mark:<9} {pid:<11} {status.detail}")
            return 0 if all(status.healthy for status in statuses) else 1
        if args.action == "env":
            print(format_exports(launcher.env()))
            return 0
        if args.action == "mqtt-device":
            print(launcher.add_mqtt_device(args.device))
            return 0
    except LauncherError as err:
        raise CliError(str(err), exit_code=1) from err
    print(f"unknown action {args.action}", file=sys.stderr)
    return 2
