"""Sparkplug B payloads and topics, without a protobuf runtime.

The Sparkplug B `Payload` message (Eclipse Tahu's `sparkplug_b.proto`) is written and read
here by hand in the protobuf wire format, so that the edge install needs no protobuf
package and every decoding failure is one exception type, `SparkplugDecodeError`.

What is covered (field numbers from the proto):

    Payload { 1 timestamp: uint64, 2 metrics: repeated Metric, 3 seq: uint64,
              4 uuid: string, 5 body: bytes }
    Metric  { 1 name: string, 2 alias: uint64, 3 timestamp: uint64, 4 datatype: uint32,
              5 is_historical: bool, 6 is_transient: bool, 7 is_null: bool,
              oneof value { 10 int_value: uint32, 11 long_value: uint64, 12 float_value:
              float, 13 double_value: double, 14 boolean_value: bool, 15 string_value:
              string, 16 bytes_value: bytes } }

Everything else (metadata, property sets, data sets, templates, extensions, fields a
newer proto adds) is skipped by wire type, as protobuf requires; a metric whose value was
in such a field decodes with `value=None` (check `is_null` to tell a real null).

Decoding rules, as protobuf's: the last occurrence of a scalar field wins, `int_value` is
read as uint32 (higher varint bits are dropped), booleans are any non-zero varint. A known
field with the wrong wire type, a truncated or over-long varint, a length that runs past
its message, wire types 6/7, field number 0, unbalanced groups and strings that are not
UTF-8 all raise `SparkplugDecodeError` (a `ValueError`) saying where.

Signed integers (Int8/16/32 in `int_value`, Int64 in `long_value`) travel as two's
complement. Implementations disagree on the width for Int8/Int16 (Tahu's Java sign-extends
to 32 bits, Tahu's Python and pysparkplug use the type's own width): the decoder reads the
type's low bits, so it takes both; the encoder writes the type's own width, which every
reader accepts. `Metric.value` is the signed number when the metric carries its datatype.
A DDATA metric may omit its datatype (it is in the birth): `Metric.with_datatype()`
re-reads the value with the birth's datatype.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Final

__all__ = [
    "NAMESPACE",
    "REBIRTH_METRIC",
    "DataType",
    "Metric",
    "MetricValue",
    "Payload",
    "SparkplugDecodeError",
    "SparkplugError",
    "SparkplugTopic",
    "decode_payload",
    "encode_payload",
    "parse_topic",
]

NAMESPACE: Final = "spBv1.0"
REBIRTH_METRIC: Final = "Node Control/Rebirth"
BDSEQ_METRIC: Final = "bdSeq"

MetricValue = int | float | bool | str | bytes


class SparkplugError(ValueError):
    """A value cannot be encoded as a Sparkplug B payload (out of range, wrong type)."""


class SparkplugDecodeError(SparkplugError):
    """Bytes are not a readable Sparkplug B payload; the message says what and where."""


class DataType(enum.IntEnum):
    """Sparkplug B metric datatypes (the ones this codec reads and writes by value)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13  # ms since the epoch, in long_value
    TEXT = 14
    UUID = 15
    BYTES = 17
    FILE = 18


