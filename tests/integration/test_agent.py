"""The agent as a user runs it (`edgefleet agent run --config`), a real child process
forwarding over HTTP to a loopback fog stand-in (`LocalSink`): a fog outage and the drain
after it lose nothing and send live data first; kill -9 during heavy ingest loses no
committed row and leaves no seq gap; a corrupt buffer file is quarantined loudly; batches
the fog refuses land in the dead-letter table, visible with `edgefleet agent dlq`."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edgefleet.edge_agent.bench_agent import TAGS, _build_model
from edgefleet.edge_agent.buffer import BufferConfig, SqliteBuffer
from edgefleet.edge_agent.harness import AgentProcess, write_agent_config
from edgefleet.edge_agent.sink import LocalSink, SeqRanges
from edgefleet.protocols.wire import Batch, decode_binary

pytestmark = pytest.mark.integration

DEVICE = "edge-01"


def synthetic(readings_per_s: float, *, assets: int = 10, tags: int = 5) -> dict[str, Any]:
    return {
        "type": "synthetic", "name": "synthetic", "assets": assets,
        "tags": [f"t{i}" for i in range(tags)],
        "rows_per_s": readings_per_s / (assets * tags), "poll_interval_s": 0.1,
    }


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
              agent: AgentProcess | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            log = agent.log()[-3000:] if agent is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{log}")
        time.sleep(0.05)


def buffer_state(path: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(committed seq, unacked rows, unacked seq ranges) of a stopped agent's buffer."""
    buffer = SqliteBuffer.open(BufferConfig(path=path, min_free_bytes=0))
    try:
        committed = buffer.committed_seq(DEVICE)
        ranges = []
        while (batch := buffer.claim_batch(DEVICE, 10_000)) is not None:
            if ranges and ranges[-1][1] + 1 == batch.first_seq:
                ranges[-1] = (ranges[-1][0], batch.last_seq)
            else:
                ranges.append((batch.first_seq, batch.last_seq))
        return committed, buffer.stats().depth, ranges
    finally:
        buffer.close()


@pytest.fixture
def sink() -> Iterator[LocalSink]:
    with LocalSink() as fog:
        yield fog


def test_outage_then_drain_loses_nothing_and_sends_live_data_first(
    tmp_path: Path, sink: LocalSink
) -> None:
    config = write_agent_config(
        tmp_path, fog_url=sink.url, sources=[synthetic(5000)],
        # The backlog is paced (about 4 s for the ~75,000 rows of the outage), so live data
        # sent "first" is a visible order, not a race.
        fog={"batch_max_wait_s": 0.2, "backoff_cap_s": 2, "backlog_rows_per_s": 20_000},
        heartbeat={"interval_s": 1},
    )
    with AgentProcess(config) as agent:
        wait_for(lambda: sink.rows > 5000, 30, "rows at the fog", agent)
        sink.stop()  # the fog goes away: connection refused
        outage_start = time.time_ns()
        time.sleep(15)  # ~75,000 readings pile up in the buffer
        outage_rows = sink.rows
        sink.start()
        back_ns = time.time_ns()
        # Drained: the fog has caught up with the rows produced up to the reconnect.
        wait_for(lambda: not sink.received(DEVICE).gaps()
                 and sink.received(DEVICE).count > outage_rows + 70_000, 90, "the drain", agent)
        arrivals = [a for a in list(sink.arrivals) if a.received_ns >= back_ns]
        status = agent.stop()
    assert status == 0, agent.log()[-3000:]

    # Live first: a batch of rows sampled after the reconnect arrived before the last
    # batch of the backlog (rows sampled during the outage) did.
    first_live = next(i for i, a in enumerate(arrivals) if a.first_seq > 0
                      and a.max_ts >= back_ns)
    last_backlog = max(i for i, a in enumerate(arrivals) if a.max_ts < back_ns
                       and a.max_ts >= outage_start)
    assert first_live < last_backlog, (first_live, last_backlog, len(arrivals))

    # Nothing lost: after SIGTERM's drain the buffer is empty and the fog holds every seq
    # the agent ever committed, once.
    committed, depth, unacked = buffer_state(tmp_path / "buffer.db")
    received = sink.received(DEVICE)
    assert depth == 0 and unacked == []
    assert received.ranges == [(1, committed)], received.ranges[:5]
    assert "drained" in agent.log() or "buffer drained" in agent.log()


