"""The `edgefleet` command line shell."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgefleet.deploy.cli import BENCHES, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", *args],
        capture_output=True, text=True, timeout=60,
    )


def test_help_lists_the_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("services", "bench"):
        assert command in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("edgefleet ") and result.stdout.strip() != "edgefleet"


def test_no_command_prints_help_and_fails() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: edgefleet" in result.stdout


def test_unknown_bench_is_refused_with_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "no-such-bench"])
    assert exit_info.value.code == 2
    assert "wire" in capsys.readouterr().err
    assert "wire" in BENCHES


def test_services_rejects_a_malformed_port_pin() -> None:
    result = run_cli("services", "up", "--port", "postgres:5432")
    assert result.returncode == 2
    assert "expected NAME=PORT" in result.stderr


def test_services_status_without_a_stack(tmp_path: object) -> None:
    result = run_cli("services", "--dir", f"{tmp_path}/none", "status")
    assert result.returncode == 1
    assert "no stack in" in result.stdout


def test_output_piped_into_a_reader_that_leaves_is_not_an_error() -> None:
    # The reader is gone before the command writes (as with `… | head` on long output).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "edgefleet.deploy.cli", "sim", "registers"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
