"""The local metrics endpoint: scraped over real HTTP and parsed with prometheus_client's
own parser; /healthz 200 and 503; bounded requests; no global registry pollution."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.edge_agent.config import MetricsConfig
from edgefleet.edge_agent.metrics import MetricsServer
from edgefleet.protocols.source import Sample, SourceStats
from edgefleet.protocols.wire import Quality

T0 = 1_795_000_000_000_000_000
SECOND = 1_000_000_000


@dataclasses.dataclass
class ForwarderStats:
    batches_sent: int = 4
    rows_sent: int = 400
    bytes_sent: int = 9000
    retries: int = 1
    dead_lettered_batches: int = 1
    dead_lettered_rows: int = 3
    last_error: str | None = None
    connected: bool = True


class FakeAgent:
    """What the lead's Agent exposes (duck-typed), around a real buffer."""

    def __init__(self, buffer: SqliteBuffer) -> None:
        self.config = SimpleNamespace(device="edge-01", buffer=buffer.config)
        self.buffer: SqliteBuffer | None = buffer
        self.stats = SimpleNamespace(started_monotonic=0.0, anomalies=5, heartbeats=2,
                                     samples_in=1000, inference_rows=50)
        self.sources = [SimpleNamespace(name="line-1", stats=SourceStats(samples=700, bad=3)),
                        SimpleNamespace(name="cell-2", stats=SourceStats(samples=300,
                                                                         reconnects=2))]
        self.forwarder = SimpleNamespace(stats=ForwarderStats())
        self.scorer = SimpleNamespace(version="m-7", errors=1,
                                      latency_us=lambda p: {50: 250.0, 99: 1200.0}[p])
        self.alerts = SimpleNamespace(stats=SimpleNamespace(sent=5, failed=0, dropped=2))
        self.queue = SimpleNamespace(refused=0)
        self.model_error = None
        self.alive = True

    def source_health(self) -> dict[str, str]:
        return {"line-1": "up", "cell-2": "down"}

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        problems = [] if self.alive else ["ingest loop stalled"]
        if self.buffer is None:
            problems.append("buffer not open")
        return not problems, {"device": "edge-01", "problems": problems}


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    buffer = SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0))
    buffer.append("edge-01", [Sample("pump-01", "flow", T0 + i * SECOND, float(i), Quality.GOOD)
                              for i in range(20)])
    buffer.flush()
    batch = buffer.claim_batch("edge-01", max_rows=5)
    assert batch is not None
    buffer.dead_letter(batch, "HTTP 422: schema")
    yield FakeAgent(buffer)
    buffer.close()


