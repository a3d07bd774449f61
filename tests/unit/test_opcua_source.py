"""OPC UA source: status codes to quality, DataValues to samples, config validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes

from edgefleet.protocols.opcua import (
    OpcUaSourceConfig,
    quality_from_status,
    sample_from_datavalue,
)
from edgefleet.protocols.source import StreamingSource
from edgefleet.protocols.wire import Quality

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(("code", "quality"), [
    (StatusCodes.Good, Quality.GOOD),
    (StatusCodes.GoodClamped, Quality.GOOD),
    (StatusCodes.UncertainLastUsableValue, Quality.UNCERTAIN),
    (StatusCodes.UncertainSensorNotAccurate, Quality.UNCERTAIN),
    (StatusCodes.Bad, Quality.BAD),
    (StatusCodes.BadNodeIdUnknown, Quality.BAD),
    (StatusCodes.BadCommunicationError, Quality.BAD),
    (0xC0000000, Quality.BAD),  # reserved severity: not trusted
])
def test_status_code_severity_gives_the_quality(code: int, quality: Quality) -> None:
    assert quality_from_status(code) is quality


def datavalue(value: Any, code: int = 0, source: datetime | None = None,
              server: datetime | None = None) -> ua.DataValue:
    return ua.DataValue(value, StatusCode=ua.StatusCode(ua.UInt32(code)),
                        SourceTimestamp=source, ServerTimestamp=server)  # type: ignore[arg-type]


def test_source_timestamp_becomes_ts_ns() -> None:
    stamp = EPOCH + timedelta(seconds=1_795_000_000, microseconds=123_456)
    sample, rejected = sample_from_datavalue("pump-01", "speed", datavalue(2960.5, source=stamp),
                                             received_ns=1)
    assert not rejected
    assert sample.ts_ns == 1_795_000_000_123_456_000
    assert (sample.asset, sample.tag, sample.value, sample.quality) == (
        "pump-01", "speed", 2960.5, Quality.GOOD)


def test_server_timestamp_then_receipt_time_are_the_fallbacks() -> None:
    server = EPOCH + timedelta(seconds=10)
    sample, _ = sample_from_datavalue("a", "t", datavalue(1.0, server=server), received_ns=5)
    assert sample.ts_ns == 10_000_000_000
    sample, _ = sample_from_datavalue("a", "t", datavalue(1.0), received_ns=5)
    assert sample.ts_ns == 5


def test_uncertain_keeps_the_value_and_bad_drops_it() -> None:
    sample, _ = sample_from_datavalue(
        "a", "t", datavalue(3.5, StatusCodes.UncertainLastUsableValue), 1)
    assert (sample.value, sample.quality) == (3.5, Quality.UNCERTAIN)
    sample, rejected = sample_from_datavalue(
        "a", "t", datavalue(None, StatusCodes.BadNodeIdUnknown), 1)
    assert (sample.value, sample.quality, rejected) == (None, Quality.BAD, False)


@pytest.mark.parametrize(("value", "expected"), [(True, 1.0), (False, 0.0), (3, 3.0)])
def test_booleans_and_integers_are_numbers(value: Any, expected: float) -> None:
    sample, _ = sample_from_datavalue("a", "anomaly", datavalue(value), 1)
    assert sample.value == expected and sample.quality is Quality.GOOD


@pytest.mark.parametrize("value", ["running", float("nan"), None])
def test_good_status_without_a_number_is_bad_and_rejected(value: Any) -> None:
    sample, rejected = sample_from_datavalue("a", "t", datavalue(value), 1)
    assert rejected
    assert (sample.value, sample.quality) == (None, Quality.BAD)


def base(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "endpoint": "opc.tcp://127.0.0.1:4840",
        "nodes": [{"asset": "pump-01", "tag": "speed", "node_id": "ns=2;s=pump-01.speed"},
                  {"asset": "pump-01", "tag": "flow", "browse_path": "Plant/pump-01/flow"}],
    }
    config.update(overrides)
    return config


def test_valid_config_builds_a_streaming_source() -> None:
    config = OpcUaSourceConfig(**base())
    source = config.build()
    assert isinstance(source, StreamingSource)
    assert source.name == "opcua" and source.stats.samples == 0
    assert OpcUaSourceConfig.model_validate(config.model_dump()) == config


@pytest.mark.parametrize(("nodes", "needle"), [
    ([{"asset": "pump-01", "tag": "speed", "node_id": "ns=2;q=what"}],
     "node pump-01.speed (nodes[0])"),
    ([{"asset": "pump-01", "tag": "speed"}], "node pump-01.speed (nodes[0])"),
    ([{"asset": "pump-01", "tag": "speed", "node_id": "i=1", "browse_path": "Plant"}],
     "exactly one of node_id or browse_path"),
    ([{"asset": "pump-01", "tag": "flow", "browse_path": "Plant/x:pump/flow"}],
     "node pump-01.flow (nodes[0])"),
    ([{"asset": "pump 01", "tag": "speed", "node_id": "i=1"}],
     "node pump 01.speed (nodes[0]): asset"),
    ([{"asset": "pump-01", "tag": "speed", "node_id": "i=1", "colour": "red"}],
     "node pump-01.speed (nodes[0]): colour"),
    ([{"asset": "p", "tag": "t", "node_id": "i=1"}, {"asset": "p", "tag": "t", "node_id": "i=2"}],
     "node p.t (nodes[1]): asset/tag: same as nodes[0]"),
])
def test_node_errors_name_the_node(nodes: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(ValueError, match="opcua source 'opcua'") as info:
        OpcUaSourceConfig(**base(nodes=nodes))
    assert needle in str(info.value)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"endpoint": "http://plc:4840"}, "endpoint"),
    ({"security_policy": "Basic256Sha256"}, "security_mode"),
    ({"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt"},
     "certificate and private_key"),
    ({"password": "x"}, "password: set without a username"),
    ({"publishing_interval_s": 0}, "publishing_interval_s"),
    ({"poll_interval_s": -1}, "poll_interval_s"),
    ({"mode": "sometimes"}, "mode"),
    ({"nodes": []}, "nodes"),
    ({"reconnect_initial_s": 5, "reconnect_cap_s": 1}, "reconnect_cap_s"),
    ({"type": "modbus"}, "type"),
])
def test_field_errors_name_the_field(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match="opcua source") as info:
        OpcUaSourceConfig(**base(**overrides))
    assert needle in str(info.value)


def test_config_is_frozen_and_password_is_secret() -> None:
    config = OpcUaSourceConfig(**base(username="operator", password="s3cret!"))
    assert "s3cret!" not in repr(config)
    with pytest.raises(ValueError, match="frozen"):
        config.name = "other"
