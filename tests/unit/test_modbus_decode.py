"""Modbus source without a network: decoding, read planning, config validation, and the
fault paths a real simulator cannot produce (wrong-length responses), on a fake client."""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.protocols.modbus import (
    WIDTH,
    ModbusDeviceConfig,
    ModbusPointConfig,
    ModbusSourceConfig,
    decode_value,
    encode_value,
    plan_reads,
)
from edgefleet.protocols.source import PolledSource
from edgefleet.protocols.wire import Quality

ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]

# ---- decoding --------------------------------------------------------------------------

# (data type, value, {(byte_order, word_order): registers as sent})
KNOWN = [
    ("int16", -2, {("big", "big"): [0xFFFE], ("little", "big"): [0xFEFF]}),
    ("uint16", 0x1234, {("big", "big"): [0x1234], ("little", "little"): [0x3412]}),
    ("int32", 0x01020304, {
        ("big", "big"): [0x0102, 0x0304], ("big", "little"): [0x0304, 0x0102],
        ("little", "big"): [0x0201, 0x0403], ("little", "little"): [0x0403, 0x0201],
    }),
    ("int32", -1, {("big", "big"): [0xFFFF, 0xFFFF]}),
    ("uint32", 0xDEADBEEF, {
        ("big", "big"): [0xDEAD, 0xBEEF], ("big", "little"): [0xBEEF, 0xDEAD],
        ("little", "big"): [0xADDE, 0xEFBE], ("little", "little"): [0xEFBE, 0xADDE],
    }),
    ("float32", 1.0, {
        ("big", "big"): [0x3F80, 0x0000], ("big", "little"): [0x0000, 0x3F80],
        ("little", "big"): [0x803F, 0x0000], ("little", "little"): [0x0000, 0x803F],
    }),
    ("float32", -2.5, {("big", "big"): [0xC020, 0x0000]}),
    ("float64", 1.0, {
        ("big", "big"): [0x3FF0, 0, 0, 0], ("big", "little"): [0, 0, 0, 0x3FF0],
        ("little", "big"): [0xF03F, 0, 0, 0], ("little", "little"): [0, 0, 0, 0xF03F],
    }),
    ("float64", 0x0102030405060708 and 1.5, {("big", "big"): [0x3FF8, 0, 0, 0]}),
]


@pytest.mark.parametrize(("data_type", "value", "layouts"), KNOWN)
def test_known_layouts(data_type: Any, value: float, layouts: dict[Any, list[int]]) -> None:
    for (byte_order, word_order), registers in layouts.items():
        assert encode_value(value, data_type, byte_order, word_order) == registers
        assert decode_value(registers, data_type, byte_order, word_order) == value


def test_bool_and_wrong_width() -> None:
    assert decode_value([1], "bool") == 1.0
    assert decode_value([0], "bool") == 0.0
    with pytest.raises(ValueError, match="spans 2 registers"):
        decode_value([1], "float32")


_INT_RANGES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
               "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}
_STRUCT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
           "float64": "d"}


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[Any, float, str, str]:
    data_type = draw(st.sampled_from(sorted(_STRUCT)))
    byte_order, word_order = draw(st.sampled_from(ORDERS))
    if data_type in _INT_RANGES:
        low, high = _INT_RANGES[data_type]
        value: float = draw(st.integers(low, high))
    elif data_type == "float32":
        value = draw(st.floats(width=32, allow_nan=False))
    else:
        value = draw(st.floats(allow_nan=False))
    return data_type, value, byte_order, word_order


@given(typed_values())
def test_round_trip_own_encoder(case: tuple[Any, float, Any, Any]) -> None:
    data_type, value, byte_order, word_order = case
    registers = encode_value(value, data_type, byte_order, word_order)
    assert len(registers) == WIDTH[data_type]
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode_value(registers, data_type, byte_order, word_order) == value


@given(typed_values())
def test_decode_matches_struct_pack(case: tuple[Any, float, Any, Any]) -> None:
    """Independent oracle: the value packed with the word order's endianness, then cut into
    registers with big-endian bytes when byte and word order agree, little when they differ."""
    data_type, value, byte_order, word_order = case
    width = WIDTH[data_type]
    packed = struct.pack(("<" if word_order == "little" else ">") + _STRUCT[data_type], value)
    register_endian = ">" if byte_order == word_order else "<"
    registers = list(struct.unpack(f"{register_endian}{width}H", packed))
    assert decode_value(registers, data_type, byte_order, word_order) == value
    assert encode_value(value, data_type, byte_order, word_order) == registers


def test_float32_nan_decodes_as_nan() -> None:
    assert math.isnan(decode_value([0x7FC0, 0x0000], "float32"))


