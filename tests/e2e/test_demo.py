"""`edgefleet demo`, the README's first command: the plant, three real agent processes and
the real fog gateway, on the embedded stack and on the launcher's real services. Every
device must end 100 % complete, and SIGTERM must leave no process of the demo behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

DEVICES = {"edge-modbus": "modbus", "edge-opcua": "opcua", "edge-mqtt": "mqtt"}
# One report row: device, protocol, assets, readings, committed, received, expected,
# missing, duplicates, completeness.
ROW = re.compile(r"^\s+(edge-\w+)\s+(modbus|opcua|mqtt)\s+(\d+)\s+([\d,]+)\s+([\d,]+)\s+"
                 r"([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+) %$", re.MULTILINE)


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet.deploy.cli", "demo", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 240) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the demo stops what it started on SIGTERM
        out, err = process.communicate(timeout=120)
        pytest.fail(f"the demo did not finish in {timeout_s} s:\n{out}\n{err}")


@pytest.mark.parametrize("stack", ["embedded", "real"])
def test_demo_lands_every_reading_of_three_agents_once(stack: str) -> None:
    process = demo("--stack", stack, "--seconds", "8")
    out, err = finish(process)
    assert process.returncode == 0, out + err
    assert "Traceback" not in err, err
    rows = {match[0]: match[1:] for match in ROW.findall(out)}
    assert set(rows) == set(DEVICES), out
    for device, (protocol, assets, *counts, ratio) in rows.items():
        readings, committed, received, expected, missing, _dups = (
            int(n.replace(",", "")) for n in counts)
        assert protocol == DEVICES[device]
        assert int(assets) == 4  # 12 assets, round-robin over the three protocols
        assert readings > 0, f"no {protocol} readings:\n{out}"
        assert received == expected == committed > readings  # + the agents' heartbeat gauges
        assert missing == 0 and ratio == "100.0"
    assert re.search(r"heartbeat edge-modbus\s+agent \d", out), out
    assert re.search(r"anomaly episodes\s+\d+ injected", out), out
    assert "edge-modbus 0, edge-opcua 0, edge-mqtt 0" in out  # every agent drained cleanly
    assert "completeness 100 % for all 3 devices" in out


@pytest.mark.parametrize("stack", ["embedded", "real"])
def test_sigterm_mid_demo_leaves_no_process_behind(stack: str) -> None:
    process = demo("--stack", stack, "--seconds", "120")
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # wait until the agents read the plant, mid-demo
        lines.append(line)
        if line.startswith("4/5"):
            break
    assert lines and lines[-1].startswith("4/5"), "".join(lines) + (process.stderr.read()
                                                                    if process.stderr else "")
    children = psutil.Process(process.pid).children(recursive=True)
    commands = [" ".join(child.cmdline()) for child in children]
    assert sum(" agent run " in command for command in commands) == 3, commands
    assert sum(" fog run " in command for command in commands) == 1, commands
    found = re.search(r"/tmp/edgefleet-demo-[^/\s]+", " ".join(commands))
    assert found is not None, commands  # the agents' configs live in the demo's folder
    folder = Path(found.group())
    ours = [p for p in psutil.process_iter(["cmdline"])
            if str(folder) in " ".join(p.info["cmdline"] or [])]
    if stack == "real":
        assert any("postgres" in " ".join(p.info["cmdline"] or []) for p in ours), \
            "the demo's services run"

    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM

    alive = [child for child in children + ours if _alive(child)]
    assert alive == [], alive
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if str(folder) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    assert not folder.exists(), "the demo folder is removed without --keep"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
