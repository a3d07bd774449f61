"""`edgefleet demo`, the README's first command, runs to a complete report."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_lands_every_row_once_and_rejects_garbage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "demo", "--batches", "6",
         "--batch-size", "200"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rows in PostgreSQL       1200 of 1200 expected, seq gaps 0" in result.stdout
    assert "rejected as malformed    1" in result.stdout
    assert "complete, no loss, no duplicates" in result.stdout
