"""`edgefleet control run`: serve the control plane API and the fleet page.

    edgefleet control run [--db URL] [--port 8700] [--tracking-uri http://mlflow:5000]
                          [--artifacts-s3 s3://BUCKET/PREFIX] [--artifact-url-ttl-s 3600]

Operators use `edgefleet fleet` (fleet_cli.py) against it. Embedded defaults: the
database is `sqlite:///<state>/control.db`; the state folder (`--state-dir`, else
$EDGEFLEET_STATE_DIR/control, else ~/.local/state/edgefleet/control) holds the fleet
signing key, the published artifacts and, at first start, `admin.token`.

With `--artifacts-s3` (default $EDGEFLEET_CONTROL_ARTIFACTS_S3), published artifacts are
also put in S3 and devices fetch them through pre-signed URLs valid for
`--artifact-url-ttl-s` seconds (60 .. 604800); the endpoint and key pair come from
$EDGEFLEET_S3_ENDPOINT, $EDGEFLEET_S3_ACCESS_KEY and $EDGEFLEET_S3_SECRET_KEY (artifacts.py).

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
    run.add_argument("--access-log", action="store_true",
                     help="log every request (off by default: a fleet polls several times "
                     "a second per thousand devices)")
    run.add_argument("--artifacts-s3", metavar="s3://BUCKET/PREFIX",
                     default=os.environ.get("EDGEFLEET_CONTROL_ARTIFACTS_S3") or None,
                     help="also store published artifacts there and give devices pre-signed "
                     "URLs (default $EDGEFLEET_CONTROL_ARTIFACTS_S3; endpoint and keys from "
                     "$EDGEFLEET_S3_ENDPOINT, $EDGEFLEET_S3_ACCESS_KEY, "
                     "$EDGEFLEET_S3_SECRET_KEY)")
    run.add_argument("--artifact-url-ttl-s", type=float, default=3600.0,
                     help="lifetime of a pre-signed artifact URL, 60 .. 604800 (default 3600)")


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from edgefleet.deploy.cli import CliError

    from . import rollout
    from .app import ControlSettings, create_app
    from .artifacts import ArtifactConfigError, ArtifactError, S3Config, check_url_ttl

    state = (args.state_dir or default_state_dir()).absolute()
    url = args.db or f"sqlite:///{state / 'control.db'}"
    if args.shadow_s < 0 or args.poll_s <= 0 or args.bake_s < 0:
        raise CliError("--shadow-s and --bake-s must be ≥ 0 and --poll-s > 0")
    try:
        check_url_ttl(args.artifact_url_ttl_s)
    except ValueError as err:
        raise CliError(f"--artifact-url-ttl-s: {err}") from err
    if args.artifacts_s3 is not None:
        try:  # the URL and the environment's settings; no request is made
            S3Config.from_env(args.artifacts_s3)
        except ArtifactConfigError as err:
            raise CliError(f"--artifacts-s3: {err}") from err
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    settings = ControlSettings(database_url=url, state_dir=state,
                               tracking_uri=args.tracking_uri, shadow_s=args.shadow_s,
                               poll_s=args.poll_s,
                               policy=rollout.GatePolicy(bake_s=args.bake_s),
                               artifacts_s3=args.artifacts_s3,
                               artifact_url_ttl_s=args.artifact_url_ttl_s)
    try:
        app = create_app(settings)
    except (ValueError, ArtifactError) as err:  # bad settings, or S3 out of reach at start
        raise CliError(str(err)) from err
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                access_log=args.access_log)
    return 0
