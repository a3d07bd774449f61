"""`edgefleet demo`: the plant, three edge agents and the fog gateway, as users run them.

What runs (the first two steps of the end-to-end demo; no control plane or training yet):

1. the stack. `--stack embedded` (the default) installs and starts no server: an in-process
   MQTT broker (amqtt) for the plant's MQTT assets, and the fog gateway stores into SQLite.
   `--stack real` starts PostgreSQL, Mosquitto and Kafka with the launcher
   (`edgefleet services`) in a private folder; the plant's MQTT line gets its own
   ACL-confined Mosquitto account;
2. the simulated plant (`firmware-sim`, in a thread of this process): assets served over
   Modbus TCP, OPC UA and MQTT, with labelled anomaly episodes written to a JSONL file;
3. the fog gateway, `edgefleet fog run`, as a child process: embedded (HTTP ingest straight
   into SQLite) or Kafka mode (ingest → Kafka → sink workers → PostgreSQL); one bearer
   token per device;
4. three edge agents, `edgefleet agent run`, one per protocol, each with its own device
   name, token, config file and SQLite buffer, reading its share of the plant and
   forwarding batches over HTTP. After `--seconds` they get SIGTERM and drain;
5. the report, from the fog's store: per device rows received, expected, missing and
   duplicated (completeness), readings per protocol, each agent's last heartbeat, and the
   anomaly episodes the plant injected. The exit status is 0 only if every device is
   100 % complete: the fog holds every seq its agent's buffer committed, once.

SIGTERM (or Ctrl-C) stops everything the demo started (exit status 128 + signal);
`--keep` leaves the demo folder (and with `--stack real` the services) in place.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from edgefleet.deploy.demo_plant import DemoPlant
    from edgefleet.deploy.services import Launcher
    from edgefleet.edge_agent.harness import AgentProcess
    from edgefleet.fog_gateway.harness import FogProcess
    from edgefleet.fog_gateway.store import Completeness, Store

__all__ = ["AGENTS", "add_arguments", "run"]

# protocol -> the device name of the agent that reads it
AGENTS: Final = {"modbus": "edge-modbus", "opcua": "edge-opcua", "mqtt": "edge-mqtt"}
PLANT_MQTT_ACCOUNT: Final = "plant-mqtt"  # the plant's MQTT line on Mosquitto (--stack real)
REAL_SERVICES: Final = ("postgres", "mosquitto", "kafka")
PROGRESS_EVERY_S: Final = 10.0
SINK_CATCH_UP_S: Final = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", choices=("embedded", "real"), default="embedded",
                        help="embedded: no servers (in-process MQTT broker, SQLite); real: "
                             "PostgreSQL, Mosquitto and Kafka from `edgefleet services` "
                             "(%(default)s)")
    parser.add_argument("--assets", type=int, default=12,
                        help="simulated assets, spread over Modbus, OPC UA, MQTT (%(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long the agents read the plant (%(default)s)")
    parser.add_argument("--time-scale", type=float, default=60.0,
                        help="simulated seconds per wall second (%(default)s)")
    parser.add_argument("--anomaly-rate", type=float, default=0.3,
                        help="share of each asset's time in an anomaly episode (%(default)s)")
    parser.add_argument("--seed", type=int, default=7, help="the plant's seed (%(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the demo folder (and with --stack real the services)")


def say(line: str) -> None:
    print(line, flush=True)  # progress must show while the demo runs, also through a pipe


def run(args: argparse.Namespace) -> int:
    if args.assets < len(AGENTS):
        say(f"edgefleet demo: --assets must be at least {len(AGENTS)} (one per protocol)")
        return 2
    if args.seconds <= 0:
        say("edgefleet demo: --seconds must be positive")
        return 2
    demo = Demo(args)

    def on_signal(signum: int, frame: object) -> None:
        if demo.stopping:
            return  # already cleaning up: let it finish
        raise SystemExit(128 + signum)  # unwinds through `finally`: everything is stopped

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # Ctrl-C: the same, and a second one waits
    try:
        return demo.run()
    except DemoFailed as err:
        say(f"edgefleet demo: {err}")
        return 1
    finally:
        demo.close()


@dataclass
class DeviceReport:
    device: str
    protocol: str
    committed: int  # the last seq the agent's buffer committed: the fog should hold 1..this
    exit_code: int | None
    readings: int = 0  # plant readings stored (heartbeat gauges not counted)
    assets: int = 0
    row: Completeness | None = None

    @property
    def complete(self) -> bool:
        row = self.row
        return (row is not None and self.committed > 0 and self.readings > 0
                and row.missing == 0 and row.received == row.expected == self.committed)


class Demo:
    """Everything one demo run starts, so that `close` can stop exactly that."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.real = args.stack == "real"
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-", dir="/tmp"))
        self.launcher: Launcher | None = None
        self.plant: DemoPlant | None = None
        self.fog: FogProcess | None = None
        self.agents: dict[str, AgentProcess] = {}  # device -> process
        self.heartbeats: dict[str, dict[str, Any]] = {}  # device -> its last device_status
        self.store_url = ""
        self.stopping = False
        self.t0 = time.monotonic()

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> int:
        import logging

        # asyncua warns about its own defaults (plaintext-password endpoints on the
        # simulator's None-security endpoint, session timeouts the server shortened).
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        # While the agents start, the 2-core machine is busy and the simulator's updates run
        # late; it catches up by wall time, so the readings are still right: not news here.
        logging.getLogger("edgefleet.firmware_sim.runner").setLevel(logging.ERROR)
        env = self._start_stack()
        self._start_plant(env)
        fog_dir = self.workdir / "fog"
        tokens = self._add_devices(fog_dir)
        self._start_fog(fog_dir, env)
        self._start_agents(tokens)
        self._read_plant()
        exits = self._stop_agents()
        reports = self._collect(exits)
        return self._report(reports)

    def _start_stack(self) -> dict[str, str]:
        if not self.real:
            say("1/5 embedded stack: no servers to install (in-process MQTT broker for the "
                "plant, SQLite store for the fog gateway)")
            return {}
        from edgefleet.deploy.services import Launcher

        self.workdir.chmod(0o755)  # the services' system users must reach the stack folder
        self.launcher = Launcher(self.workdir / "stack")
        say(f"1/5 starting real services: {', '.join(REAL_SERVICES)} "
            f"(edgefleet services, in {self.launcher.root})")
        from edgefleet.deploy.services.base import LauncherError

        try:
            return self.launcher.up(only=REAL_SERVICES, progress=True)
        except LauncherError as err:
            raise DemoFailed(f"the services did not start: {err}") from err

    def _start_plant(self, env: dict[str, str]) -> None:
        from urllib.parse import quote, urlsplit

        from edgefleet.deploy.demo_plant import DemoPlant, MqttLine, free_port

        broker_port: int | None = None
        if self.launcher is not None:
            password = self.launcher.add_mqtt_device(PLANT_MQTT_ACCOUNT)
            broker = urlsplit(env["EDGEFLEET_MQTT_URL"])
            line = MqttLine(
                f"mqtt://{PLANT_MQTT_ACCOUNT}:{quote(password, safe='')}@"
                f"{broker.hostname}:{broker.port}",
                f"edgefleet/devices/{PLANT_MQTT_ACCOUNT}/{{asset}}/telemetry")
            where = f"Mosquitto, account {PLANT_MQTT_ACCOUNT}"
        else:
            broker_port = free_port()
            line = MqttLine(f"mqtt://127.0.0.1:{broker_port}", "plant/{asset}/telemetry")
            where = f"in-process broker on 127.0.0.1:{broker_port}"
        self.plant = DemoPlant.generate(
            self.args.assets, self.workdir / "labels.jsonl", line,
            time_scale=self.args.time_scale, anomaly_rate=self.args.anomaly_rate,
            seed=self.args.seed, embedded_broker_port=broker_port)
        counts = ", ".join(f"{len(self.plant.assets_on(p))} {label}" for p, label in
                           (("modbus", "Modbus TCP"), ("opcua", "OPC UA"), ("mqtt", "MQTT")))
        say(f"2/5 simulated plant: {self.args.assets} assets ({counts}; MQTT via {where}), "
            f"{self.args.time_scale:g}x simulated time, anomaly rate {self.args.anomaly_rate:g}")
        from edgefleet.deploy.demo_plant import PlantError

        try:
            self.plant.start()
        except PlantError as err:
            raise DemoFailed(str(err)) from err

    def _add_devices(self, fog_dir: Path) -> dict[str, str]:
        from edgefleet.fog_gateway.auth import add_device

        fog_dir.mkdir(mode=0o700)
        return {device: add_device(fog_dir / "tokens.json", device)
                for device in AGENTS.values()}

    def _start_fog(self, fog_dir: Path, env: dict[str, str]) -> None:
        from edgefleet.fog_gateway.harness import FogProcess

        settings: dict[str, Any] = {"tokens_file": str(fog_dir / "tokens.json")}
        if self.real:
            self.store_url = env["EDGEFLEET_PG_URL"]
            settings |= {"store": self.store_url,
                         "kafka": {"bootstrap": env["EDGEFLEET_KAFKA_BOOTSTRAP"],
                                   "partitions": 3},
                         "sink": {"workers": 2}}
            mode = "Kafka mode: ingest → Kafka → 2 sink workers → PostgreSQL"
        else:
            self.store_url = f"sqlite://{fog_dir / 'fog.db'}"  # fog_dir is absolute
            settings["store"] = self.store_url
            mode = "embedded mode: ingest → SQLite"
        self.fog = FogProcess(fog_dir, settings)
        try:
            self.fog.start()
        except (RuntimeError, TimeoutError) as err:
            raise DemoFailed(str(err)) from err
        say(f"3/5 fog gateway (edgefleet fog run) on {self.fog.base_url}, {mode}; "
            f"tokens for {', '.join(AGENTS.values())}")

    def _start_agents(self, tokens: dict[str, str]) -> None:
        from edgefleet.edge_agent.harness import AgentProcess, write_agent_config

        assert self.plant is not None and self.fog is not None
        agents_dir = self.workdir / "agents"
        agents_dir.mkdir(mode=0o700)  # tokens and broker logins live here
        for protocol, device in AGENTS.items():
            folder = agents_dir / device
            folder.mkdir(mode=0o700)
            token_file = folder / "fog-token"
            token_file.write_text(tokens[device], encoding="utf-8")
            token_file.chmod(0o600)
            config = write_agent_config(
                folder, fog_url=self.fog.url, device=device,
                sources=self.plant.agent_sources(protocol),
                fog={"token_file": str(token_file), "batch_max_wait_s": 0.5},
                heartbeat={"interval_s": 5.0}, drain_timeout_s=30.0)
            config.chmod(0o600)
            self.agents[device] = AgentProcess(config)
        for agent in self.agents.values():  # each is a process of its own: start them together
            self._spawn(agent)
        for device, agent in self.agents.items():
            _wait_ready(agent, device)

    def _spawn(self, agent: AgentProcess) -> None:
        with agent.log_path.open("ab") as log_file:
            agent.process = subprocess.Popen(
                [agent.python, "-m", "edgefleet.deploy.cli", "agent", "run",
                 "--config", str(agent.config)],
                stdout=log_file, stderr=log_file, env=agent.env)

    def _read_plant(self) -> None:
        from edgefleet.fog_gateway.store import open_store

        seconds = self.args.seconds
        say(f"4/5 3 edge agents (edgefleet agent run) read the plant for {seconds:g} s and "
            f"forward to the fog over HTTP: {', '.join(f'{d} ({p})' for p, d in AGENTS.items())}")
        store = open_store(self.store_url)
        try:
            start = time.monotonic()
            deadline = start + seconds
            next_progress = start + min(PROGRESS_EVERY_S, seconds)
            while (now := time.monotonic()) < deadline:
                self._check_children()
                time.sleep(min(0.5, deadline - now))
                if time.monotonic() >= next_progress and time.monotonic() < deadline:
                    next_progress += PROGRESS_EVERY_S
                    landed = {row.device: row.received for row in _completeness(store)}
                    say(f"    {time.monotonic() - start:4.0f} s  rows landed: " + ", ".join(
                        f"{device} {landed.get(device, 0):,}" for device in AGENTS.values()))
        finally:
            store.close()

    def _check_children(self) -> None:
        for device, agent in self.agents.items():
            if agent.process is not None and agent.process.poll() is not None:
                raise DemoFailed(f"agent {device} exited with {agent.process.returncode}:\n"
                                 + agent.log()[-2000:])
        if self.fog is not None and self.fog.process is not None \
                and self.fog.process.poll() is not None:
            raise DemoFailed(f"the fog gateway exited with {self.fog.process.returncode}:\n"
                             + self.fog.log()[-2000:])

    def _stop_agents(self) -> dict[str, int | None]:
        say("    stopping the agents (SIGTERM): they drain their buffers to the fog")
        for agent in self.agents.values():
            if agent.process is not None and agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
        exits: dict[str, int | None] = {}
        for device, agent in self.agents.items():
            assert agent.process is not None
            try:
                exits[device] = agent.process.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                exits[device] = None
        return exits

    def _collect(self, exits: dict[str, int | None]) -> list[DeviceReport]:
        from edgefleet.fog_gateway.store import open_store

        reports = [DeviceReport(device, protocol, _committed_seq(self.agents[device]),
                                exits[device]) for protocol, device in AGENTS.items()]
        store = open_store(self.store_url)
        try:
            # Kafka mode: the sink may still be writing what the ingest accepted.
            deadline = time.monotonic() + SINK_CATCH_UP_S
            while True:
                rows = {row.device: row for row in _completeness(store)}
                caught_up = all(r.device in rows and rows[r.device].received >= r.committed
                                for r in reports)
                if caught_up or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            self.heartbeats = {status["device"]: status for status in store.device_status()}
        finally:
            store.close()
        readings = _readings_by_device(self.store_url)
        for report in reports:
            report.row = rows.get(report.device)
            report.readings, report.assets = readings.get(report.device, (0, 0))
        return reports

    def _report(self, reports: list[DeviceReport]) -> int:
        assert self.plant is not None
        store = "PostgreSQL, through Kafka" if self.real else "SQLite"
        say(f"5/5 report ({self.args.stack} stack; from the fog's store, {store})")
        say(f"  {'device':<12} {'protocol':<8} {'assets':>6} {'readings':>9} {'committed':>9} "
            f"{'received':>9} {'expected':>9} {'missing':>7} {'dups':>5} {'complete':>9}")
        for r in reports:
            row = r.row
            ratio = f"{100 * row.ratio:.1f} %" if row is not None else "-"
            say(f"  {r.device:<12} {r.protocol:<8} {r.assets:>6} {r.readings:>9,} "
                f"{r.committed:>9,} {row.received if row else 0:>9,} "
                f"{row.expected if row else 0:>9,} {row.missing if row else 0:>7,} "
                f"{row.duplicates if row else 0:>5,} {ratio:>9}")
        say("  (readings: the plant's samples; received also counts the agents' own "
            "heartbeat gauges; committed: the last seq each agent's buffer committed)")
        say("  readings by protocol  " + ", ".join(f"{r.protocol} {r.readings:,}"
                                                  for r in reports))
        for r in reports:
            beat = self.heartbeats.get(r.device)
            if beat is None:
                say(f"  heartbeat {r.device:<12} none received")
                continue
            say(f"  heartbeat {r.device:<12} agent {beat['agent_version']}, buffer depth "
                f"{beat['buffer_depth']}, uptime {float(beat['uptime_s'] or 0):.0f} s, "
                f"status {beat['status']}")
        by_kind = self.plant.episodes_by_kind()
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(by_kind.items())) or "none"
        simulated_min = self.args.seconds * self.args.time_scale / 60
        say(f"  anomaly episodes      {sum(by_kind.values())} injected over "
            f"{simulated_min:.0f} simulated minutes ({kinds})")
        say("                        ground truth: labels.jsonl in the demo folder "
            "(kept with --keep)")
        agent_exits = ", ".join(f"{r.device} {r.exit_code}" for r in reports)
        say(f"  agents' exit status   {agent_exits} (0: drained and stopped cleanly)")
        say(f"  elapsed               {time.monotonic() - self.t0:.1f} s")
        incomplete = [r.device for r in reports if not r.complete]
        if incomplete:
            say(f"  result                INCOMPLETE: {', '.join(incomplete)} (logs in "
                f"{self.workdir}; rerun with --keep to keep them)")
            return 1
        say(f"  result                completeness 100 % for all {len(reports)} devices: "
            "every reading the agents buffered landed in the fog exactly once")
        return 0

    # ---- stopping -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop what this run started, newest first; each step runs even if one fails."""
        self.stopping = True
        steps: list[tuple[str, Any]] = [
            *((f"agent {device}", _stopper(agent)) for device, agent in self.agents.items()),
            ("fog gateway", self.fog.stop if self.fog is not None else None),
            ("plant", self.plant.stop if self.plant is not None else None),
        ]
        if self.launcher is not None and not self.args.keep:
            steps.append(("services", self.launcher.down))
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception as err:  # noqa: BLE001 - keep stopping the rest
                print(f"edgefleet demo: stopping {name} failed: {err!r}", file=sys.stderr)
        if self.args.keep:
            say(f"demo folder kept: {self.workdir} (fog store, agents' configs, buffers and "
                "logs, labels.jsonl)")
            if self.launcher is not None:
                say(f"services left running: eval \"$(edgefleet services --dir "
                    f"{self.launcher.root} env)\"; stop them with `edgefleet services --dir "
                    f"{self.launcher.root} down`")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class DemoFailed(Exception):
    """A child process of the demo died; the message carries the end of its log."""


