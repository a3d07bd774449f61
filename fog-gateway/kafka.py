"""Kafka plumbing of the fog gateway: the topic contract, topic creation and the producer.

Message contract (ingest and the MQTT bridge both produce through `kafka_messages`):

=========================  ======  ===========================================================
topic                      key     value
=========================  ======  ===========================================================
`edgefleet.readings`       device  the binary wire encoding of one `Batch`, exactly the bytes
                                   that were validated (`encode_binary(batch)`)
`edgefleet.heartbeats`     device  the binary wire encoding of one `Heartbeat`
`edgefleet.inferences`     device  JSON `{"device", "rows": [{"asset", "tag", "ts", "seq",
                                   "value"}, …]}`: the batch's readings whose tag starts with
                                   `ml:`; produced only when there are any
`edgefleet.alerts`         device  JSON `{"device", "asset", "ts", "seq", "model_version"}`,
                                   one per `ml:<version>:is_anomaly` reading whose value is 1
=========================  ======  ===========================================================

Keys are the device name (UTF-8), so one device's messages stay in order on one partition.

`KafkaPublisher` contracts:

* Idempotent producer (`enable.idempotence`, `acks=all`), lz4. A message counts as
  published only when the broker has acknowledged it; `on_delivery` is called exactly once
  per message that `produce` accepted: with None when it was delivered, with a
  `KafkaUnavailable` when it was not or when delivery can no longer be confirmed.
* Bounded: librdkafka's local queue holds at most `queue_max_messages`. When it is full
  `produce` raises `Backpressure` (HTTP ingest answers 429) and queues nothing.
* Broker state: librdkafka reports a lost cluster through `error_cb` (`_ALL_BROKERS_DOWN`)
  the moment its connections are refused, but reports the affected messages only when
  `message.timeout.ms` expires (measured with tansu: 10 s after the kill with the default,
  while `_ALL_BROKERS_DOWN` came within 50 ms). So the publisher does not wait for the
  timeouts: on `_ALL_BROKERS_DOWN` it flips `available` to False, fails every message
  awaiting its delivery report with `KafkaUnavailable` (librdkafka may still deliver some
  of them later: at-least-once, the database deduplicates on `(device, seq)`), and
  `produce` raises `KafkaUnavailable` until a metadata probe succeeds again. Softer signals
  (a `_TRANSPORT` error, a delivery that timed out) trigger a probe first and flip the
  state only if it fails. A broker that is up but silent is caught by `message.timeout.ms`.
* When the cluster comes back after an outage, topics of `TOPICS` that are missing are
  created again (tansu keeps topics in memory only; `recreate_topics_partitions=None`
  turns this off), and the publisher starts a fresh librdkafka producer: a restarted
  tansu forgets producer ids, and librdkafka's idempotent producer then only bumps its
  epoch and retries until every message times out. A fatal producer error, or deliveries
  timing out, also replace the producer. The old one's messages are purged (reported as
  failed) and it is polled until it has reported each of them: no caller waits forever.
* tansu (the test broker) on SIGTERM keeps serving, and acknowledging, for about 5 s
  before it exits; the outage is seen when it exits. Being memory-only, it loses what it
  acknowledged and nobody consumed yet: at-least-once holds end to end only with a
  broker that keeps what it acknowledged.
* No thread runs before `start()` (also called by the first `produce`); `close()` flushes
  for up to `timeout_s`, fails what is still undelivered and stops the poll thread.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # confluent_kafka.admin does not re-export it

from edgefleet.protocols.wire import Batch, Heartbeat

__all__ = [
    "ALERTS_TOPIC",
    "HEARTBEATS_TOPIC",
    "INFERENCES_TOPIC",
    "READINGS_TOPIC",
    "TOPICS",
    "Backpressure",
    "KafkaPublisher",
    "KafkaUnavailable",
    "MessageRejected",
    "PublishError",
    "PublisherStats",
    "ensure_topics",
    "heartbeat_message",
    "kafka_messages",
    "measure_kafka_throughput",
]

log = logging.getLogger(__name__)

READINGS_TOPIC: Final = "edgefleet.readings"
INFERENCES_TOPIC: Final = "edgefleet.inferences"
HEARTBEATS_TOPIC: Final = "edgefleet.heartbeats"
ALERTS_TOPIC: Final = "edgefleet.alerts"
TOPICS: Final = (READINGS_TOPIC, INFERENCES_TOPIC, HEARTBEATS_TOPIC, ALERTS_TOPIC)

INFERENCE_TAG_PREFIX: Final = "ml:"
_ANOMALY_SUFFIX: Final = ":is_anomaly"
_PROBE_TIMEOUT_S: Final = 1.0
_PROBE_EVERY_S: Final = 0.5
_POLL_TIMEOUT_S: Final = 0.05
# Errors after which the publisher checks the cluster with a metadata request.
_SUSPICIOUS: Final = frozenset({
    KafkaError._TRANSPORT, KafkaError._MSG_TIMED_OUT, KafkaError._RESOLVE,
    KafkaError._TIMED_OUT, KafkaError._AUTHENTICATION, KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART,
})


class PublishError(Exception):
    """A message was not published to Kafka."""


class KafkaUnavailable(PublishError):
    """The cluster is down, or delivery failed or could not be confirmed: retry later (503)."""


class Backpressure(PublishError):
    """The local producer queue is full: retry later (429)."""


class MessageRejected(PublishError):
    """The message can never be published as it is (too large, …): do not retry it."""


# ---- the message contract ---------------------------------------------------------------

_JSON: Final = msgspec.json.Encoder()


def kafka_messages(batch: Batch, body: bytes) -> list[tuple[str, bytes, bytes]]:
    """The Kafka messages (topic, key, value) for one validated batch.

    `body` is the batch's binary wire encoding exactly as received and validated; it goes
    to `edgefleet.readings` unchanged. Inference readings (`ml:` tags) also go to
    `edgefleet.inferences` as one JSON message, and every `ml:<version>:is_anomaly` reading
    with value 1 becomes one message on `edgefleet.alerts`.
    """
    key = batch.device.encode()
    messages = [(READINGS_TOPIC, key, body)]
    rows: list[dict[str, Any]] = []
    alerts: list[tuple[str, bytes, bytes]] = []
    for reading in batch.readings:
        tag = reading.tag
        if not tag.startswith(INFERENCE_TAG_PREFIX):
            continue
        rows.append({"asset": reading.asset, "tag": tag, "ts": reading.ts,
                     "seq": reading.seq, "value": reading.value})
        if tag.endswith(_ANOMALY_SUFFIX) and reading.value == 1.0:
            version = tag[len(INFERENCE_TAG_PREFIX):-len(_ANOMALY_SUFFIX)]
            alert = {"device": batch.device, "asset": reading.asset, "ts": reading.ts,
                     "seq": reading.seq, "model_version": version}
            alerts.append((ALERTS_TOPIC, key, _JSON.encode(alert)))
    if rows:
        messages.append((INFERENCES_TOPIC, key, _JSON.encode({"device": batch.device,
                                                              "rows": rows})))
    messages.extend(alerts)
    return messages


def heartbeat_message(heartbeat: Heartbeat, body: bytes) -> tuple[str, bytes, bytes]:
    """The Kafka message for one validated heartbeat (`body`: its binary encoding)."""
    return (HEARTBEATS_TOPIC, heartbeat.device.encode(), body)


# ---- topics -----------------------------------------------------------------------------


def ensure_topics(
    bootstrap: str,
    partitions: int = 6,
    *,
    timeout_s: float = 10.0,
    topics: Sequence[str] = TOPICS,
    extra: Mapping[str, str | int] | None = None,
) -> None:
    """Create the topics of `topics` that do not exist yet, with `partitions` partitions.

    Existing topics are left as they are (also when another process created one in the
    meantime). Raises `KafkaUnavailable` if the cluster does not answer within `timeout_s`.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **(extra or {})})
    deadline = time.monotonic() + timeout_s
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as err:
        raise KafkaUnavailable(f"kafka {bootstrap}: cannot list topics: {err}") from err
    missing = [NewTopic(name, partitions) for name in topics if name not in existing]
    if not missing:
        return
    remaining = max(0.1, deadline - time.monotonic())
    futures = admin.create_topics(missing, request_timeout=remaining, operation_timeout=remaining)
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as err:
            error = err.args[0] if err.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise KafkaUnavailable(f"kafka {bootstrap}: cannot create topic {name}: {err}") from err
        except TimeoutError as err:
            raise KafkaUnavailable(
                f"kafka {bootstrap}: creating topic {name} took more than {timeout_s} s"
            ) from err
    log.info("kafka %s: created topics %s", bootstrap, ", ".join(t.topic for t in missing))


