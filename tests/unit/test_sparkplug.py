"""The hand-written Sparkplug B codec: round trips, cross-checks with an independent
implementation (pysparkplug, which uses Google's protobuf runtime), unknown fields, and
every kind of malformed input raising SparkplugDecodeError."""

from __future__ import annotations

import contextlib
import math
import struct

# An independent Sparkplug implementation, installed by `make venv` with --no-deps because
# it pins paho-mqtt<2; a missing one fails these tests rather than skipping them.
import pysparkplug
import pysparkplug._protobuf as pb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols.sparkplug import (
    DataType,
    Metric,
    Payload,
    SparkplugDecodeError,
    SparkplugError,
    SparkplugTopic,
    decode_payload,
    encode_payload,
    parse_topic,
)

_RANGES = {
    DataType.INT8: (-(2**7), 2**7 - 1), DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1), DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT8: (0, 2**8 - 1), DataType.UINT16: (0, 2**16 - 1),
    DataType.UINT32: (0, 2**32 - 1), DataType.UINT64: (0, 2**64 - 1),
    DataType.DATETIME: (0, 2**64 - 1),
}


@st.composite
def metrics(draw: st.DrawFn) -> Metric:
    datatype = draw(st.sampled_from([*_RANGES, DataType.FLOAT, DataType.DOUBLE,
                                     DataType.BOOLEAN, DataType.STRING, DataType.TEXT,
                                     DataType.BYTES]))
    value: object
    if datatype in _RANGES:
        low, high = _RANGES[datatype]
        value = draw(st.integers(low, high))
    elif datatype == DataType.FLOAT:
        value = draw(st.floats(width=32, allow_nan=False))
    elif datatype == DataType.DOUBLE:
        value = draw(st.floats(allow_nan=False))
    elif datatype == DataType.BOOLEAN:
        value = draw(st.booleans())
    elif datatype == DataType.BYTES:
        value = draw(st.binary(max_size=20))
    else:
        value = draw(st.text(max_size=20))
    if draw(st.booleans()):
        value = None
    return Metric(
        name=draw(st.none() | st.text(max_size=30)),
        alias=draw(st.none() | st.integers(0, 2**64 - 1)),
        timestamp=draw(st.none() | st.integers(0, 2**64 - 1)),
        datatype=datatype,
        value=value,  # type: ignore[arg-type]
        is_null=value is None,
        is_historical=draw(st.booleans()),
        is_transient=draw(st.booleans()),
    )


payloads = st.builds(
    Payload,
    timestamp=st.none() | st.integers(0, 2**64 - 1),
    metrics=st.lists(metrics(), max_size=6).map(tuple),
    seq=st.none() | st.integers(0, 255),
    uuid=st.none() | st.text(max_size=10),
    body=st.none() | st.binary(max_size=10),
)


def same(decoded: Metric, original: Metric) -> bool:
    return (decoded.name, decoded.alias, decoded.timestamp, decoded.datatype, decoded.value,
            decoded.is_null, decoded.is_historical, decoded.is_transient) == (
        original.name, original.alias, original.timestamp, original.datatype, original.value,
        original.is_null, original.is_historical, original.is_transient)


@settings(max_examples=300, deadline=None)
@given(payloads)
def test_round_trip(payload: Payload) -> None:
    decoded = decode_payload(encode_payload(payload))
    assert (decoded.timestamp, decoded.seq, decoded.uuid, decoded.body) == (
        payload.timestamp, payload.seq, payload.uuid, payload.body)
    assert len(decoded.metrics) == len(payload.metrics)
    for got, want in zip(decoded.metrics, payload.metrics, strict=True):
        assert same(got, want), (got, want)


@settings(max_examples=200, deadline=None)
@given(payloads)
def test_google_protobuf_reads_what_we_write_and_we_read_what_it_writes(
        payload: Payload) -> None:
    ours = encode_payload(payload)
    theirs = pb.Payload.FromString(ours)
    assert len(theirs.metrics) == len(payload.metrics)
    assert decode_payload(theirs.SerializeToString()) == decode_payload(ours)


