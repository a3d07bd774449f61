"""The fog gateway's Kafka plumbing without a broker: the message contract, the publisher's
delivery bookkeeping (fake librdkafka producer) and the sink worker (fake consumer, fake
store)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from edgefleet.fog_gateway.kafka import (
    ALERTS_TOPIC,
    HEARTBEATS_TOPIC,
    INFERENCES_TOPIC,
    READINGS_TOPIC,
    Backpressure,
    KafkaPublisher,
    KafkaUnavailable,
    heartbeat_message,
    kafka_messages,
)
from edgefleet.fog_gateway.sink import SinkWorker
from edgefleet.fog_gateway.store import Completeness, StoreUnavailable, WriteResult
from edgefleet.protocols.wire import Batch, Heartbeat, Quality, Reading, encode_binary

T0 = 1_795_000_000_000_000_000


def make_batch(device: str, first: int, n: int, tags: Sequence[str] = ("flow",),
               values: Sequence[float] | None = None) -> Batch:
    readings = tuple(
        Reading(device, "pump-01", tags[i % len(tags)], T0 + i * 1_000_000,
                values[i] if values is not None else float(i), Quality.GOOD, first + i)
        for i in range(n)
    )
    return Batch(device=device, first_seq=first, last_seq=first + n - 1, readings=readings,
                 sent_at=T0)


def make_heartbeat(device: str, ts: int = T0) -> Heartbeat:
    return Heartbeat(device=device, ts=ts, agent_version="0.1.0", buffer_depth=0,
                     dropped_total=0, compacted_total=0, uptime_s=1.0)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


# ---- the message contract ----------------------------------------------------------------


def test_kafka_messages_for_a_plain_batch_is_the_validated_body_only() -> None:
    batch = make_batch("edge-01", 10, 3)
    body = encode_binary(batch)
    assert kafka_messages(batch, body) == [(READINGS_TOPIC, b"edge-01", body)]


def test_kafka_messages_adds_inferences_and_one_alert_per_anomaly() -> None:
    tags = ("flow", "ml:2.1:score", "ml:2.1:is_anomaly")
    batch = make_batch("edge-01", 100, 6, tags=tags, values=[1.5, 0.7, 1.0, 2.5, 0.1, 0.0])
    body = encode_binary(batch)
    messages = kafka_messages(batch, body)
    assert [topic for topic, _, _ in messages] == [READINGS_TOPIC, INFERENCES_TOPIC,
                                                   ALERTS_TOPIC]
    assert all(key == b"edge-01" for _, key, _ in messages)
    assert messages[0][2] is body
    inferences = json.loads(messages[1][2])
    assert inferences["device"] == "edge-01"
    assert inferences["rows"] == [
        {"asset": "pump-01", "tag": "ml:2.1:score", "ts": T0 + 1_000_000, "seq": 101,
         "value": 0.7},
        {"asset": "pump-01", "tag": "ml:2.1:is_anomaly", "ts": T0 + 2_000_000, "seq": 102,
         "value": 1.0},
        {"asset": "pump-01", "tag": "ml:2.1:score", "ts": T0 + 4_000_000, "seq": 104,
         "value": 0.1},
        {"asset": "pump-01", "tag": "ml:2.1:is_anomaly", "ts": T0 + 5_000_000, "seq": 105,
         "value": 0.0},
    ]
    assert json.loads(messages[2][2]) == {"device": "edge-01", "asset": "pump-01",
                                          "ts": T0 + 2_000_000, "seq": 102,
                                          "model_version": "2.1"}


def test_heartbeat_message_is_keyed_by_device() -> None:
    heartbeat = make_heartbeat("edge-07")
    body = encode_binary(heartbeat)
    assert heartbeat_message(heartbeat, body) == (HEARTBEATS_TOPIC, b"edge-07", body)


# ---- the publisher, against a fake librdkafka producer ---------------------------------


class FakeProducer:
    """Queues messages; the test decides when the 'cluster' acknowledges or fails them."""

    def __init__(self, config: dict[str, Any], queue_max: int = 1000) -> None:
        self.config = config
        self.queue_max = queue_max
        self.queued: list[Callable[[KafkaError | None, Message], None]] = []
        self.outcomes: list[KafkaError | None] = []  # served by the next poll
        self.errors: list[KafkaError] = []  # error_cb events served by the next poll
        self.cluster_up = True
        self.lock = threading.Lock()

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None, *,
                on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
                ) -> None:
        with self.lock:
            if len(self.queued) >= self.queue_max:
                raise BufferError("Local: Queue full")
            assert on_delivery is not None
            self.queued.append(on_delivery)

    def settle_all(self, error: KafkaError | None = None) -> None:
        with self.lock:
            self.outcomes.extend([error] * len(self.queued))

    def poll(self, timeout: float = -1) -> int:
        with self.lock:
            errors, self.errors = self.errors, []
            count = min(len(self.outcomes), len(self.queued))
            callbacks, self.queued = self.queued[:count], self.queued[count:]
            outcomes, self.outcomes = self.outcomes[:count], self.outcomes[count:]
        for error in errors:
            self.config["error_cb"](error)
        for callback, outcome in zip(callbacks, outcomes, strict=True):
            callback(outcome, Message(topic="t"))
        if not errors and not callbacks:
            time.sleep(min(timeout, 0.002))  # stands in for librdkafka's blocking poll
        return len(callbacks)

    def flush(self, timeout: float = -1) -> int:
        return len(self.queued)

    def purge(self, in_queue: bool = True, in_flight: bool = True,
              blocking: bool = True) -> None:
        with self.lock:
            self.queued.clear()

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if not self.cluster_up:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        topics = (READINGS_TOPIC, INFERENCES_TOPIC, HEARTBEATS_TOPIC, ALERTS_TOPIC)
        return SimpleNamespace(brokers={1: "broker"}, topics=dict.fromkeys(topics))

    def __len__(self) -> int:
        return len(self.queued)


@contextmanager
def fake_publisher(queue_max: int = 1000) -> Iterator[tuple[KafkaPublisher, list[FakeProducer]]]:
    producers: list[FakeProducer] = []

    def factory(config: dict[str, Any]) -> FakeProducer:
        producers.append(FakeProducer(config, queue_max))
        return producers[-1]

    publisher = KafkaPublisher("fake:9092", queue_max_messages=queue_max,
                               producer_factory=factory)
    with publisher:
        yield publisher, producers


def test_publish_all_resolves_when_every_message_is_delivered() -> None:
    async def main() -> None:
        with fake_publisher() as (publisher, producers):
            task = asyncio.create_task(publisher.publish_all(
                [(READINGS_TOPIC, b"d", b"1"), (ALERTS_TOPIC, b"d", b"2")]))
            await asyncio.sleep(0.02)
            assert not task.done()  # nothing acknowledged yet
            producers[0].settle_all()
            await asyncio.wait_for(task, 2)
            assert publisher.stats.delivered == 2 and publisher.stats.failed == 0

    asyncio.run(main())


def test_all_brokers_down_fails_waiting_callers_at_once_and_refuses_until_a_probe_passes(
) -> None:
    async def main() -> None:
        with fake_publisher() as (publisher, producers):
            producer = producers[0]
            task = asyncio.create_task(publisher.publish_all([(READINGS_TOPIC, b"d", b"1")]))
            await asyncio.sleep(0.01)
            producer.cluster_up = False
            producer.errors.append(KafkaError(KafkaError._ALL_BROKERS_DOWN))
            started = time.monotonic()
            with pytest.raises(KafkaUnavailable, match="all brokers are down"):
                await asyncio.wait_for(task, 2)
            assert time.monotonic() - started < 1.0  # not message.timeout.ms later
            assert not publisher.available
            with pytest.raises(KafkaUnavailable):
                publisher.produce(READINGS_TOPIC, b"d", b"2", lambda _error: None)
            producer.cluster_up = True
            deadline = time.monotonic() + 5
            while not publisher.available and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert publisher.available
            # Back from an outage, a fresh producer gets a fresh producer id.
            assert len(producers) == 2 and publisher.stats.producer_restarts == 1
            late = asyncio.create_task(publisher.publish_all([(READINGS_TOPIC, b"d", b"3")]))
            await asyncio.sleep(0.01)
            producers[1].settle_all()
            await asyncio.wait_for(late, 2)
            assert publisher.stats.outages == 1

    asyncio.run(main())


def test_a_full_local_queue_is_backpressure_and_queues_nothing() -> None:
    async def main() -> None:
        with fake_publisher(queue_max=3) as (publisher, producers):
            publisher.produce(READINGS_TOPIC, b"d", b"1", lambda _error: None)
            publisher.produce(READINGS_TOPIC, b"d", b"2", lambda _error: None)
            with pytest.raises(Backpressure):  # 2 queued + 2 would exceed 3
                await publisher.publish_all([(READINGS_TOPIC, b"d", b"3")] * 2)
            assert len(producers[0].queued) == 2
            publisher.produce(READINGS_TOPIC, b"d", b"3", lambda _error: None)
            with pytest.raises(Backpressure):
                publisher.produce(READINGS_TOPIC, b"d", b"4", lambda _error: None)
            assert publisher.stats.refused_backpressure == 2

    asyncio.run(main())


def test_a_failed_delivery_reaches_the_callback_as_kafka_unavailable() -> None:
    outcomes: list[KafkaUnavailable | None] = []
    with fake_publisher() as (publisher, producers):
        publisher.produce(READINGS_TOPIC, b"d", b"1", outcomes.append)
        producers[0].settle_all(KafkaError(KafkaError._MSG_TIMED_OUT))
        wait_until(lambda: len(outcomes) == 1, "the delivery report")
    assert isinstance(outcomes[0], KafkaUnavailable)
    assert "timed out" in str(outcomes[0])


def test_a_callback_is_called_once_even_if_delivery_is_reported_after_an_outage() -> None:
    outcomes: list[KafkaUnavailable | None] = []
    with fake_publisher() as (publisher, producers):
        producer = producers[0]
        publisher.produce(READINGS_TOPIC, b"d", b"1", outcomes.append)
        producer.cluster_up = False
        producer.errors.append(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        wait_until(lambda: len(outcomes) == 1, "the early failure")
        producer.settle_all()  # librdkafka delivers it after all
        wait_until(lambda: not producer.queued, "the late delivery report")
    assert len(outcomes) == 1 and isinstance(outcomes[0], KafkaUnavailable)


def test_a_raising_callback_does_not_stop_the_reports_of_others() -> None:
    outcomes: list[KafkaUnavailable | None] = []

    def broken(_error: KafkaUnavailable | None) -> None:
        raise RuntimeError("a bug in the caller")

    with fake_publisher() as (publisher, producers):
        publisher.produce(READINGS_TOPIC, b"d", b"1", broken)
        publisher.produce(READINGS_TOPIC, b"d", b"2", outcomes.append)
        producers[0].settle_all()
        wait_until(lambda: outcomes == [None], "the second report")
    assert publisher.stats.delivered == 2


# ---- the sink worker, against a fake consumer and a fake store -------------------------


class FakeConsumer:
    """One partition per topic; consume() blocks on a condition, like librdkafka's."""

    def __init__(self) -> None:
        self.partitions = [TopicPartition(READINGS_TOPIC, 0), TopicPartition(HEARTBEATS_TOPIC, 0)]
        self.log: dict[tuple[str, int], list[Message]] = {
            (tp.topic, tp.partition): [] for tp in self.partitions}
        self.position_: dict[tuple[str, int], int] = dict.fromkeys(self.log, 0)
        self.committed: dict[tuple[str, int], int] = {}
        self.commit_calls = 0
        self.paused: set[tuple[str, int]] = set()
        self.pause_calls = 0
        self.resume_calls = 0
        self.assigned: list[TopicPartition] = []
        self.callbacks: dict[str, Any] = {}
        self.closed = False
        self.cond = threading.Condition()

    def append(self, topic: str, value: bytes | None) -> None:
        with self.cond:
            log = self.log[(topic, 0)]
            log.append(Message(topic=topic, partition=0, offset=len(log), value=value))
            self.cond.notify_all()

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None,
                  on_lost: Any = None) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke}

    def _ready(self) -> list[Message]:
        return [m for key, log in self.log.items() if key not in self.paused
                for m in log[self.position_[key]:]]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        if not self.assigned:
            self.assigned = list(self.partitions)
            self.callbacks["assign"](self, list(self.partitions))
        with self.cond:
            self.cond.wait_for(lambda: bool(self._ready()), timeout=timeout)
            taken = self._ready()[:num_messages]
            for message in taken:
                key = (message.topic() or "", message.partition() or 0)
                self.position_[key] = (message.offset() or 0) + 1
            return taken

    def revoke_all(self) -> None:
        """A rebalance: the partitions go, and come back from the committed offsets."""
        self.callbacks["revoke"](self, list(self.assigned))
        with self.cond:
            self.assigned = []
            self.paused.clear()
            for key in self.position_:
                self.position_[key] = self.committed.get(key, 0)

    def commit(self, *, offsets: list[TopicPartition],
               asynchronous: bool) -> list[TopicPartition]:
        assert asynchronous is False
        self.commit_calls += 1
        for tp in offsets:
            self.committed[(tp.topic, tp.partition)] = tp.offset
        return offsets

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.pause_calls += 1
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resume_calls += 1
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.position_[(tp.topic, tp.partition)])
                for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        return 0, len(self.log[(partition.topic, partition.partition)])

    def close(self) -> None:
        self.closed = True