# ---- planning --------------------------------------------------------------------------


def point(address: int, data_type: str = "uint16", register_type: str = "holding",
          tag: str | None = None) -> ModbusPointConfig:
    return ModbusPointConfig.model_validate({
        "asset": "a", "tag": tag or f"t{register_type}{address}", "register_type": register_type,
        "address": address, "data_type": data_type,
    })


def spans(points: Sequence[ModbusPointConfig], **kwargs: Any) -> list[tuple[str, int, int]]:
    return [(b.register_type, b.address, b.count) for b in plan_reads(points, **kwargs)]


def test_adjacent_points_coalesce_and_gaps_split() -> None:
    points = [point(0, "float32"), point(2, "float32"), point(4), point(10), point(11, "int32")]
    assert spans(points) == [("holding", 0, 5), ("holding", 10, 3)]
    assert spans(points, max_gap=5) == [("holding", 0, 13)]
    assert spans(points, max_gap=4) == [("holding", 0, 5), ("holding", 10, 3)]


def test_reads_never_exceed_125_registers() -> None:
    points = [point(a, "float32") for a in range(0, 300, 2)]
    blocks = plan_reads(points)
    assert [b.count for b in blocks] == [124, 124, 52]  # a float32 never straddles two reads
    assert sum(len(b.points) for b in blocks) == len(points)
    assert all(b.count <= 125 for b in blocks)
    assert [b.count for b in plan_reads([point(a) for a in range(300)])] == [125, 125, 50]
    assert [b.count for b in plan_reads([point(a) for a in range(30)], max_registers=10)] == \
        [10, 10, 10]


def test_bits_coalesce_up_to_2000() -> None:
    coils = [point(a, "bool", "coil") for a in range(0, 4500, 3)]
    blocks = plan_reads(coils)
    assert all(b.count <= 2000 for b in blocks)
    assert [b.register_type for b in blocks] == ["coil"] * len(blocks)
    assert sum(len(b.points) for b in blocks) == len(coils)


def test_tables_are_planned_separately_and_overlaps_share_a_read() -> None:
    points = [point(0, "float32", "input"), point(0, "uint16", "holding", "h0"),
              point(0, "uint32", "holding", "h0wide"), point(0, "bool", "coil"),
              point(0, "bool", "discrete")]
    assert spans(points) == [("coil", 0, 1), ("discrete", 0, 1), ("input", 0, 2),
                             ("holding", 0, 2)]


# ---- config validation -----------------------------------------------------------------


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "devices": [{"name": "pump-1", "host": "127.0.0.1", "port": 5020},
                    {"name": "pump-2", "host": "127.0.0.1", "port": 5021}],
        "points": [{"asset": "pump-1", "tag": "flow", "address": 0, "data_type": "float32"},
                   {"asset": "pump-2", "tag": "flow", "address": 0, "data_type": "float32"}],
    }
    config.update(overrides)
    return config


def error_of(config: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        ModbusSourceConfig.model_validate(config)
    return str(caught.value)


def test_valid_config_builds_a_polled_source() -> None:
    config = ModbusSourceConfig.model_validate(base_config())
    assert config.type == "modbus"
    source = config.build()
    assert isinstance(source, PolledSource)
    assert source.reads_per_poll == 2
    # Coils default to bool.
    assert ModbusPointConfig(asset="a", tag="t", register_type="coil", address=0).data_type == \
        "bool"


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda c: c["devices"][1].update(timeout_s=-1),
     r"device 'pump-2' \(devices\[1\]\): timeout_s: Input should be greater than 0"),
    (lambda c: c["devices"][0].update(parity="X"), r"device 'pump-1' \(devices\[0\]\): parity"),
    (lambda c: c["devices"][0].update(bogus=1),
     r"device 'pump-1' \(devices\[0\]\): bogus: Extra inputs are not permitted"),
    (lambda c: c["devices"][1].update(serial_port="/dev/ttyS0"),
     r"device 'pump-2': set exactly one of host"),
    (lambda c: c["devices"][1].update(port=5020),
     r"device 'pump-2': unit_id 1 on 127.0.0.1:5020 is already device 'pump-1'"),
    (lambda c: c["points"][1].update(asset="pump-3"),
     r"device 'pump-3': points\[1\] \(pump-3.flow\): device: no device named 'pump-3'"),
    (lambda c: c["points"][0].update(register_type="coil"),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): data_type: float32 cannot be read from a "
     r"coil"),
    (lambda c: c["points"][0].update(data_type="bool"),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): data_type: bool cannot be read from a "
     r"holding"),
    (lambda c: c["points"][0].update(address=65535),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): address: float32 at 65535 runs past"),
    (lambda c: c["points"][0].update(address=-1),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): address: Input should be greater than"),
    (lambda c: c["points"][0].update(scale=math.inf),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): scale: scale must be finite"),
    (lambda c: c["points"].append({"asset": "pump-1", "tag": "flow", "address": 7}),
     r"device 'pump-1': points\[2\] \(pump-1.flow\): asset/tag: same as points\[0\]"),
    (lambda c: c["points"].pop(),
     r"device 'pump-2': no points are read from it"),
    (lambda c: c["devices"][0].update(max_read_registers=1),
     r"device 'pump-1': points\[0\] \(pump-1.flow\): data_type: float32 spans 2 registers"),
    (lambda c: c["devices"][1].update(name="pump-1"),
     r"device 'pump-1': name is used by two devices"),
])
def test_config_errors_name_device_and_field(mutate: Any, expected: str) -> None:
    config = base_config()
    mutate(config)
    assert __import__("re").search(expected, error_of(config)), error_of(config)


