"""HTTP ingest: `POST /v1/ingest` of one device's batch or heartbeat, acknowledged only
once it is durable downstream.

A request carries one wire message (protocols/wire.py), binary
(`application/vnd.edgefleet.wire`) or JSON (`application/json`), gzip-compressed
(`Content-Encoding: gzip`) or plain, and `Authorization: Bearer <device token>`.

Answers, and what the edge agent does with each (edge-agent/forwarder.py):

| status | when | agent |
|---|---|---|
| 202 | durable: Kafka confirmed delivery, or the embedded store committed | acks the rows |
| 409 | every seq of the batch was already accepted here (a replay) | acks |
| 400 | undecodable or invalid body; the reason names the field | dead-letters the batch |
| 401 | no token, or not one this gateway knows | holds and retries later |
| 403 | the token is another device's | holds |
| 413 | over `max_body_bytes`, or `max_decoded_bytes` once gunzipped | splits the batch |
| 415 | a Content-Encoding other than gzip/identity | dead-letters |
| 429 | too many requests in flight, or the publisher's queue is full (`Retry-After`) | backs off |
| 503 | the publisher is down (Kafka unreachable, store unavailable) (`Retry-After`) | backs off |

Every refusal is counted in `edgefleet_fog_rejected_total{reason}` and nothing of a
refused request is written: validation finishes before anything is published, and a batch
is published as one message. Replays are detected from the seq ranges this process has
accepted per device (merged ranges, bounded per device); after a restart, or for a batch
only partly seen before, the store's `(device, seq)` deduplication keeps the database
exactly-once anyway.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import logging
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edgefleet.protocols.wire import (
    BINARY_MAGIC,
    Batch,
    Heartbeat,
    WireError,
    decode_upload,
    encode_binary,
)

if TYPE_CHECKING:
    from .auth import DeviceTokens

__all__ = [
    "IngestBusy",
    "IngestLimits",
    "IngestUnavailable",
    "Publisher",
    "ReplayGuard",
    "create_app",
]

log = logging.getLogger(__name__)

WIRE_CONTENT_TYPE: Final = "application/vnd.edgefleet.wire"
REJECT_REASONS: Final = (
    "unauthenticated", "forbidden_device", "malformed", "oversize", "unsupported_encoding",
    "replayed", "busy", "unavailable",
)


class IngestBusy(Exception):
    """The publisher cannot take more now (answer 429); retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IngestUnavailable(Exception):
    """The publisher's destination is down (answer 503); retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Publisher(Protocol):
    """Where accepted messages go. Both methods return only once the message is durable
    (delivered to Kafka, or committed to the store), and raise IngestBusy or
    IngestUnavailable otherwise. `body` is the message's binary wire encoding."""

    async def publish_batch(self, batch: Batch, body: bytes) -> None: ...

    async def publish_heartbeat(self, heartbeat: Heartbeat, body: bytes) -> None: ...

    def health(self) -> tuple[bool, str]: ...


@dataclasses.dataclass(frozen=True)
class IngestLimits:
    max_body_bytes: int = 8 * 1024**2  # as received (compressed)
    max_decoded_bytes: int = 64 * 1024**2  # after gunzip: a gzip bomb stops here
    max_in_flight: int = 64  # requests being published at once; more get 429
    busy_retry_after_s: float = 1.0
    replay_ranges_per_device: int = 4096


class ReplayGuard:
    """Per device, the seqs accepted so far as merged inclusive ranges.

    Memory follows the number of holes, not rows; past `max_ranges` per device the oldest
    ranges are forgotten (a replay of those falls through to the store's deduplication).
    `max_ranges=0` switches the guard off (every replay reaches the store).
    """

    def __init__(self, max_ranges: int = 4096) -> None:
        self.max_ranges = max_ranges
        self._ranges: dict[str, tuple[list[int], list[int]]] = {}

    def covered(self, device: str, first: int, last: int) -> bool:
        ranges = self._ranges.get(device)
        if ranges is None:
            return False
        starts, ends = ranges
        i = bisect.bisect_right(starts, first) - 1
        return i >= 0 and ends[i] >= last

    def add(self, device: str, first: int, last: int) -> None:
        if self.max_ranges == 0:
            return
        starts, ends = self._ranges.setdefault(device, ([], []))
        i = bisect.bisect_left(ends, first - 1)
        j = i
        new_first, new_last = first, last
        while j < len(starts) and starts[j] <= last + 1:
            new_first, new_last = min(new_first, starts[j]), max(new_last, ends[j])
            j += 1
        starts[i:j] = [new_first]
        ends[i:j] = [new_last]
        if len(starts) > self.max_ranges:
            del starts[0], ends[0]