class FakeStore:
    """Dedupes on (device, seq) like the real stores; can be made unavailable or picky."""

    description = "fake store"

    def __init__(self, consumer: FakeConsumer) -> None:
        self.consumer = consumer
        self.rows: dict[tuple[str, int], float | None] = {}
        self.heartbeats: list[Heartbeat] = []
        self.available = True
        self.refuse_device: str | None = None  # raise ValueError for batches of this device
        self.attempts = 0
        self.committed_at_write: list[dict[tuple[str, int], int]] = []
        self.closed = False

    def write(self, batches: Sequence[Batch],
              heartbeats: Sequence[Heartbeat] = ()) -> WriteResult:
        self.attempts += 1
        self.committed_at_write.append(dict(self.consumer.committed))
        if not self.available:
            raise StoreUnavailable("connection refused")
        if self.refuse_device and any(b.device == self.refuse_device for b in batches):
            raise ValueError(f"value out of range for {self.refuse_device}")
        inserted = duplicates = 0
        for batch in batches:
            for reading in batch.readings:
                key = (reading.device, reading.seq)
                if key in self.rows:
                    duplicates += 1
                else:
                    self.rows[key] = reading.value
                    inserted += 1
        self.heartbeats.extend(heartbeats)
        return WriteResult(inserted, duplicates, len(heartbeats), {})

    def setup(self) -> str:
        return self.description

    def completeness(self) -> list[Completeness]:
        return []

    def device_status(self) -> list[dict[str, Any]]:
        return []

    def count_rows(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self.closed = True


@contextmanager
def running_sink(**options: Any) -> Iterator[tuple[SinkWorker, FakeConsumer, FakeStore]]:
    consumer = FakeConsumer()
    store = FakeStore(consumer)
    worker = SinkWorker("fake:9092", lambda: store,
                        consumer_factory=lambda _config: consumer,
                        max_wait_s=0.02, backoff_initial_s=0.01, backoff_cap_s=0.05,
                        **options)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield worker, consumer, store
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()
    assert consumer.closed and store.closed


def test_offsets_are_committed_only_after_the_write_returned() -> None:
    with running_sink() as (worker, consumer, store):
        for first in (1, 4, 7):
            consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", first, 3)))
        consumer.append(HEARTBEATS_TOPIC, encode_binary(make_heartbeat("edge-01")))
        wait_until(lambda: consumer.committed.get((READINGS_TOPIC, 0)) == 3
                   and consumer.committed.get((HEARTBEATS_TOPIC, 0)) == 1, "the commits")
    assert sorted(store.rows) == [("edge-01", seq) for seq in range(1, 10)]
    assert len(store.heartbeats) == 1
    # Each write saw only the offsets of earlier writes committed, never its own.
    written = 0
    for seen in store.committed_at_write:
        assert seen.get((READINGS_TOPIC, 0), 0) <= written
        written = max(written, seen.get((READINGS_TOPIC, 0), 0))
    assert worker.stats.messages == 4 and worker.stats.rows_inserted == 9
    assert worker.stats.heartbeats == 1 and worker.stats.commits >= 1


def test_store_outage_pauses_retries_the_same_messages_and_resumes_without_loss() -> None:
    with running_sink() as (worker, consumer, store):
        store.available = False
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 1, 5)))
        wait_until(lambda: store.attempts >= 3, "retries")
        assert worker.stats.paused and consumer.paused == {
            (READINGS_TOPIC, 0), (HEARTBEATS_TOPIC, 0)}
        assert consumer.committed == {}  # nothing committed while the store is down
        # Arriving meanwhile: stays in Kafka (the partitions are paused), not in memory.
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 6, 5)))
        store.available = True
        wait_until(lambda: consumer.committed.get((READINGS_TOPIC, 0)) == 2, "the commit")
        assert not worker.stats.paused and consumer.paused == set()
        assert consumer.resume_calls == 1
    assert sorted(store.rows) == [("edge-01", seq) for seq in range(1, 11)]
    assert worker.stats.rows_inserted == 10 and worker.stats.duplicates == 0
    assert worker.stats.db_errors >= 3