def test_serial_devices_on_one_line_must_agree() -> None:
    config = base_config(devices=[
        {"name": "pump-1", "serial_port": "/dev/ttyUSB0", "unit_id": 1},
        {"name": "pump-2", "serial_port": "/dev/ttyUSB0", "unit_id": 2, "baudrate": 9600},
    ])
    assert "device 'pump-2': baudrate/parity/bytesize/stopbits differ from device 'pump-1'" in \
        error_of(config)
    config["devices"][1]["baudrate"] = 19200
    source = ModbusSourceConfig.model_validate(config).build()
    assert len(source._links) == 1


def test_device_config_is_frozen() -> None:
    device = ModbusDeviceConfig(name="d", host="h")
    with pytest.raises(ValidationError):
        device.timeout_s = 3  # type: ignore[misc]


# ---- the source on a fake client -------------------------------------------------------


@dataclass
class FakeResponse:
    registers: list[int] = field(default_factory=list)
    bits: list[bool] = field(default_factory=list)
    exception_code: int = 0

    def isError(self) -> bool:
        return self.exception_code != 0


@dataclass
class FakeDevice:
    """What a fake client answers: a holding-register image, or a fault."""

    holding: list[int] = field(default_factory=lambda: [0] * 10)
    exception_code: int = 0
    short_by: int = 0
    hang: bool = False
    refuse: bool = False
    connects: int = 0


class FakeClient:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.connected = False

    async def connect(self) -> bool:
        self.device.connects += 1
        self.connected = not self.device.refuse
        return self.connected

    def close(self) -> None:
        self.connected = False

    async def read_holding_registers(self, address: int, *, count: int = 1,
                                     device_id: int = 1) -> FakeResponse:
        if self.device.hang:
            await asyncio.Event().wait()
        if self.device.exception_code:
            return FakeResponse(exception_code=self.device.exception_code)
        return FakeResponse(registers=self.device.holding[address:address + count
                                                          - self.device.short_by])

    read_input_registers = read_holding_registers

    async def read_coils(self, address: int, *, count: int = 1,
                         device_id: int = 1) -> FakeResponse:
        if self.device.hang:
            await asyncio.Event().wait()
        return FakeResponse(bits=[True] * 8)

    read_discrete_inputs = read_coils


def fake_source(devices: dict[str, FakeDevice], timeout_s: float = 0.3) -> Any:
    config = ModbusSourceConfig.model_validate({
        "reconnect_initial_s": 60, "reconnect_cap_s": 60,
        "devices": [{"name": name, "host": name, "timeout_s": timeout_s} for name in devices],
        "points": [p for name in devices for p in (
            {"asset": name, "tag": "f", "address": 0, "data_type": "float32", "scale": 2.0,
             "offset": 1.0},
            {"asset": name, "tag": "u", "address": 2, "data_type": "uint16"},
            {"asset": name, "tag": "c", "register_type": "coil", "address": 0},
        )],
    })
    return config.build(client_factory=lambda device: FakeClient(devices[device.name]))