def _gunzip(raw: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    data = inflater.decompress(raw, limit + 1)
    if len(data) > limit or inflater.unconsumed_tail:
        raise _Oversize(f"body over {limit} bytes once decompressed")
    if not inflater.eof:
        raise WireError("truncated gzip body")
    if inflater.unused_data:
        raise WireError("trailing bytes after the gzip stream (concatenated members?)")
    return data


class _Oversize(Exception):
    pass


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "edgefleet_fog_requests", "Ingest requests answered, by status code",
            ["status"], registry=registry,
        )
        self.rejected = Counter(
            "edgefleet_fog_rejected", "Ingest requests refused, by reason",
            ["reason"], registry=registry,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.rows = Counter(
            "edgefleet_fog_rows_accepted", "Readings accepted (202)", registry=registry
        )
        self.batches = Counter(
            "edgefleet_fog_batches_accepted", "Batches accepted (202)", registry=registry
        )
        self.heartbeats = Counter(
            "edgefleet_fog_heartbeats_accepted", "Heartbeats accepted (202)", registry=registry
        )
        self.bytes = Counter(
            "edgefleet_fog_ingest_bytes", "Request bytes received, as sent", registry=registry
        )
        self.in_flight = Gauge(
            "edgefleet_fog_ingest_in_flight", "Requests being published", registry=registry
        )
        self.latency = Histogram(
            "edgefleet_fog_ingest_seconds", "Time from request body to answer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=registry,
        )


def create_app(
    tokens: DeviceTokens,
    publisher: Publisher,
    *,
    limits: IngestLimits | None = None,
    registry: CollectorRegistry | None = None,
    health_checks: dict[str, Callable[[], tuple[bool, str]]] | None = None,
    scrape_executor: concurrent.futures.Executor | None = None,
) -> FastAPI:
    """The ingest application. `/metrics` serves `registry` (a fresh one by default),
    rendered in `scrape_executor` when given (collectors that query a database must not
    block the event loop); `/healthz` is 200 when the publisher and every extra check are
    healthy, else 503."""
    limits = limits or IngestLimits()
    registry = registry or CollectorRegistry()
    metrics = _Metrics(registry)
    replays = ReplayGuard(limits.replay_ranges_per_device)
    checks = {"publisher": publisher.health, **(health_checks or {})}
    in_flight = 0
    app = FastAPI(title="edgefleet fog ingest", docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.replays = replays

    def refuse(
        status: int, reason: str, message: str, retry_after: float | None = None
    ) -> Response:
        metrics.requests.labels(str(status)).inc()
        metrics.rejected.labels(reason).inc()
        headers = {"Retry-After": f"{max(1, round(retry_after))}"} if retry_after else None
        return JSONResponse({"error": message, "reason": reason}, status, headers=headers)

    async def read_body(request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/ingest")
    async def ingest(request: Request) -> Response:
        nonlocal in_flight
        device = tokens.device_for(request.headers.get("authorization"))
        if device is None:
            return refuse(401, "unauthenticated", "missing or unknown bearer token")
        raw = await read_body(request)
        if raw is None:
            return refuse(413, "oversize", f"body over {limits.max_body_bytes} bytes")
        started = time.perf_counter()
        metrics.bytes.inc(len(raw))
        encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                data = _gunzip(raw, limits.max_decoded_bytes)
            elif encoding == "identity":
                data = raw
            else:
                return refuse(415, "unsupported_encoding",
                              f"Content-Encoding {encoding!r}: use gzip or none")
            message = decode_upload(data, request.headers.get("content-type") or "")
        except _Oversize as err:
            return refuse(413, "oversize", str(err))
        except (WireError, zlib.error) as err:
            return refuse(400, "malformed", str(err)[:1000])
        if message.device != device:
            return refuse(403, "forbidden_device",
                          f"this token belongs to device {device!r}, not {message.device!r}")
        if isinstance(message, Batch) and replays.covered(
            device, message.first_seq, message.last_seq
        ):
            return refuse(409, "replayed",
                          f"seqs {message.first_seq}..{message.last_seq} of {device!r} were "
                          "already accepted")
        if in_flight >= limits.max_in_flight:
            return refuse(429, "busy", f"{in_flight} requests in flight",
                          limits.busy_retry_after_s)
        body = data if data[:2] == BINARY_MAGIC else encode_binary(message)
        in_flight += 1
        metrics.in_flight.inc()
        try:
            if isinstance(message, Batch):
                await publisher.publish_batch(message, body)
            else:
                await publisher.publish_heartbeat(message, body)
        except IngestBusy as err:
            return refuse(429, "busy", str(err), err.retry_after)
        except IngestUnavailable as err:
            return refuse(503, "unavailable", str(err), err.retry_after)
        finally:
            in_flight -= 1
            metrics.in_flight.dec()
        if isinstance(message, Batch):
            replays.add(device, message.first_seq, message.last_seq)
            metrics.rows.inc(len(message.readings))
            metrics.batches.inc()
        else:
            metrics.heartbeats.inc()
        metrics.requests.labels("202").inc()
        metrics.latency.observe(time.perf_counter() - started)
        return JSONResponse({"status": "accepted"}, 202)

    @app.get("/healthz")
    async def healthz() -> Response:
        results = {name: check() for name, check in checks.items()}
        healthy = all(ok for ok, _ in results.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded",
             "checks": {name: {"ok": ok, "detail": detail}
                        for name, (ok, detail) in results.items()}},
            200 if healthy else 503,
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if scrape_executor is None:
            text = generate_latest(registry)
        else:
            loop = asyncio.get_running_loop()
            text = await loop.run_in_executor(scrape_executor, generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app

