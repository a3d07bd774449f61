"""`FogProcess`: an `edgefleet fog run` child process, for tests, benches and demos.

It writes `fog.yaml` into a folder, starts the gateway on a free port, waits until it
serves, and on stop sends SIGTERM and returns the exit status. The gateway's log goes to
`<folder>/fog.log`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from edgefleet.deploy.child import ChildProcess

__all__ = ["FogProcess"]


class FogProcess(ChildProcess):
    def __init__(self, folder: Path, settings: dict[str, Any],
                 env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.config = folder / "fog.yaml"
        self.settings = {"log_format": "text", **settings}
        self.env = {**os.environ, **(env or {})}
        self.log_path = folder / "fog.log"
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/ingest"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> FogProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        ready = self.folder / "fog.port"
        ready.unlink(missing_ok=True)
        port = ["--port", str(self.port)] if self.port else ["--port", "0"]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.deploy.cli", "fog", "run",
                 "--config", str(self.config), *port, "--ready-file", str(ready)],
                stdout=log_file, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"fog gateway exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"fog gateway not ready in {timeout_s} s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(ready.read_text())
        return self