def test_pysparkplug_payloads_decode() -> None:
    sp = pysparkplug
    birth = sp.DBirth(timestamp=1_700_000_000_123, seq=7, metrics=(
        sp.Metric(timestamp=1_700_000_000_100, name="speed", datatype=sp.DataType.DOUBLE,
                  value=2950.5, alias=1),
        sp.Metric(timestamp=None, name="flow", datatype=sp.DataType.FLOAT, value=12.25, alias=2),
        sp.Metric(timestamp=None, name="level", datatype=sp.DataType.INT8, value=-3, alias=3),
        sp.Metric(timestamp=None, name="count", datatype=sp.DataType.INT64, value=-(2**40),
                  alias=4),
        sp.Metric(timestamp=None, name="on", datatype=sp.DataType.BOOLEAN, value=True, alias=5),
        sp.Metric(timestamp=None, name="label", datatype=sp.DataType.STRING, value="pümp",
                  alias=6),
        sp.Metric(timestamp=None, name="gone", datatype=sp.DataType.DOUBLE, value=None, alias=7),
    ))
    decoded = decode_payload(birth.encode(include_dtypes=True))
    assert decoded.timestamp == 1_700_000_000_123 and decoded.seq == 7
    by_name = {m.name: m for m in decoded.metrics}
    assert by_name["speed"].value == 2950.5 and by_name["speed"].timestamp == 1_700_000_000_100
    assert by_name["flow"].value == 12.25 and by_name["flow"].datatype == DataType.FLOAT
    assert by_name["level"].value == -3
    assert by_name["count"].value == -(2**40)
    assert by_name["on"].value is True
    assert by_name["label"].value == "pümp"
    assert by_name["gone"].is_null and by_name["gone"].value is None
    assert [m.alias for m in decoded.metrics] == [1, 2, 3, 4, 5, 6, 7]

    # DDATA by alias without datatypes: the birth's datatype re-reads the value.
    data = sp.DData(timestamp=5, seq=8, metrics=(
        sp.Metric(timestamp=None, name=None, alias=3, datatype=sp.DataType.INT8, value=-100),
    )).encode()
    metric = decode_payload(data).metrics[0]
    assert metric.name is None and metric.datatype == DataType.UNKNOWN
    assert metric.with_datatype(DataType.INT8).value == -100


def test_our_payloads_decode_in_pysparkplug() -> None:
    sp = pysparkplug
    ours = encode_payload(Payload(timestamp=99, seq=255, metrics=(
        Metric("speed", 1, 98, DataType.DOUBLE, 1480.25),
        Metric("flow", 2, None, DataType.FLOAT, 0.5),
        Metric("code", 3, None, DataType.INT32, -7),
        Metric("small", 4, None, DataType.INT16, -300),
        Metric("alarm", 5, None, DataType.BOOLEAN, False),
        Metric("bdSeq", 6, None, DataType.UINT64, 2**63 + 5),
        Metric("null", 7, None, DataType.DOUBLE, None, is_null=True),
    )))
    birth = sp.DBirth.decode(ours)
    values = {m.name: m.value for m in birth.metrics}
    assert values == {"speed": 1480.25, "flow": 0.5, "code": -7, "small": -300, "alarm": False,
                      "bdSeq": 2**63 + 5, "null": None}
    assert birth.seq == 255 and birth.timestamp == 99


def test_java_style_sign_extended_int8_decodes() -> None:
    # Tahu's Java sign-extends an Int8 to 32 bits in int_value.
    metric = pb.Payload.Metric(name="x", datatype=DataType.INT8, int_value=0xFFFFFFFD)
    raw = pb.Payload(timestamp=1, metrics=[metric]).SerializeToString()
    assert decode_payload(raw).metrics[0].value == -3


