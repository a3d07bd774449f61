"""`edgefleet bench rollout`: a staged rollout to a simulated fleet, the desired-state
endpoint's throughput and an automatic rollback, against `edgefleet control run`.

Set-up (embedded, nothing to start): a sqlite MLflow registry in a temp folder with three
genuine ONNX models of one name (`build_zscore_model` v1 and v2, and `build_nan_model`
v3), a control plane child process (`ControlProcess`: SQLite database, `--bake-s 0`,
`--poll-s` = the agents' poll interval) and `EDGEFLEET_BENCH_AGENTS` simulated agents
(`SimulatedFleet`: the real agent's ModelUpdater/FleetClient/ModelStore in one asyncio
loop of this process). The fleet first runs v1 (one wave of 100 %, not measured).

The simulated agents' model stores live in memory (`/dev/shm`, where there is one): each
real gateway writes and fsyncs its store on a disk of its own, while a thousand simulated
stores on one shared disk queue every fsync behind the others' (measured: the large waves
took 30-40 s instead of 15-20 s), which would measure this box's disk, not the rollout.

Figures (one JSON object):

* `converge_s`: v2 over v1 in the waves `1,10%,50%,100%`: from the deployment's creation
  to "succeeded" (every agent applied it with passing shadow stats), with the agents
  polling every `EDGEFLEET_BENCH_POLL_S` s (default 5). Bake time is 0 (`--bake-s 0`), so
  none is counted; the configured shadow (`shadow_s`, `EDGEFLEET_BENCH_SHADOW_S`, default
  2 s) is, once per wave, since each agent shadows before it applies.
  `wave_s` lists each wave's duration; `converge_reports_per_s` and `converge_polls_per_s`
  the control plane's load meanwhile; `control_cpu_share` its CPU time / wall time
  during the rollout (≈1.0: one core saturated, the GIL's limit), `fleet_cpu_share` the
  simulated fleet's.
* `rollback_s`: v3 over v2, in the same waves; v3 is a servable model that turns NaN on
  spikes in the live data. Once its fourth wave starts, every agent's data gets a spike
  row every third batch: the fourth wave's shadows then score NaN and fail the gate. The
  figure runs from the deployment first seen "rolling_back" to "rolled_back" (every agent
  that ran v3 reported v2 again); `rollback_agents` is how many agents had run v3 then,
  `rollback_fleet_s` when the fleet itself saw every agent serve v2 again.
* `desired_state_rps`: with the fleet stopped, `EDGEFLEET_BENCH_CLIENTS` (default 32)
  keep-alive connections send
  `GET /v1/device/desired` with each agent's token and
  `If-None-Match` (all answered 304) for `EDGEFLEET_BENCH_RPS_SECONDS` (default 10) s; the
  median of 3 bursts (`desired_state_rps_bursts`). `desired_200_rps`: the same without
  If-None-Match (full answers). `report_rps`: `POST /v1/device/report`, no deployment
  active. `p50_ms`/`p99_ms` of the 304 bursts.
* `control_rss_mb` (after everything), `enroll_s`, `agents`, `cpus`,
  `report_engine_ms`: what one device report costs the engine for a deployment of this
  fleet's size (from_dict, the devices' reports read, step, to_dict), timed on a copy of
  the control plane's database after the run — the O(fleet) work done per report.

The load generator for the rps figures is a minimal asyncio HTTP/1.1 client (not httpx),
so that on a small box the client side costs little of the CPU the server needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["bench_rollout"]

NAME: Final = "line-anomaly"
WAVES: Final = "1,10%,50%,100%"
# The latency gate is relaxed: hundreds of simulated agents share this process's GIL and
# the box's cores, so a candidate's measured p99 is the simulator's contention (5-10 ms
# seen at 200 agents on 2 cores), not the model's (~20 µs).
LATENCY_GATE_US: Final = 1_000_000.0


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _spec() -> Any:
    from edgefleet.protocols.features import FeatureSpec

    return FeatureSpec(tags=("temp", "vib"), window=4, stats=("mean", "std"))


def build_models(folder: Path) -> list[Path]:
    """v1 (means 0), v2 (means 0.1), v3 (NaN on live spikes); stds 1; for `_spec()`."""
    from edgefleet.cloud.reference_models import build_zscore_model

    from .harness import build_nan_model

    spec = _spec()
    width = len(spec.feature_names())
    folder.mkdir(parents=True, exist_ok=True)
    return [
        build_zscore_model(folder / "v1.onnx", spec, means=[0.0] * width, stds=[1.0] * width,
                           name=NAME, version="zscore-1"),
        build_zscore_model(folder / "v2.onnx", spec, means=[0.1] * width, stds=[1.0] * width,
                           name=NAME, version="zscore-2"),
        build_nan_model(folder / "v3.onnx", spec, means=[0.0] * width, stds=[1.0] * width,
                        trigger_above=5.5, name=NAME, version="zscore-nan"),
    ]


class _Operator:
    """The operator's side: deployments over the API, followed by polling."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, headers=headers, timeout=60.0)

    def deploy(self, model: str, waves: str, **policy: Any) -> str:
        answer = self.http.post("/v1/deployments", json={
            "model": model, "target": "*", "waves": waves,
            "policy": {"apply_timeout_s": 600.0, "max_latency_p99_us": LATENCY_GATE_US,
                       **policy}})
        if answer.status_code != 201:
            raise RuntimeError(f"deploy {model}: {answer.status_code} {answer.text[:300]}")
        return str(answer.json()["id"])

    def view(self, deployment: str) -> dict[str, Any]:
        answer = self.http.get(f"/v1/deployments/{deployment}")
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        found = {}
        for name in ("reports_total", "desired_requests_total"):
            match = re.search(rf"^edgefleet_control_{name} (\S+)$", text, re.MULTILINE)
            found[name] = float(match.group(1)) if match else 0.0
        return found

    def follow(self, deployment: str, timeout_s: float,
               on_view: Callable[[dict[str, Any], float], None] | None = None,
               every_s: float = 0.1) -> dict[str, Any]:
        """Poll until the deployment ends; `on_view(view, monotonic time)` sees each."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.view(deployment)
            if on_view is not None:
                on_view(view, time.monotonic())
            if view["state"] in ("succeeded", "rolled_back", "aborted"):
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {deployment} still {view['state']} after "
                                   f"{timeout_s} s: {view['progress']}")
            time.sleep(every_s)

    def close(self) -> None:
        self.http.close()


def bench_rollout() -> dict[str, Any]:
    agents = int(os.environ.get("EDGEFLEET_BENCH_AGENTS", 1000))
    poll_s = _env_float("EDGEFLEET_BENCH_POLL_S", 5.0)
    shadow_s = _env_float("EDGEFLEET_BENCH_SHADOW_S", 2.0)
    rps_seconds = _env_float("EDGEFLEET_BENCH_RPS_SECONDS", 10.0)
    clients = int(os.environ.get("EDGEFLEET_BENCH_CLIENTS", 32))
    figures: dict[str, Any] = {"agents": agents, "poll_s": poll_s, "shadow_s": shadow_s,
                               "bake_s": 0.0, "cpus": os.cpu_count() or 0}
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    from .simfleet import memory_tempdir

    stores = memory_tempdir("edgefleet-bench-stores-")
    figures["stores_on"] = _filesystem(stores)
    try:
        _run(tmp, stores, agents, poll_s, shadow_s, rps_seconds, clients, figures)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stores, ignore_errors=True)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


def _filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and \
                    len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def _run(tmp: Path, stores: Path, agents: int, poll_s: float, shadow_s: float,
         rps_seconds: float, clients: int, figures: dict[str, Any]) -> None:
    from .harness import ControlProcess, build_registry
    from .simfleet import SimulatedFleet

    uri = build_registry(tmp / "mlflow", NAME, build_models(tmp / "models"))
    control = ControlProcess(tmp / "control", tracking_uri=uri, shadow_s=shadow_s,
                             poll_s=poll_s, bake_s=0.0).start()
    operator: _Operator | None = None
    fleet: SimulatedFleet | None = None
    try:
        operator = _Operator(control.url, control.operator_headers())
        fleet = SimulatedFleet(control.url, control.public_key_text(), stores, agents,
                               features=_spec(), poll_s=poll_s, observe_s=0.5,
                               spike_value=7.0, max_connections=32)
        started = time.monotonic()
        asyncio.run(fleet.enroll_all(control.operator_headers()))
        figures["enroll_s"] = time.monotonic() - started
        _say(f"{agents} agents enrolled in {figures['enroll_s']:.1f} s")
        fleet.start()

        # The fleet on v1 first (one wave; not a figure).
        started = time.monotonic()
        view = operator.follow(operator.deploy(f"{NAME}/1", "100%"), timeout_s=600)
        _expect(view, "succeeded", fleet.models(), f"{NAME}/1")
        figures["initial_v1_s"] = time.monotonic() - started
        _say(f"the fleet runs v1 after {figures['initial_v1_s']:.1f} s")

        figures.update(_converge(control, operator, fleet))
        _say(f"v2 converged in {figures['converge_s']:.1f} s")
        figures.update(_rollback(operator, fleet))
        _say(f"v3 rolled back in {figures['rollback_s']:.1f} s")
        fleet.stop()
        tokens = list(fleet.tokens().values())
        fleet = None
        figures.update(asyncio.run(_rps(control.url, tokens, rps_seconds, clients)))
        figures["control_rss_mb"] = control.rss_bytes() / 2**20
    finally:
        if fleet is not None:
            with contextlib.suppress(Exception):
                fleet.stop()
        if operator is not None:
            operator.close()
        control.stop()
    with contextlib.suppress(Exception):  # a breakdown, not a headline figure
        figures["report_engine_ms"] = _engine_cost(control.state_dir / "control.db")


def _say(text: str) -> None:
    print(f"bench rollout: {text}", file=sys.stderr, flush=True)


def _expect(view: dict[str, Any], state: str, models: dict[str, str | None],
            model: str) -> None:
    if view["state"] != state:
        raise RuntimeError(f"deployment {view['id']} ended {view['state']}, expected "
                           f"{state}: {view['progress']['reasons']}")
    off = {a: m for a, m in models.items() if m != model}
    if off:
        raise RuntimeError(f"{len(off)} agent(s) do not serve {model}: "
                           f"{dict(list(off.items())[:5])}")


def _converge(control: Any, operator: _Operator, fleet: Any) -> dict[str, Any]:
    waves: list[float] = []

    def on_view(view: dict[str, Any], at: float) -> None:
        while len(waves) < view["progress"]["wave"]:
            waves.append(at)

    before = operator.metrics()
    cpu_control, cpu_fleet = control.cpu_seconds(), time.process_time()
    started = time.monotonic()
    deployment = operator.deploy(f"{NAME}/2", WAVES)
    view = operator.follow(deployment, timeout_s=1800, on_view=on_view)
    ended = time.monotonic()
    # Every agent applied (the deployment succeeded); the fleet's own view agrees once the
    # last report's swap is recorded, which happens before that report is sent.
    _expect(view, "succeeded", fleet.models(), f"{NAME}/2")
    wall = ended - started
    after = operator.metrics()
    waves[0] = started
    bounds = [*waves, ended]
    return {
        "converge_s": wall,
        "wave_s": [round(b - a, 2) for a, b in itertools.pairwise(bounds)],
        "converge_reports_per_s": (after["reports_total"] - before["reports_total"]) / wall,
        "converge_polls_per_s": (after["desired_requests_total"]
                                 - before["desired_requests_total"]) / wall,
        "control_cpu_share": (control.cpu_seconds() - cpu_control) / wall,
        "fleet_cpu_share": (time.process_time() - cpu_fleet) / wall,
    }


def _rollback(operator: _Operator, fleet: Any) -> dict[str, Any]:
    marks: dict[str, Any] = {}

    def on_view(view: dict[str, Any], at: float) -> None:
        progress = view["progress"]
        if progress["wave"] >= len(progress["per_wave"]) and "spikes" not in marks:
            fleet.set_spikes(None, True)  # the plant's data changes under the last wave
            marks["spikes"] = at
        if view["state"] == "rolling_back" and "rolling_back" not in marks:
            marks["rolling_back"] = at
            marks["agents"] = progress["rollback_waiting"]
        if "rolling_back" in marks and "fleet_back" not in marks and \
                all(m == f"{NAME}/2" for m in fleet.models().values()):
            marks["fleet_back"] = at

    deployment = operator.deploy(f"{NAME}/3", WAVES)
    view = operator.follow(deployment, timeout_s=1800, on_view=on_view, every_s=0.05)
    ended = time.monotonic()
    fleet.set_spikes(None, False)
    if view["state"] != "rolled_back" or "rolling_back" not in marks:
        raise RuntimeError(f"the NaN model was not rolled back: {view['state']} "
                           f"{view['progress']['reasons']}")
    deadline = time.monotonic() + 120
    while "fleet_back" not in marks:
        if all(m == f"{NAME}/2" for m in fleet.models().values()):
            marks["fleet_back"] = time.monotonic()
        elif time.monotonic() > deadline:
            raise RuntimeError("agents still serve the NaN model after the rollback")
        time.sleep(0.05)
    reasons = view["progress"]["reasons"]
    return {
        "rollback_s": ended - marks["rolling_back"],
        "rollback_fleet_s": marks["fleet_back"] - marks["rolling_back"],
        "rollback_agents": marks["agents"],
        "rollback_reason": reasons[0][:160] if reasons else "",
    }


# --- desired-state throughput -------------------------------------------------------------


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(match.group(1)) if match else 0
    if length and status not in (204, 304):  # no body, whatever the headers say
        await reader.readexactly(length)
    return status


async def _burst(url: str, requests: Sequence[bytes], seconds: float,
                 connections: int) -> dict[str, Any]:
    """`connections` keep-alive connections send `requests` round-robin for `seconds`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(number: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            index = number
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                status = await _request(reader, writer, requests[index % len(requests)])
                latencies.append(time.perf_counter() - sent)
                statuses[status] = statuses.get(status, 0) + 1
                index += connections
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    started = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(connections)))
    wall = time.monotonic() - started
    latencies.sort()
    done = len(latencies)
    return {"rps": done / wall, "statuses": statuses,
            "p50_ms": 1000 * latencies[done // 2] if done else None,
            "p99_ms": 1000 * latencies[min(done - 1, int(done * 0.99))] if done else None}


async def _rps(url: str, tokens: list[str], seconds: float, connections: int
               ) -> dict[str, Any]:
    import httpx

    host = urlsplit(url).netloc
    etags: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        for token in tokens:
            answer = await http.get("/v1/device/desired",
                                    headers={"Authorization": f"Bearer {token}"})
            etags.append(answer.headers["ETag"])

    def get(token: str, etag: str | None) -> bytes:
        extra = f"If-None-Match: {etag}\r\n" if etag else ""
        return (f"GET /v1/device/desired HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {token}\r\n{extra}\r\n").encode()

    def report(token: str) -> bytes:
        body = (b'{"generation":0,"current":"' + NAME.encode() + b'/2","previous":"'
                + NAME.encode() + b'/1","state":"applied","reason":"bench"}')
        return (f"POST /v1/device/report HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    conditional = [get(t, e) for t, e in zip(tokens, etags, strict=True)]
    bursts = [await _burst(url, conditional, seconds, connections) for _ in range(3)]
    middle = sorted(bursts, key=lambda b: b["rps"])[1]
    if set(middle["statuses"]) != {304}:
        raise RuntimeError(f"desired-state burst: statuses {middle['statuses']}, expected "
                           "304 only")
    full = await _burst(url, [get(t, None) for t in tokens], seconds / 2, connections)
    reports = await _burst(url, [report(t) for t in tokens], seconds / 2, connections)
    return {
        "desired_state_rps": middle["rps"],
        "desired_state_rps_bursts": [round(b["rps"]) for b in bursts],
        "desired_state_p50_ms": middle["p50_ms"],
        "desired_state_p99_ms": middle["p99_ms"],
        "desired_200_rps": full["rps"],
        "report_rps": reports["rps"],
        "report_statuses": {str(k): v for k, v in reports["statuses"].items()},
        "rps_clients": connections,
    }


# --- the engine's share of one report -----------------------------------------------------


def _engine_cost(database: Path) -> dict[str, float]:
    """Median ms of each part of the work a report does for an active deployment of the
    bench's size, replayed on a copy of the database (nothing is written back)."""
    from sqlalchemy import select

    from . import rollout
    from .app import _reports
    from .db import DeploymentRow
    from .schema import connect

    copy = database.with_name("engine-copy.db")
    shutil.copy(database, copy)
    engine = connect(f"sqlite:///{copy}")
    parts: dict[str, list[float]] = {"from_dict": [], "read_reports": [], "step": [],
                                     "to_dict": []}
    try:
        with engine.connect() as conn:
            from sqlalchemy.orm import Session

            with Session(conn) as db:
                row = db.scalars(select(DeploymentRow).order_by(
                    DeploymentRow.created_at.desc())).first()
                assert row is not None
                for _ in range(5):
                    t0 = time.perf_counter()
                    plan = rollout.Deployment.from_dict(row.plan)
                    t1 = time.perf_counter()
                    reports = _reports(db, plan)
                    t2 = time.perf_counter()
                    result = rollout.step(plan, reports, plan.updated_at + 1)
                    t3 = time.perf_counter()
                    result.deployment.to_dict()
                    t4 = time.perf_counter()
                    db.expire_all()
                    for key, a, b in (("from_dict", t0, t1), ("read_reports", t1, t2),
                                      ("step", t2, t3), ("to_dict", t3, t4)):
                        parts[key].append(1000 * (b - a))
    finally:
        engine.dispose()
        copy.unlink(missing_ok=True)
    return {k: round(statistics.median(v), 2) for k, v in parts.items()}
