"""The wire schema: round trips for every type and encoding, and clear rejections."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.protocols import wire
from edgefleet.protocols.bench import sample_batch
from edgefleet.protocols.wire import (
    MAX_BATCH_READINGS,
    WIRE_VERSION,
    Batch,
    DesiredState,
    Heartbeat,
    ModelManifest,
    Quality,
    Reading,
    WireError,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json,
)

MAX_INT64 = 2**63 - 1
# The shared test machine is noisy; correctness, not speed, is under test here.
relaxed = settings(deadline=None)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}", fullmatch=True)
epoch_ns = st.integers(0, MAX_INT64)
counts = st.integers(0, MAX_INT64)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    device = draw(identifiers)
    count = draw(st.integers(1, 40))
    first_seq = draw(st.integers(0, MAX_INT64 - count + 1))
    series = draw(st.lists(st.tuples(identifiers, identifiers), min_size=1, max_size=6))
    rows = []
    for i in range(count):
        asset, tag = draw(st.sampled_from(series))
        quality = draw(st.sampled_from(Quality))
        value = draw(finite_floats if quality is Quality.GOOD else st.none() | finite_floats)
        rows.append(Reading(device, asset, tag, draw(epoch_ns), value, quality, first_seq + i))
    return Batch(
        device=device,
        first_seq=first_seq,
        last_seq=first_seq + count - 1,
        readings=tuple(rows),
        sent_at=draw(epoch_ns),
    )


heartbeats = st.builds(
    Heartbeat,
    device=identifiers,
    ts=epoch_ns,
    agent_version=st.from_regex(
        r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(\+g[0-9a-f]{7})?", fullmatch=True
    ),
    model_version=st.none() | identifiers,
    applied_generation=counts,
    buffer_depth=counts,
    buffer_oldest_ts=st.none() | epoch_ns,
    dropped_total=counts,
    compacted_total=counts,
    inference_errors_total=counts,
    uptime_s=st.floats(0, 1e12, allow_nan=False),
    status=st.text(max_size=256),
)
manifests = st.builds(
    ModelManifest,
    name=identifiers,
    version=identifiers,
    sha256=st.binary(min_size=32, max_size=32).map(bytes.hex),
    size_bytes=st.integers(1, MAX_INT64),
    signature=st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()),
    key_id=identifiers,
    url=st.builds(
        lambda host, name: f"https://{host}/models/{name}.onnx", identifiers, identifiers
    ),
    feature_schema_hash=st.binary(min_size=32, max_size=32).map(bytes.hex),
    created_at=epoch_ns,
    onnx_opset=st.integers(1, 255),
)
desired_states = st.builds(
    DesiredState,
    device=identifiers,
    generation=counts,
    model=st.none() | manifests,
    pinned=st.booleans(),
    deployment=st.none() | identifiers,
    issued_at=epoch_ns,
)
messages = batches() | heartbeats | manifests | desired_states


def manifest(**changes: Any) -> ModelManifest:
    fields: dict[str, Any] = {
        "name": "press-anomaly",
        "version": "7",
        "sha256": hashlib.sha256(b"onnx bytes").hexdigest(),
        "size_bytes": 10,
        "signature": base64.b64encode(bytes(64)).decode(),
        "key_id": "release-2026",
        "url": "https://cloud.example/models/press-anomaly/7.onnx",
        "feature_schema_hash": hashlib.sha256(b"features v3").hexdigest(),
        "created_at": 1_795_000_000_000_000_000,
        "onnx_opset": 17,
    }
    fields.update(changes)
    return ModelManifest(**fields)


def batch_json(**changes: Any) -> dict[str, Any]:
    """A valid 5-reading batch as JSON-ready builtins, with top-level fields replaced."""
    doc: dict[str, Any] = msgspec.to_builtins(sample_batch(5))
    doc.update(changes)
    return doc


def decode_batch_doc(doc: object) -> Batch:
    return decode_json(json.dumps(doc), Batch)


def columnar_body(count: int, **changes: Any) -> bytes:
    """A binary Batch written by hand from the layout in docs/wire.md."""
    columns: dict[str, Any] = {
        "device": "dev-1",
        "first_seq": 100,
        "sent_at": 1_795_000_000_000_000_000,
        "series": [["press-01", "temp_c"]],
        "series_idx": [0] * count,
        "ts_base": 1_795_000_000_000_000_000,
        "ts_delta": [0] * count,
        "values": [1.5] * count,
        "uncertain": [],
        "bad": [],
    }
    columns.update(changes)
    prefix = b"EFB" + bytes((WIRE_VERSION,))
    return prefix + msgspec.msgpack.encode(list(columns.values()))


# --- round trips -----------------------------------------------------------------------


@relaxed
@given(messages)
def test_json_round_trip_every_message_type(message: wire.WireMessage) -> None:
    assert decode_json(encode_json(message), type(message)) == message
    assert wire.validate(message) == message


@relaxed
@given(messages)
def test_binary_round_trip_every_message_type(message: wire.WireMessage) -> None:
    data = encode_binary(message)
    assert data[:2] == b"EF" and data[3] == WIRE_VERSION
    assert decode_binary(data, type(message)) == message


@relaxed
@given(batches())
def test_binary_batch_is_the_default_and_accepts_any_buffer(batch: Batch) -> None:
    data = encode_binary(batch)
    assert decode_binary(data) == batch
    assert decode_binary(bytearray(data)) == batch
    assert decode_binary(memoryview(data)) == batch


@relaxed
@given(
    st.builds(
        Reading,
        identifiers,
        identifiers,
        identifiers,
        epoch_ns,
        finite_floats,
        st.just(Quality.GOOD),
        counts,
    )
)
def test_json_round_trip_reading(reading: Reading) -> None:
    assert decode_json(encode_json(reading), Reading) == reading


def test_json_is_readable_and_carries_the_version_first() -> None:
    doc = json.loads(encode_json(sample_batch(3)))
    assert next(iter(doc)) == "v" and doc["v"] == WIRE_VERSION
    assert doc["readings"][0]["quality"] == "good"
    assert isinstance(doc["readings"][0]["ts"], int)


def test_columnar_binary_is_far_smaller_than_rows() -> None:
    batch = sample_batch(1000)
    columnar = len(encode_binary(batch))
    assert columnar < len(msgspec.msgpack.encode(batch)) / 4
    assert columnar < len(encode_json(batch)) / 8


# --- rejections: every error is a WireError naming the field ------------------------


def test_wrong_type_names_the_field_path() -> None:
    doc = batch_json()
    doc["readings"][3]["seq"] = "3"
    with pytest.raises(
        WireError, match=r"Expected `int`, got `str` - at `\$\.readings\[3\]\.seq`"
    ) as info:
        decode_batch_doc(doc)
    assert info.value.path == "$.readings[3].seq"
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)


def test_missing_field() -> None:
    doc = batch_json()
    del doc["sent_at"]
    with pytest.raises(WireError, match="missing required field `sent_at`"):
        decode_batch_doc(doc)


def test_unknown_field_is_rejected_not_dropped() -> None:
    doc = batch_json()
    doc["readings"][1]["unit"] = "degC"
    with pytest.raises(WireError, match=r"unknown field `unit` - at `\$\.readings\[1\]`"):
        decode_batch_doc(doc)


def test_device_mismatch_in_a_batch() -> None:
    doc = batch_json()
    doc["readings"][2]["device"] = "someone-else"
    with pytest.raises(WireError, match=r"readings\[2\]\.device is 'someone-else'") as info:
        decode_batch_doc(doc)
    assert info.value.path == "$"


def test_non_contiguous_seq_in_a_batch() -> None:
    doc = batch_json()
    doc["readings"][2]["seq"] += 1
    doc["readings"][3]["seq"] += 1
    doc["readings"][4]["seq"] += 1
    doc["last_seq"] += 1
    with pytest.raises(WireError, match=r"span 6 seqs but the batch holds 5"):
        decode_batch_doc(doc)
    doc = batch_json()
    doc["readings"][1]["seq"], doc["readings"][2]["seq"] = (
        doc["readings"][2]["seq"],
        doc["readings"][1]["seq"],
    )
    with pytest.raises(WireError, match=r"readings\[1\]\.seq is \d+, expected \d+"):
        decode_batch_doc(doc)


def test_oversize_and_empty_batches() -> None:
    row = batch_json()["readings"][0]
    rows = [dict(row, seq=i) for i in range(MAX_BATCH_READINGS + 1)]
    doc = batch_json(readings=rows, first_seq=0, last_seq=MAX_BATCH_READINGS)
    with pytest.raises(WireError, match=r"length <= 10000 - at `\$\.readings`"):
        decode_batch_doc(doc)
    with pytest.raises(WireError, match=r"length >= 1 - at `\$\.readings`"):
        decode_batch_doc(batch_json(readings=[]))
    # series_idx is the first per-reading column, so it is the one reported.
    with pytest.raises(WireError, match=r"length <= 10000 - at `\$\.series_idx`"):
        decode_binary(columnar_body(MAX_BATCH_READINGS + 1))
    with pytest.raises(WireError, match=r"holds 1\.\.10000 readings, got 0"):
        decode_binary(columnar_body(0))


def test_constructing_a_bad_batch_in_python_fails_early() -> None:
    good = sample_batch(3)
    with pytest.raises(ValueError, match="contiguous seq range"):
        Batch(device=good.device, first_seq=0, last_seq=5, readings=good.readings, sent_at=0)
    with pytest.raises(ValueError, match="quality 'uncertain' or 'bad'"):
        Reading("d", "a", "t", 0, None, Quality.GOOD, 0)


def test_identifiers_are_checked_even_with_a_trailing_newline() -> None:
    doc = batch_json(device="dev-1\n")
    with pytest.raises(WireError, match=r"matching regex .* - at `\$\.device`"):
        decode_batch_doc(doc)
    with pytest.raises(WireError, match=r"at `\$\.readings\[0\]\.asset`"):
        doc = batch_json()
        doc["readings"][0]["asset"] = "pump 1; DROP TABLE"
        decode_batch_doc(doc)


def test_values_must_be_finite_and_good_readings_need_one() -> None:
    doc = batch_json()
    with pytest.raises(WireError, match=r"at `\$\.readings\[0\]\.value`"):
        decode_json(json.dumps(doc).replace('"value":', '"value": 1e999, "x":', 1), Batch)
    good = sample_batch(4)
    rows = list(good.readings)
    rows[2] = msgspec.structs.replace(rows[2], value=math.nan)
    data = encode_binary(msgspec.structs.replace(good, readings=tuple(rows)))
    with pytest.raises(WireError, match=r"finite `float` .* - at `\$\.values\[2\]`"):
        decode_binary(data)
    doc = batch_json()
    doc["readings"][0].update(value=None, quality="good")
    with pytest.raises(
        WireError, match=r"value None must have quality .* - at `\$\.readings\[0\]`"
    ):
        decode_batch_doc(doc)
    with pytest.raises(WireError, match=r"value None must have quality .* `\$\.values\[1\]`"):
        decode_binary(columnar_body(2, values=[1.0, None]))


def test_bad_sha256_and_signature() -> None:
    doc = msgspec.to_builtins(manifest())
    doc["sha256"] = doc["sha256"].upper()
    with pytest.raises(WireError, match=r"matching regex .* - at `\$\.sha256`"):
        decode_json(json.dumps(doc), ModelManifest)
    doc = msgspec.to_builtins(manifest())
    doc["signature"] = doc["signature"][:-2]
    with pytest.raises(WireError, match=r"at `\$\.signature`"):
        decode_json(json.dumps(doc), ModelManifest)


def test_nested_manifest_errors_name_the_full_path() -> None:
    state = DesiredState(device="dev-1", generation=3, model=manifest(), issued_at=1)
    doc = msgspec.to_builtins(state)
    doc["model"]["onnx_opset"] = 0
    with pytest.raises(WireError, match=r"at `\$\.model\.onnx_opset`"):
        decode_json(json.dumps(doc), DesiredState)


def test_foreign_truncated_and_mismatched_binary() -> None:
    data = encode_binary(sample_batch(50))
    with pytest.raises(WireError, match="not an edgefleet wire message"):
        decode_binary(b"PK\x03\x04" + data[4:])
    with pytest.raises(WireError, match="not an edgefleet wire message"):
        decode_binary(data[:3])
    with pytest.raises(WireError, match="truncated") as info:
        decode_binary(data[:-7])
    assert isinstance(info.value.__cause__, msgspec.DecodeError)
    heartbeat = Heartbeat(
        device="dev-1",
        ts=1,
        agent_version="0.1.0",
        buffer_depth=0,
        dropped_total=0,
        compacted_total=0,
        uptime_s=1.0,
    )
    with pytest.raises(WireError, match="expected a Batch message, got Heartbeat"):
        decode_binary(encode_binary(heartbeat))
    with pytest.raises(WireError, match="truncated"):
        decode_binary(encode_binary(heartbeat)[:-3], Heartbeat)


def test_hand_written_columnar_bodies_are_checked() -> None:
    assert len(decode_binary(columnar_body(3)).readings) == 3
    with pytest.raises(WireError, match=r"series index 1 out of range .* `\$\.series_idx\[2\]`"):
        decode_binary(columnar_body(3, series_idx=[0, 0, 1]))
    with pytest.raises(WireError, match=r"column ts_delta has 2 entries, values has 3"):
        decode_binary(columnar_body(3, ts_delta=[0, 0]))
    with pytest.raises(WireError, match=r"at `\$\.bad\[1\]`"):
        decode_binary(columnar_body(3, bad=[2, 1]))
    with pytest.raises(WireError, match=r"at `\$\.bad\[0\]`"):
        decode_binary(columnar_body(3, uncertain=[1], bad=[1]))
    with pytest.raises(WireError, match=r"at `\$\.uncertain\[0\]`"):
        decode_binary(columnar_body(3, uncertain=[3]))
    with pytest.raises(WireError, match=r"outside 0\.\.2\*\*63-1 - at `\$\.ts_delta\[1\]`"):
        decode_binary(columnar_body(3, ts_base=5, ts_delta=[0, -6, 0]))
    with pytest.raises(WireError, match=r"Expected `str`, got `int` - at `\$\.device`"):
        decode_binary(columnar_body(3, device=7))
    decoded = decode_binary(columnar_body(3, uncertain=[0], bad=[2], values=[1.0, 2.0, None]))
    assert [r.quality for r in decoded.readings] == [Quality.UNCERTAIN, Quality.GOOD, Quality.BAD]
    assert [r.seq for r in decoded.readings] == [100, 101, 102]


def test_a_future_version_is_reported_as_such() -> None:
    data = bytearray(encode_binary(sample_batch(5)))
    data[3] = WIRE_VERSION + 1
    with pytest.raises(WireError, match="unsupported wire version 2 \\(this receiver speaks 1\\)"):
        decode_binary(bytes(data))
    # A newer sender adds fields; the version, not the unknown field, is the reason given.
    doc = batch_json(v=WIRE_VERSION + 1, compression="zstd")
    with pytest.raises(WireError, match="unsupported wire version 2"):
        decode_batch_doc(doc)
    heartbeat = msgspec.to_builtins(
        Heartbeat(
            device="d",
            ts=1,
            agent_version="1.0.0",
            buffer_depth=0,
            dropped_total=0,
            compacted_total=0,
            uptime_s=0.0,
        )
    )
    heartbeat["v"] = 9
    with pytest.raises(WireError, match="unsupported wire version 9"):
        decode_json(json.dumps(heartbeat), Heartbeat)
    with pytest.raises(ValueError, match="unsupported wire version 0"):
        Batch(
            v=0,
            device="d",
            first_seq=0,
            last_seq=0,
            readings=(Reading("d", "a", "t", 0, 1.0, Quality.GOOD, 0),),
            sent_at=0,
        )


def test_garbage_json_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="invalid Batch \\(JSON\\)"):
        decode_json(b"{not json", Batch)
    with pytest.raises(WireError, match="Expected `object`, got `array`"):
        decode_json(b"[]", Heartbeat)


# --- manifest signatures ------------------------------------------------------------


def test_signing_payload_covers_everything_but_signature_and_url() -> None:
    ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    key = ed25519.Ed25519PrivateKey.generate()
    unsigned = manifest()
    signature = base64.b64encode(key.sign(wire.manifest_signing_payload(unsigned))).decode()
    signed = msgspec.structs.replace(unsigned, signature=signature)
    assert decode_json(encode_json(signed), ModelManifest) == signed  # canonical padding
    public = key.public_key()
    mirrored = msgspec.structs.replace(signed, url="https://fog.local/cache/7.onnx")
    public.verify(base64.b64decode(signed.signature), wire.manifest_signing_payload(mirrored))
    tampered = msgspec.structs.replace(signed, sha256=hashlib.sha256(b"evil").hexdigest())
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        public.verify(base64.b64decode(signed.signature), wire.manifest_signing_payload(tampered))
    payload = json.loads(wire.manifest_signing_payload(signed))
    assert "signature" not in payload and "url" not in payload
    assert list(payload) == sorted(payload)


# --- the benchmark, through the CLI -------------------------------------------------


def test_bench_wire_cli_prints_one_json_object() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "bench", "wire", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(completed.stdout)
    assert isinstance(figures, dict)
    assert figures["encode_decode_1000_us"] > 0
    assert figures["chosen"] == "msgpack_columnar"
    assert figures["encoded_bytes_1000"] == len(encode_binary(sample_batch(1000)))
    assert figures["json_encode_decode_1000_us"] > 0
    assert figures["binary_vs_pydantic_json_speedup"] > 0
    for name in ("msgpack_rows", "msgpack_array_like", "msgspec_json", "pydantic_json"):
        assert figures[f"candidate_{name}_us"] > 0
        assert figures[f"candidate_{name}_bytes"] > figures["encoded_bytes_1000"]
