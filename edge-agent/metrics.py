"""The agent's local `/metrics` (Prometheus text) and `/healthz` endpoint.

Nothing is counted on the hot path for metrics' sake: the agent's components keep their
own counters (`SourceStats`, `BufferStats`, `ForwarderStats`, the scorer's, the alert
sink's, `AgentStats`), and `AgentCollector` turns one `AgentSnapshot` of them into metric
families at scrape time. The collector lives in its own `CollectorRegistry`, so the
process-global registry (and anything else in the process that uses it) is untouched.

Names (all `edgefleet_agent_*`; the device is the scrape target, not a label):

=========================================  =========  ====================================
metric                                     type       meaning
=========================================  =========  ====================================
`info{device,version,model_version}`       gauge      1
`uptime_seconds`                           gauge
`samples_total{source}`                    counter    samples read (any quality)
`source_bad_samples_total{source}`         counter    samples read with quality bad
`source_rejected_total{source}`            counter    messages dropped as undecodable
`source_reconnects_total{source}`          counter
`source_up{source}`                        gauge      1 if the source's health is `up`
`buffer_up`                                gauge      1 if the buffer's stats could be read
`buffer_depth_rows`                        gauge      unacknowledged rows
`buffer_oldest_age_seconds`                gauge      age of the oldest of them (0: empty)
`buffer_bytes`                             gauge      buffer files on disk
`buffer_full`                              gauge      1 while appends are refused
`buffer_dropped_rows_total`                counter    `drop_oldest` (ever, persisted)
`buffer_compacted_rows_total`              counter    `downsample` (ever, persisted)
`buffer_appends_refused_total`             counter    since start
`buffer_dlq_batches`, `buffer_dlq_rows`    gauge      dead letters waiting for an operator
`forward_rows_total`                       counter    rows the fog acknowledged
`forward_batches_total`                    counter
`forward_bytes_total`                      counter    encoded bytes sent
`forward_retries_total`                    counter
`forward_dead_lettered_rows_total`         counter
`fog_connected`                            gauge      1 if the last send reached the fog
`inference_seconds{quantile="0.5"|"0.99"}` gauge      scoring latency per call
`inference_errors_total`                   counter
`inference_rows_total`                     counter    windows scored
`anomalies_total`                          counter
`alerts_sent_total`, `alerts_failed_total` counter    per delivery (a target each)
`alerts_dropped_total`                     counter    refused by a full alert queue
`heartbeats_total`                         counter
`ingest_refused_total`                     counter    samples refused by the full ingest queue
`cpu_seconds_total`                        counter    process user + system CPU
`resident_memory_bytes`                    gauge
`disk_free_bytes`                          gauge      the buffer's filesystem
=========================================  =========  ====================================

`/healthz` answers 200 with `{"status": "ok", …}` when the health callable (by default
the agent's `healthz() -> (ok, details)`) says so, else 503 with `{"status": "unhealthy",
"problems": […], …}`. Any other path is a 404; methods other than GET/HEAD a 405. The
server is a small `asyncio.start_server` loop (no web framework on the edge): requests
are bounded (8 KiB of request head, read within 5 s), at most 16 connections are served
at once, every response closes its connection. Port 0 binds a free port: see `port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .heartbeat import AgentSnapshot, CpuMeter, snapshot_agent

if TYPE_CHECKING:
    from .config import MetricsConfig

__all__ = ["AgentCollector", "MetricsServer", "render_metrics"]

log = logging.getLogger(__name__)

PREFIX: Final = "edgefleet_agent_"
MAX_REQUEST_HEAD: Final = 8 * 1024
READ_TIMEOUT_S: Final = 5.0
MAX_CONNECTIONS: Final = 16
SNAPSHOT_TIMEOUT_S: Final = 10.0
# The classic text format `generate_latest` writes; every Prometheus version parses it.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
SnapshotFn = Callable[[], Awaitable[AgentSnapshot]]


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


_FORWARDER: Final = (
    ("rows_sent", "forward_rows", "Rows the fog acknowledged."),
    ("batches_sent", "forward_batches", "Batches the fog acknowledged."),
    ("bytes_sent", "forward_bytes", "Encoded bytes sent to the fog."),
    ("retries", "forward_retries", "Sends retried after an error or a 429/503."),
    ("dead_lettered_rows", "forward_dead_lettered_rows", "Rows the fog refused for good."),
)
_COUNTERS: Final = (
    ("inference_rows_total", "inference_rows", "Windows scored by the model."),
    ("anomalies_total", "anomalies", "Windows the model flagged as anomalous."),
    ("alerts_sent_total", "alerts_sent", "Alert deliveries that succeeded (per target)."),
    ("alerts_failed_total", "alerts_failed", "Alert deliveries given up (per target)."),
    ("alerts_dropped_total", "alerts_dropped", "Alerts refused by a full alert queue."),
    ("heartbeats_total", "heartbeats", "Heartbeats built."),
    ("ingest_refused_total", "ingest_refused", "Samples refused by the full ingest queue."),
)


class AgentCollector(Collector):
    """Renders the latest `AgentSnapshot` (set `snapshot` before each scrape)."""

    def __init__(self) -> None:
        self.snapshot: AgentSnapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        info = GaugeMetricFamily(
            PREFIX + "info", "The agent's identity.", labels=["device", "version", "model_version"]
        )
        info.add_metric([snap.device, snap.agent_version, snap.model_version or ""], 1.0)
        yield info
        yield _gauge("uptime_seconds", "Seconds since the agent started.", snap.uptime_s)

        families = {
            "samples": CounterMetricFamily(
                PREFIX + "samples", "Samples read, any quality.", labels=["source"]
            ),
            "bad": CounterMetricFamily(
                PREFIX + "source_bad_samples", "Samples read with quality bad.", labels=["source"]
            ),
            "rejected": CounterMetricFamily(
                PREFIX + "source_rejected",
                "Messages or responses dropped as undecodable.",
                labels=["source"],
            ),
            "reconnects": CounterMetricFamily(
                PREFIX + "source_reconnects", "Sessions re-established.", labels=["source"]
            ),
        }
        up = GaugeMetricFamily(
            PREFIX + "source_up", "1 if the source's health is up.", labels=["source"]
        )
        for source in snap.sources:
            families["samples"].add_metric([source.name], source.samples)
            families["bad"].add_metric([source.name], source.bad)
            families["rejected"].add_metric([source.name], source.rejected)
            families["reconnects"].add_metric([source.name], source.reconnects)
            up.add_metric([source.name], 1.0 if source.health == "up" else 0.0)
        yield from families.values()
        yield up

        buffer = snap.buffer
        yield _gauge("buffer_up", "1 if the buffer's stats could be read.", buffer is not None)
        if buffer is not None:
            oldest = buffer.oldest_unacked_ts
            age = max(0.0, (snap.taken_ns - oldest) / 1e9) if oldest is not None else 0.0
            yield _gauge("buffer_depth_rows", "Unacknowledged rows in the buffer.", buffer.depth)
            yield _gauge(
                "buffer_oldest_age_seconds", "Age of the oldest unacknowledged row.", age
            )
            yield _gauge("buffer_bytes", "Buffer files on disk.", buffer.bytes_on_disk)
            yield _gauge("buffer_full", "1 while appends are refused.", buffer.full)
            yield _counter(
                "buffer_dropped_rows",
                "Rows dropped by when_full=drop_oldest.",
                buffer.dropped_total,
            )
            yield _counter(
                "buffer_compacted_rows",
                "Rows replaced by aggregates under when_full=downsample.",
                buffer.compacted_total,
            )
            yield _counter(
                "buffer_appends_refused", "Appends refused (full).", buffer.appends_refused
            )
            yield _gauge("buffer_dlq_batches", "Dead-lettered batches.", buffer.dlq_batches)
            yield _gauge("buffer_dlq_rows", "Rows in dead-lettered batches.", buffer.dlq_rows)

        forwarder = snap.forwarder
        for key, name, doc in _FORWARDER:
            value = forwarder.get(key)
            if isinstance(value, int | float):
                yield _counter(name, doc, float(value))
        if isinstance(forwarder.get("connected"), bool):
            yield _gauge(
                "fog_connected", "1 if the last send reached the fog.", forwarder["connected"]
            )

        latency = GaugeMetricFamily(
            PREFIX + "inference_seconds",
            "Model latency per scoring call, by quantile.",
            labels=["quantile"],
        )
        for quantile, value_us in (("0.5", snap.inference_p50_us), ("0.99", snap.inference_p99_us)):
            if value_us is not None:
                latency.add_metric([quantile], value_us / 1e6)
        yield latency
        yield _counter(
            "inference_errors", "Scoring calls that failed.", snap.inference_errors_total
        )
        for key, name, doc in _COUNTERS:
            yield _counter(name, doc, snap.counters.get(key, 0))

        process = snap.process
        yield _counter("cpu_seconds", "Process CPU, user + system.", process.cpu_seconds)
        yield _gauge("resident_memory_bytes", "Resident set size.", process.rss_bytes)
        if process.disk_free_bytes is not None:
            yield _gauge(
                "disk_free_bytes", "Free bytes on the buffer's filesystem.", process.disk_free_bytes
            )


def render_metrics(snapshot: AgentSnapshot) -> bytes:
    """The Prometheus text for one snapshot (a fresh registry: for tests and tools)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = AgentCollector()
    collector.snapshot = snapshot
    registry.register(collector)
    return generate_latest(registry)