def by_asset(samples: Sequence[Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for sample in samples:
        result.setdefault(sample.asset, {})[sample.tag] = sample
    return result


def test_fake_poll_decodes_scale_and_offset() -> None:
    good = FakeDevice(holding=encode_value(3.5, "float32") + [42] + [0] * 7)
    source = fake_source({"good": good})
    samples = by_asset(asyncio.run(source.poll()))["good"]
    assert samples["f"].value == 3.5 * 2 + 1
    assert samples["u"].value == 42
    assert samples["c"].value == 1.0
    assert all(s.quality is Quality.GOOD for s in samples.values())
    assert source.stats.samples == 3 and source.stats.bad == 0


def test_wrong_length_exception_and_timeout_are_bad_for_that_device_only() -> None:
    devices = {"good": FakeDevice(), "short": FakeDevice(short_by=1),
               "refusing": FakeDevice(exception_code=0x02), "hung": FakeDevice(hang=True)}
    source = fake_source(devices)

    async def run() -> list[Any]:
        samples = await source.poll()
        await source.close()
        return samples

    samples = by_asset(asyncio.run(run()))
    assert {s.quality for s in samples["good"].values()} == {Quality.GOOD}
    for name in ("short", "refusing"):
        assert samples[name]["f"].quality is Quality.BAD and samples[name]["f"].value is None
        assert samples[name]["c"].quality is Quality.GOOD  # the coil read succeeded
    assert {s.quality for s in samples["hung"].values()} == {Quality.BAD}
    assert source.stats.rejected == 1
    assert source.stats.errors == {"wrong_length": 1, "exception_0x02": 1, "timeout": 1}
    assert source.stats.bad == 2 + 2 + 3
    assert source.device_failing("hung") == "timeout"
    assert source.device_failing("good") is None


def test_dead_device_waits_for_backoff_and_recovery_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = FakeDevice(refuse=True)
    source = fake_source({"dead": dead})
    caplog.set_level("INFO", logger="edgefleet.protocols.modbus")

    async def run() -> None:
        for _ in range(3):
            samples = await source.poll()
            assert {s.quality for s in samples} == {Quality.BAD}
        # Backoff (60 s here) holds further connection attempts off.
        assert dead.connects == 1
        dead.refuse = False
        for link in source._links:
            link.retry_at = 0
        for _ in range(2):
            samples = await source.poll()
            assert {s.quality for s in samples} == {Quality.GOOD}

    asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("outage started" in m for m in messages) == 1
    assert sum("recovered" in m for m in messages) == 1
    assert source.stats.errors == {"connection": 3}


def test_device_poll_interval_skips_devices_not_due() -> None:
    config = ModbusSourceConfig.model_validate({
        "devices": [{"name": "slow", "host": "h", "poll_interval_s": 3600},
                    {"name": "fast", "host": "h2"}],
        "points": [{"asset": "slow", "tag": "u", "address": 0},
                   {"asset": "fast", "tag": "u", "address": 0}],
    })
    devices = {"slow": FakeDevice(), "fast": FakeDevice()}
    source = config.build(client_factory=lambda d: FakeClient(devices[d.name]))

    async def run() -> tuple[list[Any], list[Any]]:
        return await source.poll(), await source.poll()

    first, second = asyncio.run(run())
    assert sorted(s.asset for s in first) == ["fast", "slow"]
    assert [s.asset for s in second] == ["fast"]


def test_point_by_point_path_decodes_orders_and_overlaps() -> None:
    """Blocks with little-endian or overlapping points skip the one-struct fast path."""
    holding = encode_value(-7.25, "float32", "little", "little") + \
        encode_value(123456, "uint32", "big", "little") + [0] * 6
    device = FakeDevice(holding=holding)
    config = ModbusSourceConfig.model_validate({
        "devices": [{"name": "d", "host": "h"}],
        "points": [
            {"asset": "d", "tag": "f", "address": 0, "data_type": "float32",
             "byte_order": "little", "word_order": "little"},
            {"asset": "d", "tag": "u", "address": 2, "data_type": "uint32",
             "word_order": "little", "scale": 0.5},
            {"asset": "d", "tag": "overlap", "address": 3, "data_type": "uint16"},
        ],
    })
    source = config.build(client_factory=lambda _: FakeClient(device))
    got = by_asset(asyncio.run(source.poll()))["d"]
    assert got["f"].value == -7.25
    assert got["u"].value == 123456 * 0.5
    assert got["overlap"].value == holding[3]


def test_register_map_is_documented_and_printable() -> None:
    from edgefleet.firmware_sim.modbus_server import format_register_map, register_map
    from edgefleet.firmware_sim.model import AssetKind

    entries = register_map()
    holding = [e for e in entries if e.table == "holding"]
    assert sum(e.count for e in holding) == 100  # contiguous 0..99
    assert [e.name for e in entries if e.table == "input" and e.data_type == "float32"] == [
        "speed", "flow", "pressure", "current", "temperature", "vibration"]
    assert any(e.table == "coil" and e.address == 0 and e.name == "anomaly_active"
               for e in entries)
    text = format_register_map(AssetKind.PUMP)
    assert "speed [rpm]" in text and "anomaly_kind" in text and "mbpoll" in text
