"""Anomaly alerts to local consumers: an MQTT topic (QoS 1) and/or a webhook.

The durable record of every inference is in the buffer (the `ml:<version>:is_anomaly`
readings go to the fog like any data); alerts are the *fast local* path, for a line's
HMI, a PLC gateway or an on-call hook. So they are bounded and best-effort by design:

* `AlertSink.publish(alert)` never blocks and never raises: it is called from the
  inference cycle. It must be called on the event loop's thread.
* Each target (MQTT, webhook) has its own `asyncio.Queue` of `queue_max` alerts, so a
  slow webhook never holds up the MQTT topic. When a queue is full the *newest* alert is
  dropped (`when_full: drop_newest`) and counted in `stats.dropped`; the first drop of an
  episode is logged, and the end of the episode (an alert accepted again) too.
* MQTT: one session on the configured broker (`mqtt://[user:password@]host[:port]`,
  `mqtts://` with TLS), QoS 1, delivered when the broker's PUBACK arrives. A lost or
  refused session is retried after a `Backoff` delay (logged once when the outage starts,
  once when it ends); the alert being sent is kept and sent again on the next session, so
  delivery is at-least-once while the agent runs.
* Webhook: `POST <webhook_url>` with the JSON below, `webhook_timeout_s` per attempt.
  2xx is delivered. Network errors, 408, 429 and 5xx are retried after a `Backoff` delay
  (429/503 `Retry-After` is honoured, up to `backoff_cap_s`) for at most
  `webhook_max_attempts` attempts; any other answer (a 4xx: the hook refuses the alert)
  and exhausted attempts give the alert up, counted in `stats.failed`.
* Alerts still queued when the agent stops are not delivered (the readings are).

Payload (UTF-8 JSON object): `device`, `asset`, `ts` (window end, UTC epoch ns), `time`
(the same, ISO 8601), `score`, `threshold` (null if unknown), `model_version`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import httpx

from edgefleet.protocols.mqtt import BrokerAddress, parse_broker_url
from edgefleet.protocols.source import Backoff

if TYPE_CHECKING:
    from .config import AlertsConfig

__all__ = ["Alert", "AlertSink", "AlertStats"]

log = logging.getLogger(__name__)

KEEPALIVE_S: Final = 30
_AUTH_CODES: Final = frozenset({4, 5, 134, 135})


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    device: str
    asset: str
    ts_ns: int
    score: float
    threshold: float | None
    model_version: str | None

    def to_json(self) -> bytes:
        moment = datetime.fromtimestamp(self.ts_ns / 1e9, UTC)
        return json.dumps(
            {
                "device": self.device,
                "asset": self.asset,
                "ts": self.ts_ns,
                "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "score": self.score,
                "threshold": self.threshold,
                "model_version": self.model_version,
            },
            allow_nan=False,
        ).encode()


@dataclasses.dataclass
class AlertStats:
    published: int = 0  # alerts given to publish()
    sent: int = 0  # deliveries that succeeded, one per target
    failed: int = 0  # deliveries given up (webhook refused or out of attempts)
    dropped: int = 0  # alerts a full target queue refused, one per target
    mqtt_connected: bool = False
    last_error: str | None = None


class _Target:
    """One destination with its own bounded queue (drop newest when full)."""

    name = "target"

    def __init__(self, queue_max: int, stats: AlertStats) -> None:
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_max)
        self.stats = stats
        self.dropped = 0
        self._dropping_since: int | None = None  # self.dropped when the episode began
        self._failing = False

    def offer(self, alert: Alert) -> bool:
        try:
            self.queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.dropped += 1
            self.stats.dropped += 1
            if self._dropping_since is None:
                self._dropping_since = self.dropped - 1
                log.warning(
                    "alerts: %s queue full (%d alerts): dropping new alerts until it drains",
                    self.name,
                    self.queue.maxsize,
                )
            return False
        if self._dropping_since is not None:
            log.warning(
                "alerts: %s queue accepting again; %d alert(s) dropped while it was full",
                self.name,
                self.dropped - self._dropping_since,
            )
            self._dropping_since = None
        return True

    def _fail(self, message: str) -> None:
        self.stats.last_error = f"{self.name}: {message}"
        if not self._failing:
            self._failing = True
            log.warning("alerts: %s: %s (retrying with backoff)", self.name, message)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("alerts: %s delivering again", self.name)

    async def run(self) -> None:
        raise NotImplementedError


class _WebhookTarget(_Target):
    name = "webhook"

    def __init__(
        self,
        config: AlertsConfig,
        stats: AlertStats,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        super().__init__(config.queue_max, stats)
        assert config.webhook_url is not None
        self.url = config.webhook_url
        self.config = config
        self._transport = transport

    async def run(self) -> None:
        async with httpx.AsyncClient(
            timeout=self.config.webhook_timeout_s, transport=self._transport
        ) as client:
            while True:
                alert = await self.queue.get()
                try:
                    await self._deliver(client, alert)
                finally:
                    self.queue.task_done()

    async def _deliver(self, client: httpx.AsyncClient, alert: Alert) -> None:
        config = self.config
        backoff = Backoff(config.backoff_initial_s, config.backoff_cap_s)
        body = alert.to_json()
        reason = ""
        for attempt in range(1, config.webhook_max_attempts + 1):
            retry_after: float | None = None
            try:
                response = await client.post(
                    self.url, content=body, headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError as err:
                retryable, reason = True, f"{type(err).__name__}: {err}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    self.stats.sent += 1
                    self._recovered()
                    return
                retryable = status in (408, 429) or status >= 500
                reason = f"HTTP {status}"
                if status in (429, 503):
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            if not retryable:
                break
            self._fail(f"POST {self.url}: {reason}")
            if attempt < config.webhook_max_attempts:
                delay = backoff.next_delay() if retry_after is None else retry_after
                await asyncio.sleep(min(delay, config.backoff_cap_s))
        self.stats.failed += 1
        self.stats.last_error = f"webhook: {reason}"
        log.error(
            "alerts: webhook gave up on the alert for %s at %d (%s)", alert.asset, alert.ts_ns,
            reason,
        )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class _SessionEnded(Exception):
    pass


ClientFactory = Callable[[str, BrokerAddress, "AlertsConfig"], Any]


def _paho_client(client_id: str, address: BrokerAddress, config: AlertsConfig) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    client.connect_timeout = config.mqtt_ack_timeout_s
    address.configure(client, ca_file=config.ca_file)
    return client


class _MqttTarget(_Target):
    name = "mqtt"

    def __init__(
        self,
        config: AlertsConfig,
        device: str,
        stats: AlertStats,
        client_factory: ClientFactory | None,
    ) -> None:
        super().__init__(config.queue_max, stats)
        assert config.mqtt_url is not None
        address = parse_broker_url(config.mqtt_url.get_secret_value())
        if config.mqtt_username is not None:
            password = config.mqtt_password
            address = dataclasses.replace(
                address,
                username=config.mqtt_username,
                password=password.get_secret_value() if password is not None else None,
            )
        self.address = address
        self.config = config
        self.topic = config.topic_for(device)
        self.client_id = f"edgefleet-{device}-alerts"[:128]
        self._factory = client_factory or _paho_client
        self._pending: Alert | None = None  # taken from the queue, not yet acknowledged
        self.sessions = 0

    async def run(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_cap_s)
        while True:
            try:
                await self._session(backoff)
            except _SessionEnded as err:
                self._fail(str(err))
            except (OSError, ssl.SSLError) as err:
                self._fail(f"cannot connect to {self.address}: {type(err).__name__}: {err}")
            finally:
                self.stats.mqtt_connected = False
            await asyncio.sleep(backoff.next_delay())

    async def _session(self, backoff: Backoff) -> None:
        loop = asyncio.get_running_loop()
        address = self.address
        timeout = self.config.mqtt_ack_timeout_s
        client = self._factory(self.client_id, address, self.config)
        connected = asyncio.Event()
        ended = asyncio.Event()
        outcome: dict[str, str] = {}
        acks: dict[int, asyncio.Future[None]] = {}

        def wake(event: asyncio.Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(event.set)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if getattr(reason, "is_failure", False):
                code = int(getattr(reason, "value", -1))
                what = "refused the login" if code in _AUTH_CODES else "refused the session"
                outcome.setdefault("message", f"{address} {what}: {reason}")
                wake(ended)
            else:
                wake(connected)

        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            outcome.setdefault("message", f"connection to {address} lost: {reason}")
            wake(ended)

        def acked(mid: int) -> None:
            future = acks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(None)

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(acked, mid)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        await asyncio.wait_for(
            asyncio.to_thread(client.connect, address.host, address.port, KEEPALIVE_S),
            timeout + 5,
        )
        # paho's own network thread: with it running, `publish` from this thread only
        # queues the packet and wakes that thread, so one thread writes to the socket.
        # paho would also reconnect by itself; the session ends at the first loss instead
        # (`loop_stop` below) and `run` reconnects with a fresh client after a Backoff delay.
        client.loop_start()
        getter: asyncio.Task[Alert] | None = None
        try:
            if not await _first(connected, ended, timeout):
                raise _SessionEnded(
                    outcome.get("message", f"no CONNACK from {address} within {timeout} s")
                )
            self.sessions += 1
            self.stats.mqtt_connected = True
            backoff.reset()
            self._recovered()
            while True:
                if self._pending is None:
                    getter = asyncio.ensure_future(self.queue.get())
                    await _first_task(getter, ended)
                    if not getter.done():
                        raise _SessionEnded(outcome.get("message", "session ended"))
                    self._pending = getter.result()
                    getter = None
                alert = self._pending
                info = client.publish(self.topic, alert.to_json(), qos=1)
                if info.rc != 0:
                    raise _SessionEnded(f"publish to {address} failed (rc {info.rc})")
                future: asyncio.Future[None] = loop.create_future()
                acks[info.mid] = future
                if not await _first_future(future, ended, timeout):
                    raise _SessionEnded(
                        outcome.get("message", f"no PUBACK from {address} within {timeout} s")
                    )
                self._pending = None
                self.stats.sent += 1
                self.queue.task_done()
        finally:
            if getter is not None:
                # Not awaited: awaiting here could swallow this task's own cancellation.
                # A cancelled `Queue.get` leaves its item in the queue.
                if getter.done() and not getter.cancelled():
                    self._pending = getter.result()
                else:
                    getter.cancel()
            with contextlib.suppress(Exception):  # best effort: the broker may be gone
                client.disconnect()
            await asyncio.to_thread(client.loop_stop)


async def _first(event: asyncio.Event, ended: asyncio.Event, timeout: float) -> bool:
    """Wait for `event`; False if `ended` is set first or `timeout` passes."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await _first_task(waiter, ended, timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def _first_future(future: asyncio.Future[None], ended: asyncio.Event, timeout: float) -> bool:
    await _first_task(future, ended, timeout)
    if not future.done():
        future.cancel()
        return False
    return True