# Field numbers of the value oneof.
_INT, _LONG, _FLOAT, _DOUBLE, _BOOL, _STRING, _BYTES = 10, 11, 12, 13, 14, 15, 16
# datatype -> (value field, bits, signed) for the integer types
_INTEGERS: Final[dict[int, tuple[int, int, bool]]] = {
    DataType.INT8: (_INT, 8, True), DataType.INT16: (_INT, 16, True),
    DataType.INT32: (_INT, 32, True), DataType.INT64: (_LONG, 64, True),
    DataType.UINT8: (_INT, 8, False), DataType.UINT16: (_INT, 16, False),
    DataType.UINT32: (_INT, 32, False), DataType.UINT64: (_LONG, 64, False),
    DataType.DATETIME: (_LONG, 64, False),
}
_TEXTS: Final = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})
_BLOBS: Final = frozenset({DataType.BYTES, DataType.FILE})
_U32: Final = (1 << 32) - 1
_U64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric. In a birth it has a name, datatype and (usually) an alias; in DDATA it
    may have only the alias. `timestamp` is ms since the epoch (UTC)."""

    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None
    datatype: int = DataType.UNKNOWN
    value: MetricValue | None = None
    is_null: bool = False
    is_historical: bool = False
    is_transient: bool = False
    # How the value travelled (its field number), so it can be re-read by datatype.
    wire_field: int | None = None

    def with_datatype(self, datatype: int) -> Metric:
        """This metric read as `datatype` (the one its birth declared)."""
        if self.datatype != DataType.UNKNOWN or datatype == DataType.UNKNOWN:
            return self
        value = self.value
        spec = _INTEGERS.get(datatype)
        if spec is not None and isinstance(value, int) and not isinstance(value, bool):
            value = _signed(value, spec[1]) if spec[2] else value
        return replace(self, datatype=datatype, value=value)


@dataclass(frozen=True, slots=True)
class Payload:
    """A Sparkplug B payload. `timestamp` is ms since the epoch (UTC); `seq` is 0..255 in
    every message but NDEATH (which has none)."""

    timestamp: int | None = None
    metrics: tuple[Metric, ...] = ()
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    """`spBv1.0/<group>/<message type>/<edge node>[/<device>]`."""

    group_id: str
    message_type: str  # NBIRTH, NDEATH, DBIRTH, DDEATH, NDATA, DDATA, NCMD, DCMD
    edge_node_id: str
    device_id: str | None = None

    def __str__(self) -> str:
        parts = [NAMESPACE, self.group_id, self.message_type, self.edge_node_id]
        if self.device_id is not None:
            parts.append(self.device_id)
        return "/".join(parts)


_MESSAGE_TYPES: Final = frozenset(
    {"NBIRTH", "NDEATH", "DBIRTH", "DDEATH", "NDATA", "DDATA", "NCMD", "DCMD"})


def parse_topic(topic: str) -> SparkplugTopic | None:
    """The parts of a Sparkplug B topic, or None if `topic` is not one."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[2] not in _MESSAGE_TYPES:
        return None
    if any(not part for part in parts):
        return None
    device = parts[4] if len(parts) == 5 else None
    if (device is None) != parts[2].startswith("N"):
        return None
    return SparkplugTopic(parts[1], parts[2], parts[3], device)


# ---- encoding ----------------------------------------------------------------------------


def _varint(value: int, out: bytearray) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _key(field: int, wire_type: int, out: bytearray) -> None:
    _varint((field << 3) | wire_type, out)


def _uint_field(field: int, value: int, out: bytearray, bits: int = 64) -> None:
    if not 0 <= value < (1 << bits):
        raise SparkplugError(f"field {field}: {value} is not a uint{bits}")
    _key(field, 0, out)
    _varint(value, out)


def _bytes_field(field: int, value: bytes, out: bytearray) -> None:
    _key(field, 2, out)
    _varint(len(value), out)
    out += value


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _encode_value(metric: Metric, out: bytearray) -> None:
    value, datatype = metric.value, metric.datatype
    where = f"metric {metric.name or metric.alias!r}"
    if datatype in _INTEGERS:
        field, bits, signed = _INTEGERS[datatype]
        if isinstance(value, bool) or not isinstance(value, int):
            raise SparkplugError(f"{where}: {DataType(datatype).name} needs an int, "
                                 f"got {value!r}")
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if not low <= value <= high:
            raise SparkplugError(f"{where}: {value} is out of range for "
                                 f"{DataType(datatype).name}")
        _key(field, 0, out)
        _varint(value & ((1 << bits) - 1), out)
    elif datatype in (DataType.FLOAT, DataType.DOUBLE):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SparkplugError(f"{where}: {DataType(datatype).name} needs a number, "
                                 f"got {value!r}")
        try:
            if datatype == DataType.FLOAT:
                _key(_FLOAT, 5, out)
                out += struct.pack("<f", value)
            else:
                _key(_DOUBLE, 1, out)
                out += struct.pack("<d", value)
        except (OverflowError, struct.error) as err:
            raise SparkplugError(f"{where}: {value!r} does not fit a "
                                 f"{DataType(datatype).name}") from err
    elif datatype == DataType.BOOLEAN:
        if not isinstance(value, bool):
            raise SparkplugError(f"{where}: BOOLEAN needs a bool, got {value!r}")
        _key(_BOOL, 0, out)
        out.append(1 if value else 0)
    elif datatype in _TEXTS:
        if not isinstance(value, str):
            raise SparkplugError(f"{where}: {DataType(datatype).name} needs a str")
        _bytes_field(_STRING, value.encode(), out)
    elif datatype in _BLOBS:
        if not isinstance(value, bytes):
            raise SparkplugError(f"{where}: {DataType(datatype).name} needs bytes")
        _bytes_field(_BYTES, value, out)
    else:
        raise SparkplugError(f"{where}: cannot encode a value of datatype {datatype}")


