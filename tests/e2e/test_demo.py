"""`edgefleet demo`, the README's first command, runs to a complete report."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_demo_reads_the_plant_and_lands_every_reading_once() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.deploy.cli", "demo", "--seconds", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the demo stops its stack on SIGTERM
        out, err = process.communicate(timeout=60)
        pytest.fail(f"the demo did not finish in 300 s:\n{out}\n{err}")
    assert process.returncode == 0, out + err
    by_protocol = dict(re.findall(r"(modbus|opcua|mqtt) ([\d,]+)", out))
    assert set(by_protocol) == {"modbus", "opcua", "mqtt"}
    assert all(int(n.replace(",", "")) > 0 for n in by_protocol.values())
    landed = re.search(r"rows in PostgreSQL\s+(\d+) of (\d+) expected, seq gaps (\d+)", out)
    assert landed is not None, out
    rows, expected, gaps = map(int, landed.groups())
    assert rows == expected == sum(int(n.replace(",", "")) for n in by_protocol.values())
    assert gaps == 0
    assert "assets seen              6 of 6" in out
    assert "rejected as malformed    1" in out
    assert "complete, no loss, no duplicates" in out


def test_demo_stops_its_stack_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.deploy.cli", "demo", "--seconds", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # wait until the plant runs, mid-demo
        lines.append(line)
        if line.startswith("3/5"):
            break
    stack_dir = next(p.cmdline() for p in psutil.process_iter(["cmdline"])
                     if any("edgefleet-demo-" in part for part in (p.info["cmdline"] or []))
                     and "postgres" in " ".join(p.info["cmdline"] or []))
    assert stack_dir, "the demo's stack is running"
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if any("edgefleet-demo-" in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []
