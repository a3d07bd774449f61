"""The launcher's refusals and clean-up: each bad situation gets one clear line, a non-zero
exit and nothing half-started; `down` leaves no process behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from edgefleet.deploy.services import Launcher, LauncherError, MissingBinary
from edgefleet.deploy.services.base import LaunchSpec, Service, StackContext, find_binary
from edgefleet.deploy.services.kafka import KafkaService
from edgefleet.deploy.services.launcher import MARKER_ENV

from ..conftest import make_stack_dir

pytestmark = pytest.mark.integration


def stack_processes(root: Path) -> list[psutil.Process]:
    """Live processes that belong to the stack in `root`, read from the process table."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if environ.get(MARKER_ENV) == str(root) or str(root) in cmdline:
            found.append(proc)
    return found


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "services", "--dir", str(root), *args],
        capture_output=True, text=True, timeout=240,
    )


@pytest.fixture
def root() -> Iterator[Path]:
    path = make_stack_dir("edgefleet-launcher-")
    yield path
    Launcher(path).down()
    shutil.rmtree(path.parent, ignore_errors=True)


def test_up_down_leaves_no_orphans(root: Path) -> None:
    # MLflow brings PostgreSQL (which forks backends) and SeaweedFS (several servers).
    result = cli(root, "up", "--only", "mlflow")
    assert result.returncode == 0, result.stderr
    running = stack_processes(root)
    names = {" ".join(p.cmdline()) for p in running}
    assert any("postgres" in n for n in names) and any("weed" in n for n in names)
    assert any("mlflow" in n for n in names)
    assert len(running) >= 4
    # Every listening socket is on a port the launcher allocated: nothing binds a fixed
    # default port that a second stack on the same machine would collide with.
    allocated = set(Launcher(root).context().ports.values())
    listening = {
        conn.laddr.port
        for proc in running
        for conn in proc.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening and listening <= allocated, sorted(listening - allocated)

    down = cli(root, "down")
    assert down.returncode == 0, down.stderr
    assert "postgres" in down.stdout and "mlflow" in down.stdout
    assert stack_processes(root) == []
    # Data is kept: a second up reuses the cluster, its secrets and (if free) its ports.
    again = cli(root, "up", "--only", "postgres")
    assert again.returncode == 0, again.stderr
    assert cli(root, "status").returncode == 0


def test_second_up_is_refused_while_running(root: Path) -> None:
    assert cli(root, "up", "--only", "kafka").returncode == 0
    before = {p.pid for p in stack_processes(root)}
    second = cli(root, "up", "--only", "kafka")
    assert second.returncode != 0
    assert "already running" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert {p.pid for p in stack_processes(root)} == before


def test_taken_port_is_refused_and_nothing_starts(root: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = cli(root, "up", "--only", "kafka", "--port", f"kafka={port}")
    assert result.returncode != 0
    assert f"port {port} for kafka is taken" in result.stderr
    assert stack_processes(root) == []


def test_foreign_folder_is_refused(root: Path) -> None:
    root.mkdir()
    (root / "holiday-photos.jpg").write_bytes(b"not ours")
    result = cli(root, "up", "--only", "kafka")
    assert result.returncode != 0
    assert "was not made by `edgefleet services`" in result.stderr
    assert sorted(p.name for p in root.iterdir()) == ["holiday-photos.jpg"]
    assert stack_processes(root) == []


def test_dirty_folder_is_refused_until_down(root: Path) -> None:
    launcher = Launcher(root)
    launcher.up(only=["kafka"])
    pid = launcher.status()[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # a crash: state says running, the process is gone
    result = cli(root, "up", "--only", "kafka")
    assert result.returncode != 0
    assert "did not stop cleanly" in result.stderr and "services down" in result.stderr
    assert cli(root, "down").returncode == 0
    assert cli(root, "up", "--only", "kafka").returncode == 0


class _AbsentBinary(Service):
    name: ClassVar[str] = "absent"
    port_names: ClassVar[tuple[str, ...]] = ("absent",)

    def check_installed(self) -> None:
        find_binary(self.name, ["edgefleet-no-such-binary"], "apt-get install edgefleet-absent")


class _DiesAtStart(Service):
    name: ClassVar[str] = "dies"
    port_names: ClassVar[tuple[str, ...]] = ("dies",)

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        return LaunchSpec(argv=["sh", "-c", "echo 'fatal: cannot open config' >&2; exit 3"])


def test_missing_binary_names_the_install_command_and_starts_nothing(root: Path) -> None:
    launcher = Launcher(root, services=(KafkaService(), _AbsentBinary()))
    with pytest.raises(MissingBinary, match="install it with: apt-get install edgefleet-absent"):
        launcher.up()
    assert stack_processes(root) == []


def test_a_failed_start_stops_what_was_already_started(root: Path) -> None:
    launcher = Launcher(root, services=(KafkaService(), _DiesAtStart()))
    expected = r"(?s)dies exited with status 3.*fatal: cannot open config"
    with pytest.raises(LauncherError, match=expected):
        launcher.up()
    assert stack_processes(root) == []
    assert launcher.status()[0].running is False
