"""Shared fixtures. Integration tests talk to real servers started by the project's own
launcher (`edgefleet services`), once per test session, in a private folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.deploy.services import Launcher


def make_stack_dir(prefix: str) -> Path:
    """A fresh folder the services' system users (postgres, mosquitto) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103 - system users must traverse it
    return path / "stack"


@pytest.fixture(scope="session")
def stack() -> Iterator[Launcher]:
    """The full stack: PostgreSQL, Mosquitto, Kafka, S3, MLflow, Prometheus."""
    root = make_stack_dir("edgefleet-it-")
    launcher = Launcher(root)
    try:
        launcher.up()
        yield launcher
    finally:
        launcher.down()
        shutil.rmtree(root.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def stack_env(stack: Launcher) -> dict[str, str]:
    return stack.env()