def test_an_undecodable_message_is_skipped_counted_and_committed_past() -> None:
    with running_sink() as (worker, consumer, store):
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 1, 2)))
        consumer.append(READINGS_TOPIC, b"EFB\x01 not msgpack")
        consumer.append(READINGS_TOPIC, None)
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 3, 2)))
        wait_until(lambda: consumer.committed.get((READINGS_TOPIC, 0)) == 4, "the commit")
    assert worker.stats.undecodable == 2 and worker.stats.messages == 4
    assert sorted(store.rows) == [("edge-01", seq) for seq in range(1, 5)]


def test_a_batch_the_store_refuses_is_isolated_and_skipped() -> None:
    with running_sink() as (worker, consumer, store):
        store.refuse_device = "edge-bad"
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 1, 2)))
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-bad", 1, 2)))
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-02", 1, 2)))
        wait_until(lambda: consumer.committed.get((READINGS_TOPIC, 0)) == 3, "the commit")
    assert worker.stats.rejected_by_store == 1
    assert sorted(store.rows) == [("edge-01", 1), ("edge-01", 2), ("edge-02", 1), ("edge-02", 2)]


def test_revoked_partitions_drop_unwritten_messages_which_come_again() -> None:
    with running_sink() as (worker, consumer, store):
        store.available = False
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 1, 3)))
        wait_until(lambda: store.attempts >= 2, "a failed write")
        consumer.revoke_all()  # the worker must forget what it held, unwritten
        store.available = True
        wait_until(lambda: consumer.committed.get((READINGS_TOPIC, 0)) == 1, "the commit")
        assert not worker.stats.paused
    assert sorted(store.rows) == [("edge-01", seq) for seq in range(1, 4)]
    assert worker.stats.rows_inserted == 3 and worker.stats.rebalances == 2


def test_lag_counts_messages_behind_the_high_watermark() -> None:
    with running_sink(lag_interval_s=0.01) as (worker, consumer, store):
        store.available = False
        consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", 1, 1)))
        wait_until(lambda: worker.stats.paused, "the pause")
        for first in (2, 3, 4):
            consumer.append(READINGS_TOPIC, encode_binary(make_batch("edge-01", first, 1)))
        wait_until(lambda: worker.stats.lag == 3, "a lag of 3")
        store.available = True
        wait_until(lambda: worker.stats.lag == 0, "no lag")
