"""The fog's config file and its command line: faults named by path, exit status 2,
relative paths resolved against the file's folder, tokens printed once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.fog_gateway.auth import DeviceTokens
from edgefleet.fog_gateway.config import FogConfigError, load_fog_config


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.deploy.cli", "fog", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_every_bad_field_is_named_by_its_path(tmp_path: Path) -> None:
    path = tmp_path / "fog.yaml"
    path.write_text("kafka: {bootstrap: k:9092, partitions: 0}\nlisten: {port: 70000}\n"
                    "store: mysql://x\nsink: {wrkers: 2}\n")
    with pytest.raises(FogConfigError) as caught:
        load_fog_config(path)
    problems = "\n".join(caught.value.problems)
    for where in ("kafka.partitions", "listen.port", "store", "sink.wrkers"):
        assert where + ":" in problems, problems


def test_relative_paths_follow_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    monkeypatch.delenv("EDGEFLEET_FOG_STORE", raising=False)
    path = tmp_path / "site" / "fog.yaml"
    path.parent.mkdir()
    path.write_text("store: sqlite:data/fog.db\ntokens_file: tokens.json\n")
    config = load_fog_config(path)
    assert config.store == f"sqlite:///{tmp_path / 'site' / 'data' / 'fog.db'}"
    assert config.tokens_file == tmp_path / "site" / "tokens.json"
    assert config.kafka is None  # embedded by default


def test_the_store_url_may_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_FOG_STORE", "postgresql://fog@db/edgefleet")
    assert load_fog_config(None).store == "postgresql://fog@db/edgefleet"
    path = tmp_path / "fog.yaml"
    path.write_text("store: sqlite:///x.db\n")
    assert load_fog_config(path).store == "sqlite:///x.db"  # the file wins


def test_cli_add_device_prints_the_token_once_and_bad_config_exits_2(tmp_path: Path) -> None:
    added = cli("add-device", "edge-07", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert DeviceTokens(tmp_path / "tokens.json").device_for(f"Bearer {token}") == "edge-07"
    assert "shown only once" in added.stderr
    (tmp_path / "bad.yaml").write_text("limits: {max_in_flight: 0}\n")
    bad = cli("run", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "limits.max_in_flight" in bad.stderr
    assert cli("remove-device", "edge-07", cwd=tmp_path).returncode == 0
    assert cli("remove-device", "edge-07", cwd=tmp_path).returncode == 1
