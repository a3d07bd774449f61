"""Scenarios: generated from flags or read from YAML, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.firmware_sim.model import AssetKind
from edgefleet.firmware_sim.scenario import Scenario, ScenarioError


def test_generate_assigns_kinds_and_protocols_round_robin() -> None:
    scenario = Scenario.generate(20, ["modbus", "opcua", "mqtt"], anomaly_rate=0.05, seed=7)
    assert len(scenario.assets) == 20
    assert {a.kind for a in scenario.assets} == set(AssetKind)
    assert [len(scenario.assets_on(p)) for p in ("modbus", "opcua", "mqtt")] == [7, 7, 6]
    assert len({a.name for a in scenario.assets}) == 20


def test_same_scenario_and_seed_build_the_same_plant() -> None:
    scenario = Scenario.generate(6, ["modbus"], seed=11, start_ns=1_795_000_000 * 10**9)
    one, other = scenario.build_plant(), scenario.build_plant()
    for plant in (one, other):
        plant.advance_to(1_795_000_600 * 10**9)
    assert all(one.values(a.name) == other.values(a.name) for a in scenario.assets)


def test_yaml_scenario_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(
        "seed: 3\nanomaly_rate: 0.1\nassets:\n"
        "  - {name: pump-01, kind: pump, protocol: modbus}\n"
        "  - {name: comp-01, kind: compressor, protocol: opcua}\n"
        "modbus: {byte_order: little, word_order: little}\n"
    )
    scenario = Scenario.from_yaml(path)
    assert scenario.seed == 3 and scenario.assets_on("opcua") == ["comp-01"]
    assert scenario.modbus.byte_order == "little"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("assets: []\n", "assets: List should have at least 1 item"),
        ("anomaly_rate: 2\nassets: [{name: a, kind: pump, protocol: modbus}]\n",
         "anomaly_rate: Input should be less than 1"),
        ("assets: [{name: a, kind: turbine, protocol: modbus}]\n", "assets.0.kind"),
        ("assets: [{name: a, kind: pump, protocol: profinet}]\n", "assets.0.protocol"),
        ("assets: [{name: a, kind: pump, protocol: modbus, colour: red}]\n", "assets.0.colour"),
        ("assets: [{name: a, kind: pump, protocol: modbus},"
         " {name: a, kind: pump, protocol: opcua}]\n", "repeated: a"),
        ("assets: [{name: a, kind: pump, protocol: modbus}]\nmodbus: {word_order: middle}\n",
         "modbus.word_order"),
        ("assets: [\n", "while parsing"),
    ],
)
def test_bad_scenarios_name_the_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        Scenario.from_yaml(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_unknown_protocol_on_the_command_line() -> None:
    with pytest.raises(ScenarioError, match=r"unknown protocol.*bacnet"):
        Scenario.generate(3, ["modbus", "bacnet"])
