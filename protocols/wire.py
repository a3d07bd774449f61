"""The wire schema every tier speaks: readings, batches, heartbeats, desired state, manifests.

Contract (details and measured figures in docs/wire.md):

* Every top-level message (`Batch`, `Heartbeat`, `DesiredState`, `ModelManifest`) carries
  `v`, the wire version. This module speaks exactly `WIRE_VERSION`; any other version is
  rejected with a `WireError` that says so. Adding or changing a field bumps the version,
  because receivers forbid unknown fields (a typo or a newer sender is an error, not data
  silently dropped). Senders speak the version of the receiver they talk to.
* Decoding is strict: types, identifier patterns, bounds and the cross-field invariants
  below are all checked. Every decoding failure raises `WireError` (a `ValueError`) whose
  message names the field path (`at $.readings[3].seq`) and the problem, raised `from`
  the underlying error. Constructing a struct in Python checks only the cross-field
  invariants (`__post_init__`); call `validate()` to apply every field constraint to an
  object built from untrusted input.
* Timestamps are integer nanoseconds since the Unix epoch, UTC: exact (a float of seconds
  has ~240 ns resolution today and compares unreliably), the same 9 bytes on msgpack.
* Values are finite floats or None. NaN and ±inf are rejected: JSON cannot carry them and
  they poison aggregates downstream. A source that cannot produce a number sends
  `value=None` with quality `uncertain` or `bad`; a `good` reading must carry a value.
* A `Batch` is one device's contiguous seq range: `readings[i].seq == first_seq + i`,
  `last_seq - first_seq + 1 == len(readings)`, `1 <= len(readings) <= MAX_BATCH_READINGS`,
  and every reading's device is the batch's device. The edge buffer assigns gap-free
  per-device seqs and the forwarder ships contiguous ranges, so a hole inside a batch is a
  bug upstream; holes *between* batches are what completeness accounting measures.

Two encodings: JSON (`encode_json`/`decode_json`; debugging, HTTP clients, the control
plane) and a binary encoding for the hot path (`encode_binary`/`decode_binary`). Binary
messages start with a 4-byte prefix `b"EF" + kind + version`; the body of a `Batch` is a
columnar msgpack array (series dictionary, delta-coded timestamps, implied seqs), the body
of the other kinds is the msgpack map of the struct.
"""

from __future__ import annotations

import enum
import re
from itertools import accumulate, chain, repeat
from operator import attrgetter, sub
from typing import Annotated, Any, Final, TypeVar, overload

import msgspec

__all__ = [
    "BINARY_MAGIC",
    "IDENTIFIER_PATTERN",
    "MAX_BATCH_READINGS",
    "WIRE_VERSION",
    "Batch",
    "DesiredState",
    "Heartbeat",
    "ModelManifest",
    "Quality",
    "Reading",
    "WireError",
    "WireMessage",
    "decode_binary",
    "decode_json",
    "decode_upload",
    "encode_binary",
    "encode_json",
    "manifest_signing_payload",
    "validate",
]

WIRE_VERSION: Final = 1
MAX_BATCH_READINGS: Final = 10_000
MAX_INT64: Final = 2**63 - 1
# Device, asset, tag, model and key names: safe in file names, URLs, Kafka keys and SQL
# identifiers alike. 128 characters at most (the pattern bounds the length). Patterns end
# in \Z, not $: msgspec uses Python's re, where $ also matches before a trailing newline.
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z"
BINARY_MAGIC: Final = b"EF"
_MAX_FLOAT: Final = 1.7976931348623157e308  # sys.float_info.max; the bounds exclude NaN/inf

Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=IDENTIFIER_PATTERN)]
# Semantic versions and build tags ("0.4.1+g3f2a").
VersionString = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,63}\Z")
]
EpochNanos = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]  # ns since 1970-01-01 UTC
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
FiniteFloat = Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0, le=_MAX_FLOAT)]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z")]
# An Ed25519 signature is 64 bytes: 88 base64 characters, canonical padding ("[AQgw]==").
Ed25519Base64 = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+/]{85}[AQgw]==\Z")]
Url = Annotated[
    str, msgspec.Meta(min_length=1, max_length=2048, pattern=r"^[a-z][a-z0-9+.-]*://\S+\Z")
]
StatusText = Annotated[str, msgspec.Meta(max_length=256)]