async def _first_task(
    task: asyncio.Future[Any], ended: asyncio.Event, timeout: float | None = None
) -> None:
    """Wait until `task` is done, `ended` is set or `timeout` passes (task not cancelled)."""
    ender = asyncio.ensure_future(ended.wait())
    try:
        await asyncio.wait({task, ender}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ender.cancel()


class AlertSink:
    """Delivers anomaly alerts to the configured targets; see the module docstring.

    `run()` delivers until cancelled (one task per target). `http_transport` and
    `mqtt_client_factory` are injectable for tests."""

    def __init__(
        self,
        config: AlertsConfig,
        *,
        device: str,
        http_transport: httpx.AsyncBaseTransport | None = None,
        mqtt_client_factory: ClientFactory | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.stats = AlertStats()
        self.threshold: float | None = None  # used by publish_result when results lack one
        self.targets: list[_Target] = []
        if config.mqtt_url is not None:
            self.targets.append(_MqttTarget(config, device, self.stats, mqtt_client_factory))
        if config.webhook_url is not None:
            self.targets.append(_WebhookTarget(config, self.stats, http_transport))

    def publish(self, alert: Alert) -> bool:
        """Queue `alert` for every target without blocking; False if any target's queue
        was full (that target dropped it, counted)."""
        self.stats.published += 1
        accepted = True
        for target in self.targets:
            accepted = target.offer(alert) and accepted
        return accepted

    def publish_result(self, result: Any, *, threshold: float | None = None) -> bool:
        """Publish an `InferenceResult`-like object (`asset`, `ts_ns`, `score`,
        `model_version`, optional `threshold`) as an alert from this device."""
        found = getattr(result, "threshold", None)
        if found is None:
            found = threshold if threshold is not None else self.threshold
        return self.publish(
            Alert(
                device=self.device,
                asset=result.asset,
                ts_ns=int(result.ts_ns),
                score=float(result.score),
                threshold=float(found) if found is not None else None,
                model_version=getattr(result, "model_version", None),
            )
        )

    @property
    def queued(self) -> int:
        return sum(target.queue.qsize() for target in self.targets)

    async def run(self) -> None:
        if not self.targets:
            await asyncio.Event().wait()  # nothing to deliver: idle until cancelled
        async with asyncio.TaskGroup() as group:
            for target in self.targets:
                group.create_task(target.run(), name=f"alerts-{target.name}")

    async def join(self) -> None:
        """Wait until every alert queued so far was delivered or given up (run() must be
        running)."""
        for target in self.targets:
            await target.queue.join()