def test_kill_9_during_heavy_ingest_loses_no_committed_row(
    tmp_path: Path, sink: LocalSink
) -> None:
    config = write_agent_config(tmp_path, fog_url=sink.url, sources=[synthetic(30_000)],
                                fog={"batch_max_wait_s": 0.1})
    agent = AgentProcess(config).start()
    try:
        wait_for(lambda: sink.rows > 60_000, 60, "heavy ingest", agent)
        agent.kill()
    finally:
        agent.kill()
    committed, _depth, unacked = buffer_state(tmp_path / "buffer.db")
    received = sink.received(DEVICE)
    # Every committed seq is at the fog or still in the buffer: nothing in between is lost.
    covered = sorted([*received.ranges, *unacked])
    merged: list[list[int]] = []
    for first, last in covered:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    assert merged == [[1, committed]], (merged[:5], committed)

    # The restarted agent continues the seq space without a gap and forwards the rest.
    with AgentProcess(config) as again:
        wait_for(lambda: sink.received(DEVICE).highest > committed + 10_000, 60,
                 "rows after the restart", again)
        assert again.stop() == 0, again.log()[-3000:]
    committed_after, depth_after, _ = buffer_state(tmp_path / "buffer.db")
    assert depth_after == 0
    assert sink.received(DEVICE).ranges == [(1, committed_after)]


def test_a_corrupt_buffer_file_is_quarantined_loudly(tmp_path: Path, sink: LocalSink) -> None:
    (tmp_path / "buffer.db").write_bytes(b"SQLite format 3\x00" + b"\xde\xad" * 4000)
    config = write_agent_config(tmp_path, fog_url=sink.url, sources=[synthetic(500)],
                                heartbeat={"interval_s": 1})
    with AgentProcess(config) as agent:
        wait_for(lambda: DEVICE in sink.heartbeats, 30, "a heartbeat", agent)
        beat = sink.heartbeats[DEVICE]
        assert agent.stop() == 0
    log = agent.log()
    assert "CRITICAL" in log and "BUFFER QUARANTINED" in log
    quarantined = list(tmp_path.glob("buffer.db.corrupt-*"))
    assert quarantined and quarantined[0].read_bytes().startswith(b"SQLite format 3\x00\xde\xad")
    assert "corrupt buffer quarantined" in beat.status
    assert sink.received(DEVICE).ranges[0][0] == 1  # a fresh buffer, seqs from 1


def test_batches_the_fog_refuses_are_dead_lettered_and_listed(
    tmp_path: Path, sink: LocalSink
) -> None:
    sink.refuse[DEVICE] = (422, "tag t3 is not in this site's schema")
    config = write_agent_config(tmp_path, fog_url=sink.url, sources=[synthetic(1000)],
                                fog={"batch_max_wait_s": 0.1})
    with AgentProcess(config) as agent:
        wait_for(lambda: sink.rejected[422] >= 3, 30, "refused batches", agent)
        assert agent.stop() == 0
    assert "dead-lettered" in agent.log()
    assert sink.rows == 0
    listing = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "agent", "dlq", "--config", str(config),
         "list"], capture_output=True, text=True, timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert "422" in listing.stdout and "not in this site's schema" in listing.stdout
    buffer = SqliteBuffer.open(BufferConfig(path=tmp_path / "buffer.db", min_free_bytes=0))
    try:
        letters = buffer.dlq_list()
        # Refused batches left the queue once each: the rows are in the DLQ, not retried.
        assert len(letters) == sink.rejected[422]
        assert sum(d.rows for d in letters) + buffer.stats().depth == buffer.committed_seq(
            DEVICE)
        first = letters[0].dlq_id
    finally:
        buffer.close()
    export = subprocess.run(
        [sys.executable, "-m", "edgefleet.deploy.cli", "agent", "dlq", "--config", str(config),
         "export", str(first)], capture_output=True, text=True, timeout=60,
    )
    assert export.returncode == 0 and json.loads(export.stdout)["device"] == DEVICE