def serve(agent: Any, check: Callable[[MetricsServer, httpx.AsyncClient], Any]) -> Any:
    async def main() -> Any:
        server = MetricsServer(MetricsConfig(port=0), agent, agent_version="0.1.0")
        port = await server.start()
        assert port and port == server.port
        task = asyncio.create_task(server.serve())
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                return await check(server, client)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def samples_of(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_are_scraped_and_parse(agent: Any) -> None:
    async def check(server: MetricsServer, client: httpx.AsyncClient) -> str:
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.text

    text = serve(agent, check)
    metrics = samples_of(text)
    one = {name: next(iter(values.values())) for name, values in metrics.items()}
    assert metrics["edgefleet_agent_samples_total"] == {
        (("source", "line-1"),): 700.0, (("source", "cell-2"),): 300.0}
    assert metrics["edgefleet_agent_source_up"] == {
        (("source", "line-1"),): 1.0, (("source", "cell-2"),): 0.0}
    assert metrics["edgefleet_agent_source_reconnects_total"][(("source", "cell-2"),)] == 2.0
    assert one["edgefleet_agent_buffer_depth_rows"] == 15.0  # 20 appended, 5 dead-lettered
    assert one["edgefleet_agent_buffer_dlq_batches"] == 1.0
    assert one["edgefleet_agent_buffer_dlq_rows"] == 5.0
    assert one["edgefleet_agent_buffer_oldest_age_seconds"] > 0
    assert one["edgefleet_agent_buffer_bytes"] > 0 and one["edgefleet_agent_buffer_up"] == 1.0
    assert one["edgefleet_agent_buffer_dropped_rows_total"] == 0.0
    assert one["edgefleet_agent_buffer_compacted_rows_total"] == 0.0
    assert one["edgefleet_agent_forward_rows_total"] == 400.0
    assert one["edgefleet_agent_forward_batches_total"] == 4.0
    assert one["edgefleet_agent_forward_retries_total"] == 1.0
    assert one["edgefleet_agent_forward_dead_lettered_rows_total"] == 3.0
    assert one["edgefleet_agent_fog_connected"] == 1.0
    assert metrics["edgefleet_agent_inference_seconds"] == {
        (("quantile", "0.5"),): 0.00025, (("quantile", "0.99"),): 0.0012}
    assert one["edgefleet_agent_inference_errors_total"] == 1.0
    assert one["edgefleet_agent_anomalies_total"] == 5.0
    assert one["edgefleet_agent_alerts_dropped_total"] == 2.0
    assert one["edgefleet_agent_heartbeats_total"] == 2.0
    assert one["edgefleet_agent_resident_memory_bytes"] > 10e6
    assert one["edgefleet_agent_cpu_seconds_total"] > 0
    assert metrics["edgefleet_agent_info"] == {
        (("device", "edge-01"), ("model_version", "m-7"), ("version", "0.1.0")): 1.0}
    # A dedicated registry: nothing leaked into the process-global one.
    assert not any(name.startswith("edgefleet_agent")
                   for family in prometheus_client.REGISTRY.collect()
                   for name in [family.name])


def test_scrapes_read_current_figures(agent: Any) -> None:
    async def check(server: MetricsServer, client: httpx.AsyncClient) -> tuple[float, float]:
        first = samples_of((await client.get("/metrics")).text)
        agent.sources[0].stats.samples += 50
        batch = await asyncio.to_thread(agent.buffer.claim_batch, "edge-01", 10)
        await asyncio.to_thread(agent.buffer.ack, "edge-01", batch.last_seq)
        second = samples_of((await client.get("/metrics")).text)
        assert server.scrapes == 2
        key = (("source", "line-1"),)
        return (second["edgefleet_agent_samples_total"][key]
                - first["edgefleet_agent_samples_total"][key],
                second["edgefleet_agent_buffer_depth_rows"][()])

    assert serve(agent, check) == (50.0, 5.0)


def test_healthz_ok_then_unhealthy(agent: Any) -> None:
    async def check(server: MetricsServer, client: httpx.AsyncClient) -> None:
        ok = await client.get("/healthz")
        assert ok.status_code == 200
        assert ok.json() == {"status": "ok", "device": "edge-01", "problems": []}
        agent.alive = False
        agent.buffer = None
        bad = await client.get("/healthz")
        assert bad.status_code == 503
        assert bad.json()["status"] == "unhealthy"
        assert bad.json()["problems"] == ["ingest loop stalled", "buffer not open"]
        # Metrics still answer without a buffer, and say so.
        metrics = samples_of((await client.get("/metrics")).text)
        assert metrics["edgefleet_agent_buffer_up"][()] == 0.0
        assert "edgefleet_agent_buffer_depth_rows" not in metrics

    serve(agent, check)


def test_a_broken_health_check_is_a_503(agent: Any) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("boom")

    agent.healthz = broken

    async def check(server: MetricsServer, client: httpx.AsyncClient) -> None:
        response = await client.get("/healthz")
        assert response.status_code == 503
        assert "boom" in response.json()["problems"][0]

    serve(agent, check)


def test_other_paths_methods_and_oversized_requests(agent: Any) -> None:
    async def check(server: MetricsServer, client: httpx.AsyncClient) -> None:
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/metrics/../etc")).status_code == 404
        assert (await client.post("/metrics", content=b"x")).status_code == 405
        head = await client.head("/healthz")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get("/metrics?name=x")).status_code == 200
        # A request head over 8 KiB is refused without reading it all.
        huge = await client.get("/metrics", headers={"X-Pad": "a" * 20_000})
        assert huge.status_code == 431
        # A garbage request line is a 400, not a crash; the server keeps serving.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert (await client.get("/healthz")).status_code == 200

    serve(agent, check)


def test_health_body_is_json_with_extra_details(agent: Any) -> None:
    agent.healthz = lambda: (True, {"status": "ignored", "sources": {"line-1": "up"}})

    async def check(server: MetricsServer, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.get("/healthz")
        assert response.headers["content-type"] == "application/json"
        return dict(json.loads(response.content))

    assert serve(agent, check) == {"status": "ok", "sources": {"line-1": "up"}}
