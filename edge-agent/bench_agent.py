"""`edgefleet bench agent --json`: the whole agent, measured as a user would run it.

Every phase runs the real `edgefleet agent run` as a child process (so CPU and memory are
the agent's alone, read from /proc) forwarding over HTTP to a `LocalSink` on loopback in
this process. The model is a real ONNX z-score model over the shared feature module's
windows, fitted on the same synthetic signal.

==========================  =============================================================
figure                      how
==========================  =============================================================
`readings_per_s`            synthetic source offering `EDGEFLEET_BENCH_RATE` readings/s
                            (default 60,000) with inference on; rows the sink received
                            per second over `EDGEFLEET_BENCH_SECONDS` (default 20), after
                            a warm-up
`agent_cpu_cores`           the agent's CPU seconds ÷ wall seconds in that window
`infer_p99_us`              the agent's own p99 per scoring call (`/metrics`)
`modbus_e2e_readings_per_s` the same pipeline fed by the Modbus simulator (20 PLCs × 93
                            points, polled every 50 ms): rows received per second
`rss_mb_empty`              peak RSS over 10 s at 5,000 readings/s with the fog up
`rss_mb_backlog_5m`         peak RSS over 10 s at 5,000 readings/s with
                            `EDGEFLEET_BENCH_BACKLOG_ROWS` (default 5,000,000) unsent rows
                            in the buffer and the fog down
`drain_ratio`               after a fog outage of `EDGEFLEET_BENCH_OUTAGE_S` (default 600)
                            at 5,000 readings/s: the backlog's size ÷ the time from the
                            fog's return until the buffer is back to live depth, ÷ 5,000
`lost_rows`                 seqs the agent committed in that run that neither reached the
                            sink nor remain in the buffer after its SIGTERM drain
==========================  =============================================================

`EDGEFLEET_BENCH_AGENT_PYTHON` runs the agent with another interpreter, e.g. that of a
venv holding only the `edge` extra (what a gateway installs): a development venv also
imports what other extras pulled in (httpx loads its optional CLI, click and rich, when
they are importable), which shows in the RSS figures.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .buffer import BufferConfig, SqliteBuffer
from .harness import AgentProcess, write_agent_config
from .sink import LocalSink, SeqRanges

__all__ = ["bench_agent"]

DEVICE: Final = "edge-01"
TAGS: Final = ("speed", "flow", "pressure", "current", "temperature", "vibration")
LIVE_RATE: Final = 5000.0


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _synthetic(readings_per_s: float, assets: int = 20) -> dict[str, Any]:
    return {
        "type": "synthetic", "name": "synthetic", "assets": assets, "tags": list(TAGS),
        "rows_per_s": readings_per_s / (assets * len(TAGS)), "poll_interval_s": 0.1,
        "spike_probability": 0.001,
    }


def _build_model(folder: Path) -> Path:
    """A z-score model fitted on windows of the synthetic signal the agent will read."""
    from edgefleet.cloud.reference_models import fit_zscore_model
    from edgefleet.protocols.features import FeatureSpec, FeatureWindows
    from edgefleet.protocols.synthetic import SyntheticSource, SyntheticSourceConfig

    spec = FeatureSpec(tags=TAGS, window=30)
    clock = [1_795_000_000_000_000_000]
    source = SyntheticSource(
        SyntheticSourceConfig(assets=4, tags=TAGS, rows_per_s=10, poll_interval_s=1.0, seed=7),
        clock_ns=lambda: clock[0],
    )
    windows = FeatureWindows(spec)
    rows = []
    for _ in range(200):
        clock[0] += 1_000_000_000
        rows += [w.features for w in windows.add(asyncio.run(source.poll()))]
    import numpy as np

    path = folder / "zscore.onnx"
    fit_zscore_model(path, spec, np.vstack(rows), version="bench-1", threshold=6.0)
    return path


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    figures = {}
    for line in text.splitlines():
        match = re.match(r"^(edgefleet_agent_[a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if match:
            figures[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return figures


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench agent: timed out waiting for {what}")
        time.sleep(0.05)


def _peak_rss_mb(agent: AgentProcess, seconds: float) -> float:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, agent.rss_bytes())
        time.sleep(0.2)
    return round(peak / 2**20, 1)


def _agent(config: Path) -> AgentProcess:
    return AgentProcess(config, python=os.environ.get("EDGEFLEET_BENCH_AGENT_PYTHON"))


def _config(folder: Path, sink: LocalSink, sources: list[dict[str, Any]], *,
            model: Path | None, metrics_port: int | None = None, **fog: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_agent_config(
        folder, fog_url=sink.url, sources=sources,
        model={"path": str(model)} if model is not None else None,
        fog={"backoff_cap_s": 2.0, **fog},
        metrics={"enabled": metrics_port is not None, "port": metrics_port or 0},
        heartbeat={"interval_s": 5}, drain_timeout_s=60,
    )


def _throughput(root: Path, model: Path, seconds: float) -> dict[str, float]:
    port = _free_port()
    with LocalSink() as sink:
        rate = _env("EDGEFLEET_BENCH_RATE", 60_000)
        config = _config(root / "throughput", sink, [_synthetic(rate, assets=50)],
                         model=model, metrics_port=port)
        with _agent(config) as agent:
            _wait(lambda: sink.rows > 0, 60, "the first rows")
            time.sleep(3)  # warm-up: windows fill, the model is scored
            rows0, cpu0, t0 = sink.rows, agent.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            rows1, cpu1, t1 = sink.rows, agent.cpu_seconds(), time.monotonic()
            metrics = _scrape(port)
            agent.stop()
    p99 = metrics.get('edgefleet_agent_inference_seconds{quantile="0.99"}')
    return {
        "readings_per_s": round((rows1 - rows0) / (t1 - t0)),
        "offered_readings_per_s": rate,
        "agent_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "infer_p99_us": round(p99 * 1e6, 1) if p99 is not None else -1.0,
        "inference_rows": metrics.get("edgefleet_agent_inference_rows_total", 0.0),
    }


def _modbus(root: Path, seconds: float) -> float:
    from edgefleet.protocols.bench_modbus import bench_points, start_simulator, stop_simulator

    async def start() -> tuple[Any, dict[str, Any]]:
        return await start_simulator(20)

    loop = asyncio.new_event_loop()
    try:
        child, ready = loop.run_until_complete(start())
        try:
            endpoints = ready["endpoints"]
            source = {
                "type": "modbus", "name": "plcs", "poll_interval_s": 0.05,
                "devices": [{"name": name, "host": host, "port": port, "timeout_s": 5.0}
                            for name, (host, port) in endpoints.items()],
                "points": [p for name in endpoints for p in bench_points(name)],
            }
            with LocalSink() as sink:
                config = _config(root / "modbus", sink, [source], model=None)
                with _agent(config) as agent:
                    _wait(lambda: sink.rows > 0, 60, "the first Modbus rows")
                    time.sleep(2)
                    rows0, t0 = sink.rows, time.monotonic()
                    time.sleep(seconds)
                    rows1, t1 = sink.rows, time.monotonic()
                    agent.stop()
        finally:
            loop.run_until_complete(stop_simulator(child))
    finally:
        loop.close()
    return round((rows1 - rows0) / (t1 - t0))


def _rss(root: Path, model: Path, backlog_rows: int) -> dict[str, float]:
    figures = {}
    with LocalSink() as sink:
        config = _config(root / "empty", sink, [_synthetic(LIVE_RATE)], model=model)
        with _agent(config) as agent:
            _wait(lambda: sink.rows > 0, 60, "the first rows")
            figures["rss_mb_empty"] = _peak_rss_mb(agent, 10)
            agent.stop()
    folder = root / "backlog"
    folder.mkdir(parents=True, exist_ok=True)
    _prefill(folder / "buffer.db", backlog_rows)
    sink = LocalSink().start()
    sink.stop()  # a port nobody listens on: the fog is down for the whole phase
    config = _config(folder, sink, [_synthetic(LIVE_RATE)], model=model)
    with _agent(config) as agent:
        time.sleep(2)
        figures["rss_mb_backlog_5m"] = _peak_rss_mb(agent, 10)
        agent.kill()
    figures["backlog_rows"] = backlog_rows
    return figures


def _prefill(path: Path, rows: int) -> None:
    from edgefleet.protocols.source import Sample
    from edgefleet.protocols.wire import Quality

    buffer = SqliteBuffer.open(BufferConfig(path=path, min_free_bytes=0, commit_rows=20_000,
                                            max_bytes=8 * 1024**3))
    try:
        ts = time.time_ns() - rows * 200_000
        chunk = 20_000
        for start in range(0, rows, chunk):
            buffer.append(DEVICE, [
                Sample(f"asset-{i % 20}", TAGS[i % 6], ts + i * 200_000, float(i % 977),
                       Quality.GOOD)
                for i in range(start, min(rows, start + chunk))
            ])
        buffer.flush()
    finally:
        buffer.close()


def _outage(root: Path, model: Path, outage_s: float) -> dict[str, float]:
    port = _free_port()
    folder = root / "outage"
    with LocalSink() as sink:
        config = _config(folder, sink, [_synthetic(LIVE_RATE)], model=model, metrics_port=port)
        with _agent(config) as agent:
            _wait(lambda: sink.rows > LIVE_RATE, 60, "the first rows")
            sink.stop()
            time.sleep(outage_s)
            depth_key = "edgefleet_agent_buffer_depth_rows"
            backlog = _scrape(port)[depth_key]
            arrivals_before = sink.batches
            sink.start()
            _wait(lambda: sink.batches > arrivals_before, 60, "the fog's return")
            back = time.monotonic()
            # Drained: the buffer is back to what live data keeps in flight (< 1 s of it).
            _wait(lambda: _scrape(port)[depth_key] < LIVE_RATE, outage_s * 2 + 120,
                  "the drain")
            drain_s = time.monotonic() - back
            status = agent.stop()
        if status != 0:
            raise RuntimeError(f"agent exited with {status}:\n{agent.log()[-2000:]}")
        committed, buffered = _committed_and_unsent(folder / "buffer.db")
        received = sink.received(DEVICE)
    # Lost: a seq the agent committed that is neither at the fog nor still in its buffer.
    held = SeqRanges()
    for first, last in [*received.ranges, *buffered]:
        held.add(first, last)
    lost = committed - held.count
    return {
        "drain_ratio": round(backlog / drain_s / LIVE_RATE, 1),
        "drain_backlog_rows": backlog,
        "drain_s": round(drain_s, 2),
        "outage_s": outage_s,
        "lost_rows": lost,
        "duplicate_rows": sink.duplicates,
    }


def _committed_and_unsent(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """A stopped agent's last committed seq and the seq ranges still in its buffer."""
    buffer = SqliteBuffer.open(BufferConfig(path=path, min_free_bytes=0))
    try:
        ranges = []
        while (batch := buffer.claim_batch(DEVICE, 10_000)) is not None:
            ranges.append((batch.first_seq, batch.last_seq))
        return buffer.committed_seq(DEVICE), ranges
    finally:
        buffer.close()


def bench_agent() -> dict[str, Any]:
    seconds = _env("EDGEFLEET_BENCH_SECONDS", 20)
    outage_s = _env("EDGEFLEET_BENCH_OUTAGE_S", 600)
    backlog_rows = int(_env("EDGEFLEET_BENCH_BACKLOG_ROWS", 5_000_000))
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-agent-") as tmp:
        root = Path(tmp)
        model = _build_model(root)
        figures: dict[str, Any] = {}
        figures.update(_throughput(root, model, seconds))
        figures["modbus_e2e_readings_per_s"] = _modbus(root, seconds)
        figures.update(_rss(root, model, backlog_rows))
        figures.update(_outage(root, model, outage_s))
    figures["bench_seconds"] = seconds
    figures["cpus"] = os.cpu_count() or 0
    figures["agent_python"] = os.environ.get("EDGEFLEET_BENCH_AGENT_PYTHON", sys.executable)
    return figures
