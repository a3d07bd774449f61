"""`edgefleet fleet`: the operators' client of the control plane.

    edgefleet fleet devices [--target site=plant-a]
    edgefleet fleet enrollment-token --label site=plant-a [--group line-2] [--ttl-s 86400]
    edgefleet fleet deploy --model NAME@champion --target site=plant-a --waves 1,10%,50%,100%
    edgefleet fleet status [DEPLOYMENT] [--once] [--json]   a live table of the rollout
    edgefleet fleet pause|resume|abort|rollback DEPLOYMENT

It reads $EDGEFLEET_CONTROL_URL (default http://127.0.0.1:8700) and
$EDGEFLEET_CONTROL_TOKEN (an operator or admin token).

Exit status: 0 done; 1 the control plane refused (its reason on stderr) or the deployment
shown ended rolled back; 2 usage or connection errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["DEFAULT_URL", "add_arguments", "run"]

DEFAULT_URL = "http://127.0.0.1:8700"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    devices = sub.add_parser("devices", help="list the fleet's devices")
    devices.add_argument("--target", default="*", help="selector, e.g. site=plant-a")
    devices.add_argument("--json", action="store_true")
    token = sub.add_parser("enrollment-token",
                           help="a one-time token a gateway enrolls with (edgefleet agent "
                           "enroll); it prints only the token")
    token.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                       help="a label the device gets (repeatable)")
    token.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    token.add_argument("--ttl-s", type=float, default=24 * 3600.0)
    deploy = sub.add_parser("deploy", help="roll a model version out in waves")
    deploy.add_argument("--model", required=True, help="NAME@ALIAS or NAME/VERSION")
    deploy.add_argument("--target", default="*", help="selector, e.g. site=plant-a")
    deploy.add_argument("--waves", default="1,10%,50%,100%")
    deploy.add_argument("--bake-s", type=float, default=None)
    deploy.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="a live table of a rollout (default: the active)")
    status.add_argument("deployment", nargs="?")
    status.add_argument("--once", action="store_true", help="print once and exit")
    status.add_argument("--json", action="store_true", help="print once, as JSON")
    for action in ("pause", "resume", "abort", "rollback"):
        one = sub.add_parser(action, help=f"{action} a deployment")
        one.add_argument("deployment")


def run(args: argparse.Namespace) -> int:
    import httpx

    from edgefleet.deploy.cli import CliError

    url = os.environ.get("EDGEFLEET_CONTROL_URL", DEFAULT_URL).rstrip("/")
    token = os.environ.get("EDGEFLEET_CONTROL_TOKEN")
    if not token:
        raise CliError("set EDGEFLEET_CONTROL_TOKEN to an operator token")
    with httpx.Client(base_url=url, timeout=30.0,
                      headers={"Authorization": f"Bearer {token}"}) as http:
        try:
            return _fleet(args, http)
        except httpx.TransportError as err:
            raise CliError(f"cannot reach the control plane at {url}: {err}") from err


def _call(http: Any, method: str, path: str, **kwargs: Any) -> Any:
    from edgefleet.deploy.cli import CliError

    response = http.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise CliError(f"{method} {path}: HTTP {response.status_code}: {detail}", 1)
    return response.json() if response.content else {}


def _fleet(args: argparse.Namespace, http: Any) -> int:
    from edgefleet.deploy.cli import CliError
    if args.action == "devices":
        devices = _call(http, "GET", "/v1/devices", params={"target": args.target})["devices"]
        print(json.dumps(devices) if args.json else _devices_table(devices))
        return 0
    if args.action == "enrollment-token":
        labels = {}
        for item in args.label:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--label {item!r}: expected KEY=VALUE")
            labels[key] = value
        made = _call(http, "POST", "/v1/enrollment-tokens",
                     json={"labels": labels, "groups": args.group, "ttl_s": args.ttl_s})
        print(made["token"])
        return 0
    if args.action == "deploy":
        body: dict[str, Any] = {"model": args.model, "target": args.target,
                                "waves": args.waves, "requested_by": "edgefleet fleet deploy"}
        if args.bake_s is not None:
            body["policy"] = {"bake_s": args.bake_s}
        created = _call(http, "POST", "/v1/deployments", json=body)
        print(json.dumps(created) if args.json else
              f"deployment {created['id']}: {created['model']} → {created['target']}, "
              f"{created['state']}")
        return 0
    if args.action == "status":
        return _status(args, http)
    changed = _call(http, "POST", f"/v1/deployments/{args.deployment}/{args.action}")
    print(f"deployment {changed['id']}: {changed['state']}")
    return 0


def _status(args: argparse.Namespace, http: Any) -> int:
    from edgefleet.deploy.cli import CliError

    deployment_id = args.deployment
    if deployment_id is None:
        active = _call(http, "GET", "/v1/deployments", params={"active": True})["deployments"]
        if not active:
            recent = _call(http, "GET", "/v1/deployments")["deployments"]
            if not recent:
                raise CliError("no deployments yet", 1)
            active = recent[:1]
        deployment_id = active[0]["id"]
    live = not (args.once or args.json) and sys.stdout.isatty()
    while True:
        view = _call(http, "GET", f"/v1/deployments/{deployment_id}")
        if args.json:
            print(json.dumps(view))
            break
        table = _status_table(view)
        print(("\x1b[H\x1b[2J" if live else "") + table, flush=True)
        if not live or view["state"] in ("succeeded", "rolled_back", "aborted"):
            break
        time.sleep(1.0)
    return 1 if view["state"] == "rolled_back" else 0


def _status_table(view: dict[str, Any]) -> str:
    p = view["progress"]
    lines = [f"deployment {view['id']}  {view['model']} → {view['target']}  "
             f"state {view['state']}  wave {p.get('wave')}/{p.get('waves')}  "
             f"{p.get('percent', 0)} %",
             f"{'wave':>4}  {'devices':>7}  {'pending':>7}  {'applied':>7}  {'passed':>7}  "
             f"{'failed':>6}  {'rolled back':>11}"]
    for i, wave in enumerate(p.get("per_wave", []), 1):
        lines.append(f"{i:>4}  {wave.get('devices', 0):>7}  {wave.get('pending', 0):>7}  "
                     f"{wave.get('applied', 0):>7}  {wave.get('passed', 0):>7}  "
                     f"{wave.get('failed', 0):>6}  {wave.get('rolled_back', 0):>11}")
    lines += [f"reason: {r}" for r in p.get("reasons", [])]
    return "\n".join(lines)


def _devices_table(devices: list[dict[str, Any]]) -> str:
    lines = [f"{'device':<20} {'online':<7} {'model':<28} {'desired':<28} {'state':<12} labels"]
    for d in devices:
        labels = " ".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        lines.append(f"{d['device']:<20} {'yes' if d['online'] else 'no':<7} "
                     f"{d['current_model'] or '-':<28} {d['desired_model'] or '-':<28} "
                     f"{d['state']:<12} {labels}")
    return "\n".join(lines)