def _encode_metric(metric: Metric) -> bytes:
    out = bytearray()
    if metric.name is not None:
        _bytes_field(1, metric.name.encode(), out)
    if metric.alias is not None:
        _uint_field(2, metric.alias, out)
    if metric.timestamp is not None:
        _uint_field(3, metric.timestamp, out)
    if metric.datatype != DataType.UNKNOWN:
        _uint_field(4, metric.datatype, out, bits=32)
    for field, flag in ((5, metric.is_historical), (6, metric.is_transient),
                        (7, metric.is_null or metric.value is None)):
        if flag:
            _key(field, 0, out)
            out.append(1)
    if not metric.is_null and metric.value is not None:
        _encode_value(metric, out)
    return bytes(out)


def encode_payload(payload: Payload) -> bytes:
    """The protobuf bytes of `payload`. A metric is encoded by its `datatype`; with
    `value=None` (or `is_null`) it is sent as null. Raises `SparkplugError` for a value
    that does not fit its datatype."""
    out = bytearray()
    if payload.timestamp is not None:
        _uint_field(1, payload.timestamp, out)
    for metric in payload.metrics:
        _bytes_field(2, _encode_metric(metric), out)
    if payload.seq is not None:
        _uint_field(3, payload.seq, out)
    if payload.uuid is not None:
        _bytes_field(4, payload.uuid.encode(), out)
    if payload.body is not None:
        _bytes_field(5, payload.body, out)
    return bytes(out)


