"""What a launchable service is, and the errors the launcher speaks.

A `Service` is a thin description: which binaries it needs, how to lay out its data,
the command that runs it in the foreground, how to tell it is ready, and which
environment variables describe it to clients. The `Launcher` owns processes, ports,
state and clean-up, so a service module never forks or kills anything itself.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

__all__ = [
    "APT_PACKAGES",
    "LaunchSpec",
    "LauncherError",
    "MissingBinary",
    "NotReady",
    "Service",
    "StackContext",
    "check_traversable",
    "chown_tree",
    "find_binary",
    "poll_until",
    "tcp_port_open",
    "write_private",
]

# Debian packages the launcher needs, by binary. `make deps` installs them when root.
APT_PACKAGES = ("postgresql", "mosquitto", "mosquitto-clients", "prometheus")


class LauncherError(Exception):
    """Something the user must fix: printed as one line, exit status non-zero."""


class MissingBinary(LauncherError):
    def __init__(self, service: str, binary: str, install: str) -> None:
        super().__init__(f"{service}: `{binary}` is not installed; install it with: {install}")


class NotReady(LauncherError):
    """A service did not pass its readiness check in time."""


@dataclass(frozen=True)
class LaunchSpec:
    """How to run a service in the foreground; the launcher supervises the process."""

    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    user: str | None = None  # drop to this user when the launcher runs as root


@dataclass
class StackContext:
    """What a service sees of the running stack: its folder, ports, secrets and peers."""

    root: Path
    ports: dict[str, int]
    secrets: dict[str, str]
    exports: dict[str, str]  # exports of services already started, for dependants
    run_as_root: bool = field(default_factory=lambda: os.geteuid() == 0)

    def dir_for(self, service: str) -> Path:
        path = self.root / service
        path.mkdir(parents=True, exist_ok=True)
        return path

    def port(self, name: str) -> int:
        return self.ports[name]


class Service:
    """Base class: subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    # Port names this service needs, e.g. ("mosquitto", "mosquitto_tls").
    port_names: ClassVar[tuple[str, ...]]
    requires: ClassVar[tuple[str, ...]] = ()
    # Secrets generated at first `up` and kept in the data folder (mode 0600).
    secret_names: ClassVar[tuple[str, ...]] = ()
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    stop_grace_s: ClassVar[float] = 10.0
    ready_timeout_s: ClassVar[float] = 30.0

    def check_installed(self) -> None:
        """Raise `MissingBinary` naming the install command when a binary is absent."""

    def prepare(self, ctx: StackContext) -> None:
        """Write config and initialise data. Idempotent: a second `up` reuses the data."""

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        raise NotImplementedError

    def is_ready(self, ctx: StackContext) -> bool:
        """One readiness probe. The launcher polls it (and watches the process meanwhile);
        raising counts as "not ready yet" and the last error is reported on timeout."""
        return all(tcp_port_open(ctx.port(name)) for name in self.port_names)

    def after_ready(self, ctx: StackContext) -> None:
        """Create what dependants need (databases, buckets) once the service is up."""

    def health(self, ctx: StackContext) -> tuple[bool, str]:
        """A live check for `status`: (healthy, one-line detail)."""
        port = ctx.port(self.port_names[0])
        ok = tcp_port_open(port)
        return ok, f"127.0.0.1:{port}" + ("" if ok else " not answering")

    def exports(self, ctx: StackContext) -> dict[str, str]:
        """Environment variables that describe this service to its clients."""
        return {}


def check_traversable(path: Path, user: str, service: str) -> None:
    """As root, `service` runs as system `user`, who must be able to reach `path`."""
    uid = pwd.getpwnam(user).pw_uid
    for parent in [path, *path.parents]:
        info = parent.stat()
        if info.st_uid != uid and not info.st_mode & 0o001:
            raise LauncherError(
                f"{service}: running as root, it runs as user '{user}', who cannot enter "
                f"{parent}; choose a --dir under a world-traversable folder such as /tmp"
            )


def chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def write_private(path: Path, text: str) -> None:
    """Write a secret-bearing file with mode 0600 from the start (no window at 0644)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def find_binary(service: str, names: list[str], install: str) -> str:
    """The first of `names` found beside this Python (a venv's bin/), on PATH or as an
    absolute path, else `MissingBinary` naming the install command."""
    for candidate in names:
        beside_python = Path(sys.executable).parent / candidate
        if not os.path.isabs(candidate) and os.access(beside_python, os.X_OK):
            return str(beside_python)
        if os.path.isabs(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
        elif found := shutil.which(candidate):
            return found
    raise MissingBinary(service, names[0], install)


def tcp_port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def poll_until(check: Callable[[], bool], deadline: float, what: str, every_s: float = 0.1) -> None:
    """Poll `check` until it returns True; raise `NotReady` naming `what` at `deadline`."""
    last_error: Exception | None = None
    while True:
        try:
            if check():
                return
        except Exception as err:  # noqa: BLE001 - any failure means "not ready yet"
            last_error = err
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise NotReady(f"{what} was not ready in time{detail}")
        time.sleep(every_s)
