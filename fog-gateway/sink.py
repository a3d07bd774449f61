"""The sink: Kafka (`edgefleet.readings`, `edgefleet.heartbeats`) → the store, exactly once
in the database.

Contracts
---------
**Offsets follow the database.** Auto-commit is off. The worker collects up to
`max_batch_messages` messages (or what arrived within `max_wait_s`), decodes them, calls
`store.write(batches, heartbeats)` once, and only after it returned commits the next
offsets, synchronously. A crash between the write and the commit replays those messages;
the store deduplicates on `(device, seq)`, so the database holds every row once.

**Store outage: pause, retry, resume.** When the store raises `StoreUnavailable`, nothing
is committed and the messages stay in memory. The worker pauses every assigned partition
(so librdkafka stops fetching and memory stays bounded), logs the outage once, and retries
the same write after a capped, fully jittered exponential delay (`backoff_cap_s`) until it
succeeds; then it commits, resumes the partitions, and logs the recovery once. While
paused it keeps calling the consumer, so the group sees a live member and rebalances are
served.

**Undecodable messages** (`WireError`; impossible unless the log is corrupted, since ingest
validated every message) are counted, logged once per episode (first one, then a summary
when a good message ends the episode), and skipped: their offsets are committed with the
rest, so a bad message cannot block its partition forever.

**Data the store rejects** (any error other than `StoreUnavailable`: retrying cannot help)
is isolated by writing the held batches one at a time; the ones still refused are skipped,
counted in `rejected_by_store` and logged at ERROR with the device and seq range, and the
rest are written. The partition moves on instead of crash-looping on one message.

**Rebalance.** On revoke (or loss) of partitions, messages held from them that were not
written yet are dropped from memory; their offsets were not committed, so the next owner
reads them again.

**Stop.** `run(stop)` returns soon after `stop` is set: held messages are written and
committed when the store is available, else dropped (not committed: they are read again),
and the consumer leaves its group.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from edgefleet.protocols.source import Backoff
from edgefleet.protocols.wire import Batch, Heartbeat, WireError, decode_binary

from .kafka import _LIBRDKAFKA_LOG as LIBRDKAFKA_LOG
from .kafka import HEARTBEATS_TOPIC, READINGS_TOPIC
from .store import Store, StoreUnavailable

__all__ = ["ConsumerLike", "SinkStats", "SinkWorker"]

log = logging.getLogger(__name__)

_PAUSED_POLL_S: Final = 0.1


class ConsumerLike(Protocol):
    """The part of `confluent_kafka.Consumer` the worker uses (unit tests inject a fake)."""

    def subscribe(self, topics: list[str], on_assign: Any = ..., on_revoke: Any = ...,
                  on_lost: Any = ...) -> None: ...
    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]: ...
    def commit(self, *, offsets: list[TopicPartition],
               asynchronous: Literal[False]) -> list[TopicPartition]: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def assignment(self) -> list[TopicPartition]: ...
    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]: ...
    def close(self) -> None: ...


@dataclass
class SinkStats:
    """Counters since start; written by the worker thread, read by metrics."""

    messages: int = 0  # Kafka messages received (any kind, also undecodable ones)
    batches: int = 0  # batches written
    rows_inserted: int = 0  # readings newly stored
    duplicates: int = 0  # readings the store already had
    heartbeats: int = 0  # heartbeats that updated device status
    undecodable: int = 0  # messages skipped as corrupt
    rejected_by_store: int = 0  # batches/heartbeats skipped because the store refused them
    writes: int = 0  # successful store.write calls
    commits: int = 0  # successful offset commits
    commit_errors: int = 0
    db_errors: int = 0  # store.write calls that raised StoreUnavailable
    kafka_errors: int = 0  # consumer errors reported by librdkafka
    rebalances: int = 0
    paused: bool = False  # consumption paused because the store is unavailable
    lag: int | None = None  # messages behind the partitions' high watermarks, if known


@dataclass(frozen=True, slots=True)
class _Held:
    """One consumed message waiting for its write: where it came from and what it holds."""

    topic: str
    partition: int
    offset: int
    item: Batch | Heartbeat | None  # None: undecodable, skipped but committed


class SinkWorker:
    """One consumer-group member writing Kafka to the store; see the module docstring."""

    def __init__(
        self,
        bootstrap: str,
        store_factory: Callable[[], Store],
        *,
        group_id: str = "edgefleet-sink",
        max_batch_messages: int = 500,
        max_wait_s: float = 0.2,
        backoff_cap_s: float = 10.0,
        backoff_initial_s: float = 0.2,
        lag_interval_s: float = 2.0,
        extra: dict[str, str | int] | None = None,
        consumer_factory: Callable[[dict[str, Any]], ConsumerLike] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_batch_messages < 1:
            raise ValueError("max_batch_messages must be at least 1")
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.max_batch_messages = max_batch_messages
        self.max_wait_s = max_wait_s
        self.stats = SinkStats()
        self._store_factory = store_factory
        self._consumer_factory = consumer_factory or self._default_consumer
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # A crashed worker's partitions move after this long (Kafka's default is 45 s),
            # and tansu answers a JoinGroup only after session.timeout.ms / 2.
            "session.timeout.ms": 10_000,
            # tansu holds a fetch for up to this long even when data is there: the default
            # 500 ms made a median of 115 ms from produce to consume, 100 ms makes 22 ms.
            "fetch.wait.max.ms": 100,
            **(extra or {}),
            "error_cb": self._on_error,
            "logger": LIBRDKAFKA_LOG,
        }
        self._backoff = Backoff(min(backoff_initial_s, backoff_cap_s), backoff_cap_s, rng)
        self._consumer: ConsumerLike | None = None
        self._held: list[_Held] = []
        self._retry_at: float | None = None  # set while paused on a store outage
        self._outage_since = 0.0
        self._corrupt_episode = 0  # undecodable messages since the last good one
        self._kafka_error: str | None = None  # the consumer error being reported, if any
        self._lag_interval_s = lag_interval_s
        self._lag_at = -math.inf

    @staticmethod
    def _default_consumer(config: dict[str, Any]) -> ConsumerLike:
        return Consumer(config)

    # ---- the loop -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume and write until `stop` is set (blocking; run it in a thread)."""
        store = self._store_factory()  # connects lazily: nothing to fail here but config
        consumer = self._consumer_factory(self._config)
        self._consumer = consumer
        log.info("sink %s: consuming %s, %s from %s", self.group_id, READINGS_TOPIC,
                 HEARTBEATS_TOPIC, self.bootstrap)
        try:
            consumer.subscribe([READINGS_TOPIC, HEARTBEATS_TOPIC], on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_revoke)
            while not stop.is_set():
                if self._retry_at is not None:
                    self._wait_paused(consumer, stop)
                    if stop.is_set():
                        break
                else:
                    room = self.max_batch_messages - len(self._held)
                    self._accept(consumer.consume(num_messages=room, timeout=self.max_wait_s))
                if self._held:
                    self._flush(consumer, store)
                self._update_lag(consumer)
            if self._held and self._retry_at is None:
                self._flush(consumer, store)  # a last write; dropped (not committed) if it fails
        finally:
            if self._held:
                log.info("sink %s: stopping with %d messages not written; they were not "
                         "committed and will be read again", self.group_id, len(self._held))
            self._held.clear()
            consumer.close()
            store.close()
            self._consumer = None

    def _wait_paused(self, consumer: ConsumerLike, stop: threading.Event) -> None:
        """Serve the consumer (rebalances, group liveness) until the next retry is due."""
        while not stop.is_set():
            retry_at = self._retry_at
            if retry_at is None:  # a rebalance dropped everything that was held
                return
            remaining = retry_at - time.monotonic()
            if remaining <= 0:
                return
            messages = consumer.consume(num_messages=self.max_batch_messages,
                                        timeout=min(_PAUSED_POLL_S, remaining))
            if messages:  # fetched before the pause took effect, or from a new assignment
                self._accept(messages)
                consumer.pause(consumer.assignment())

    def _accept(self, messages: Sequence[Message]) -> None:
        for message in messages:
            error = message.error()
            if error is not None:
                self._consumer_error(error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if topic is None or partition is None or offset is None:
                continue
            self.stats.messages += 1
            self._held.append(_Held(topic, partition, offset, self._decode(message, topic)))
        if self._kafka_error is not None and any(m.error() is None for m in messages):
            log.warning("sink %s: consuming again (after: %s)", self.group_id, self._kafka_error)
            self._kafka_error = None

    def _decode(self, message: Message, topic: str) -> Batch | Heartbeat | None:
        value = message.value()
        try:
            if value is None:
                raise WireError("message has no value")
            item: Batch | Heartbeat
            if topic == READINGS_TOPIC:
                item = decode_binary(value, Batch)
            elif topic == HEARTBEATS_TOPIC:
                item = decode_binary(value, Heartbeat)
            else:
                raise WireError(f"unexpected topic {topic!r}")
        except WireError as err:
            self.stats.undecodable += 1
            self._corrupt_episode += 1
            if self._corrupt_episode == 1:
                log.error("sink %s: skipping undecodable message %s[%s]@%s: %s (further ones "
                          "are counted, not logged, until a good message arrives)",
                          self.group_id, topic, message.partition(), message.offset(), err)
            return None
        if self._corrupt_episode:
            log.warning("sink %s: %d undecodable message(s) skipped; decoding again",
                        self.group_id, self._corrupt_episode)
            self._corrupt_episode = 0
        return item

    # ---- writing and committing ---------------------------------------------------------

    def _flush(self, consumer: ConsumerLike, store: Store) -> None:
        held = self._held
        batches = [h.item for h in held if isinstance(h.item, Batch)]
        heartbeats = [h.item for h in held if isinstance(h.item, Heartbeat)]
        try:
            if batches or heartbeats:
                self._write(store, batches, heartbeats)
        except StoreUnavailable as err:
            self._store_down(consumer, err)
            return
        except Exception as err:  # noqa: BLE001 - the store refused data: isolate it below
            log.error("sink %s: the store refused a write of %d batches and %d heartbeats "
                      "(%s: %s); writing them one at a time", self.group_id, len(batches),
                      len(heartbeats), type(err).__name__, err)
            try:
                self._write_one_by_one(store, [*batches, *heartbeats])
            except StoreUnavailable as outage:
                self._store_down(consumer, outage)
                return
        if self._retry_at is not None:
            self._store_back(consumer)
        self._commit(consumer, held)
        self._held = []

    def _write(self, store: Store, batches: list[Batch], heartbeats: list[Heartbeat]) -> None:
        result = store.write(batches, heartbeats)
        self.stats.writes += 1
        self.stats.batches += len(batches)
        self.stats.rows_inserted += result.readings
        self.stats.duplicates += result.duplicates
        self.stats.heartbeats += result.heartbeats

    def _write_one_by_one(self, store: Store, items: list[Batch | Heartbeat]) -> None:
        for item in items:
            batches, heartbeats = ([item], []) if isinstance(item, Batch) else ([], [item])
            try:
                self._write(store, batches, heartbeats)
            except StoreUnavailable:
                raise
            except Exception as err:  # noqa: BLE001 - skipped, counted and logged, not retried
                self.stats.rejected_by_store += 1
                what = (f"batch {item.device} seq {item.first_seq}..{item.last_seq}"
                        if isinstance(item, Batch) else f"heartbeat {item.device} ts {item.ts}")
                log.error("sink %s: the store refused %s (%s: %s); skipped",
                          self.group_id, what, type(err).__name__, err)

    def _commit(self, consumer: ConsumerLike, held: list[_Held]) -> None:
        next_offsets: dict[tuple[str, int], int] = {}
        for h in held:
            key = (h.topic, h.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), h.offset + 1)
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(next_offsets.items())]
        try:
            committed = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            # Written but not committed: they may be read again, and deduplicated.
            self.stats.commit_errors += 1
            log.warning("sink %s: offset commit failed (%s); the rows are stored, the "
                        "messages may be read again", self.group_id, err)
            return
        failed = [tp for tp in committed if tp.error is not None]
        if failed:
            self.stats.commit_errors += 1
            log.warning("sink %s: offset commit failed for %s", self.group_id,
                        ", ".join(f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in failed))
            return
        self.stats.commits += 1

    def _store_down(self, consumer: ConsumerLike, err: StoreUnavailable) -> None:
        self.stats.db_errors += 1
        if self._retry_at is None:
            self._outage_since = time.monotonic()
            self.stats.paused = True
            consumer.pause(consumer.assignment())
            log.error("sink %s: store unavailable (%s); consumption paused, retrying the "
                      "same %d messages with backoff", self.group_id, err, len(self._held))
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _store_back(self, consumer: ConsumerLike) -> None:
        consumer.resume(consumer.assignment())
        log.warning("sink %s: store available again after %.1f s (%d attempts); consuming",
                    self.group_id, time.monotonic() - self._outage_since,
                    self._backoff.attempts + 1)
        self._retry_at = None
        self.stats.paused = False
        self._backoff.reset()

    # ---- rebalance, errors, lag ---------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.stats.rebalances += 1
        log.info("sink %s: assigned %s", self.group_id, _names(partitions))
        if self._retry_at is not None:  # still waiting for the store: do not fetch yet
            consumer.assign(partitions)
            consumer.pause(partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        before = len(self._held)
        self._held = [h for h in self._held if (h.topic, h.partition) not in revoked]
        dropped = before - len(self._held)
        log.info("sink %s: revoked %s%s", self.group_id, _names(partitions),
                 f"; dropped {dropped} unwritten messages (the next owner reads them)"
                 if dropped else "")
        if not self._held and self._retry_at is not None:
            self._retry_at = None  # nothing left to retry; the next write finds out
            self.stats.paused = False

    def _consumer_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        self.stats.kafka_errors += 1
        if self._kafka_error is None:
            self._kafka_error = error.str()
            log.warning("sink %s: consumer error: %s (logged once until messages flow again)",
                        self.group_id, error.str())

    def _on_error(self, error: KafkaError) -> None:
        # Served by consume(), in the worker thread. librdkafka reconnects by itself.
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT) \
                or error.fatal():
            self._consumer_error(error)
        else:
            log.warning("sink %s: %s", self.group_id, error.str())

    def _update_lag(self, consumer: ConsumerLike) -> None:
        now = time.monotonic()
        if now - self._lag_at < self._lag_interval_s:
            return
        self._lag_at = now
        assignment = consumer.assignment()
        if not assignment:
            self.stats.lag = 0
            return
        try:
            positions = consumer.position(assignment)
            lag = 0
            for tp in positions:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high < 0 or tp.offset < 0:
                    continue  # nothing fetched yet: unknown, counted as 0
                lag += max(0, high - tp.offset)
        except KafkaException:
            self.stats.lag = None
            return
        self.stats.lag = lag


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