# ---- decoding ----------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "end", "pos", "where")

    def __init__(self, data: bytes | memoryview, where: str) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.where = where

    def fail(self, problem: str) -> SparkplugDecodeError:
        return SparkplugDecodeError(f"{self.where}: {problem} (at byte {self.pos})")

    def varint(self) -> int:
        result = shift = 0
        data, pos, end = self.data, self.pos, self.end
        while True:
            if pos >= end:
                raise self.fail("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise self.fail("varint longer than 10 bytes")
        self.pos = pos
        if result > _U64:
            raise self.fail("varint larger than 64 bits")
        return result

    def take(self, size: int) -> memoryview | bytes:
        if size > self.end - self.pos:
            raise self.fail(f"field of {size} bytes runs past the end")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def key(self) -> tuple[int, int]:
        key = self.varint()
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise self.fail("field number 0")
        if wire_type > 5:
            raise self.fail(f"invalid wire type {wire_type}")
        return field, wire_type

    def skip(self, field: int, wire_type: int) -> None:
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self.take(8)
        elif wire_type == 2:
            self.take(self.varint())
        elif wire_type == 5:
            self.take(4)
        elif wire_type == 3:  # a (deprecated) group: skip to its matching end-group
            while True:
                if self.pos >= self.end:
                    raise self.fail(f"group {field} is not closed")
                inner, inner_type = self.key()
                if inner_type == 4:
                    if inner != field:
                        raise self.fail(f"group {field} closed by end-group {inner}")
                    return
                self.skip(inner, inner_type)
        else:  # 4: an end-group with no start
            raise self.fail(f"end-group {field} without a start")

    def text(self, name: str) -> str:
        raw = self.take(self.varint())
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{name} is not UTF-8") from err

    def expect(self, field: int, wire_type: int, wanted: int, name: str) -> None:
        if wire_type != wanted:
            raise self.fail(f"{name} (field {field}) has wire type {wire_type}, "
                            f"expected {wanted}")


_WIRE_TYPES: Final = {1: 2, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0, _INT: 0, _LONG: 0, _FLOAT: 5,
                      _DOUBLE: 1, _BOOL: 0, _STRING: 2, _BYTES: 2}
_METRIC_FIELDS: Final = {1: "name", 2: "alias", 3: "timestamp", 4: "datatype",
                         5: "is_historical", 6: "is_transient", 7: "is_null",
                         _INT: "int_value", _LONG: "long_value", _FLOAT: "float_value",
                         _DOUBLE: "double_value", _BOOL: "boolean_value",
                         _STRING: "string_value", _BYTES: "bytes_value"}
_OTHER_VALUE_FIELDS: Final = frozenset({17, 18, 19})  # dataset, template, extension


def _decode_metric(data: bytes | memoryview, where: str) -> Metric:
    reader = _Reader(data, where)
    name: str | None = None
    alias = timestamp = None
    datatype = 0
    flags = [False, False, False]  # historical, transient, null
    value: MetricValue | None = None
    wire_field: int | None = None
    while reader.pos < reader.end:
        field, wire_type = reader.key()
        label = _METRIC_FIELDS.get(field)
        if label is None:
            if field in _OTHER_VALUE_FIELDS:  # the oneof moved to a type we do not read
                value, wire_field = None, field
            reader.skip(field, wire_type)
            continue
        reader.expect(field, wire_type, _WIRE_TYPES[field], label)
        if field == 1:
            name = reader.text("name")
        elif field == 2:
            alias = reader.varint()
        elif field == 3:
            timestamp = reader.varint()
        elif field == 4:
            datatype = reader.varint() & _U32
        elif field in (5, 6, 7):
            flags[field - 5] = reader.varint() != 0
        else:
            wire_field = field
            if field == _INT:
                value = reader.varint() & _U32
            elif field == _LONG:
                value = reader.varint()
            elif field == _FLOAT:
                value = struct.unpack("<f", reader.take(4))[0]
            elif field == _DOUBLE:
                value = struct.unpack("<d", reader.take(8))[0]
            elif field == _BOOL:
                value = reader.varint() != 0
            elif field == _STRING:
                value = reader.text("string_value")
            else:
                value = bytes(reader.take(reader.varint()))
    metric = Metric(name, alias, timestamp, 0, value, flags[2], flags[0], flags[1], wire_field)
    return metric.with_datatype(datatype) if datatype else metric


def decode_payload(data: bytes | bytearray | memoryview) -> Payload:
    """Read a Sparkplug B payload. Raises `SparkplugDecodeError` for anything unreadable."""
    view = memoryview(data)
    reader = _Reader(view, "payload")
    timestamp = seq = None
    uuid: str | None = None
    body: bytes | None = None
    metrics: list[Metric] = []
    names = {1: "timestamp", 2: "metrics", 3: "seq", 4: "uuid", 5: "body"}
    while reader.pos < reader.end:
        field, wire_type = reader.key()
        if field not in names:
            reader.skip(field, wire_type)
            continue
        reader.expect(field, wire_type, 2 if field in (2, 4, 5) else 0, names[field])
        if field == 1:
            timestamp = reader.varint()
        elif field == 2:
            chunk = reader.take(reader.varint())
            metrics.append(_decode_metric(chunk, f"metrics[{len(metrics)}]"))
        elif field == 3:
            seq = reader.varint()
        elif field == 4:
            uuid = reader.text("uuid")
        else:
            body = bytes(reader.take(reader.varint()))
    return Payload(timestamp, tuple(metrics), seq, uuid, body)
