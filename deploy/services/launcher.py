"""Start, stop and inspect the local real-services stack, all under one folder.

Layout of the folder (`--dir`, default `.edgefleet/services`):

    stack.json      marker and state: ports, pids, which services run (no secrets)
    secrets.json    generated passwords and keys, mode 0600, made at first `up`
    pki/            the stack's CA (ca.pem is what TLS clients trust)
    <service>/      each service's config, data and `service.log`

Contracts:
- `up` starts nothing unless every selected service's binary is installed and every
  pinned port is free; if any service fails to become ready, the ones already started
  are stopped again, so nothing is left half-started.
- A folder that is not empty and holds no `stack.json` is foreign and refused; so is a
  second `up` while the stack runs, and a folder whose last run did not stop cleanly
  (`down` clears that).
- `down` stops every service (its stop signal, then SIGKILL after a grace period) and
  then sweeps any process still carrying this folder's marker in its environment, so no
  orphan survives.
- Data, ports and secrets persist across `down`/`up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .base import LauncherError, NotReady, Service, StackContext, write_private
from .kafka import KafkaService
from .mlflow import MlflowService
from .mosquitto import MosquittoService
from .postgres import PostgresService
from .prometheus import PrometheusService
from .s3 import S3Service

__all__ = ["DEFAULT_DIR", "MARKER_ENV", "STACK", "Launcher", "ServiceStatus"]

# Start order: a service comes after everything it `requires`.
STACK: tuple[Service, ...] = (
    PostgresService(),
    MosquittoService(),
    KafkaService(),
    S3Service(),
    MlflowService(),
    PrometheusService(),
)
DEFAULT_DIR = Path(".edgefleet/services")
# Every service process carries this in its environment, so `down` can find stragglers.
MARKER_ENV = "EDGEFLEET_SERVICES_ROOT"
_STATE_FORMAT = "edgefleet-services/1"
_LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    detail: str


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes; reap it if it is our child.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _marked_pids(root: Path) -> list[int]:
    """Pids of live processes whose environment carries this stack's marker."""
    marker = f"{MARKER_ENV}={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


