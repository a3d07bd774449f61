"""One list of sources, discriminated by `type:`, with errors naming source and field."""

from __future__ import annotations

import pytest
import yaml

from edgefleet.protocols.config import SourceConfigError, load_sources
from edgefleet.protocols.modbus import ModbusSourceConfig
from edgefleet.protocols.opcua import OpcUaSourceConfig

GOOD = """
- type: modbus
  name: line-1
  devices: [{name: pump-01, host: 127.0.0.1, port: 5020}]
  points: [{asset: pump-01, tag: flow, register_type: input, address: 2, data_type: float32}]
- type: opcua
  name: cell-2
  endpoint: opc.tcp://127.0.0.1:4840
  nodes: [{asset: comp-01, tag: pressure, browse_path: Plant/comp-01/pressure}]
"""


def test_sources_are_discriminated_by_type() -> None:
    sources = load_sources(yaml.safe_load(GOOD))
    assert [type(s) for s in sources] == [ModbusSourceConfig, OpcUaSourceConfig]
    assert [s.name for s in sources] == ["line-1", "cell-2"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d[0].update(type="profinet"), ["sources[0] ('line-1')", "type", "profinet"]),
        (lambda d: d[0]["devices"][0].update(timeout_s=-1),
         ["sources[0] ('line-1')", "pump-01", "timeout_s"]),
        (lambda d: d[1].update(endpont="x"), ["sources[1] ('cell-2')", "endpont", "xtra"]),
        (lambda d: d[1].pop("endpoint"), ["sources[1] ('cell-2')", "endpoint", "required"]),
        (lambda d: d[1].update(name="line-1"), ["repeated: line-1"]),
    ],
)
def test_bad_sources_name_the_source_and_field(edit, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(GOOD)
    edit(data)
    with pytest.raises(SourceConfigError) as info:
        load_sources(data)
    assert all(part in str(info.value) for part in expected), str(info.value)
