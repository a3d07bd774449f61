"""MqttSource without a broker: configuration, the JSON path syntax, timestamps, every
bad-input case fed through `handle()`, Sparkplug host state, and the bounded hand-off
from paho's thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from pydantic import ValidationError

from edgefleet.protocols.mqtt import (
    MessageInbox,
    MqttSource,
    MqttSourceConfig,
    RawMessage,
    compile_path,
    parse_broker_url,
    parse_timestamp,
    resolve_path,
)
from edgefleet.protocols.source import Sample, StreamingSource
from edgefleet.protocols.sparkplug import (
    REBIRTH_METRIC,
    DataType,
    Metric,
    Payload,
    decode_payload,
    encode_payload,
)
from edgefleet.protocols.wire import Quality

URL = "mqtt://edgefleet:s3cret@127.0.0.1:1883"
TS_MS = 1_795_000_000_123
TS_NS = TS_MS * 1_000_000


def json_config(**extra: Any) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate({
        "broker": URL,
        "subscriptions": [{"format": "json", "topic": "plant/+/telemetry",
                           "asset": {"topic_segment": 1}, "values_path": "values",
                           "tags": {"code": "$.status.code"}, "timestamp_path": "ts"}],
        **extra,
    })


class Collect:
    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def __call__(self, sample: Sample) -> None:
        self.samples.append(sample)

    def by_tag(self) -> dict[str, Sample]:
        return {s.tag: s for s in self.samples}


def feed(source: MqttSource, topic: str, payload: bytes | dict[str, Any]) -> Collect:
    out = Collect()
    raw = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    source.handle(topic, raw, 42, out)
    return out


# ---- configuration ---------------------------------------------------------------------------


def test_config_builds_a_streaming_source() -> None:
    source = json_config().build()
    assert isinstance(source, StreamingSource)
    assert source.config.qos == 1 and source.config.clean_session is False
    assert "s3cret" not in repr(source.config)  # the URL holds a password
    assert source.config.effective_client_id().startswith("edgefleet-")


@pytest.mark.parametrize(("change", "problem"), [
    ({"broker": "http://x"}, "mqtt:// or mqtts://"),
    ({"broker": "mqtt://host:99999"}, "port"),
    ({"ca_file": "/tmp/ca.pem"}, "plain mqtt://"),
    ({"password": "x"}, "without a username"),
    ({"qos": 3}, "qos"),
    ({"unknown": 1}, "Extra inputs"),
    ({"subscriptions": [{"format": "json", "topic": "a/#/b", "asset": {"fixed": "a"},
                         "tags": {"x": "x"}}]}, "'#' must be a whole, last level"),
    ({"subscriptions": [{"format": "json", "topic": "a/b", "asset": {"fixed": "a",
                         "path": "x"}, "tags": {"x": "x"}}]}, "exactly one"),
    ({"subscriptions": [{"format": "json", "topic": "a/b", "asset": {"fixed": "a"}}]},
     "tags and/or values_path"),
    ({"subscriptions": [{"format": "json", "topic": "a/b", "asset": {"topic_segment": 5},
                         "tags": {"x": "x"}}]}, "past the topic"),
    ({"subscriptions": [{"format": "json", "topic": "a/b", "asset": {"fixed": "a"},
                         "tags": {"x": "values..x"}}]}, "cannot read"),
    ({"subscriptions": [{"format": "sparkplug", "group_id": "a/b"}]}, "group_id"),
    ({"subscriptions": []}, "at least 1"),
])
def test_config_errors_name_the_problem(change: dict[str, Any], problem: str) -> None:
    data: dict[str, Any] = {
        "broker": URL, "subscriptions": [{"format": "json", "topic": "a/b",
                                          "asset": {"fixed": "a"}, "tags": {"x": "x"}}]}
    data.update(change)
    with pytest.raises(ValidationError, match=problem):
        MqttSourceConfig.model_validate(data)


def test_broker_urls() -> None:
    address = parse_broker_url("mqtts://dev%40a:p%3Aw@broker.local")
    assert (address.host, address.port, address.tls) == ("broker.local", 8883, True)
    assert (address.username, address.password) == ("dev@a", "p:w")
    assert "p:w" not in repr(address) and "p:w" not in str(address)
    assert parse_broker_url("mqtt://h").port == 1883


# ---- paths and timestamps --------------------------------------------------------------------


def test_path_syntax() -> None:
    assert compile_path("values.flow") == ("values", "flow")
    assert compile_path("$.values.flow") == ("values", "flow")
    assert compile_path("readings[0].v") == ("readings", 0, "v")
    assert compile_path("$['flow.m3h']") == ("flow.m3h",)
    assert compile_path('a["b c"][-1]') == ("a", "b c", -1)
    for bad in ("", "$", "a..b", "a[x]", "a['b"):
        with pytest.raises(ValueError):
            compile_path(bad)
    document = {"a": [{"b": 1}, {"b": 2}], "c.d": 3}
    assert resolve_path(document, compile_path("a[1].b")) == 2
    assert resolve_path(document, compile_path("$['c.d']")) == 3
    assert resolve_path(document, compile_path("a[5].b")) is not None  # the missing marker
    assert resolve_path(document, compile_path("a.b")) is resolve_path(document, ("zz",))


def test_timestamps() -> None:
    assert parse_timestamp(TS_MS, "auto") == TS_NS
    assert parse_timestamp(TS_MS / 1000, "auto") == pytest.approx(TS_NS, abs=1000)
    assert parse_timestamp(TS_NS, "auto") == TS_NS
    assert parse_timestamp(TS_MS * 1000, "us") == TS_NS
    assert parse_timestamp("2026-11-22T10:00:00.5Z", "auto") == 1_795_341_600_500_000_000
    assert parse_timestamp("2026-11-22T11:00:00.5+01:00", "iso8601") == 1_795_341_600_500_000_000
    assert parse_timestamp("2026-11-22T10:00:00.5", "auto") == 1_795_341_600_500_000_000
    for bad, unit in (("yesterday", "auto"), (True, "auto"), (-1, "ms"), (TS_MS, "iso8601"),
                      (float("nan"), "auto"), ([1], "auto"), (10**30, "ns")):
        assert parse_timestamp(bad, unit) is None, bad


# ---- JSON decoding and bad input -------------------------------------------------------------


def test_json_message_becomes_samples() -> None:
    source = json_config().build()
    out = feed(source, "plant/pump-01/telemetry", {
        "ts": TS_MS, "values": {"flow": 12.5, "speed": 1480, "alarm": True},
        "status": {"code": 3}})
    assert out.by_tag() == {
        "flow": Sample("pump-01", "flow", TS_NS, 12.5, Quality.GOOD),
        "speed": Sample("pump-01", "speed", TS_NS, 1480.0, Quality.GOOD),
        "alarm": Sample("pump-01", "alarm", TS_NS, 1.0, Quality.GOOD),
        "code": Sample("pump-01", "code", TS_NS, 3.0, Quality.GOOD),
    }
    assert source.stats.samples == 4 and source.stats.rejected == 0


def test_asset_from_payload_and_fixed_and_receipt_time() -> None:
    source = MqttSourceConfig.model_validate({"broker": URL, "subscriptions": [
        {"format": "json", "topic": "a", "asset": {"path": "meta.asset"},
         "tags": {"t": "v"}},
        {"format": "json", "topic": "b", "asset": {"fixed": "press-1"}, "tags": {"t": "v"}},
    ]}).build()
    assert feed(source, "a", {"meta": {"asset": "m-9"}, "v": 1}).samples == [
        Sample("m-9", "t", 42, 1.0, Quality.GOOD)]
    assert feed(source, "b", {"v": 2}).samples == [Sample("press-1", "t", 42, 2.0, Quality.GOOD)]
    assert feed(source, "a", {"meta": {"asset": "no spaces allowed"}, "v": 1}).samples == []
    assert source.stats.errors == {"no_asset": 1}


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json{", "not_json"),
    (b"\xff\xfe", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"text"', "not_object"),
    (b"[" * 100_000 + b"]" * 100_000, "oversize"),
    (json.dumps({"ts": "yesterday", "values": {"flow": 1}}).encode(), "bad_timestamp"),
    (json.dumps({"values": {"flow": 1}}).encode(), "bad_timestamp"),
    (json.dumps({"ts": TS_MS, "values": [1, 2]}).encode(), "no_values"),
    (json.dumps({"ts": TS_MS}).encode(), "no_values"),
])
def test_rejected_messages_are_counted(payload: bytes, reason: str) -> None:
    source = json_config(max_payload_bytes=4096).build()
    out = feed(source, "plant/pump-01/telemetry", payload)
    assert out.samples == []
    assert source.stats.rejected == 1
    assert source.stats.errors == {reason: 1}


def test_deeply_nested_json_is_rejected_not_a_crash() -> None:
    source = json_config(max_payload_bytes=10_000_000).build()
    out = feed(source, "plant/pump-01/telemetry", b"[" * 200_000 + b"]" * 200_000)
    assert out.samples == [] and source.stats.errors in ({"not_json": 1}, {"not_object": 1})


def test_wrong_value_types_become_bad_samples() -> None:
    source = json_config().build()
    out = feed(source, "plant/pump-01/telemetry", {
        "ts": TS_MS, "values": {"flow": "12.5", "speed": None, "temperature": {"v": 1},
                                "pressure": 7.5, "bad key": 1},
        "status": {}})
    got = out.by_tag()
    for tag in ("flow", "speed", "temperature", "code"):
        assert got[tag] == Sample("pump-01", tag, TS_NS, None, Quality.BAD), tag
    assert got["pressure"].quality is Quality.GOOD
    assert source.stats.errors == {"not_a_number": 3, "missing_value": 1, "unknown_metric": 1}
    assert source.stats.bad == 4 and source.stats.samples == 5
    assert source.stats.rejected == 1  # the member that is not a tag name
    # NaN and Infinity (which Python's json reads) are not finite numbers either.
    out = feed(source, "plant/pump-01/telemetry",
               b'{"ts": 1795000000123, "values": {"flow": NaN, "speed": Infinity}}')
    assert all(s.quality is Quality.BAD for s in out.samples if s.tag != "code")


def test_repeated_failures_are_logged_once_then_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    source = json_config().build()
    for _ in range(50):
        feed(source, "plant/pump-01/telemetry", b"junk")
    warnings = [r for r in caplog.records if "not_json" in r.getMessage()]
    assert len(warnings) == 1 and source.stats.errors == {"not_json": 50}


# ---- Sparkplug ------------------------------------------------------------------------------


class FakeReason:
    is_failure = False
    value = 0


class FakePaho:
    """A paho client double for `client_factory`: `loop()` (run in the source's network
    thread) answers the connect with a CONNACK, then delivers `inbound` messages."""

    def __init__(self, inbound: list[tuple[str, bytes]] | None = None) -> None:
        self.published: list[tuple[str, bytes, int]] = []
        self.subscribed: list[Any] = []
        self.inbound = list(inbound or [])
        self.connected = False
        self.closed = False
        self.on_connect: Any = None
        self.on_disconnect: Any = None
        self.on_message: Any = None
        self.drained = threading.Event()  # every inbound message was handed over

    def connect(self, host: str, port: int, keepalive: int) -> None:
        self.connected = True

    def subscribe(self, topics: Any) -> None:
        self.subscribed.append(topics)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.published.append((topic, payload, qos))

    def loop(self, timeout: float) -> int:
        if self.closed:
            return 1
        if self.connected:
            self.connected = False
            self.on_connect(self, None, {}, FakeReason(), None)
        while self.inbound:
            topic, payload = self.inbound.pop(0)
            self.on_message(self, None, type("Msg", (), {"topic": topic,
                                                         "payload": payload})())
        self.drained.set()
        time.sleep(timeout / 4)
        return 0

    def disconnect(self) -> None:
        self.closed = True


def run_with(config: MqttSourceConfig, fake: FakePaho, until: Any,
             out: Collect | None = None) -> tuple[MqttSource, Collect]:
    source = MqttSource(config, client_factory=lambda _: fake)
    out = out or Collect()

    async def scenario() -> None:
        task = asyncio.create_task(source.run(out))
        deadline = time.monotonic() + 30
        while not until(source, out):
            assert time.monotonic() < deadline, (source.stats, out.samples)
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    return source, out


def sparkplug_source(**sub: Any) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate({"broker": URL, "subscriptions": [
        {"format": "sparkplug", "group_id": "plant", **sub}]})


def nbirth(bdseq: int = 0) -> bytes:
    return encode_payload(Payload(timestamp=TS_MS, seq=0, metrics=(
        Metric("bdSeq", datatype=DataType.UINT64, value=bdseq),
        Metric(REBIRTH_METRIC, datatype=DataType.BOOLEAN, value=False))))


def dbirth(seq: int = 1) -> bytes:
    return encode_payload(Payload(timestamp=TS_MS, seq=seq, metrics=(
        Metric("speed", 1, TS_MS, DataType.DOUBLE, 2950.0),
        Metric("level", 2, TS_MS, DataType.INT8, -3),
        Metric("label", 3, TS_MS, DataType.STRING, "on"),
        Metric("Properties/x", 4, TS_MS, DataType.DOUBLE, 1.0))))


def ddata(seq: int, *metrics: Metric) -> bytes:
    return encode_payload(Payload(timestamp=TS_MS + 100, seq=seq, metrics=metrics))


def test_sparkplug_births_aliases_and_deaths() -> None:
    source = sparkplug_source().build()
    out = Collect()
    source.handle("spBv1.0/plant/NBIRTH/gw", nbirth(), 1, out)
    source.handle("spBv1.0/plant/DBIRTH/gw/pump-01", dbirth(), 1, out)
    birth = out.by_tag()
    assert birth["speed"] == Sample("pump-01", "speed", TS_NS, 2950.0, Quality.GOOD)
    assert birth["level"].value == -3.0
    assert birth["label"].quality is Quality.BAD  # a string is not a number
    assert "Properties/x" not in birth  # not a tag name: counted and dropped
    assert source.stats.errors == {"not_a_number": 1, "unknown_metric": 1}

    out = Collect()
    # By alias, without datatype: Int8 -100 is re-read with the birth's datatype.
    source.handle("spBv1.0/plant/DDATA/gw/pump-01", ddata(
        2, Metric(alias=1, value=2951.5, datatype=DataType.DOUBLE),
        Metric(alias=2, value=156, datatype=DataType.UINT8),
        Metric(alias=1, timestamp=TS_MS + 5, is_null=True)), 1, out)
    values = [(s.tag, s.ts_ns, s.value, s.quality) for s in out.samples]
    assert values[0] == ("speed", TS_NS + 100_000_000, 2951.5, Quality.GOOD)
    assert values[2] == ("speed", TS_NS + 5_000_000, None, Quality.BAD)

    out = Collect()
    source.handle("spBv1.0/plant/NDEATH/gw", encode_payload(Payload(
        timestamp=TS_MS + 999, metrics=(Metric("bdSeq", datatype=DataType.UINT64,
                                               value=0),))), 1, out)
    assert {s.tag for s in out.samples} == {"speed", "level", "label"}
    assert all(s.quality is Quality.BAD and s.value is None for s in out.samples)


def test_stale_ndeath_of_an_older_session_is_ignored() -> None:
    source = sparkplug_source().build()
    out = Collect()
    source.handle("spBv1.0/plant/NBIRTH/gw", nbirth(bdseq=5), 1, out)
    source.handle("spBv1.0/plant/DBIRTH/gw/pump-01", dbirth(), 1, out)
    out = Collect()
    source.handle("spBv1.0/plant/NDEATH/gw", encode_payload(Payload(timestamp=1, metrics=(
        Metric("bdSeq", datatype=DataType.UINT64, value=4),))), 1, out)
    assert out.samples == []


def test_ddata_before_birth_requests_a_rebirth_once_per_interval() -> None:
    early = [("spBv1.0/plant/DDATA/gw/pump-01",
              ddata(seq, Metric(alias=1, value=1.0, datatype=DataType.DOUBLE)))
             for seq in (5, 6, 7)]
    fake = FakePaho(early)
    source, out = run_with(sparkplug_source(rebirth_interval_s=3600), fake,
                           lambda src, _: src.stats.errors.get("no_birth", 0) == 3)
    assert out.samples == [] and source.stats.rejected == 3
    assert fake.subscribed == [[("spBv1.0/plant/+/+", 1), ("spBv1.0/plant/+/+/+", 1)]]
    assert len(fake.published) == 1
    topic, payload, _ = fake.published[0]
    assert topic == "spBv1.0/plant/NCMD/gw"
    metric = decode_payload(payload).metrics[0]
    assert (metric.name, metric.value) == (REBIRTH_METRIC, True)


def test_an_alias_missing_from_the_dbirth_is_no_birth_too() -> None:
    source = sparkplug_source(request_rebirth=False).build()
    out = Collect()
    source.handle("spBv1.0/plant/NBIRTH/gw", nbirth(), 1, out)
    source.handle("spBv1.0/plant/DBIRTH/gw/pump-01", dbirth(), 1, out)
    before = len(out.samples)
    source.handle("spBv1.0/plant/DDATA/gw/pump-01",
                  ddata(2, Metric(alias=99, value=1.0, datatype=DataType.DOUBLE)), 1, out)
    assert len(out.samples) == before and source.stats.errors["no_birth"] == 1


def test_unknown_metrics_and_devices_and_bad_bytes() -> None:
    source = sparkplug_source(tags=["speed"], devices=["pump-01"]).build()
    out = Collect()
    source.handle("spBv1.0/plant/NBIRTH/gw", nbirth(), 1, out)
    source.handle("spBv1.0/plant/DBIRTH/gw/pump-01", dbirth(), 1, out)
    source.handle("spBv1.0/plant/DBIRTH/gw/other", dbirth(2), 1, out)
    assert [s.tag for s in out.samples] == ["speed"]
    assert source.stats.errors["unknown_metric"] == 3
    source.handle("spBv1.0/plant/DDATA/gw/pump-01", b"\x12\x05\x0a", 1, out)
    assert source.stats.errors["bad_sparkplug"] == 1
    source.handle("spBv1.0/plant/DDATA/gw/pump-01", ddata(9, Metric(
        alias=1, value=1.0, datatype=DataType.DOUBLE)), 1, out)
    assert source.stats.errors["seq_gap"] == 1  # 3 expected after the two births
    source.handle("spBv1.0/plant/NCMD/gw", b"anything", 1, out)  # commands are ignored


# ---- the hand-off from paho's thread ---------------------------------------------------------


def test_inbox_is_bounded_and_counts_what_it_drops() -> None:
    async def scenario() -> None:
        inbox = MessageInbox(asyncio.get_running_loop(), capacity=5, full_wait_s=0.01)
        results: list[bool] = []

        def producer() -> None:  # paho's thread; the consumer is not reading yet
            for i in range(20):
                results.append(inbox.put_threadsafe(RawMessage("t", b"%d" % i, 1, i)))

        thread = threading.Thread(target=producer)
        thread.start()
        await asyncio.to_thread(thread.join, 30)
        assert results.count(True) == 5 and inbox.dropped == 15
        got = [await inbox.get() for _ in range(5)]
        assert [m.received_ns for m in got] == [0, 1, 2, 3, 4]  # the oldest are kept
        assert inbox.put_threadsafe(RawMessage("t", b"x", 1, 99))  # room again
        assert (await inbox.get()).received_ns == 99

    asyncio.run(scenario())


def test_inbox_waits_for_room_before_dropping() -> None:
    async def scenario() -> None:
        inbox = MessageInbox(asyncio.get_running_loop(), capacity=1, full_wait_s=30)
        assert inbox.put_threadsafe(RawMessage("t", b"1", 1, 1))
        done = threading.Event()

        def producer() -> None:
            inbox.put_threadsafe(RawMessage("t", b"2", 1, 2))  # blocks until a get()
            done.set()

        thread = threading.Thread(target=producer)
        thread.start()
        assert (await inbox.get()).received_ns == 1
        assert (await inbox.get()).received_ns == 2
        await asyncio.to_thread(thread.join, 30)
        assert done.is_set() and inbox.dropped == 0

    asyncio.run(scenario())


def test_queue_full_drops_reach_the_stats() -> None:
    """With a one-message queue and no wait, a burst from paho's thread loses messages;
    every loss is counted in the stats, and the source goes on."""
    good = json.dumps({"ts": TS_MS, "values": {"flow": 1}, "status": {"code": 0}}).encode()
    fake = FakePaho([("plant/p/telemetry", good)] * 200)

    class Stalled(Collect):  # the event loop is stuck until paho's burst is over
        def __call__(self, sample: Sample) -> None:
            fake.drained.wait(30)
            super().__call__(sample)

    config = json_config(queue_size=1, full_wait_s=0.0)
    source, _ = run_with(config, fake, lambda src, o: len(o.samples) // 2
                         + src.stats.errors.get("queue_full", 0) == 200, Stalled())
    assert source.stats.errors["queue_full"] >= 198  # one being decoded, one queued
    assert source.stats.rejected == source.stats.errors["queue_full"]
    assert source.sessions == 1 and source.stats.reconnects == 0