def _stopper(agent: AgentProcess) -> Any:
    def stop() -> None:
        if agent.process is not None and agent.process.poll() is None:
            agent.stop(timeout_s=40.0)  # SIGTERM: drains for at most its drain_timeout_s

    return stop


def _wait_ready(agent: AgentProcess, device: str, timeout_s: float = 60.0) -> None:
    from edgefleet.edge_agent.harness import READY_LINE

    assert agent.process is not None
    deadline = time.monotonic() + timeout_s
    while READY_LINE not in agent.log():
        if agent.process.poll() is not None:
            raise DemoFailed(f"agent {device} exited with {agent.process.returncode}:\n"
                             + agent.log()[-3000:])
        if time.monotonic() > deadline:
            raise DemoFailed(f"agent {device} not running after {timeout_s:g} s:\n"
                             + agent.log()[-3000:])
        time.sleep(0.05)


def _completeness(store: Store) -> list[Completeness]:
    from edgefleet.fog_gateway.store import StoreUnavailable

    try:
        return store.completeness()
    except StoreUnavailable:  # e.g. SQLite busy for a moment: the next look will do
        return []


def _committed_seq(agent: AgentProcess) -> int:
    """The last seq the agent's buffer committed (`max(next_seq) - 1`)."""
    path = agent.config.parent / "buffer.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        row = connection.execute("SELECT max(next_seq) - 1 FROM devices").fetchone()
    return int(row[0] or 0)


# The plant's readings: not the agents' heartbeat gauges (asset `agent`) and not
# inference outputs (tags `ml:…`).
_READINGS_SQL: Final = (
    "SELECT device, count(*), count(DISTINCT asset) FROM readings "
    "WHERE asset <> 'agent' AND tag NOT LIKE 'ml:%%' GROUP BY device"
)


def _readings_by_device(store_url: str) -> dict[str, tuple[int, int]]:
    """Per device: the plant's readings stored, and how many assets they came from."""
    if store_url.startswith("sqlite:///"):
        path = store_url.removeprefix("sqlite://")  # the absolute path
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(_READINGS_SQL).fetchall()
    else:
        import psycopg

        with psycopg.connect(store_url) as pg:
            rows = pg.execute(_READINGS_SQL).fetchall()
    return {str(device): (int(count), int(assets)) for device, count, assets in rows}