# ---- the producer -----------------------------------------------------------------------


class ProducerLike(Protocol):
    """The part of `confluent_kafka.Producer` the publisher uses (tests may fake it)."""

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, *,
                on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
                ) -> None: ...
    def poll(self, timeout: float = -1) -> int: ...
    def flush(self, timeout: float = -1) -> int: ...
    def purge(self, in_queue: bool = True, in_flight: bool = True,
              blocking: bool = True) -> None: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...
    def __len__(self) -> int: ...


DeliveryCallback = Callable[[KafkaUnavailable | None], None]


@dataclass
class PublisherStats:
    """Counters since start; written by the publisher's threads, read by metrics."""

    produced: int = 0  # messages accepted into the local queue
    delivered: int = 0  # acknowledged by the cluster
    failed: int = 0  # reported to on_delivery as KafkaUnavailable
    refused_backpressure: int = 0  # produce calls refused: local queue full
    refused_unavailable: int = 0  # produce calls refused: cluster known to be down
    outages: int = 0  # times `available` went from True to False
    producer_restarts: int = 0  # librdkafka producers replaced after a fatal error


class _LibrdkafkaLogFilter(logging.Filter):
    """Drops librdkafka's per-attempt connection failures (`FAIL`, every 50 ms during an
    outage); the publisher logs the outage itself once when it starts and once when it ends."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (isinstance(args, tuple) and args and args[0] == "FAIL")


_LIBRDKAFKA_LOG: Final = logging.getLogger(f"{__name__}.librdkafka")
_LIBRDKAFKA_LOG.addFilter(_LibrdkafkaLogFilter())


def _settle(future: asyncio.Future[None], error: KafkaUnavailable | None) -> None:
    if future.done():  # cancelled by a caller that gave up
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class KafkaPublisher:
    """Publishes to Kafka with delivery confirmation; see the module docstring."""

    def __init__(
        self,
        bootstrap: str,
        *,
        queue_max_messages: int = 100_000,
        message_timeout_ms: int = 10_000,
        linger_ms: int = 5,
        extra: Mapping[str, str | int] | None = None,
        recreate_topics_partitions: int | None = 6,
        producer_factory: Callable[[dict[str, Any]], ProducerLike] | None = None,
    ) -> None:
        if queue_max_messages < 1:
            raise ValueError("queue_max_messages must be at least 1")
        self.bootstrap = bootstrap
        self.queue_max_messages = queue_max_messages
        self.stats = PublisherStats()
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": linger_ms,
            "message.timeout.ms": message_timeout_ms,
            "queue.buffering.max.messages": queue_max_messages,
            **(extra or {}),
            # Callbacks and logs are served by poll(), i.e. by the poll thread.
            "error_cb": self._on_error,
            "logger": _LIBRDKAFKA_LOG,
        }
        self._recreate_partitions = recreate_topics_partitions
        self._extra = dict(extra or {})
        self._producer_factory = producer_factory or self._default_producer
        self._producer: ProducerLike | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start/close and refusal counters
        self._pending: dict[int, DeliveryCallback] = {}  # token -> on_delivery
        self._retired: list[ProducerLike] = []  # replaced, with messages not yet reported
        self._tokens = itertools.count()
        self._closing = threading.Event()
        self._closed = False  # = _closing.is_set(), cheaper on the hot path
        self._available = True
        self._down_reason = ""
        self._down_since = 0.0
        self._suspect = False  # probe the cluster at the next chance
        self._renew: str | None = None  # why to replace the producer at the next chance
        self._last_probe = -float("inf")
        self._replaced_at = -float("inf")
        self._message_timeout_s = message_timeout_ms / 1000
        self._flush_timeout_s = 10.0

    @staticmethod
    def _default_producer(config: dict[str, Any]) -> ProducerLike:
        return Producer(config)

    # ---- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        """Create the librdkafka producer and the thread that serves its callbacks."""
        with self._lock:
            if self._closing.is_set():
                raise KafkaUnavailable("the publisher is closed")
            if self._thread is not None:
                return
            self._producer = self._producer_factory(self._config)
            self._thread = threading.Thread(
                target=self._poll_loop, name="kafka-publisher-poll", daemon=True
            )
            self._thread.start()

    def __enter__(self) -> KafkaPublisher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to `timeout_s`, fail what is still undelivered, stop the thread."""
        with self._lock:
            if self._closing.is_set():
                return
            self._flush_timeout_s = timeout_s
            self._closing.set()
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    @property
    def available(self) -> bool:
        """False from the moment the cluster is known to be down until a probe succeeds."""
        return self._available and not self._closed

    @property
    def queue_depth(self) -> int:
        """Messages in librdkafka's queue (waiting to be sent or acknowledged)."""
        producer = self._producer
        return len(producer) if producer is not None else 0

    # ---- producing ----------------------------------------------------------------------

    def produce(
        self,
        topic: str,
        key: bytes,
        value: bytes,
        on_delivery: Callable[[KafkaUnavailable | None], None],
    ) -> None:
        """Queue one message; `on_delivery` is called once, from the poll thread.

        Thread-safe. Raises `Backpressure` when the local queue is full, `KafkaUnavailable`
        when the cluster is known to be down, `MessageRejected` for a message the producer
        refuses outright (larger than `message.max.bytes`); in those cases nothing was
        queued and `on_delivery` is never called.
        """
        if self._thread is None:
            self.start()
        producer = self._producer
        if not self._available or self._closed or producer is None:
            self._count("refused_unavailable")
            raise KafkaUnavailable(self._down_reason or "the publisher is closed")
        # No lock on this path (it halved the throughput): `_pending` is one dict for the
        # publisher's life and a callback is called by whoever pops it (atomic under the
        # GIL): the delivery report, or `_fail_pending` when the cluster goes down.
        # Registered before producing, so a report can never come first.
        token = next(self._tokens)
        self._pending[token] = on_delivery
        try:
            producer.produce(topic, value, key,
                             on_delivery=functools.partial(self._on_delivery, token))
        except BufferError as err:
            if self._pending.pop(token, None) is None:
                return  # `_fail_pending` got it first and has reported the failure
            self._count("refused_backpressure")
            raise Backpressure(
                f"kafka producer queue is full ({self.queue_max_messages} messages)"
            ) from err
        except KafkaException as err:
            if self._pending.pop(token, None) is None:
                return
            raise self._produce_error(topic, err) from err

    async def publish_all(self, messages: Sequence[tuple[str, bytes, bytes]]) -> None:
        """Produce `messages` and return when the cluster has acknowledged all of them.

        Raises `Backpressure` (before queueing anything) when they do not fit in the local
        queue, `KafkaUnavailable` when the cluster is down or any delivery fails. A
        failure after some messages were queued leaves those to be delivered or failed by
        librdkafka: the caller retries the whole set, and duplicates are harmless.
        """
        if not messages:
            return
        if self._thread is None:
            self.start()
        if self.queue_depth + len(messages) > self.queue_max_messages:
            self._count("refused_backpressure")
            raise Backpressure(
                f"kafka producer queue is full ({self.queue_max_messages} messages)"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []

        def settler(future: asyncio.Future[None]) -> DeliveryCallback:
            def settle(error: KafkaUnavailable | None) -> None:
                if not loop.is_closed():  # else the caller is long gone
                    loop.call_soon_threadsafe(_settle, future, error)
            return settle

        try:
            for topic, key, value in messages:
                future: asyncio.Future[None] = loop.create_future()
                self.produce(topic, key, value, settler(future))
                futures.append(future)
        except PublishError:
            for future in futures:
                future.cancel()
            raise
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _produce_error(self, topic: str, err: KafkaException) -> PublishError:
        error = err.args[0] if err.args else None
        code = error.code() if isinstance(error, KafkaError) else None
        if code == KafkaError._QUEUE_FULL:
            self._count("refused_backpressure")
            return Backpressure(f"kafka producer queue is full: {err}")
        if code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE):
            return MessageRejected(f"kafka refused a message for {topic}: {err}")
        if isinstance(error, KafkaError) and error.fatal():
            self._renew = f"fatal error: {error.str()}"
        elif code in _SUSPICIOUS:
            self._suspect = True  # an unknown topic, say: the probe recreates it
        return KafkaUnavailable(f"kafka refused a message for {topic}: {err}")

    def _count(self, counter: str) -> None:
        """Count a refusal (any thread; rare, so a lock is cheap here)."""
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    # ---- callbacks (poll thread) --------------------------------------------------------
    # Everything below runs in the poll thread only, which is therefore the only writer of
    # `delivered`, `failed`, `produced`, `outages` and `producer_restarts`.

    def _on_delivery(self, token: int, err: KafkaError | None, _msg: Message) -> None:
        callback = self._pending.pop(token, None)
        if callback is None:  # already failed when the cluster went down
            return
        if err is None:
            self.stats.delivered += 1
            self._call(callback, None)
            return
        self.stats.failed += 1
        if err.code() == KafkaError._MSG_TIMED_OUT:
            # Broker down (the probe will tell) or a producer that cannot get its messages
            # accepted any more: either way a fresh producer is cheap. Messages produced
            # before the last replacement say nothing about the current producer.
            if time.monotonic() - self._replaced_at > self._message_timeout_s:
                self._renew = "deliveries timed out"
            self._suspect = True
        elif err.code() in _SUSPICIOUS:
            self._suspect = True
        self._call(callback, KafkaUnavailable(f"kafka delivery failed: {err.str()}"))

    @staticmethod
    def _call(callback: DeliveryCallback, error: KafkaUnavailable | None) -> None:
        try:
            callback(error)
        except Exception:  # a caller's bug must not stop every delivery report
            log.exception("kafka publisher: a delivery callback raised")

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("kafka publisher: fatal producer error: %s", err.str())
            self._renew = f"fatal error: {err.str()}"
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._mark_down(f"kafka {self.bootstrap}: all brokers are down ({err.str()})")
        elif err.code() in _SUSPICIOUS:
            self._suspect = True
        else:
            log.warning("kafka publisher: %s", err.str())

    def _mark_down(self, reason: str) -> None:
        if self._available:
            self._available = False
            self._down_reason = reason
            self._down_since = time.monotonic()
            self.stats.outages += 1
            log.error("%s; refusing messages until it answers again", reason)
        self._suspect = False
        self._fail_pending(f"{reason}; delivery not confirmed")

    def _fail_pending(self, reason: str) -> None:
        """Report every message still waiting as failed (librdkafka may yet deliver some:
        at-least-once). Their later delivery reports find nothing to call."""
        error = KafkaUnavailable(reason)
        for token in list(self._pending):  # a snapshot; producers may add meanwhile
            callback = self._pending.pop(token, None)
            if callback is not None:
                self.stats.failed += 1
                self._call(callback, error)

    # ---- the poll thread ----------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._closing.is_set():
            producer = self._producer
            assert producer is not None
            producer.poll(_POLL_TIMEOUT_S)
            self._poll_retired()
            if self._renew is not None:
                self._replace_producer(self._renew)
            elif self._suspect or not self._available:
                self._probe(producer)
            self.stats.produced = self.stats.delivered + self.stats.failed + len(self._pending)
        producer = self._producer
        assert producer is not None
        remaining = producer.flush(self._flush_timeout_s)
        if remaining:
            log.warning("kafka publisher: closing with %d undelivered messages", remaining)
        for old in [producer, *self._retired]:
            old.purge()
            old.poll(0)
        self._fail_pending("the publisher closed before delivery")

    def _poll_retired(self) -> None:
        """Serve replaced producers until every message they took has been reported:
        librdkafka reports each message exactly once, so no caller waits forever."""
        for old in list(self._retired):
            old.poll(0)
            if len(old) == 0:
                self._retired.remove(old)

    def _probe(self, producer: ProducerLike) -> None:
        now = time.monotonic()
        if now - self._last_probe < _PROBE_EVERY_S:
            return
        self._last_probe = now
        self._suspect = False
        try:
            metadata = producer.list_topics(timeout=_PROBE_TIMEOUT_S)
        except KafkaException as err:
            self._mark_down(f"kafka {self.bootstrap}: not answering ({err})")
            return
        if not metadata.brokers:
            self._mark_down(f"kafka {self.bootstrap}: no brokers in the cluster metadata")
            return
        if self._recreate_partitions is not None and not set(TOPICS) <= set(metadata.topics):
            try:
                ensure_topics(self.bootstrap, self._recreate_partitions, timeout_s=5.0,
                              extra=self._extra)
            except KafkaUnavailable as err:
                self._mark_down(str(err))
                return
        if self._available:
            return
        # A restarted broker may not know this producer's id any more (tansu forgets it,
        # and librdkafka then retries with bumped epochs until every message times out):
        # a fresh producer asks for a new id.
        self._replace_producer("the cluster came back after an outage")
        log.warning("kafka %s: answering again after %.1f s; accepting messages",
                    self.bootstrap, time.monotonic() - self._down_since)
        self._available = True

    def _replace_producer(self, reason: str) -> None:
        """Swap in a new librdkafka producer. The old one's messages are purged, which
        reports them as failed; it is polled until it has reported every message."""
        self._renew = None
        self._replaced_at = time.monotonic()
        replacement = self._producer_factory(self._config)
        old, self._producer = self._producer, replacement
        self.stats.producer_restarts += 1
        log.info("kafka publisher: new producer (%s)", reason)
        if old is not None:
            old.purge()
            self._retired.append(old)
            self._poll_retired()


