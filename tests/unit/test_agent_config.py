"""Loading agent.yaml: the example is valid, paths resolve against the file's folder, the
fog token may come from the environment, and every kind of fault is reported with the
exact dotted path of the field at fault."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet.edge_agent.config import (
    FOG_TOKEN_ENV,
    AgentConfig,
    AgentConfigError,
    load_agent_config,
    parse_agent_config,
)
from edgefleet.protocols.modbus import ModbusSourceConfig

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "agent.example.yaml"
ENV = {FOG_TOKEN_ENV: "t0ken-from-env"}

BASE = """
device: edge-01
sources:
  - type: modbus
    name: line-1
    devices: [{name: pump-01, host: 127.0.0.1, port: 5020}]
    points:
      - {asset: pump-01, tag: speed, register_type: input, address: 0, data_type: float32}
      - {asset: pump-01, tag: flow, register_type: input, address: 2, data_type: float32}
      - {asset: pump-01, tag: pressure, register_type: input, address: 4, data_type: float32}
buffer: {path: data/buffer.db, max_bytes: 1073741824, when_full: block}
fog: {url: "http://127.0.0.1:8080/v1/ingest"}
"""


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def write_data(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(BASE)
    edit(data)
    return write(tmp_path, yaml.safe_dump(data, sort_keys=False))


def problems_of(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(AgentConfigError) as info:
        load_agent_config(path, environ=ENV if environ is None else environ)
    assert str(path) in str(info.value)
    return info.value.problems


def test_the_example_is_valid_and_useful() -> None:
    config = load_agent_config(EXAMPLE, environ=ENV)
    assert config.device == "edge-01"
    (source,) = config.sources
    assert isinstance(source, ModbusSourceConfig)
    assert source.devices[0].port == 5020 and source.devices[0].host == "127.0.0.1"
    assert {p.tag for p in source.points} >= {"speed", "flow", "pressure"}
    assert config.buffer.max_bytes == 1024**3 and config.buffer.when_full == "block"
    assert config.buffer.path == EXAMPLE.parent / "state" / "buffer.db"
    assert config.model is None
    assert config.fog.url == "http://127.0.0.1:8080/v1/ingest"
    token = config.fog.token
    assert token is not None and token.get_secret_value() == "t0ken-from-env"
    assert config.metrics.port == 9108 and config.metrics.host == "127.0.0.1"
    assert config.heartbeat.interval_s == 10


def test_defaults_and_frozen(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, BASE), environ={})
    assert config.heartbeat.interval_s == 10 and config.heartbeat.asset == "agent"
    assert (config.metrics.host, config.metrics.port, config.metrics.enabled) == (
        "127.0.0.1", 9108, True)
    assert config.alerts.mqtt_url is None and config.alerts.webhook_url is None
    assert config.alerts.queue_max == 1000
    assert config.alerts.topic_for(config.device) == "edgefleet/edge-01/alerts"
    assert config.drain_timeout_s == 10 and config.log_level == "INFO"
    assert config.effective_state_dir == tmp_path / "data"
    with pytest.raises(ValueError, match="frozen"):
        config.device = "other"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "models").mkdir()
    (folder / "models" / "m.onnx").write_bytes(b"not really onnx; the agent checks that")

    def edit(data: dict[str, Any]) -> None:
        data["model"] = {"path": "models/m.onnx", "threshold": 0.8, "assets": ["pump-01"]}
        data["state_dir"] = "state"
        data["alerts"] = {"mqtt_url": "mqtts://127.0.0.1:8883", "ca_file": "ca.pem"}

    config_path = write_data(folder, edit)
    monkeypatch.chdir(tmp_path)  # the working directory does not matter
    config = load_agent_config(config_path, environ={})
    assert config.buffer.path == folder / "data" / "buffer.db"
    assert config.model is not None and config.model.path == folder / "models" / "m.onnx"
    assert config.model.assets == ("pump-01",)
    assert config.state_dir == folder / "state"
    assert config.alerts.ca_file == folder / "ca.pem"

    absolute = write_data(folder, lambda d: d["buffer"].update(path="/var/lib/x/buffer.db"))
    assert load_agent_config(absolute, environ={}).buffer.path == Path("/var/lib/x/buffer.db")


def test_fog_token_from_the_environment_only_when_the_file_has_none(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, BASE), environ=ENV)
    assert config.fog.token is not None
    assert config.fog.token.get_secret_value() == "t0ken-from-env"
    in_file = write_data(tmp_path, lambda d: d["fog"].update(token="from-file"))
    config = load_agent_config(in_file, environ=ENV)
    assert config.fog.token is not None and config.fog.token.get_secret_value() == "from-file"
    assert "t0ken-from-env" not in repr(config) and "from-file" not in repr(config)


def test_built_in_python_too(tmp_path: Path) -> None:
    config = parse_agent_config(yaml.safe_load(BASE), base_dir=tmp_path, environ={})
    assert isinstance(config, AgentConfig)
    assert config.buffer.path == tmp_path / "data" / "buffer.db"
    again = AgentConfig.model_validate(config.model_dump())
    assert again.sources == config.sources


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        # unknown key, at the top and nested, with a suggestion
        (lambda d: d.update(bufer={}), "bufer: unknown key (did you mean 'buffer'?)"),
        (lambda d: d["buffer"].update(max_byte=5), "buffer.max_byte: unknown key"),
        (lambda d: d.update(heartbeat={"interval": 5}), "heartbeat.interval: unknown key"),
        # bad types and bounds
        (lambda d: d.update(heartbeat={"interval_s": "soon"}),
         "heartbeat.interval_s: Input should be a valid number"),
        (lambda d: d.update(heartbeat={"interval_s": 0.5}),
         "heartbeat.interval_s: Input should be greater than or equal to 1"),
        (lambda d: d["buffer"].update(max_bytes=-1),
         "buffer.max_bytes: Input should be greater than or equal to 262144"),
        (lambda d: d["buffer"].update(when_full="panic"),
         "buffer.when_full: Input should be 'block', 'drop_oldest' or 'downsample'"),
        (lambda d: d.update(metrics={"port": 70000}),
         "metrics.port: Input should be less than or equal to 65535"),
        (lambda d: d.update(device="edge 01!"), "device: String should match pattern"),
        (lambda d: d.pop("device"), "device: required, not set"),
        (lambda d: d.pop("buffer"), "buffer: required, not set"),
        (lambda d: d["buffer"].pop("path"), "buffer.path: required, not set"),
        (lambda d: d.update(model={"path": "m.pkl"}),
         "model.path: must name an .onnx file, not 'm.pkl'"),
        (lambda d: d.update(model={"path": "missing.onnx"}), "model.path: no such file: "),
        (lambda d: d.update(alerts={"queue_max": 0}),
         "alerts.queue_max: Input should be greater than or equal to 1"),
        (lambda d: d.update(alerts={"topic": "a/{site}"}),
         "alerts.topic: the only placeholder allowed is {device}"),
        (lambda d: d.update(alerts={"mqtt_password": "x"}),
         "alerts.mqtt_password: set without mqtt_username"),
        (lambda d: d["buffer"].update(max_rows=10, commit_rows=100),
         "buffer: commit_rows (100) must not exceed max_rows (10)"),
        # sources: problems carry load_sources' own location, down to the field
        (lambda d: d["sources"][0]["points"][2].update(address=-2),
         "sources[0] ('line-1'): device 'pump-01': points[2] (pump-01.pressure): address: "
         "Input should be greater than or equal to 0"),
        (lambda d: d["sources"][0]["devices"][0].update(timeout_s="x"),
         "sources[0] ('line-1'): device 'pump-01' (devices[0]): timeout_s: "
         "Input should be a valid number"),
        (lambda d: d["sources"][0].update(type="profinet"), "sources[0] ('line-1'): type: "),
        (lambda d: d["sources"][0].update(polling=1),
         "sources[0] ('line-1'): polling: Extra inputs are not permitted"),
        (lambda d: d.update(sources=[]), "sources: needs at least 1 item(s), has 0"),
        (lambda d: d.update(sources={"type": "modbus"}),
         "sources: must be a list of sources, got a mapping"),
        (lambda d: d["sources"].append(dict(d["sources"][0])),
         "sources: source names must be unique; repeated: line-1"),
    ],
)
def test_each_fault_names_its_exact_path(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    problems = problems_of(write_data(tmp_path, edit))
    assert any(problem.startswith(expected) for problem in problems), problems


def test_fog_problems_are_under_fog(tmp_path: Path) -> None:
    problems = problems_of(write_data(tmp_path, lambda d: d["fog"].update(nope=1)))
    assert problems[0].startswith("fog.nope: unknown key"), problems
    problems = problems_of(write_data(tmp_path, lambda d: d.pop("fog")))
    assert problems == ["fog: required, not set"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["buffer"]["max_bytes"] = -1
        data["heartbeat"] = {"interval_s": "soon"}
        data["sources"][0]["points"][0]["address"] = 70000
        data["sources"][0]["points"][1]["tag"] = "bad tag"
        data["extra"] = True

    problems = problems_of(write_data(tmp_path, edit))
    paths = [p.split(": ")[0] for p in problems]
    assert "buffer.max_bytes" in paths and "heartbeat.interval_s" in paths
    assert "extra" in paths
    source_problems = [p for p in problems if p.startswith("sources[0] ('line-1')")]
    assert len(source_problems) == 2, problems
    assert any("points[0]" in p and "address" in p for p in source_problems)
    assert any("points[1]" in p and "tag" in p for p in source_problems)


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "device: edge-01\nsources: [\n  {type: modbus\nbuffer: {}\n")
    (problem,) = problems_of(path)
    assert problem.startswith("YAML syntax, line 4, column 7: while parsing a flow mapping: "
                              "expected ',' or '}', but got ':'"), problem


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "device: edge-02\n")
    (problem,) = problems_of(path)
    assert problem == ("YAML syntax, line 13, column 1: found duplicate key 'device' "
                       "(first at line 2)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "(file): no such file"),
        ("", "(file): the file is empty"),
        ("# only a comment\n", "(file): the file is empty"),
        ("- device: x\n", "(top): expected a mapping of settings, got a list"),
    ],
)
def test_missing_empty_or_not_a_mapping(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "agent.yaml"
    if content is not None:
        path.write_text(content)
    assert problems_of(path) == [expected]


def test_a_folder_is_not_a_config(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == ["(file): is a folder, not a config file"]


def test_error_message_lists_problems_under_the_file(tmp_path: Path) -> None:
    path = write_data(tmp_path, lambda d: d["buffer"].update(max_bytes=-1))
    with pytest.raises(AgentConfigError) as info:
        load_agent_config(path, environ={})
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: invalid agent config (1 problem)"
    assert lines[1].startswith("  buffer.max_bytes: ")