class Launcher:
    def __init__(self, root: Path = DEFAULT_DIR, services: Sequence[Service] = STACK) -> None:
        self.root = root.resolve()
        self.services = {service.name: service for service in services}
        self._state_path = self.root / "stack.json"
        self._secrets_path = self.root / "secrets.json"

    # ---- selection, state and secrets -------------------------------------------------

    def select(self, only: Iterable[str] | None) -> list[Service]:
        """The services to start, in start order, with what they require added."""
        if not only:
            return list(self.services.values())
        wanted: set[str] = set()
        pending = list(only)
        while pending:
            name = pending.pop()
            if name not in self.services:
                known = ", ".join(self.services)
                raise LauncherError(f"unknown service {name!r}; known: {known}")
            if name not in wanted:
                wanted.add(name)
                pending.extend(self.services[name].requires)
        return [service for name, service in self.services.items() if name in wanted]

    def _read_state(self) -> dict[str, object] | None:
        if not self._state_path.exists():
            return None
        try:
            state = json.loads(self._state_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LauncherError(f"{self._state_path} is unreadable ({err}); remove it") from err
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise LauncherError(f"{self._state_path} was not written by this launcher version")
        return state

    def _write_state(self, state: dict[str, object]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self._state_path)

    def _processes(self, state: dict[str, object] | None) -> dict[str, int]:
        processes = state.get("processes", {}) if state else {}
        assert isinstance(processes, dict)
        return {str(name): int(pid) for name, pid in processes.items()}

    def _load_secrets(self, services: Iterable[Service]) -> dict[str, str]:
        stored: dict[str, str] = {}
        if self._secrets_path.exists():
            stored = json.loads(self._secrets_path.read_text())
        missing = [
            name for service in services for name in service.secret_names if name not in stored
        ]
        if missing:
            for name in missing:
                stored[name] = secrets.token_urlsafe(24)
            write_private(self._secrets_path, json.dumps(stored, indent=2, sort_keys=True))
        return stored

    def context(self) -> StackContext:
        """The context of the stack as recorded in this folder (for status/env/clients)."""
        state = self._read_state()
        if state is None:
            raise LauncherError(f"no stack in {self.root}; start one with `edgefleet services up`")
        ports = state.get("ports", {})
        assert isinstance(ports, dict)
        ctx = StackContext(self.root, dict(ports), self._load_secrets([]), {})
        return ctx

    def _check_folder(self) -> dict[str, object] | None:
        if self.root.exists() and not self.root.is_dir():
            raise LauncherError(f"{self.root} exists and is not a folder")
        state = self._read_state() if self.root.exists() else None
        if state is None and self.root.exists() and any(self.root.iterdir()):
            raise LauncherError(
                f"{self.root} is not empty and holds no stack.json: it was not made by "
                "`edgefleet services`; choose another --dir or empty it"
            )
        if state is None:
            return None
        processes = self._processes(state)
        alive = {name: pid for name, pid in processes.items() if _pid_alive(pid)}
        if alive:
            listed = ", ".join(f"{name} (pid {pid})" for name, pid in alive.items())
            raise LauncherError(
                f"a stack is already running in {self.root}: {listed}; "
                "see `edgefleet services status` or stop it with `edgefleet services down`"
            )
        if processes or _marked_pids(self.root):
            raise LauncherError(
                f"{self.root} holds a stack that did not stop cleanly "
                f"({', '.join(processes) or 'stray processes'}); "
                f"run `edgefleet services down --dir {self.root}` first"
            )
        return state

    def _allocate_ports(
        self, services: list[Service], pinned: dict[str, int], previous: dict[str, int]
    ) -> dict[str, int]:
        names = [name for service in services for name in service.port_names]
        unknown = sorted(set(pinned) - set(names))
        if unknown:
            raise LauncherError(
                f"--port names {', '.join(unknown)} are not ports of the selected services "
                f"({', '.join(names)})"
            )
        ports: dict[str, int] = {}
        for name in names:
            if name in pinned:
                port = pinned[name]
                if port in ports.values() or not _port_free(port):
                    raise LauncherError(
                        f"port {port} for {name} is taken; pass another with "
                        f"--port {name}=N, or leave it out to use a free port"
                    )
                ports[name] = port
        for name in names:
            if name in ports:
                continue
            old = previous.get(name)
            if old and old not in ports.values() and _port_free(old):
                ports[name] = old  # keep addresses stable across down/up when possible
            else:
                ports[name] = _free_port(set(ports.values()))
        return ports

    # ---- up ---------------------------------------------------------------------------

    def up(
        self,
        only: Iterable[str] | None = None,
        ports: dict[str, int] | None = None,
        progress: bool = False,
    ) -> dict[str, str]:
        """Start the selected services and return their environment exports."""
        services = self.select(only)
        state = self._check_folder()
        for service in services:
            service.check_installed()
        previous = state.get("ports", {}) if state else {}
        assert isinstance(previous, dict)
        self.root.mkdir(parents=True, exist_ok=True)
        # System users (postgres, mosquitto) must traverse it; secrets inside stay 0600.
        os.chmod(self.root, 0o755)  # noqa: S103
        ctx = StackContext(
            self.root,
            self._allocate_ports(services, ports or {}, {k: int(v) for k, v in previous.items()}),
            self._load_secrets(services),
            {},
        )
        new_state: dict[str, object] = {
            "format": _STATE_FORMAT,
            "ports": ctx.ports,
            "processes": {},
            "services": [service.name for service in services],
            "started_at": datetime.now(UTC).isoformat(),
        }
        self._write_state(new_state)
        started: dict[str, int] = {}
        try:
            for service in services:
                t0 = time.monotonic()
                pid = self._start(service, ctx, started, new_state)
                ctx.exports.update(service.exports(ctx))
                if progress:
                    took = time.monotonic() - t0
                    print(f"  {service.name:<11} ready in {took:5.1f} s  (pid {pid})", flush=True)
        except BaseException:
            self._stop_all(started)
            new_state["processes"] = {}
            self._write_state(new_state)
            raise
        return self.env(ctx)

    def _start(
        self,
        service: Service,
        ctx: StackContext,
        started: dict[str, int],
        state: dict[str, object],
    ) -> int:
        service.prepare(ctx)
        spec = service.launch_spec(ctx)
        log_path = ctx.dir_for(service.name) / "service.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.root)),
            "LANG": "C.UTF-8",
            "TZ": "UTC",
            MARKER_ENV: str(self.root),
            **spec.env,
        }
        with open(log_path, "ab") as log:
            started_at = datetime.now(UTC).isoformat()
            log.write(f"\n--- start {started_at}: {shlex.join(spec.argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd or ctx.dir_for(service.name),
                env=env,
                user=spec.user if ctx.run_as_root else None,
                start_new_session=True,  # its own process group: stopped as one
            )
        started[service.name] = process.pid
        state["processes"] = dict(started)
        self._write_state(state)
        self._wait_ready(service, ctx, process, log_path)
        service.after_ready(ctx)
        return process.pid

    def _wait_ready(
        self, service: Service, ctx: StackContext, process: subprocess.Popen[bytes], log: Path
    ) -> None:
        deadline = time.monotonic() + service.ready_timeout_s
        last_error: Exception | None = None
        while True:
            code = process.poll()
            if code is not None:
                raise LauncherError(
                    f"{service.name} exited with status {code} while starting; "
                    f"last lines of {log}:\n{_tail(log)}"
                )
            try:
                if service.is_ready(ctx):
                    return
            except Exception as err:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = err
            if time.monotonic() >= deadline:
                detail = f" (last error: {last_error})" if last_error else ""
                raise NotReady(
                    f"{service.name} was not ready after {service.ready_timeout_s:.0f} s{detail}; "
                    f"last lines of {log}:\n{_tail(log)}"
                )
            time.sleep(0.2)

    # ---- down -------------------------------------------------------------------------

    def _stop_all(self, processes: dict[str, int]) -> list[str]:
        stopped = []
        # Reverse start order (dependants first), whatever order the state file kept.
        order = [name for name in self.services if name in processes]
        order += [name for name in processes if name not in self.services]
        for name in reversed(order):
            service = self.services.get(name)
            sig = service.stop_signal if service else signal.SIGTERM
            grace = service.stop_grace_s if service else 10.0
            if self._stop_group(processes[name], sig, grace):
                stopped.append(name)
        for pid in _marked_pids(self.root):  # stragglers that left their process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return stopped

    @staticmethod
    def _stop_group(pid: int, sig: signal.Signals, grace_s: float) -> bool:
        if not _pid_alive(pid):
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # the leader may be gone while children linger
        deadline = time.monotonic() + 5
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def down(self) -> list[str]:
        """Stop every service of the stack in this folder; returns the names stopped."""
        state = self._read_state()
        if state is None:
            if self.root.exists() and _marked_pids(self.root):
                self._stop_all({})
            return []
        stopped = self._stop_all(self._processes(state))
        state["processes"] = {}
        self._write_state(state)
        return stopped

    # ---- status, env, devices ----------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        state = self._read_state()
        if state is None:
            return []
        ctx = self.context()
        processes = self._processes(state)
        names = state.get("services", [])
        assert isinstance(names, list)
        result = []
        for name in names:
            service = self.services[name]
            pid = processes.get(name)
            if pid is None or not _pid_alive(pid):
                result.append(ServiceStatus(name, False, False, None, "not running"))
                continue
            healthy, detail = service.health(ctx)
            result.append(ServiceStatus(name, True, healthy, pid, detail))
        return result

    def env(self, ctx: StackContext | None = None) -> dict[str, str]:
        """Exports describing the running services to clients."""
        ctx = ctx or self.context()
        state = self._read_state() or {}
        names = state.get("services", [])
        assert isinstance(names, list)
        running = self._processes(state)
        exports = {"EDGEFLEET_SERVICES_DIR": str(self.root)}
        for name in names:
            if name in running:
                exports.update(self.services[name].exports(ctx))
        return exports

    def add_mqtt_device(self, device: str, timeout_s: float = 10.0) -> str:
        """Give `device` a Mosquitto account confined to its own topics; returns its password
        once the running broker accepts it (it applies new accounts on SIGHUP, a moment later)."""
        mosquitto = self.services["mosquitto"]
        assert isinstance(mosquitto, MosquittoService)
        ctx = self.context()
        password = mosquitto.add_device(ctx, device)
        pid = self._processes(self._read_state()).get("mosquitto")
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGHUP)  # Mosquitto rereads its password and ACL files
            mosquitto.wait_for_login(ctx, device, password, timeout_s)
        return password


def format_exports(exports: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in exports.items())
