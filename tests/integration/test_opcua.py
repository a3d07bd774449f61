"""The OPC UA source against the OPC UA simulator, on loopback: subscriptions, polling,
a restarted server, a disappearing node, and an encrypted session with a username."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edgefleet.firmware_sim.model import TAGS, AnomalyKind, AssetKind, Plant
from edgefleet.firmware_sim.opcua_server import OpcUaSimConfig, OpcUaSimServer
from edgefleet.protocols.opcua import OpcUaSource, OpcUaSourceConfig
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

pytestmark = pytest.mark.integration

START_NS = 1_795_000_000_000_000_000
ASSETS = [("pump-01", AssetKind.PUMP), ("comp-01", AssetKind.COMPRESSOR)]
DEADLINE_S = 30.0


class Harness:
    """A plant, its OPC UA simulator ticking every 100 ms (simulated and wall), and a
    source under test collecting samples."""

    def __init__(self, server: OpcUaSimServer, plant: Plant) -> None:
        self.server = server
        self.plant = plant
        self.samples: list[Sample] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def tick_forever(self) -> None:
        while True:
            self.plant.advance_to(self.plant.now_ns + self.plant.tick_ns)
            self.server.update(self.plant)
            await asyncio.sleep(0.1)

    def start_ticking(self) -> None:
        self._tasks.append(asyncio.create_task(self.tick_forever()))

    def run_source(self, source: OpcUaSource) -> asyncio.Task[None]:
        task = asyncio.create_task(source.run(self.samples.append))
        self._tasks.append(task)
        return task

    def nodes(self, by: str = "node_id") -> list[dict[str, str]]:
        nodes = []
        for asset, kind in ASSETS:
            for spec in TAGS[kind]:
                address = (self.server.node_id(asset, spec.name) if by == "node_id"
                           else f"Plant/{asset}/{spec.name}")
                nodes.append({"asset": asset, "tag": spec.name, by: address})
        return nodes

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop()


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def make_plant(anomaly_rate: float = 0.0) -> Plant:
    return Plant(ASSETS, seed=3, anomaly_rate=anomaly_rate, start_ns=START_NS)


@contextlib.asynccontextmanager
async def serving(config: OpcUaSimConfig | None = None) -> AsyncIterator[Harness]:
    plant = make_plant()
    server = OpcUaSimServer(config or OpcUaSimConfig(), plant, [name for name, _ in ASSETS])
    await server.start()
    h = Harness(server, plant)
    try:
        yield h
    finally:
        await h.close()


def run(scenario: Callable[[Harness], Awaitable[None]],
        config: OpcUaSimConfig | None = None) -> None:
    async def main() -> None:
        async with serving(config) as h:
            await scenario(h)

    asyncio.run(main())


def source_config(h: Harness, **overrides: Any) -> OpcUaSourceConfig:
    settings: dict[str, Any] = {
        "endpoint": h.server.endpoint, "nodes": h.nodes(), "publishing_interval_s": 0.1,
        "reconnect_initial_s": 0.1, "reconnect_cap_s": 1.0, "retry_bad_nodes_s": 0.5,
        "watchdog_interval_s": 0.5,
    }
    settings.update(overrides)
    return OpcUaSourceConfig(**settings)


def test_subscription_values_and_source_timestamps() -> None:
    run(_subscription_values_and_source_timestamps)


async def _subscription_values_and_source_timestamps(h: Harness) -> None:
    source = source_config(h).build()
    h.run_source(source)
    await wait_for(lambda: source.mode == "subscription", "a subscription")
    # Hold the plant still, publish one known state, and compare every tag exactly.
    h.plant.advance_to(h.plant.now_ns + 5 * h.plant.tick_ns)
    h.server.update(h.plant)
    now = h.plant.now_ns

    def latest() -> dict[tuple[str, str], Sample] | None:
        found = {(s.asset, s.tag): s for s in h.samples if s.ts_ns == now}
        return found if len(found) == 12 else None

    got = await wait_for(latest, "all 12 tags at the plant's time")
    for asset, _ in ASSETS:
        for tag, value in h.plant.values(asset).items():
            sample = got[(asset, tag)]
            assert sample.value == value
            assert sample.quality is Quality.GOOD
            assert sample.ts_ns == now
    # And it keeps streaming as the plant moves.
    h.start_ticking()
    await wait_for(lambda: any(s.ts_ns > now for s in h.samples), "later values")
    assert source.stats.bad == 0


def test_anomaly_status_nodes_reflect_the_label() -> None:
    run(_anomaly_status_nodes_reflect_the_label)


async def _anomaly_status_nodes_reflect_the_label(h: Harness) -> None:
    nodes = [{"asset": "pump-01", "tag": "anomaly", "browse_path": "Plant/pump-01/anomaly"},
             {"asset": "pump-01", "tag": "anomaly_code",
              "node_id": h.server.node_id("pump-01", "anomaly_code")}]
    source = source_config(h, nodes=nodes).build()
    h.run_source(source)
    await wait_for(lambda: len(h.samples) >= 2, "initial status values")
    assert {(s.tag, s.value) for s in h.samples} == {("anomaly", 0.0), ("anomaly_code", 0.0)}
    # Force an overload episode on pump-01 (the model's own episode machinery).
    asset = h.plant.assets["pump-01"]
    asset.next_episode_ns = h.plant.now_ns
    while h.plant.status("pump-01") is AnomalyKind.NONE:
        h.plant.advance_to(h.plant.now_ns + h.plant.tick_ns)
    kind = h.plant.status("pump-01")
    h.server.update(h.plant)
    await wait_for(lambda: {("anomaly", 1.0), ("anomaly_code", float(kind))}
                   <= {(s.tag, s.value) for s in h.samples}, "the anomaly label")


def test_polling_when_the_server_refuses_subscriptions() -> None:
    run(_polling_when_refused, OpcUaSimConfig(refuse_subscriptions=True))


async def _polling_when_refused(h: Harness) -> None:
    h.start_ticking()
    source = source_config(h, nodes=h.nodes(by="browse_path"), poll_interval_s=0.2).build()
    h.run_source(source)
    await wait_for(lambda: source.mode == "polling", "the polling fallback")
    await wait_for(lambda: len({s.ts_ns for s in h.samples}) >= 3, "three polls")
    assert source.stats.errors.get("subscription_refused", 0) >= 1
    assert all(s.quality is Quality.GOOD for s in h.samples)
    # Polled values are the plant's values at their source timestamps.
    last = h.samples[-1]
    assert START_NS < last.ts_ns <= h.plant.now_ns


def test_source_survives_a_server_restart() -> None:
    run(_source_survives_a_server_restart)


async def _source_survives_a_server_restart(h: Harness) -> None:
    h.start_ticking()
    source = source_config(h).build()
    task = h.run_source(source)
    await wait_for(lambda: len(h.samples) >= 24, "values before the restart")
    await h.server.restart(down_s=0.5)
    mark = len(h.samples)
    restarted_at = h.plant.now_ns
    await wait_for(lambda: source.stats.reconnects >= 1, "a reconnect")
    await wait_for(lambda: any(s.ts_ns > restarted_at and s.quality is Quality.GOOD
                               for s in h.samples[mark:]), "values after the restart")
    assert not task.done()
    assert source.mode == "subscription"


def test_deleted_node_is_bad_and_comes_back() -> None:
    run(_deleted_node_is_bad_and_comes_back)


async def _deleted_node_is_bad_and_comes_back(h: Harness) -> None:
    h.start_ticking()
    source = source_config(h).build()
    h.run_source(source)
    await wait_for(lambda: len(h.samples) >= 12, "first values")
    await h.server.delete_tag("pump-01", "flow")

    def flow() -> list[Sample]:
        return [s for s in h.samples if (s.asset, s.tag) == ("pump-01", "flow")]

    await wait_for(lambda: flow()[-1].quality is Quality.BAD, "bad quality")
    assert flow()[-1].value is None
    mark = len(flow())
    await h.server.restore_tag("pump-01", "flow")
    await wait_for(lambda: any(s.quality is Quality.GOOD for s in flow()[mark:]),
                   "good quality again")
    assert source.stats.reconnects == 0


def test_encrypted_session_with_username(tmp_path: Path) -> None:
    config = OpcUaSimConfig(security=["Basic256Sha256_SignAndEncrypt"],
                            certificate_dir=tmp_path / "server", users={"operator": "s3cret!"})

    async def scenario(h: Harness) -> None:
        await _encrypted_session(h, tmp_path)

    run(scenario, config)


async def _encrypted_session(h: Harness, tmp_path: Path) -> None:
    server = h.server
    h.start_ticking()
    secure = {
        "security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt",
        "certificate": tmp_path / "client" / "cert.der",
        "private_key": tmp_path / "client" / "key.pem",
        "server_certificate": server.certificate_path, "username": "operator",
    }
    good = source_config(h, password="s3cret!", **secure).build()
    h.run_source(good)
    await wait_for(lambda: len(h.samples) >= 12, "values over the encrypted session")
    assert (tmp_path / "client" / "cert.der").exists()

    wrong = source_config(h, name="wrong-password", password="guess", **secure).build()
    task = h.run_source(wrong)
    await wait_for(lambda: wrong.stats.errors.get("auth", 0) >= 2,
                   "the rejected password, retried")
    assert wrong.last_error is not None and "authentication" in wrong.last_error
    assert not task.done() and not wrong.connected
    assert server.rejected_logins >= 2


def test_slow_server_is_an_outage_and_recovers() -> None:
    run(_slow_server_is_an_outage_and_recovers)


async def _slow_server_is_an_outage_and_recovers(h: Harness) -> None:
    h.start_ticking()
    source = source_config(h, mode="polling", poll_interval_s=0.2, request_timeout_s=0.5).build()
    task = h.run_source(source)
    await wait_for(lambda: len(h.samples) >= 12, "first polled values")
    h.server.read_delay_s = 2.0  # every Read now outlasts the source's request timeout
    await wait_for(lambda: sum(source.stats.errors.values()) >= 1 and not source.connected,
                   "the slow server counted as an outage")
    h.server.read_delay_s = 0.0
    mark = len(h.samples)
    await wait_for(lambda: source.connected and len(h.samples) >= mark + 12,
                   "values once the server is fast again")
    assert not task.done()
    assert source.stats.reconnects >= 1
