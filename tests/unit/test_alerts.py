"""Alert delivery: a real MQTT broker (amqtt, in process) read by a real paho subscriber,
a loopback stdlib HTTP server as the webhook, and the bounded queue's drop-newest policy.
Waits are on events and queue joins with deadlines, never bare sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.edge_agent.alerts import Alert, AlertSink
from edgefleet.edge_agent.config import AlertsConfig

T0 = 1_795_000_000_123_000_000


def alert(i: int = 0) -> Alert:
    return Alert(device="edge-01", asset=f"pump-{i:02d}", ts_ns=T0 + i, score=0.9 + i / 100,
                 threshold=0.8, model_version="m-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def broker(port: int) -> AsyncIterator[Broker]:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    server = Broker(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


class Subscriber:
    """A paho client in its own thread, collecting messages of one topic."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[bytes] = []
        self.subscribed = threading.Event()
        self.got = threading.Condition()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-subscriber")
        client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda c, u, mid, r, p: self.subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.got:
            self.messages.append(message.payload)
            self.got.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.messages) >= count, timeout), self.messages
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def start_subscriber(port: int, topic: str) -> Subscriber:
    subscriber = await asyncio.to_thread(Subscriber, port, topic)
    assert await asyncio.to_thread(subscriber.subscribed.wait, 10.0)
    return subscriber


def test_mqtt_alerts_reach_the_topic_with_qos1() -> None:
    port = free_port()

    async def main() -> None:
        async with broker(port):
            subscriber = await start_subscriber(port, "edgefleet/+/alerts")
            config = AlertsConfig(mqtt_url=f"mqtt://127.0.0.1:{port}")
            sink = AlertSink(config, device="edge-01")
            runner = asyncio.create_task(sink.run())
            try:
                for i in range(3):
                    assert sink.publish(alert(i))
                await asyncio.wait_for(sink.join(), 10)
                assert sink.stats.sent == 3 and sink.stats.mqtt_connected
                messages = await asyncio.to_thread(subscriber.wait_for, 3)
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
                await asyncio.to_thread(subscriber.close)
        documents = [json.loads(m) for m in messages]
        assert [d["asset"] for d in documents] == ["pump-00", "pump-01", "pump-02"]
        assert documents[0] == {
            "device": "edge-01", "asset": "pump-00", "ts": T0,
            "time": "2026-11-18T11:06:40.123Z", "score": 0.9, "threshold": 0.8,
            "model_version": "m-1",
        }
        assert sink.stats.mqtt_connected is False  # the session ended with the task

    asyncio.run(main())


