"""Heartbeats: the wire message, the `agent` gauges that travel as readings, process
figures from /proc, and reading a running agent duck-typed (with a real buffer)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.edge_agent.heartbeat import (
    CpuMeter,
    HeartbeatBuilder,
    ProcessFigures,
    build_heartbeat,
    disk_free_bytes,
    process_sample,
)
from edgefleet.protocols.source import Sample, SourceStats
from edgefleet.protocols.wire import Heartbeat, Quality, decode_json, encode_json

T0 = 1_795_000_000_000_000_000
SECOND = 1_000_000_000


def open_buffer(tmp_path: Path) -> SqliteBuffer:
    return SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0))


def fill(buffer: SqliteBuffer, rows: int, start_ts: int = T0) -> None:
    buffer.append(
        "edge-01",
        [Sample("pump-01", "flow", start_ts + i * SECOND, float(i), Quality.GOOD)
         for i in range(rows)],
    )
    buffer.flush()


@dataclasses.dataclass
class FakeForwarderStats:  # the shape helper B's ForwarderStats has
    batches_sent: int = 3
    rows_sent: int = 300
    bytes_sent: int = 4096
    retries: int = 2
    dead_lettered_batches: int = 0
    dead_lettered_rows: int = 0
    last_error: str | None = None
    connected: bool = True
    last_ack_ns: int | None = None


def test_build_heartbeat_wire_message_and_gauges(tmp_path: Path) -> None:
    with open_buffer(tmp_path) as buffer:
        fill(buffer, 10)
        stats = buffer.stats()
    now_ns = T0 + 100 * SECOND  # the oldest row (ts T0) is 100 s old
    report = build_heartbeat(
        "edge-01", "0.1.0", "m-3", stats, FakeForwarderStats(),
        {"line-1": "up", "cell-2": "down"}, 180.0, 950.0, started_monotonic=1000.0,
        applied_generation=4, inference_errors_total=1,
        process=ProcessFigures(cpu_seconds=1.5, rss_bytes=64 * 1024 * 1024, cpu_percent=12.5,
                               disk_free_bytes=2 * 1024**3),
        extra={"anomalies_total": 7},
        now_ns=now_ns, now_monotonic=1060.0,
    )
    beat = report.heartbeat
    assert beat.device == "edge-01" and beat.ts == now_ns and beat.agent_version == "0.1.0"
    assert beat.model_version == "m-3" and beat.applied_generation == 4
    assert beat.buffer_depth == 10 and beat.buffer_oldest_ts == T0
    assert beat.dropped_total == 0 and beat.compacted_total == 0
    assert beat.inference_errors_total == 1 and beat.uptime_s == pytest.approx(60.0)
    assert beat.status == "degraded: source cell-2 down"
    # It is a valid wire message: it round-trips through the strict decoder.
    assert decode_json(encode_json(beat), Heartbeat) == beat

    gauges = {s.tag: s for s in report.samples}
    assert all(s.asset == "agent" and s.ts_ns == now_ns and s.quality == Quality.GOOD
               for s in report.samples)
    values = {tag: s.value for tag, s in gauges.items()}
    assert values["cpu_percent"] == 12.5
    assert values["rss_mb"] == 64.0
    assert values["disk_free_mb"] == 2048.0
    assert values["infer_p50_us"] == 180.0 and values["infer_p99_us"] == 950.0
    assert values["buffer_depth"] == 10.0
    assert values["buffer_oldest_age_s"] == 100.0
    assert values["dropped_total"] == 0.0 and values["compacted_total"] == 0.0
    assert values["source.line-1.up"] == 1.0 and values["source.cell-2.up"] == 0.0
    assert values["fwd_rows_total"] == 300.0 and values["fwd_retries_total"] == 2.0
    assert values["fog_connected"] == 1.0
    assert values["anomalies_total"] == 7.0
    assert values["uptime_s"] == 60.0


def test_healthy_heartbeat_is_ok_and_unknowns_are_left_out(tmp_path: Path) -> None:
    with open_buffer(tmp_path) as buffer:
        stats = buffer.stats()
    report = build_heartbeat("edge-01", "0.1.0", None, stats, {}, {"line-1": "up"}, None, None,
                             started_monotonic=0.0, now_ns=T0, now_monotonic=5.0)
    assert report.heartbeat.status == "ok"
    assert report.heartbeat.buffer_oldest_ts is None
    tags = {s.tag for s in report.samples}
    # No model, no forwarder figures, no process figures: nothing invented as 0.
    assert not tags & {"infer_p50_us", "infer_p99_us", "cpu_percent", "rss_mb",
                       "fwd_rows_total", "fog_connected", "inference_errors_total"}
    assert {"buffer_depth", "buffer_oldest_age_s", "source.line-1.up"} <= tags
    assert {s.tag: s.value for s in report.samples}["buffer_oldest_age_s"] == 0.0


def test_status_names_every_problem_and_fits_the_wire(tmp_path: Path) -> None:
    with open_buffer(tmp_path) as buffer:
        stats = buffer.stats()
    stats = dataclasses.replace(stats, full=True, full_reason="max_bytes", dlq_batches=2)
    forwarder = {"connected": False, "last_error": "connection refused"}
    health = {f"source-{i:03d}": "stale" for i in range(40)}
    report = build_heartbeat("edge-01", "0.1.0", None, stats, forwarder, health, None, None,
                             started_monotonic=0.0, problems=["model: bad file"],
                             now_ns=T0, now_monotonic=1.0)
    status = report.heartbeat.status
    assert status.startswith("degraded: source source-000 stale, source-001 stale")
    assert len(status) == 256 and status.endswith("…")
    short = build_heartbeat("edge-01", "0.1.0", None, stats, forwarder, {"a": "up"}, None, None,
                            started_monotonic=0.0, problems=["model: bad file"],
                            now_ns=T0, now_monotonic=1.0).heartbeat.status
    assert short == ("degraded: buffer full (max_bytes); 2 dead-lettered batch(es); "
                     "fog unreachable (connection refused); model: bad file")
    decode_json(encode_json(report.heartbeat), Heartbeat)  # 256 characters still valid


def test_gauge_tags_are_valid_identifiers_even_for_long_source_names(tmp_path: Path) -> None:
    with open_buffer(tmp_path) as buffer:
        stats = buffer.stats()
        long_name = "s" * 125  # "source.<name>.up" would be 136 characters
        report = build_heartbeat("edge-01", "0.1.0", None, stats, {}, {long_name: "up", "b": "up"},
                                 None, None, started_monotonic=0.0, extra={"bad tag!": 1},
                                 now_ns=T0 + SECOND, now_monotonic=1.0)
        tags = {s.tag for s in report.samples}
        assert "source.b.up" in tags and not any(long_name in t for t in tags)
        assert "bad tag!" not in tags
        # The buffer accepts the gauges as they are (they travel in the agent's stream).
        buffer.append("edge-01", report.samples)
        buffer.flush()
        batch = buffer.claim_batch("edge-01", max_rows=1000)
        assert batch is not None and {r.tag for r in batch.readings} == tags


def test_process_sample_matches_psutil() -> None:
    cpu, rss = process_sample()
    me = psutil.Process(os.getpid())
    times = me.cpu_times()
    assert cpu == pytest.approx(times.user + times.system, abs=0.1)
    assert rss == pytest.approx(me.memory_info().rss, rel=0.1)
    assert rss > 10 * 1024 * 1024  # a Python process with numpy-sized deps loaded


def test_cpu_meter_measures_busy_time() -> None:
    now = [100.0]
    cpu = [5.0]
    meter = CpuMeter(clock=lambda: now[0], sample=lambda: (cpu[0], 0))
    now[0], cpu[0] = 110.0, 7.5  # 2.5 s of CPU in 10 s
    assert meter.percent() == pytest.approx(25.0)
    assert meter.percent() is None  # no time passed


def test_disk_free_uses_the_nearest_existing_folder(tmp_path: Path) -> None:
    expected = shutil.disk_usage(tmp_path).free
    found = disk_free_bytes(tmp_path / "not" / "yet" / "buffer.db")
    assert found is not None
    assert found == pytest.approx(expected, rel=0.01)


def test_builder_reads_a_running_agent(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    fill(buffer, 5)
    source_stats = SourceStats(samples=42, bad=2)
    agent: Any = SimpleNamespace(
        config=SimpleNamespace(device="edge-01", buffer=buffer.config,
                               heartbeat=SimpleNamespace(asset="agent")),
        stats=SimpleNamespace(started_monotonic=0.0, anomalies=3, heartbeats=1, samples_in=42,
                              inference_rows=9),
        sources=[SimpleNamespace(name="line-1", stats=source_stats)],
        source_health=lambda: {"line-1": "up"},
        buffer=buffer,
        forwarder=SimpleNamespace(stats=FakeForwarderStats(connected=False)),
        scorer=SimpleNamespace(version="m-1", latency_us=lambda p: 100.0 * p, errors=2),
        alerts=SimpleNamespace(stats=SimpleNamespace(sent=1, failed=0, dropped=4)),
        queue=SimpleNamespace(refused=0),
        model_error=None,
    )

    async def main() -> None:
        builder = HeartbeatBuilder(agent, "0.1.0")
        beat, gauges = await builder.build()
        assert beat.buffer_depth == 5 and beat.model_version == "m-1"
        assert beat.inference_errors_total == 2
        assert beat.status == "degraded: fog unreachable"
        values = {s.tag: s.value for s in gauges}
        assert values["infer_p50_us"] == 5000.0 and values["infer_p99_us"] == 9900.0
        assert values["alerts_dropped_total"] == 4.0 and values["anomalies_total"] == 3.0
        assert values["rss_mb"] > 10 and "disk_free_mb" in values and "cpu_percent" in values

    try:
        asyncio.run(main())
    finally:
        buffer.close()