# ---- bench ------------------------------------------------------------------------------


def measure_kafka_throughput(bootstrap: str, messages: int = 300_000, size: int = 200,
                             ) -> dict[str, float]:
    """Publish `messages` messages of `size` bytes through `KafkaPublisher.produce` from
    one process (one producing thread) and wait until the cluster has acknowledged each.

    Uses a fresh topic (6 partitions) and 64 device keys, as the gateway would; the first
    message (metadata, the idempotent producer's id) is sent before the clock starts.
    Returns `kafka_msgs_per_s` (acknowledged messages per second, from the first produce
    to the last acknowledgement), `kafka_mb_per_s` of payload, `kafka_seconds`,
    `kafka_messages` and `kafka_failed` (0 unless the cluster failed deliveries).
    """
    topic = f"edgefleet.bench.{uuid.uuid4().hex[:12]}"
    ensure_topics(bootstrap, 6, topics=[topic])
    keys = [f"bench-{i:03d}".encode() for i in range(64)]
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    outcomes: list[bool] = []  # list.append is atomic: no lock on the hot path
    done = threading.Event()

    def delivered(error: KafkaUnavailable | None) -> None:
        outcomes.append(error is None)
        if len(outcomes) == messages + 1:
            done.set()

    publisher = KafkaPublisher(bootstrap, linger_ms=20, recreate_topics_partitions=None,
                               queue_max_messages=max(messages + 1, 100_000))
    with publisher:
        publisher.produce(topic, keys[0], payload, delivered)
        deadline = time.monotonic() + 30
        while not outcomes and time.monotonic() < deadline:
            time.sleep(0.01)
        if not outcomes or not outcomes[0]:
            raise KafkaUnavailable(f"kafka {bootstrap}: the bench's first message failed")
        t0 = time.perf_counter()
        for i in range(messages):
            publisher.produce(topic, keys[i & 63], payload, delivered)
        if not done.wait(120):
            raise KafkaUnavailable(f"kafka {bootstrap}: bench messages not acknowledged")
        elapsed = time.perf_counter() - t0
    return {
        "kafka_msgs_per_s": round(messages / elapsed),
        "kafka_mb_per_s": round(messages * size / elapsed / 1e6, 1),
        "kafka_seconds": round(elapsed, 3),
        "kafka_messages": messages,
        "kafka_failed": outcomes.count(False),
    }
