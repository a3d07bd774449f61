"""`ChildProcess`: what the test and bench harnesses of long-running edgefleet commands
(`edgefleet fog run`, `edgefleet control run`) share once their child is started: its
pid, log, CPU and memory, and a stop that sends SIGTERM and kills after a grace period.
A subclass sets `process` and `log_path` and defines `start()`."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Final, Self

__all__ = ["ChildProcess"]

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_TICKS: Final = os.sysconf("SC_CLK_TCK")


class ChildProcess:
    process: subprocess.Popen[bytes] | None
    log_path: Path
    stop_grace_s: float = 60.0  # how long `stop` waits after SIGTERM by default

    def start(self) -> Self:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
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

    def stop(self, grace_s: float | None = None) -> int:
        """SIGTERM, then wait up to `grace_s` (default `stop_grace_s`); SIGKILL after that
        (-9). The exit status."""
        if grace_s is None:
            grace_s = self.stop_grace_s
        if self.process is None:
            return 0
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
