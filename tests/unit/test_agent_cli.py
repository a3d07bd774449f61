"""`edgefleet agent`: check-config, run's config errors, and the dead-letter commands
against a real buffer file with a dead-lettered batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet.deploy.cli import main
from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.edge_agent.config import FOG_TOKEN_ENV
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Batch, Quality, Reading, decode_json

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "agent.example.yaml"
T0 = 1_795_000_000_000_000_000
SECOND = 1_000_000_000


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


def agent_yaml(tmp_path: Path, **changes: Any) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["buffer"]["path"] = str(tmp_path / "buffer.db")
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _fog_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FOG_TOKEN_ENV, "t0ken")


def test_check_config_on_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "check-config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("agent config OK: device 'edge-01'")
    assert len(out.strip().splitlines()) == 1  # one paragraph
    for part in ("1 source: line-1 (modbus, 1 device, 6 points, every 1 s)",
                 f"buffer {EXAMPLE.parent / 'state' / 'buffer.db'} (cap 1 GiB",
                 "when full: block", "no model", "fog http://127.0.0.1:8080/v1/ingest",
                 "token set", "metrics on http://127.0.0.1:9108/metrics"):
        assert part in out, out
    assert "t0ken" not in out


def test_check_config_in_a_subprocess_exit_codes(tmp_path: Path) -> None:
    ok = run_cli("agent", "check-config", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "agent.yaml"
    data = yaml.safe_load(EXAMPLE.read_text())
    data["sources"][0]["points"][2]["address"] = -1
    data["buffer"]["max_bytes"] = -5
    bad.write_text(yaml.safe_dump(data))
    result = run_cli("agent", "check-config", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "buffer.max_bytes: Input should be greater than or equal to 262144" in result.stderr
    assert "sources[0] ('line-1'): device 'pump-01': points[2] (pump-01.pressure): address:" \
        in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device: edge-01\nbogus: 1\n", "bogus: unknown key"),
        ("device: [\n", "YAML syntax, line 2, column 1"),
        ("", "(file): the file is empty"),
    ],
)
def test_invalid_configs_exit_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    for argv in (["agent", "check-config", str(path)], ["agent", "run", "--config", str(path)],
                 ["agent", "dlq", "--config", str(path), "list"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"edgefleet agent: {path}: invalid agent config")
        assert expected in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "(file): no such file" in capsys.readouterr().err


def test_agent_help_lists_the_actions() -> None:
    result = run_cli("agent", "--help")
    assert result.returncode == 0
    for action in ("check-config", "run", "dlq"):
        assert action in result.stdout
    assert "agent" in run_cli("--help").stdout


# ---- dead letters ------------------------------------------------------------------------


@pytest.fixture
def dead_lettered(tmp_path: Path) -> tuple[Path, Batch]:
    """A buffer file holding 30 rows of which seqs 1..10 were dead-lettered, then closed."""
    config_path = agent_yaml(tmp_path)
    with SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0)) as buf:
        buf.append("edge-01", [Sample("pump-01", f"t{i % 3}", T0 + i * SECOND, float(i),
                                      Quality.GOOD if i % 7 else Quality.UNCERTAIN)
                               for i in range(30)])
        buf.flush()
        batch = buf.claim_batch("edge-01", max_rows=10)
        assert batch is not None
        assert buf.dead_letter(batch, "HTTP 422: readings[3].tag: unknown series") == 1
    return config_path, batch


def test_dlq_list(dead_lettered: tuple[Path, Batch], capsys: pytest.CaptureFixture[str]) -> None:
    config_path, _ = dead_lettered
    assert main(["agent", "dlq", "--config", str(config_path), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "DEVICE", "SEQS", "ROWS", "AGE", "REASON"]
    assert lines[1].split()[:4] == ["1", "edge-01", "1..10", "10"]
    assert lines[1].split()[4].endswith("s")  # age, e.g. "0s"
    assert "HTTP 422: readings[3].tag: unknown series" in lines[1]
    assert len(lines) == 2


def test_dlq_show_summary_and_json_lines(
    dead_lettered: tuple[Path, Batch], capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, batch = dead_lettered
    assert main(["agent", "dlq", "--config", str(config_path), "show", "1"]) == 0
    out = capsys.readouterr().out
    assert "seqs:     1..10 (10 readings)" in out
    assert "reason:   HTTP 422: readings[3].tag: unknown series" in out
    assert "series:   3 on 1 asset(s): pump-01" in out
    assert main(["agent", "dlq", "--config", str(config_path), "show", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    readings = [json.loads(line) for line in lines]
    assert [r["seq"] for r in readings] == list(range(1, 11))
    assert readings[0] == {"device": "edge-01", "asset": "pump-01", "tag": "t0", "ts": T0,
                           "value": 0.0, "quality": "uncertain", "seq": 1}
    assert [tuple(r.values()) for r in readings] == [
        (r.device, r.asset, r.tag, r.ts, r.value, r.quality.value, r.seq) for r in batch.readings
    ]


def test_dlq_export_is_a_replayable_wire_batch(
    dead_lettered: tuple[Path, Batch], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, batch = dead_lettered
    out_file = tmp_path / "dlq-1.json"
    assert main(["agent", "dlq", "--config", str(config_path), "export", "1",
                 "-o", str(out_file)]) == 0
    exported = decode_json(out_file.read_bytes(), Batch)  # strict: a valid wire Batch
    assert exported.readings == batch.readings
    assert (exported.device, exported.first_seq, exported.last_seq) == ("edge-01", 1, 10)
    capsys.readouterr()
    assert main(["agent", "dlq", "--config", str(config_path), "export", "1"]) == 0
    assert decode_json(capsys.readouterr().out.strip(), Batch).readings == batch.readings


def test_dlq_delete_then_unknown_ids(
    dead_lettered: tuple[Path, Batch], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, _ = dead_lettered
    assert main(["agent", "dlq", "--config", str(config_path), "delete", "1"]) == 0
    assert "deleted dead-lettered batch #1" in capsys.readouterr().out
    with SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0)) as buf:
        stats = buf.stats()
        assert stats.dlq_batches == 0 and stats.depth == 20  # the live rows are untouched
    for action in ("show", "delete", "export"):
        assert main(["agent", "dlq", "--config", str(config_path), action, "1"]) == 1
        assert "no dead-lettered batch #1" in capsys.readouterr().err
    assert main(["agent", "dlq", "--config", str(config_path), "list"]) == 0
    assert capsys.readouterr().out.strip() == "no dead-lettered batches"


def test_dlq_refuses_while_the_agent_holds_the_buffer(
    dead_lettered: tuple[Path, Batch], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, _ = dead_lettered
    # The running agent is another process: the lock is an flock on <buffer>.lock.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, fcntl, os\n"
         f"fd = os.open({str(tmp_path / 'buffer.db.lock')!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert main(["agent", "dlq", "--config", str(config_path), "list"]) == 1
        err = capsys.readouterr().err
        assert "held by a running agent" in err and "stop the agent" in err
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert main(["agent", "dlq", "--config", str(config_path), "list"]) == 0


def test_dlq_without_a_buffer_file_does_not_create_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = agent_yaml(tmp_path)
    assert main(["agent", "dlq", "--config", str(config_path), "list"]) == 1
    assert "no buffer at" in capsys.readouterr().err
    assert not (tmp_path / "buffer.db").exists()


def test_show_json_readings_decode_as_wire_readings(
    dead_lettered: tuple[Path, Batch], capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, batch = dead_lettered
    assert main(["agent", "dlq", "--config", str(config_path), "show", "1", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert tuple(decode_json(line, Reading) for line in lines) == batch.readings
