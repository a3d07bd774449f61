"""`edgefleet bench wire`: encode+decode cost and size of a 1,000-reading Batch per encoding.

Every candidate starts from its own native object (a `Batch`, a pydantic model, a dict)
and ends with a decoded one, so the figure is what a forwarder plus a gateway pay per
batch. The msgspec and pydantic candidates validate fully (identifier patterns, bounds,
batch invariants; `msgpack_array_like_ids_once` checks each distinct identifier once
rather than per field); msgpack-python with dicts validates nothing and is a floor, not an
option. `*_gzip_us` adds gzip and gunzip, as on the forwarder's HTTPS path. Timings are
medians: per run the median of many calls, then the median over runs interleaved across
candidates, because the machines this runs on are shared. docs/wire.md reads the figures.
"""

from __future__ import annotations

import gzip
import random
import re
import statistics
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import pydantic

from . import wire
from .wire import Batch, Quality, Reading

__all__ = ["bench_wire", "sample_batch"]

CHOSEN = "msgpack_columnar"
GZIP_LEVEL = 6  # gzip's and httpx's default
_TAGS = ("temp_c", "pressure_bar", "vibration_rms", "current_a", "speed_rpm", "flow_lpm")
_BASELINES = (60.0, 6.5, 2.1, 14.0, 1480.0, 35.0)


def sample_batch(readings: int = 1000, seed: int = 7) -> Batch:
    """A realistic forwarder batch: 1 device, 10 assets x 6 tags polled once a second.

    Values are noisy floats (full 64-bit mantissas), 1 % of readings are `uncertain` and
    0.5 % are `bad` with no value, seqs continue a long-running device's counter.
    """
    rng = random.Random(seed)
    device = "plant1.press-line-07"
    start_ns = 1_795_000_000_000_000_000
    first_seq = 48_211_903
    rows: list[Reading] = []
    cycle = 0
    while len(rows) < readings:
        for asset in range(10):
            for tag, baseline in zip(_TAGS, _BASELINES, strict=True):
                if len(rows) == readings:
                    break
                # One Modbus round trip per asset: ~4 ms apart within a 1 s poll cycle.
                ts = start_ns + cycle * 1_000_000_000 + asset * 4_000_000 + rng.randrange(50_000)
                draw = rng.random()
                quality = (
                    Quality.BAD
                    if draw < 0.005
                    else (Quality.UNCERTAIN if draw < 0.015 else Quality.GOOD)
                )
                value = None if quality is Quality.BAD else baseline * (1 + rng.gauss(0, 0.02))
                rows.append(
                    Reading(
                        device,
                        f"press-{asset:02d}",
                        tag,
                        ts,
                        value,
                        quality,
                        first_seq + len(rows),
                    )
                )
        cycle += 1
    return Batch(
        device=device,
        first_seq=first_seq,
        last_seq=first_seq + readings - 1,
        readings=tuple(rows),
        sent_at=start_ns + cycle * 1_000_000_000,
    )


# --- candidate (b): the same schema with array_like structs ------------------------------


class _ArrayReading(Reading, array_like=True, frozen=True, gc=False):
    pass


class _ArrayBatch(Batch, array_like=True, frozen=True):
    readings: Annotated[
        tuple[_ArrayReading, ...], msgspec.Meta(min_length=1, max_length=wire.MAX_BATCH_READINGS)
    ]


# --- candidate (b2): array_like rows, identifier patterns checked once per distinct value --
#
# Per-field regex checks cost ~0.3 us per string, 3,000 strings per batch; this variant asks
# what row-wise would cost if the schema checked each distinct identifier once instead.

_PlainId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_IDENTIFIER_RE = re.compile(wire.IDENTIFIER_PATTERN)


class _ArrayReadingIdsOnce(msgspec.Struct, array_like=True, frozen=True, gc=False):
    device: _PlainId
    asset: _PlainId
    tag: _PlainId
    ts: wire.EpochNanos
    value: wire.FiniteFloat | None
    quality: Quality
    seq: wire.Seq

    def __post_init__(self) -> None:
        if self.value is None and self.quality == Quality.GOOD:
            raise ValueError("a reading with value None must have quality 'uncertain' or 'bad'")


