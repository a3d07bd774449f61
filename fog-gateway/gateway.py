"""`edgefleet fog run`: one process serving the ingest, and in Kafka mode also the MQTT
bridge and sink workers, until SIGTERM.

Start: the store's schema is created or checked, and what was found is logged (TimescaleDB
hypertables, native partitions, or SQLite); in Kafka mode the topics are created when
missing. Stop (SIGTERM or SIGINT): the HTTP server stops accepting and finishes the
requests in flight, the bridge disconnects (its session persists: Mosquitto redelivers the
unacknowledged MQTT messages when the same client id reconnects, so a gateway keeps its
client id across restarts), the producer is flushed, the sink workers commit
what they wrote and leave their group, the store is closed. Nothing accepted is lost:
a 202 was only ever sent for data that was already durable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgefleet.protocols.wire import Batch, Heartbeat

from .ingest import IngestBusy, IngestLimits, IngestUnavailable

if TYPE_CHECKING:
    from .config import FogConfig
    from .kafka import KafkaPublisher
    from .store import Store

__all__ = ["CompletenessCollector", "JsonLogFormatter", "KafkaIngestPublisher", "serve"]

log = logging.getLogger(__name__)

HEARTBEATS_TOPIC = "edgefleet.heartbeats"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str, level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonLogFormatter() if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class KafkaIngestPublisher:
    """The ingest's Publisher in Kafka mode: a request is answered once every message it
    produced (the batch, and its inference and alert messages) was delivered."""

    def __init__(self, kafka: KafkaPublisher) -> None:
        self.kafka = kafka

    async def _publish(self, messages: list[tuple[str, bytes, bytes]]) -> None:
        from .kafka import Backpressure, KafkaUnavailable

        try:
            await self.kafka.publish_all(messages)
        except Backpressure as err:
            raise IngestBusy(f"Kafka producer queue full: {err}") from err
        except KafkaUnavailable as err:
            raise IngestUnavailable(f"Kafka unavailable: {err}") from err

    async def publish_batch(self, batch: Batch, body: bytes) -> None:
        from .kafka import kafka_messages

        await self._publish(kafka_messages(batch, body))

    async def publish_heartbeat(self, heartbeat: Heartbeat, body: bytes) -> None:
        await self._publish([(HEARTBEATS_TOPIC, heartbeat.device.encode(), body)])

    def health(self) -> tuple[bool, str]:
        if self.kafka.available:
            return True, "Kafka reachable"
        return False, "Kafka unreachable"


class CompletenessCollector(Collector):
    """Per-device completeness from the store, refreshed at most every `max_age_s`:
    `edgefleet_fog_rows_received`, `_rows_expected`, `_seq_missing`,
    `_duplicate_rows_total` and `_completeness_ratio`, labelled by device."""

    def __init__(self, store_factory: Callable[[], Store], max_age_s: float = 10.0) -> None:
        self._store_factory = store_factory
        self._store: Store | None = None
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._cached: list[Metric] = []
        self._at = float("-inf")

    def _query(self) -> list[Metric]:
        received = GaugeMetricFamily("edgefleet_fog_rows_received",
                                     "Distinct seqs stored per device", labels=["device"])
        expected = GaugeMetricFamily("edgefleet_fog_rows_expected",
                                     "max seq - min seq + 1 per device", labels=["device"])
        missing = GaugeMetricFamily("edgefleet_fog_seq_missing",
                                    "Seqs never received (gaps) per device", labels=["device"])
        duplicates = CounterMetricFamily("edgefleet_fog_duplicate_rows",
                                         "Rows received again and deduplicated",
                                         labels=["device"])
        ratio = GaugeMetricFamily("edgefleet_fog_completeness_ratio",
                                  "rows received / rows expected", labels=["device"])
        if self._store is None:
            self._store = self._store_factory()
        for row in self._store.completeness():
            received.add_metric([row.device], row.received)
            expected.add_metric([row.device], row.expected)
            missing.add_metric([row.device], row.missing)
            duplicates.add_metric([row.device], row.duplicates)
            ratio.add_metric([row.device], row.ratio)
        return [received, expected, missing, duplicates, ratio]

    def collect(self) -> Iterator[Metric]:
        from .store import StoreUnavailable

        with self._lock:
            if time.monotonic() - self._at > self._max_age_s:
                try:
                    self._cached = self._query()
                except StoreUnavailable as err:
                    log.warning("completeness metrics: %s", err)
                self._at = time.monotonic()
            yield from self._cached


class _StatsCollector(Collector):
    """Exposes the numeric fields of components' stats dataclasses, summed over the
    components (e.g. all sink workers), as `<prefix>_<field>` counters, or gauges for the
    fields named in `gauges` (booleans are gauges too)."""

    def __init__(
        self, prefix: str, stats: Callable[[], list[Any]], gauges: frozenset[str] = frozenset()
    ) -> None:
        self._prefix = prefix
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        totals: dict[str, float] = {}
        for stats in self._stats():
            for name, value in vars(stats).items():
                if isinstance(value, int | float):  # bool is an int
                    totals[name] = totals.get(name, 0.0) + float(value)
        for name, value in totals.items():
            family = GaugeMetricFamily if name in self._gauges else CounterMetricFamily
            yield family(f"{self._prefix}_{name}", f"{self._prefix} {name}", value=value)


async def serve(config: FogConfig, *, on_ready: Callable[[int], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    from .auth import DeviceTokens
    from .embedded import StorePublisher
    from .ingest import create_app
    from .store import open_store

    def store_factory() -> Store:
        return open_store(config.store)

    store = store_factory()
    description = await asyncio.to_thread(store.setup)
    store.close()
    log.info("fog gateway: %s; store: %s", config.describe(), description)
    tokens = DeviceTokens(config.tokens_file)
    if tokens.devices == 0:
        log.warning("no device tokens in %s: every request will be refused (401); add one "
                    "with `edgefleet fog add-device NAME`", config.tokens_file)

    registry = CollectorRegistry()
    stop_workers = threading.Event()
    closers: list[Callable[[], None]] = []
    workers: list[threading.Thread] = []
    health_checks: dict[str, Callable[[], tuple[bool, str]]] = {}
    publisher: Any
    if config.kafka is None:
        embedded = StorePublisher(store_factory,
                                  max_pending_rows=config.limits.max_pending_rows).start()
        publisher = embedded
        closers.append(embedded.close)
        registry.register(_StatsCollector("edgefleet_fog_store", lambda: [embedded.stats]))
    else:
        from .bridge import MqttBridge
        from .kafka import KafkaPublisher, ensure_topics
        from .sink import SinkWorker

        kafka_config = config.kafka
        await asyncio.to_thread(ensure_topics, kafka_config.bootstrap, kafka_config.partitions)
        kafka = KafkaPublisher(kafka_config.bootstrap,
                               queue_max_messages=kafka_config.queue_max_messages,
                               message_timeout_ms=kafka_config.message_timeout_ms,
                               recreate_topics_partitions=kafka_config.partitions)
        publisher = KafkaIngestPublisher(kafka)
        closers.append(kafka.close)
        registry.register(_StatsCollector("edgefleet_fog_kafka", lambda: [kafka.stats]))
        sinks = [SinkWorker(kafka_config.bootstrap, store_factory, group_id=config.sink.group_id)
                 for _ in range(config.sink.workers)]
        workers = [threading.Thread(target=sink.run, args=(stop_workers,),
                                    name=f"fog-sink-{index}", daemon=True)
                   for index, sink in enumerate(sinks)]
        registry.register(_StatsCollector("edgefleet_fog_sink", lambda: [s.stats for s in sinks],
                                          frozenset({"paused", "lag"})))
        if config.mqtt is not None:
            mqtt = config.mqtt
            bridge = MqttBridge(mqtt.url, kafka, prefix=mqtt.prefix, username=mqtt.username,
                                password=mqtt.read_password(), shared_group=mqtt.shared_group)
            bridge.start()
            closers.insert(0, bridge.stop)
            registry.register(_StatsCollector("edgefleet_fog_bridge", lambda: [bridge.stats],
                                              frozenset({"in_flight", "connected"})))
    for thread in workers:
        thread.start()
    registry.register(CompletenessCollector(store_factory))

    limits = IngestLimits(
        max_body_bytes=config.limits.max_body_bytes,
        max_decoded_bytes=config.limits.max_decoded_bytes,
        max_in_flight=config.limits.max_in_flight,
        replay_ranges_per_device=config.limits.replay_ranges_per_device,
    )
    app = create_app(tokens, publisher, limits=limits, registry=registry,
                     health_checks=health_checks, scrape_executor=_single_thread())
    server = _Server(uvicorn.Config(
        app, host=config.listen.host, port=config.listen.port, log_config=None,
        access_log=False, lifespan="off", timeout_graceful_shutdown=10,
    ))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.handle_exit, signum, None)
    watcher = asyncio.create_task(_announce(server, on_ready), name="announce")
    try:
        await server.serve()
    finally:
        watcher.cancel()
        log.info("fog gateway stopping")
        stop_workers.set()
        for close in closers:
            await asyncio.to_thread(close)
        for thread in workers:
            await asyncio.to_thread(thread.join, 30)
        log.info("fog gateway stopped")
    return 0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a caught SIGTERM once the server has stopped, which would kill
        # the process before the producer is flushed and the sink workers commit. `serve`
        # installs handlers that only ask the server to exit.
        yield


def _single_thread() -> concurrent.futures.Executor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fog-scrape")


async def _announce(server: Any, on_ready: Callable[[int], None] | None) -> None:
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    log.info("fog gateway ready on port %d", port)
    if on_ready is not None:
        on_ready(port)
