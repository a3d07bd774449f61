"""The `edgefleet` command line.

Each subcommand lives with its component in a module that exposes
`add_arguments(parser)` and `run(args) -> int`. Building the parser imports those
modules, so they import only the standard library at module level and bring in their
heavy dependencies inside `run`: `edgefleet agent …` on a gateway device never imports
the cloud stack.

Benchmarks are registered by name in `BENCHES`: each entry is "module:function", where
the function takes no arguments and returns a JSON-serialisable dict of figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["BENCHES", "COMMANDS", "main"]

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "edgefleet.deploy.demo",
        "run the main job end to end (today: the simulated plant read by three edge agents "
        "into the fog gateway, with a completeness report; --stack real for real services)",
    ),
    "sim": (
        "edgefleet.firmware_sim.cli",
        "run simulated PLCs (Modbus, OPC UA, MQTT) with labelled anomalies; "
        "`sim registers` prints the Modbus map",
    ),
    "agent": (
        "edgefleet.edge_agent.cli",
        "run the edge agent, check its config, list and handle its dead-lettered batches",
    ),
    "fog": (
        "edgefleet.fog_gateway.cli",
        "run the fog gateway (ingest, MQTT bridge, sink), manage device tokens, "
        "read completeness",
    ),
    "control": (
        "edgefleet.cloud.control.cli",
        "run the control plane: enrollment, signed model publishing, rollouts in waves "
        "with health gates, fleet health",
    ),
    "fleet": (
        "edgefleet.cloud.control.fleet_cli",
        "push a model version to the fleet and follow the rollout (deploy, status, pause, "
        "resume, abort, rollback, devices)",
    ),
    "services": (
        "edgefleet.deploy.services_cli",
        "start, stop and inspect the local real services (PostgreSQL, Mosquitto, Kafka, S3, "
        "MLflow, Prometheus)",
    ),
    "train": (
        "edgefleet.cloud.training.cli",
        "train anomaly models on the fog store's labelled history, export ONNX, register "
        "in MLflow (challenger; champion when better)",
    ),
}

# bench name -> "module:function" returning a dict of figures.
BENCHES: dict[str, str] = {
    "wire": "edgefleet.protocols.bench:bench_wire",
    "protocols": "edgefleet.protocols.bench_protocols:bench_protocols",
    "agent": "edgefleet.edge_agent.bench_agent:bench_agent",
    "fog": "edgefleet.fog_gateway.bench_fog:bench_fog",
    "train": "edgefleet.cloud.training.bench_train:bench_train",
    "rollout": "edgefleet.cloud.control.bench_rollout:bench_rollout",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2 unless given."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _version() -> str:
    try:
        return version("edgefleet")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _load(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _add_bench(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run a named benchmark and print its figures",
        description="Run a named benchmark. Figures go to stdout; record them in BENCHMARKS.md.",
    )
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    bench_fn: Callable[[], dict[str, Any]] = _load(BENCHES[args.name])
    figures = bench_fn()
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description=(
            "Industrial edge MLOps: edge agents read PLCs and run ONNX models, a fog gateway "
            "lands the data, a control plane retrains and rolls models out in waves."
        ),
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        code: int = handler(args)
    except CliError as err:
        print(f"edgefleet {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgefleet … | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    return code


if __name__ == "__main__":
    # Run through the canonical module, so `CliError` raised by subcommands (which import
    # `edgefleet.deploy.cli`) is the class caught here, not a `__main__` copy of it.
    from edgefleet.deploy.cli import main as canonical_main

    sys.exit(canonical_main())