class _ArrayBatchIdsOnce(_ArrayBatch, frozen=True):
    readings: Annotated[  # type: ignore[assignment]
        tuple[_ArrayReadingIdsOnce, ...],
        msgspec.Meta(min_length=1, max_length=wire.MAX_BATCH_READINGS),
    ]

    def __post_init__(self) -> None:
        super().__post_init__()
        names = {r.asset for r in self.readings} | {r.tag for r in self.readings}
        for name in names:
            if not _IDENTIFIER_RE.match(name):
                raise ValueError(f"{name!r} is not a valid identifier")


# --- candidate (e): pydantic v2 models with the same constraints -------------------------

# pydantic compiles patterns with Rust's regex, where $ is end-of-text and \Z is unknown.
_PydId = Annotated[
    str,
    pydantic.Field(
        min_length=1, max_length=128, pattern=wire.IDENTIFIER_PATTERN.replace("\\Z", "$")
    ),
]
_PydNonNeg = Annotated[int, pydantic.Field(ge=0, le=wire.MAX_INT64)]


class _PydReading(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    device: _PydId
    asset: _PydId
    tag: _PydId
    ts: _PydNonNeg
    value: Annotated[float, pydantic.Field(allow_inf_nan=False)] | None
    quality: Quality
    seq: _PydNonNeg

    @pydantic.model_validator(mode="after")
    def _good_has_value(self) -> _PydReading:
        if self.value is None and self.quality == Quality.GOOD:
            raise ValueError("a reading with value None must have quality 'uncertain' or 'bad'")
        return self


class _PydBatch(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
    v: int = wire.WIRE_VERSION
    device: _PydId
    first_seq: _PydNonNeg
    last_seq: _PydNonNeg
    readings: Annotated[
        tuple[_PydReading, ...], pydantic.Field(min_length=1, max_length=wire.MAX_BATCH_READINGS)
    ]
    sent_at: _PydNonNeg

    @pydantic.model_validator(mode="after")
    def _invariants(self) -> _PydBatch:
        if self.last_seq - self.first_seq + 1 != len(self.readings):
            raise ValueError("a batch is a contiguous seq range")
        for i, reading in enumerate(self.readings):
            if reading.device != self.device or reading.seq != self.first_seq + i:
                raise ValueError(f"readings[{i}] breaks the batch invariants")
        return self


# --- measurement -----------------------------------------------------------------------


class _Candidate:
    def __init__(
        self, name: str, encode: Callable[[], bytes], decode: Callable[[bytes], object]
    ) -> None:
        self.name = name
        self.encode = encode
        self.decode = decode
        self.payload = encode()
        self.encode_decode_ns: list[float] = []
        self.encode_ns: list[float] = []
        self.decode_ns: list[float] = []
        self.gzip_ns: list[float] = []

    def round_trip(self) -> object:
        return self.decode(self.encode())

    def decode_payload(self) -> object:
        return self.decode(self.payload)

    def gzip_round_trip(self) -> object:
        """What the HTTPS forwarding path pays: encode, gzip, gunzip, decode."""
        return self.decode(gzip.decompress(gzip.compress(self.encode(), GZIP_LEVEL)))


def _candidates(batch: Batch) -> list[_Candidate]:
    array_batch = _ArrayBatch(
        device=batch.device,
        first_seq=batch.first_seq,
        last_seq=batch.last_seq,
        readings=tuple(_ArrayReading(*msgspec.structs.astuple(r)) for r in batch.readings),
        sent_at=batch.sent_at,
    )
    ids_once_batch = _ArrayBatchIdsOnce(
        device=batch.device,
        first_seq=batch.first_seq,
        last_seq=batch.last_seq,
        readings=tuple(_ArrayReadingIdsOnce(*msgspec.structs.astuple(r)) for r in batch.readings),
        sent_at=batch.sent_at,
    )
    pyd_batch = _PydBatch.model_validate(msgspec.to_builtins(batch))
    dict_batch = msgspec.to_builtins(batch)
    rows_encoder = msgspec.msgpack.Encoder()
    rows_decoder = msgspec.msgpack.Decoder(Batch)
    array_decoder = msgspec.msgpack.Decoder(_ArrayBatch)
    found = [
        _Candidate("msgpack_rows", lambda: rows_encoder.encode(batch), rows_decoder.decode),
        _Candidate(
            "msgpack_array_like", lambda: rows_encoder.encode(array_batch), array_decoder.decode
        ),
        _Candidate(
            "msgpack_array_like_ids_once",
            lambda: rows_encoder.encode(ids_once_batch),
            msgspec.msgpack.Decoder(_ArrayBatchIdsOnce).decode,
        ),
        _Candidate("msgpack_columnar", lambda: wire.encode_binary(batch), wire.decode_binary),
        _Candidate(
            "msgspec_json",
            lambda: wire.encode_json(batch),
            lambda data: wire.decode_json(data, Batch),
        ),
        _Candidate(
            "pydantic_json",
            lambda: pyd_batch.model_dump_json().encode(),
            _PydBatch.model_validate_json,
        ),
    ]
    try:
        import msgpack  # dev extra: an optional candidate
    except ImportError:
        return found
    found.append(
        _Candidate(
            "msgpack_python_dicts",
            lambda: msgpack.packb(dict_batch),
            msgpack.unpackb,
        )
    )
    return found


def _median_ns(fn: Callable[[], object], iterations: int) -> float:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def bench_wire(runs: int = 7, budget_s_per_run: float = 1.6) -> dict[str, Any]:
    """Measure every candidate; return one flat dict of figures (µs are medians)."""
    batch = sample_batch(1000)
    candidates = _candidates(batch)
    for candidate in candidates:  # a decode that fails must fail here, not be timed
        candidate.gzip_round_trip()
    # Size iterations so one run of all candidates takes about budget_s_per_run.
    per_call = {c.name: max(_median_ns(c.gzip_round_trip, 3), 1.0) for c in candidates}
    share_ns = budget_s_per_run * 1e9 / (4 * len(candidates))
    for _ in range(runs):
        for c in candidates:
            n = max(5, min(400, int(share_ns / per_call[c.name])))
            c.encode_decode_ns.append(_median_ns(c.round_trip, n))
            c.encode_ns.append(_median_ns(c.encode, n))
            c.decode_ns.append(_median_ns(c.decode_payload, n))
            c.gzip_ns.append(_median_ns(c.gzip_round_trip, max(5, n // 3)))

    figures: dict[str, Any] = {"readings_per_batch": len(batch.readings), "runs": runs}
    for c in candidates:
        prefix = f"candidate_{c.name}"
        figures[f"{prefix}_us"] = round(statistics.median(c.encode_decode_ns) / 1000, 1)
        figures[f"{prefix}_encode_us"] = round(statistics.median(c.encode_ns) / 1000, 1)
        figures[f"{prefix}_decode_us"] = round(statistics.median(c.decode_ns) / 1000, 1)
        figures[f"{prefix}_bytes"] = len(c.payload)
        figures[f"{prefix}_gzip_us"] = round(statistics.median(c.gzip_ns) / 1000, 1)
        figures[f"{prefix}_gzip_bytes"] = len(gzip.compress(c.payload, GZIP_LEVEL))
    figures["chosen"] = CHOSEN
    figures["encode_decode_1000_us"] = figures[f"candidate_{CHOSEN}_us"]
    figures["encoded_bytes_1000"] = figures[f"candidate_{CHOSEN}_bytes"]
    figures["encode_gzip_decode_1000_us"] = figures[f"candidate_{CHOSEN}_gzip_us"]
    figures["json_encode_decode_1000_us"] = figures["candidate_msgspec_json_us"]
    figures["binary_vs_pydantic_json_speedup"] = round(
        figures["candidate_pydantic_json_us"] / figures["encode_decode_1000_us"], 1
    )
    return figures