def _default_health(agent: Any) -> HealthFn:
    def health() -> tuple[bool, dict[str, Any]]:
        method = getattr(agent, "healthz", None)
        if callable(method):
            ok, details = method()
            return bool(ok), dict(details)
        open_ = getattr(agent, "buffer", None) is not None
        return open_, {"problems": [] if open_ else ["buffer not open"]}

    return health


class MetricsServer:
    """Serves `/metrics` and `/healthz` for one agent (see the module docstring).

    `agent` is read as `heartbeat.snapshot_agent` describes; `health` defaults to the
    agent's `healthz()`. `start()` binds (then `port` is the bound port), `serve()` starts
    if needed and runs until cancelled, `close()` stops."""

    def __init__(
        self,
        config: MetricsConfig,
        agent: Any,
        *,
        agent_version: str | None = None,
        health: HealthFn | None = None,
        snapshot: SnapshotFn | None = None,
    ) -> None:
        self.config = config
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = AgentCollector()
        self.registry.register(self.collector)
        self.port: int | None = None
        self.scrapes = 0
        self.refused_connections = 0
        self._health = health or _default_health(agent)
        self._cpu = CpuMeter()
        version = agent_version or _version()
        self._snapshot: SnapshotFn = snapshot or (
            lambda: snapshot_agent(agent, version, cpu_meter=self._cpu)
        )
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, self.config.host, self.config.port, limit=MAX_REQUEST_HEAD
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("metrics on http://%s:%d/metrics (health: /healthz)", self.config.host, self.port)
        return self.port

    async def serve(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    # ---- requests ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            self.refused_connections += 1
            writer.close()
            return
        async with self._slots:
            try:
                status, content_type, body, head_only = await self._respond(reader)
                reason = _REASONS[status]
                head = (
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode("ascii") + (b"" if head_only else body))
                await writer.drain()
            except (ConnectionError, TimeoutError):
                pass  # the client left or stalled: nothing to answer
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), READ_TIMEOUT_S)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return 431, "text/plain", b"request head too large\n", False
        except asyncio.IncompleteReadError:
            return 400, "text/plain", b"incomplete request\n", False
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request line\n", False
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/healthz"):
            return 404, "text/plain", b"not found: try /metrics or /healthz\n", False
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n", False
        head_only = method == "HEAD"
        if path == "/healthz":
            status, body = self._healthz()
            return status, "application/json", body, head_only
        return 200, CONTENT_TYPE, await self.render(), head_only

    async def render(self) -> bytes:
        """Refresh the snapshot and render the registry (what GET /metrics returns)."""
        try:
            snapshot = await asyncio.wait_for(self._snapshot(), SNAPSHOT_TIMEOUT_S)
        except TimeoutError:
            log.warning("metrics: agent snapshot took over %.0f s; serving the previous one",
                        SNAPSHOT_TIMEOUT_S)
        else:
            self.collector.snapshot = snapshot
        self.scrapes += 1
        return generate_latest(self.registry)

    def _healthz(self) -> tuple[int, bytes]:
        try:
            ok, details = self._health()
        except Exception as err:  # noqa: BLE001 - a broken health check is itself unhealthy
            ok, details = False, {"problems": [f"health check failed: {err!r}"]}
        document: dict[str, Any] = {"status": "ok" if ok else "unhealthy"}
        document.update((k, v) for k, v in details.items() if k != "status")
        if not ok and not document.get("problems"):
            document["problems"] = ["unhealthy"]
        return (200 if ok else 503), json.dumps(document, default=str).encode() + b"\n"


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"