class _Hook(http.server.BaseHTTPRequestHandler):
    """A webhook that records every alert it is sent."""

    alerts: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).alerts.append(json.loads(body))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_inference_readings_are_forwarded_and_anomalies_alert_a_webhook(
    tmp_path: Path,
) -> None:
    model = _build_model(tmp_path)  # a real ONNX z-score model over the shared features
    _Hook.alerts = []
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    source = {"type": "synthetic", "name": "line", "assets": 3, "tags": list(TAGS),
              "rows_per_s": 10, "poll_interval_s": 0.1, "spike_probability": 0.02}
    try:
        with LocalSink(keep_readings=100_000) as sink:
            config = write_agent_config(
                tmp_path, fog_url=sink.url, sources=[source], model={"path": str(model)},
                fog={"batch_max_wait_s": 0.2},
                alerts={"webhook_url": f"http://127.0.0.1:{hook.server_port}/alerts"})
            with AgentProcess(config) as agent:
                wait_for(lambda: len(_Hook.alerts) >= 2, 60, "anomaly alerts", agent)
                assert agent.stop() == 0
            readings = list(sink.readings)
    finally:
        hook.shutdown()
    scores = [r for r in readings if r.tag == "ml:bench-1:score"]
    flags = [r for r in readings if r.tag == "ml:bench-1:is_anomaly"]
    assert scores and len(scores) == len(flags)
    assert {r.asset for r in scores} == {"asset-0", "asset-1", "asset-2"}
    anomalous = {(r.asset, r.ts) for r in flags if r.value == 1.0}
    # Each alert matches a flagged window that travelled to the fog with the data.
    for alert in _Hook.alerts[:2]:
        assert alert["device"] == DEVICE and alert["model_version"] == "bench-1"
        assert (alert["asset"], alert["ts"]) in anomalous
        assert alert["score"] > alert["threshold"] == 6.0
    assert "model zscore version bench-1 loaded" in agent.log()


def test_forwarding_over_mqtt_qos1_to_a_real_broker(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.protocols.mqtt import parse_broker_url

    url = stack_env["EDGEFLEET_MQTT_URL"]
    prefix = f"fog-{uuid.uuid4().hex[:8]}"
    address = parse_broker_url(url)
    received = SeqRanges()
    batches: list[Batch] = []

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        batch = decode_binary(message.payload)
        batches.append(batch)
        received.add(batch.first_seq, batch.last_seq)

    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-sub")
    if address.username is not None:
        subscriber.username_pw_set(address.username, address.password)
    subscriber.on_message = on_message
    subscriber.connect(address.host, address.port)
    subscriber.subscribe(f"{prefix}/{DEVICE}/batch", qos=1)
    subscriber.loop_start()
    try:
        config = write_agent_config(tmp_path, fog_url=f"{url.rstrip('/')}/{prefix}",
                                    sources=[synthetic(2000)], fog={"batch_max_wait_s": 0.2})
        with AgentProcess(config) as agent:
            wait_for(lambda: received.count > 6000, 60, "batches over MQTT", agent)
            assert agent.stop() == 0
        committed, depth, _ = buffer_state(tmp_path / "buffer.db")
        wait_for(lambda: received.highest >= committed, 30, "the drained rows")
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    assert depth == 0
    assert received.ranges == [(1, committed)]  # every row once acknowledged, in seq order
    assert all(b.device == DEVICE for b in batches)
