"""`edgefleet control run`: serve the control plane API and the fleet page.

    edgefleet control run [--db URL] [--port 8700] [--tracking-uri http://mlflow:5000]

Operators use `edgefleet fleet` (fleet_cli.py) against it. Embedded defaults: the
database is `sqlite:///<state>/control.db`; the state folder (`--state-dir`, else
$EDGEFLEET_STATE_DIR/control, else ~/.local/state/edgefleet/control) holds the fleet
signing key, the published artifacts and, at first start, `admin.token`.

Exit status: 0 after a clean shutdown; 2 on bad settings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_arguments", "default_state_dir", "run"]


def default_state_dir() -> Path:
    env = os.environ.get("EDGEFLEET_STATE_DIR")
    return (Path(env) if env else Path.home() / ".local" / "state" / "edgefleet") / "control"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="serve the control plane API and the fleet page")
    run.add_argument("--db", default=os.environ.get("EDGEFLEET_CONTROL_DB"),
                     help="database URL, postgresql://… or sqlite:///… (default "
                     "$EDGEFLEET_CONTROL_DB, else sqlite in the state folder)")
    run.add_argument("--state-dir", type=Path, default=None)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8700)
    run.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                     help="MLflow to publish models from (default $MLFLOW_TRACKING_URI)")
    run.add_argument("--shadow-s", type=float, default=30.0,
                     help="how long agents shadow a new model before swapping (default 30)")
    run.add_argument("--poll-s", type=float, default=5.0,
                     help="desired-state poll interval suggested to agents (default 5)")
    run.add_argument("--bake-s", type=float, default=0.0,
                     help="default wait between a passed wave and the next (default 0)")


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from edgefleet.deploy.cli import CliError

    from . import rollout
    from .app import ControlSettings, create_app

    state = (args.state_dir or default_state_dir()).absolute()
    url = args.db or f"sqlite:///{state / 'control.db'}"
    if args.shadow_s < 0 or args.poll_s <= 0 or args.bake_s < 0:
        raise CliError("--shadow-s and --bake-s must be ≥ 0 and --poll-s > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    settings = ControlSettings(database_url=url, state_dir=state,
                               tracking_uri=args.tracking_uri, shadow_s=args.shadow_s,
                               poll_s=args.poll_s,
                               policy=rollout.GatePolicy(bake_s=args.bake_s))
    try:
        app = create_app(settings)
    except ValueError as err:
        raise CliError(str(err)) from err
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