def test_unknown_and_unsupported_fields_are_skipped() -> None:
    metric = pb.Payload.Metric(name="speed", alias=4, datatype=DataType.DOUBLE,
                               double_value=3.5)
    metric.metadata.description = "rpm"  # field 8: a message we do not read
    metric.properties.keys.append("engUnit")  # field 9
    other = pb.Payload.Metric(name="table", datatype=16)  # a DataSet value: skipped
    other.dataset_value.num_of_columns = 1
    raw = pb.Payload(timestamp=1, seq=2, metrics=[metric, other]).SerializeToString()
    # Fields a newer proto might add: a varint, a fixed64, a fixed32, a blob and a group.
    extra = bytes([0xF8, 0x01, 0x05, 0xF9, 0x01]) + bytes(8) + bytes([0xFD, 0x01]) + bytes(4)
    extra += bytes([0xF2, 0x01, 0x02, 0x41, 0x42]) + bytes([0xFB, 0x01, 0x08, 0x01, 0xFC, 0x01])
    decoded = decode_payload(raw + extra)
    assert decoded.metrics[0].value == 3.5 and decoded.metrics[0].alias == 4
    assert decoded.metrics[1].name == "table" and decoded.metrics[1].value is None
    assert decoded.seq == 2


def test_last_scalar_wins_and_int_value_is_32_bits() -> None:
    raw = bytes([0x18, 0x01, 0x18, 0x02])  # seq twice
    assert decode_payload(raw).seq == 2
    # An int_value varint wider than 32 bits keeps its low 32 bits, as protobuf does.
    body = bytes([0x20, 0x07, 0x50]) + _varint(2**33 + 5)
    assert decode_payload(bytes([0x12, len(body)]) + body).metrics[0].value == 5


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x08", "truncated varint"),
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    (b"\x08" + b"\xff" * 9 + b"\x7f", "larger than 64 bits"),
    (b"\x12\x05\x0a", "runs past the end"),
    (b"\x00\x01", "field number 0"),
    (b"\x0e", "invalid wire type 6"),
    (b"\x0a\x01\x00", "timestamp (field 1) has wire type 2"),
    (b"\x12\x03\x0a\x01\xff", "name is not UTF-8"),
    (b"\xfb\x01\x08\x01", "is not closed"),
    (b"\xfc\x01", "without a start"),
    (b"\x12\x02\x65\x00", "metrics\\[0\\]: field of 4 bytes runs past"),
    (b"\x12\x01\x61", "float_value (field 12)"),
])
def test_malformed_input_raises_one_error_type(raw: bytes, problem: str) -> None:
    with pytest.raises(SparkplugDecodeError, match=problem.replace("(", r"\(").replace(
            ")", r"\)")):
        decode_payload(raw)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_the_codec_error(raw: bytes) -> None:
    with contextlib.suppress(SparkplugDecodeError):
        decode_payload(raw)


def test_encoding_checks_ranges_and_types() -> None:
    with pytest.raises(SparkplugError, match="out of range for INT8"):
        encode_payload(Payload(metrics=(Metric("x", datatype=DataType.INT8, value=200),)))
    with pytest.raises(SparkplugError, match="needs an int"):
        encode_payload(Payload(metrics=(Metric("x", datatype=DataType.INT32, value=1.5),)))
    with pytest.raises(SparkplugError, match="does not fit a FLOAT"):
        encode_payload(Payload(metrics=(Metric("x", datatype=DataType.FLOAT, value=1e300),)))
    with pytest.raises(SparkplugError, match="datatype 0"):
        encode_payload(Payload(metrics=(Metric("x", value=1.0),)))
    nan = decode_payload(encode_payload(Payload(metrics=(
        Metric("x", datatype=DataType.DOUBLE, value=math.nan),))))
    assert math.isnan(nan.metrics[0].value)  # type: ignore[arg-type]
    assert struct.calcsize("<f") == 4


def test_topics() -> None:
    topic = parse_topic("spBv1.0/plant/DDATA/gw-1/pump-01")
    assert topic == SparkplugTopic("plant", "DDATA", "gw-1", "pump-01")
    assert str(topic) == "spBv1.0/plant/DDATA/gw-1/pump-01"
    assert parse_topic("spBv1.0/plant/NBIRTH/gw-1") == SparkplugTopic("plant", "NBIRTH", "gw-1")
    for bad in ("spBv1.0/plant/DDATA/gw-1", "spBv1.0/plant/NDATA/gw-1/x", "plant/a/b/c",
                "spBv1.0/plant/FOO/gw", "spBv1.0//NBIRTH/gw"):
        assert parse_topic(bad) is None, bad