class WireError(ValueError):
    """A message could not be decoded or violates the schema.

    `path` is the JSON-path-like location of the problem (`$.readings[3].seq`; in a binary
    Batch the column, `$.values[2]`), `$` for an invariant of the whole message, or None
    when the bytes are not a readable message (magic, kind, version, truncation, syntax).
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class Quality(enum.StrEnum):
    """How far to trust a reading (OPC UA's Good/Uncertain/Bad status classes).

    JSON carries the name. The binary Batch carries no per-reading quality at all: it lists
    the indexes of `uncertain` and `bad` readings, and every other reading is `good`.
    """

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


def _check_version(v: int) -> None:
    if v != WIRE_VERSION:
        raise ValueError(f"unsupported wire version {v!r} (this receiver speaks {WIRE_VERSION})")


class Reading(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One sample of one tag of one asset, as read from the field device.

    `ts` is when the value was sampled (source timestamp when the protocol has one), in
    UTC epoch nanoseconds. `seq` is the device's gap-free sequence number from the edge
    buffer. `gc=False`: a reading holds only scalars, so it can never be part of a cycle.
    """

    device: Identifier
    asset: Identifier
    tag: Identifier
    ts: EpochNanos
    value: FiniteFloat | None
    quality: Quality
    seq: Seq

    def __post_init__(self) -> None:
        if self.value is None and self.quality == Quality.GOOD:
            raise ValueError("a reading with value None must have quality 'uncertain' or 'bad'")


class Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A contiguous seq range of one device's readings, as the forwarder ships them.

    `sent_at` is when the forwarder encoded the batch (UTC epoch ns): with `ts` it gives
    end-to-end latency, and a resend of the same range carries a new `sent_at`.
    """

    v: int = WIRE_VERSION
    device: Identifier
    first_seq: Seq
    last_seq: Seq
    readings: Annotated[
        tuple[Reading, ...], msgspec.Meta(min_length=1, max_length=MAX_BATCH_READINGS)
    ]
    sent_at: EpochNanos

    def __post_init__(self) -> None:
        _check_version(self.v)
        count = len(self.readings)
        # msgspec applies Meta length bounds only when decoding; re-check for Python callers.
        if not 1 <= count <= MAX_BATCH_READINGS:
            raise ValueError(
                f"a batch holds 1..{MAX_BATCH_READINGS} readings, this one holds {count}"
            )
        if self.last_seq - self.first_seq + 1 != count:
            raise ValueError(
                f"first_seq={self.first_seq} and last_seq={self.last_seq} span "
                f"{self.last_seq - self.first_seq + 1} seqs but the batch holds {count} "
                "readings; a batch is a contiguous seq range"
            )
        device = self.device
        first_seq = self.first_seq
        # A plain loop measured faster than map/attrgetter comparisons (35 vs 60 us/1000).
        for i, reading in enumerate(self.readings):
            if reading.device != device:
                raise ValueError(
                    f"readings[{i}].device is {reading.device!r} but the batch is from {device!r}"
                )
            if reading.seq != first_seq + i:
                raise ValueError(
                    f"readings[{i}].seq is {reading.seq}, expected {first_seq + i}: seqs run "
                    "contiguously from first_seq"
                )


class Heartbeat(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An agent's periodic self-report: liveness, versions, buffer health, counters.

    `buffer_depth` counts readings not yet acknowledged by the fog; `buffer_oldest_ts` is
    the `ts` of the oldest of them (None when empty). `dropped_total`/`compacted_total` are
    the buffer's full-policy counters since first start, `inference_errors_total` the model
    runtime's. `applied_generation` is the `DesiredState.generation` the agent has applied
    (0 before the first). `status` is a short human-readable line, not parsed.
    """

    v: int = WIRE_VERSION
    device: Identifier
    ts: EpochNanos
    agent_version: VersionString
    model_version: Identifier | None = None
    applied_generation: Count = 0
    buffer_depth: Count
    buffer_oldest_ts: EpochNanos | None = None
    dropped_total: Count
    compacted_total: Count
    inference_errors_total: Count = 0
    uptime_s: NonNegativeFloat
    status: StatusText = ""

    def __post_init__(self) -> None:
        _check_version(self.v)


class ModelManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A published, signed model artifact.

    `sha256` and `size_bytes` describe the ONNX file at `url`. `signature` is Ed25519 by the
    key `key_id` over `manifest_signing_payload(manifest)`, which covers every field except
    `signature` itself and `url` (so an artifact can be mirrored without re-signing; the
    signed hash still pins the bytes). `feature_schema_hash` is the sha256 of the feature
    definition the model was trained on; an agent refuses a model whose hash differs from
    its feature pipeline's. `created_at` is UTC epoch ns.
    """

    v: int = WIRE_VERSION
    name: Identifier
    version: Identifier
    sha256: Sha256Hex
    size_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_INT64)]
    signature: Ed25519Base64
    key_id: Identifier
    url: Url
    feature_schema_hash: Sha256Hex
    created_at: EpochNanos
    onnx_opset: Annotated[int, msgspec.Meta(ge=1, le=255)]

    def __post_init__(self) -> None:
        _check_version(self.v)


class DesiredState(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the control plane wants a device to run.

    `generation` increases every time the control plane changes this device's desired
    state; an agent applies a state only if its generation is newer than the one it has
    applied, so a stale or replayed message is harmless. `model` None means run without a
    model. `pinned` means an operator fixed this device's model: rollouts skip it.
    `deployment` names the rollout that produced this state, if any. `issued_at` is UTC
    epoch ns.
    """

    v: int = WIRE_VERSION
    device: Identifier
    generation: Count
    model: ModelManifest | None = None
    pinned: bool = False
    deployment: Identifier | None = None
    issued_at: EpochNanos

    def __post_init__(self) -> None:
        _check_version(self.v)


WireMessage = Batch | Heartbeat | DesiredState | ModelManifest
_M = TypeVar("_M", bound=Batch | Heartbeat | DesiredState | ModelManifest | Reading)

# --- errors -----------------------------------------------------------------------------

_PATH_RE: Final = re.compile(r" - at `(\$[^`]*)`$")
_FLOAT_BOUND_RE: Final = re.compile(r"Expected `float` [<>]= -?1\.7976931348623157e\+308")


def _wire_error(context: str, err: Exception, column_names: tuple[str, ...] = ()) -> WireError:
    """Convert a msgspec error into a WireError that keeps msgspec's field path."""
    message = str(err)
    # The finite-float bounds reject NaN and ±inf; say that rather than quoting 1.79e308.
    message = _FLOAT_BOUND_RE.sub(
        "Expected a finite `float` (NaN and inf are not allowed)", message
    )
    if column_names:
        # The columnar body is an array; name its elements in paths (`$[7][3]` -> `$.values[3]`).
        def name_column(match: re.Match[str]) -> str:
            index = int(match.group(1))
            name = column_names[index] if index < len(column_names) else match.group(1)
            return f"$.{name}"

        message = re.sub(r"\$\[(\d+)\]", name_column, message, count=1)
    found = _PATH_RE.search(message)
    if found:
        path: str | None = found.group(1)
    else:
        # msgspec omits the location for the top-level object (a batch invariant, say);
        # a DecodeError (malformed or truncated input) has no location at all.
        path = "$" if isinstance(err, msgspec.ValidationError) else None
    return WireError(f"{context}: {message}", path=path)


class _VersionProbe(msgspec.Struct):
    """Reads only `v`, ignoring every other field, to explain a failed decode."""

    v: Any = None


_JSON_PROBE: Final = msgspec.json.Decoder(_VersionProbe)
_MSGPACK_PROBE: Final = msgspec.msgpack.Decoder(_VersionProbe)


def _version_error(
    context: str,
    probe: msgspec.json.Decoder[_VersionProbe] | msgspec.msgpack.Decoder[_VersionProbe],
    data: Any,
) -> WireError | None:
    """If a message that failed to decode declares another version, report that instead.

    A newer sender's message usually fails on an unknown field before `v` is checked; the
    version is the real reason and the one a receiver must log.
    """
    try:
        declared = probe.decode(data).v
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != WIRE_VERSION:
        return WireError(
            f"{context}: unsupported wire version {declared} (this receiver speaks {WIRE_VERSION})"
        )
    return None


# --- JSON -------------------------------------------------------------------------------

_JSON_ENCODER: Final = msgspec.json.Encoder()
_JSON_DECODERS: Final[dict[type[Any], msgspec.json.Decoder[Any]]] = {
    t: msgspec.json.Decoder(t) for t in (Batch, Heartbeat, DesiredState, ModelManifest, Reading)
}


def encode_json(obj: WireMessage | Reading) -> bytes:
    """Encode a message as compact UTF-8 JSON (field order as declared, `v` first)."""
    return _JSON_ENCODER.encode(obj)


def decode_json(data: bytes | str, type_: type[_M]) -> _M:
    """Decode and fully validate JSON as `type_`; raise WireError naming the bad field."""
    decoder = _JSON_DECODERS.get(type_)
    if decoder is None:
        raise TypeError(f"{type_!r} is not a wire message type")
    try:
        result: _M = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        context = f"invalid {type_.__name__} (JSON)"
        version_error = _version_error(context, _JSON_PROBE, data)
        raise (version_error or _wire_error(context, err)) from err
    return result


def validate(obj: _M) -> _M:
    """Return `obj` after checking every field constraint, as a receiver would.

    Struct constructors do not check types, patterns or bounds (msgspec does that on
    decode); use this on objects assembled from untrusted input before sending them.
    """
    return decode_json(encode_json(obj), type(obj))


def manifest_signing_payload(manifest: ModelManifest) -> bytes:
    """The bytes a manifest's Ed25519 signature covers.

    Canonical JSON (keys sorted, no whitespace) of every field except `signature` and
    `url`. Both signer and verifier must use this function.
    """
    fields = msgspec.structs.asdict(manifest)
    del fields["signature"], fields["url"]
    return msgspec.json.encode(fields, order="sorted")


# --- binary -----------------------------------------------------------------------------
#
# Prefix (4 bytes): b"EF", one ASCII kind byte (B, H, D, M), one version byte.
# Batch body: msgpack array, see _BatchColumns. Other kinds: the msgpack map of the struct.
# The binary format never carries quality codes: good is implied, the others are listed.

_KIND_BY_TYPE: Final[dict[type[Any], bytes]] = {
    Batch: b"B",
    Heartbeat: b"H",
    DesiredState: b"D",
    ModelManifest: b"M",
}
_TYPE_BY_KIND: Final = {kind[0]: t for t, kind in _KIND_BY_TYPE.items()}
_PREFIX_LEN: Final = 4

Int64 = Annotated[int, msgspec.Meta(ge=-MAX_INT64 - 1, le=MAX_INT64)]


class _BatchColumns(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The columnar body of a binary Batch. Reading i of the batch is

        device, series[series_idx[i]] (asset, tag), ts[i], values[i], quality, first_seq + i

    with ts[i] = ts_base + ts_delta[0] + ... + ts_delta[i] (the encoder writes ts_base = ts[0],
    ts_delta[0] = 0), and quality `uncertain` if i is
    in `uncertain`, `bad` if i is in `bad` (both strictly increasing), else `good`.
    Per-row device and seq and repeated asset/tag strings are gone, small timestamp deltas
    pack into 1-5 bytes instead of 9, and mostly-good quality costs nothing.
    """

    device: Identifier
    first_seq: Seq
    sent_at: EpochNanos
    series: Annotated[
        list[tuple[Identifier, Identifier]], msgspec.Meta(max_length=MAX_BATCH_READINGS)
    ]
    series_idx: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH_READINGS)]
    ts_base: EpochNanos
    ts_delta: Annotated[list[Int64], msgspec.Meta(max_length=MAX_BATCH_READINGS)]
    values: Annotated[list[FiniteFloat | None], msgspec.Meta(max_length=MAX_BATCH_READINGS)]
    uncertain: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH_READINGS)]
    bad: Annotated[list[Count], msgspec.Meta(max_length=MAX_BATCH_READINGS)]


_COLUMN_NAMES: Final = _BatchColumns.__struct_fields__
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_COLUMNS_DECODER: Final = msgspec.msgpack.Decoder(_BatchColumns)
_MSGPACK_DECODERS: Final[dict[type[Any], msgspec.msgpack.Decoder[Any]]] = {
    t: msgspec.msgpack.Decoder(t) for t in (Heartbeat, DesiredState, ModelManifest)
}


class _SeriesInterner(dict[tuple[str, str], int]):
    """Maps (asset, tag) to its index in first-seen order; lookups of known keys stay in C."""

    def __missing__(self, key: tuple[str, str]) -> int:
        index = self[key] = len(self)
        return index


_QUALITIES: Final = frozenset(Quality)
_get_asset_tag = attrgetter("asset", "tag")
_get_ts = attrgetter("ts")
_get_value = attrgetter("value")
_get_quality = attrgetter("quality")


def _positions(items: list[Any], wanted: object) -> list[int]:
    """Indexes of `wanted` in `items`; list.index scans in C, once per hit."""
    found: list[int] = []
    try:
        while True:
            found.append(items.index(wanted, found[-1] + 1 if found else 0))
    except ValueError:
        return found


def _encode_batch_body(batch: Batch) -> bytes:
    readings = batch.readings
    interner = _SeriesInterner()
    series_idx = list(map(interner.__getitem__, map(_get_asset_tag, readings)))
    ts = list(map(_get_ts, readings))
    qualities = list(map(_get_quality, readings))
    good = qualities.count(Quality.GOOD)
    uncertain = _positions(qualities, Quality.UNCERTAIN) if good < len(qualities) else []
    bad = _positions(qualities, Quality.BAD) if good < len(qualities) else []
    if good + len(uncertain) + len(bad) != len(qualities):
        stray = next(q for q in qualities if q not in _QUALITIES)
        raise WireError(f"cannot encode Batch: {stray!r} is not a Quality")
    columns = _BatchColumns(
        device=batch.device,
        first_seq=batch.first_seq,
        sent_at=batch.sent_at,
        series=list(interner),
        series_idx=series_idx,
        ts_base=ts[0],
        ts_delta=list(map(sub, ts, chain((ts[0],), ts))),
        values=list(map(_get_value, readings)),
        uncertain=uncertain,
        bad=bad,
    )
    return _MSGPACK_ENCODER.encode(columns)


def _decode_batch_body(body: memoryview) -> Batch:
    context = "invalid Batch (binary)"
    try:
        cols = _COLUMNS_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise _wire_error(context, err, _COLUMN_NAMES) from err
    count = len(cols.values)
    if not 1 <= count <= MAX_BATCH_READINGS:
        raise WireError(f"{context}: a batch holds 1..{MAX_BATCH_READINGS} readings, got {count}")
    for name in ("series_idx", "ts_delta"):
        if len(getattr(cols, name)) != count:
            raise WireError(
                f"{context}: column {name} has {len(getattr(cols, name))} entries, "
                f"values has {count}",
                path=f"$.{name}",
            )
    series = cols.series
    if max(cols.series_idx) >= len(series):
        bad = next(i for i, s in enumerate(cols.series_idx) if s >= len(series))
        raise WireError(
            f"{context}: series index {cols.series_idx[bad]} out of range "
            f"(dictionary has {len(series)} entries) - at `$.series_idx[{bad}]`",
            path=f"$.series_idx[{bad}]",
        )
    ts = list(accumulate(cols.ts_delta, initial=cols.ts_base))
    del ts[0]
    if min(ts) < 0 or max(ts) > MAX_INT64:
        bad = next(i for i, t in enumerate(ts) if not 0 <= t <= MAX_INT64)
        raise WireError(
            f"{context}: timestamp {ts[bad]} of reading {bad} is outside 0..2**63-1 "
            f"- at `$.ts_delta[{bad}]`",
            path=f"$.ts_delta[{bad}]",
        )
    quality = [Quality.GOOD] * count
    for name, marked in (("uncertain", Quality.UNCERTAIN), ("bad", Quality.BAD)):
        previous = -1
        for position, index in enumerate(getattr(cols, name)):
            # Strictly increasing and in range, and no reading listed twice.
            if index <= previous or index >= count or quality[index] is not Quality.GOOD:
                raise WireError(
                    f"{context}: reading index {index} must be greater than {previous}, below "
                    f"{count} and not already marked - at `$.{name}[{position}]`",
                    path=f"$.{name}[{position}]",
                )
            quality[index] = marked
            previous = index
    assets = map([s[0] for s in series].__getitem__, cols.series_idx)
    tags = map([s[1] for s in series].__getitem__, cols.series_idx)
    first_seq = cols.first_seq
    if first_seq + count - 1 > MAX_INT64:
        raise WireError(f"{context}: first_seq {first_seq} + {count} readings overflows int64")
    try:
        # Struct constructors skip field checks; every column was checked above.
        readings = tuple(
            map(
                Reading,
                repeat(cols.device),
                assets,
                tags,
                ts,
                cols.values,
                quality,
                range(first_seq, first_seq + count),
            )
        )
        return Batch(
            device=cols.device,
            first_seq=first_seq,
            last_seq=first_seq + count - 1,
            readings=readings,
            sent_at=cols.sent_at,
        )
    except ValueError as err:  # Reading.__post_init__: value None with quality good
        bad = next(
            (i for i, v in enumerate(cols.values) if v is None and quality[i] is Quality.GOOD), 0
        )
        raise WireError(
            f"{context}: {err} - at `$.values[{bad}]`", path=f"$.values[{bad}]"
        ) from err


def encode_binary(obj: WireMessage) -> bytes:
    """Encode a message in the binary wire format (prefix + msgpack body)."""
    kind = _KIND_BY_TYPE.get(type(obj))
    if kind is None:
        raise TypeError(f"{type(obj)!r} has no binary wire encoding")
    prefix = BINARY_MAGIC + kind + bytes((obj.v,))
    if isinstance(obj, Batch):
        return prefix + _encode_batch_body(obj)
    return prefix + _MSGPACK_ENCODER.encode(obj)


@overload
def decode_binary(data: bytes | bytearray | memoryview) -> Batch: ...
@overload
def decode_binary(data: bytes | bytearray | memoryview, type_: type[_M]) -> _M: ...
def decode_binary(data: bytes | bytearray | memoryview, type_: type[Any] = Batch) -> Any:
    """Decode and fully validate a binary message of kind `type_` (default `Batch`).

    Foreign bytes, another kind, another version and truncated bodies raise WireError.
    """
    if type_ not in _KIND_BY_TYPE:
        raise TypeError(f"{type_!r} has no binary wire encoding")
    view = memoryview(data)
    name = type_.__name__
    if len(view) < _PREFIX_LEN or view[:2].tobytes() != BINARY_MAGIC:
        raise WireError(
            f"invalid {name} (binary): not an edgefleet wire message "
            f"(expected prefix {BINARY_MAGIC!r}, got {bytes(view[:_PREFIX_LEN])!r})"
        )
    kind, version = view[2], view[3]
    if kind != _KIND_BY_TYPE[type_][0]:
        other = _TYPE_BY_KIND.get(kind)
        got = other.__name__ if other else f"unknown kind {bytes((kind,))!r}"
        raise WireError(f"invalid {name} (binary): expected a {name} message, got {got}")
    if version != WIRE_VERSION:
        raise WireError(
            f"invalid {name} (binary): unsupported wire version {version} "
            f"(this receiver speaks {WIRE_VERSION})"
        )
    body = view[_PREFIX_LEN:]
    if type_ is Batch:
        return _decode_batch_body(body)
    try:
        return _MSGPACK_DECODERS[type_].decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        context = f"invalid {name} (binary)"
        raise (_version_error(context, _MSGPACK_PROBE, body) or _wire_error(context, err)) from err


class _ReadingsProbe(msgspec.Struct):
    """Tells a JSON Batch from a JSON Heartbeat: only a Batch has `readings`."""

    readings: Any = None


_READINGS_PROBE: Final = msgspec.json.Decoder(_ReadingsProbe)


def decode_upload(data: bytes, content_type: str = "") -> Batch | Heartbeat:
    """Decode what an agent uploads: a `Batch` or a `Heartbeat`, binary or JSON.

    Binary messages are recognised by their prefix whatever `content_type` says; JSON must
    be declared as `application/json`. Raises WireError naming the problem.
    """
    if data[:2] == BINARY_MAGIC:
        if data[2:3] == _KIND_BY_TYPE[Heartbeat]:
            return decode_binary(data, Heartbeat)
        return decode_binary(data, Batch)
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise WireError(
            f"not a wire message: the body has no {BINARY_MAGIC!r} prefix and the "
            f"Content-Type is {content_type!r}, not application/json"
        )
    try:
        is_batch = _READINGS_PROBE.decode(data).readings is not None
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise WireError(f"invalid JSON: {err}") from err
    if is_batch:
        return decode_json(data, Batch)
    return decode_json(data, Heartbeat)
