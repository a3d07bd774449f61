"""Run a real agent as a child process (`edgefleet agent run`), for tests and benches.

`AgentProcess` starts `python -m edgefleet.deploy.cli agent run --config FILE`, waits for
its "running" log line, and reads the child's CPU time and resident memory from `/proc`
(Linux), so what a bench measures is the agent alone, not the harness or the sink.
`write_agent_config` writes a config the way a user would (YAML on disk).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = ["AgentProcess", "write_agent_config"]

READY_LINE: Final = " running: "
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_TICKS: Final = os.sysconf("SC_CLK_TCK")


def write_agent_config(
    folder: Path,
    *,
    fog_url: str,
    sources: list[dict[str, Any]],
    device: str = "edge-01",
    buffer: Mapping[str, Any] | None = None,
    fog: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """Write `folder/agent.yaml` (buffer at `folder/buffer.db` unless given) and return it."""
    data: dict[str, Any] = {
        "device": device,
        "sources": sources,
        "buffer": {"path": str(folder / "buffer.db"), "min_free_bytes": 0, **(buffer or {})},
        "fog": {"url": fog_url, **(fog or {})},
        "metrics": {"enabled": False},
        **settings,
    }
    if model is not None:
        data["model"] = dict(model)
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class AgentProcess:
    """One `edgefleet agent run` child; its stderr goes to `<config folder>/agent.log`."""

    def __init__(
        self, config: Path, *, env: Mapping[str, str] | None = None, python: str | None = None
    ) -> None:
        self.config = config
        self.python = python or sys.executable  # e.g. a venv with only the `edge` extra
        self.log_path = config.parent / "agent.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, ready_timeout_s: float = 60.0) -> AgentProcess:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [self.python, "-m", "edgefleet.deploy.cli", "agent", "run",
                 "--config", str(self.config)],
                stdout=log_file, stderr=log_file, env=self.env,
            )
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + ready_timeout_s
        while READY_LINE not in self.log()[start:]:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"agent not running after {ready_timeout_s} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU of the child so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss_bytes(self) -> int:
        return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * _PAGE

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: the crash a power loss or an OOM killer causes, minus the kernel's part."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