@contextlib.asynccontextmanager
async def gate(listen_port: int, target_port: int) -> AsyncIterator[None]:
    """Open `listen_port` and splice each connection to `target_port`: a broker that
    "comes up" only once the test's own subscriber is already in place."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(splice, "127.0.0.1", listen_port)
    try:
        yield
    finally:
        server.close()


def test_mqtt_alerts_wait_for_a_broker_that_comes_up_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, broker_port = free_port(), free_port()
    caplog.set_level(logging.INFO, logger="edgefleet.edge_agent.alerts")

    async def main() -> None:
        config = AlertsConfig(mqtt_url=f"mqtt://127.0.0.1:{port}", backoff_initial_s=0.05,
                              backoff_cap_s=0.2, topic="plant/{device}/alarms")
        sink = AlertSink(config, device="edge-01")
        runner = asyncio.create_task(sink.run())
        try:
            assert sink.publish(alert(1))
            # Refused connections are retried with backoff; the alert waits in the queue.
            for _ in range(500):
                if sink.stats.last_error is not None:
                    break
                await asyncio.sleep(0.01)
            assert sink.stats.last_error is not None and "cannot connect" in sink.stats.last_error
            assert sink.stats.sent == 0
            async with broker(broker_port):
                # Subscribe first, then let the sink reach the broker: no publish can
                # land before the subscription exists.
                subscriber = await start_subscriber(broker_port, "plant/edge-01/alarms")
                try:
                    async with gate(port, broker_port):
                        await asyncio.wait_for(sink.join(), 15)
                        messages = await asyncio.to_thread(subscriber.wait_for, 1)
                finally:
                    await asyncio.to_thread(subscriber.close)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        assert json.loads(messages[0])["asset"] == "pump-01"
        assert sink.stats.sent == 1

    asyncio.run(main())
    outage = [r for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert len(outage) == 1  # logged once when the outage began, not per attempt
    assert any("delivering again" in r.getMessage() for r in caplog.records)


def test_full_queue_drops_the_newest_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgefleet.edge_agent.alerts")
    config = AlertsConfig(webhook_url="http://127.0.0.1:9/hook", queue_max=2)
    sink = AlertSink(config, device="edge-01")
    results = [sink.publish(alert(i)) for i in range(5)]  # no run(): nothing drains
    assert results == [True, True, False, False, False]
    assert sink.stats.dropped == 3 and sink.stats.published == 5 and sink.queued == 2
    queued = [sink.targets[0].queue.get_nowait() for _ in range(2)]
    assert [a.asset for a in queued] == ["pump-00", "pump-01"]  # the oldest were kept
    drops = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(drops) == 1
    assert sink.publish(alert(9))  # room again: the episode ends, and says how many
    assert any("3 alert(s) dropped" in r.getMessage() for r in caplog.records)


class Hook:
    """A loopback webhook answering with scripted statuses (then 200)."""

    def __init__(self, statuses: list[int], retry_after: str | None = None) -> None:
        self.statuses = statuses
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hook.bodies.append(json.loads(self.rfile.read(length)))
                assert self.headers["Content-Type"] == "application/json"
                status = hook.statuses.pop(0) if hook.statuses else 200
                self.send_response(status)
                if retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_factory() -> Iterator[Any]:
    hooks: list[Hook] = []

    def make(statuses: list[int], retry_after: str | None = None) -> Hook:
        hooks.append(Hook(statuses, retry_after))
        return hooks[-1]

    yield make
    for hook in hooks:
        hook.close()


def deliver(config: AlertsConfig, alerts: list[Alert]) -> AlertSink:
    async def main() -> AlertSink:
        sink = AlertSink(config, device="edge-01")
        runner = asyncio.create_task(sink.run())
        try:
            for item in alerts:
                sink.publish(item)
            await asyncio.wait_for(sink.join(), 15)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        return sink

    return asyncio.run(main())


def test_webhook_retries_503_then_delivers(hook_factory: Any) -> None:
    hook = hook_factory([503, 500], retry_after="0")
    config = AlertsConfig(webhook_url=hook.url, backoff_initial_s=0.01, backoff_cap_s=0.05)
    sink = deliver(config, [alert(1)])
    assert sink.stats.sent == 1 and sink.stats.failed == 0
    assert len(hook.bodies) == 3  # 503, 500, then 200
    assert hook.bodies[-1]["asset"] == "pump-01" and hook.bodies[-1]["score"] == 0.91


def test_webhook_refusal_is_not_retried(hook_factory: Any) -> None:
    hook = hook_factory([400])
    config = AlertsConfig(webhook_url=hook.url, backoff_initial_s=0.01, backoff_cap_s=0.05)
    sink = deliver(config, [alert(1), alert(2)])
    assert sink.stats.failed == 1 and sink.stats.sent == 1
    assert [b["asset"] for b in hook.bodies] == ["pump-01", "pump-02"]  # one try each
    assert sink.stats.last_error == "webhook: HTTP 400"


def test_webhook_attempts_are_bounded(hook_factory: Any) -> None:
    hook = hook_factory([500] * 10)
    config = AlertsConfig(webhook_url=hook.url, webhook_max_attempts=3,
                          backoff_initial_s=0.01, backoff_cap_s=0.05)
    sink = deliver(config, [alert(1)])
    assert sink.stats.failed == 1 and sink.stats.sent == 0
    assert len(hook.bodies) == 3


def test_webhook_down_counts_a_failure() -> None:
    config = AlertsConfig(webhook_url=f"http://127.0.0.1:{free_port()}/hook",
                          webhook_max_attempts=2, backoff_initial_s=0.01, backoff_cap_s=0.02)
    sink = deliver(config, [alert(1)])
    assert sink.stats.failed == 1
    assert sink.stats.last_error is not None and "ConnectError" in sink.stats.last_error


def test_publish_result_carries_the_threshold() -> None:
    config = AlertsConfig(webhook_url="http://127.0.0.1:9/hook")
    sink = AlertSink(config, device="edge-01")
    sink.threshold = 0.7

    class Result:
        asset = "pump-03"
        ts_ns = T0
        score = 0.95
        is_anomaly = True
        model_version = "m-2"

    assert sink.publish_result(Result())
    queued = sink.targets[0].queue.get_nowait()
    assert queued == Alert("edge-01", "pump-03", T0, 0.95, 0.7, "m-2")


def test_alert_config_is_checked() -> None:
    with pytest.raises(ValueError, match="only placeholder allowed"):
        AlertsConfig(topic="edgefleet/{site}/alerts")
    with pytest.raises(ValueError, match="no wildcards"):
        AlertsConfig(topic="edgefleet/+/alerts")
    with pytest.raises(ValueError, match="mqtt:// or mqtts://"):
        AlertsConfig(mqtt_url="http://broker")
    with pytest.raises(ValueError, match="webhook_url"):
        AlertsConfig(webhook_url="ftp://x")
    config = AlertsConfig(mqtt_url="mqtt://user:s3cret@127.0.0.1:1883")
    assert "s3cret" not in repr(config)
    assert config.topic_for("edge-01") == "edgefleet/edge-01/alerts"
