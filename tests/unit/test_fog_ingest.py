"""The fog's HTTP ingest against an injected publisher: every answer of the contract table
in fog-gateway/ingest.py, what is counted, and that nothing of a refused request is
published. Real HTTP framing through FastAPI's TestClient; tokens from a real token file."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edgefleet.fog_gateway.auth import DeviceTokens, add_device, remove_device
from edgefleet.fog_gateway.ingest import (
    IngestBusy,
    IngestLimits,
    IngestUnavailable,
    ReplayGuard,
    create_app,
)
from edgefleet.protocols.wire import (
    Batch,
    Heartbeat,
    Quality,
    Reading,
    decode_binary,
    encode_binary,
    encode_json,
)

WIRE = "application/vnd.edgefleet.wire"
T0 = 1_795_000_000_000_000_000
OWN = "<the device's own token>"


def batch(device: str = "edge-01", first: int = 1, rows: int = 10) -> Batch:
    readings = tuple(
        Reading(device=device, asset="pump-01", tag="flow", ts=T0 + i * 1000, value=float(i),
                quality=Quality.GOOD, seq=first + i)
        for i in range(rows)
    )
    return Batch(device=device, first_seq=first, last_seq=first + rows - 1, readings=readings,
                 sent_at=T0)


def heartbeat(device: str = "edge-01") -> Heartbeat:
    return Heartbeat(device=device, ts=T0, agent_version="0.1.0", buffer_depth=3,
                     dropped_total=0, compacted_total=0, uptime_s=1.5)


class FakePublisher:
    def __init__(self) -> None:
        self.batches: list[tuple[Batch, bytes]] = []
        self.heartbeats: list[Heartbeat] = []
        self.fail: Exception | None = None

    async def publish_batch(self, batch: Batch, body: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append((batch, body))

    async def publish_heartbeat(self, heartbeat: Heartbeat, body: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.heartbeats.append(heartbeat)

    def health(self) -> tuple[bool, str]:
        return self.fail is None, "fake"


class Fog:
    def __init__(self, tmp_path: Path, limits: IngestLimits | None = None) -> None:
        self.tokens_path = tmp_path / "tokens.json"
        self.token = add_device(self.tokens_path, "edge-01")
        self.other_token = add_device(self.tokens_path, "edge-02")
        self.publisher = FakePublisher()
        self.registry = CollectorRegistry()
        app = create_app(DeviceTokens(self.tokens_path), self.publisher, limits=limits,
                         registry=self.registry)
        self.client = TestClient(app)

    def post(self, body: bytes, *, token: str | None = OWN, content_type: str = WIRE,
             encoding: str | None = None) -> tuple[int, dict[str, object], dict[str, str]]:
        """POST `body` with this device's token (`OWN`), another token, or none."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = "Bearer " + (self.token if token is OWN else token)
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        response = self.client.post("/v1/ingest", content=body, headers=headers)
        return response.status_code, response.json(), dict(response.headers)

    def rejected(self, reason: str) -> float:
        value = self.registry.get_sample_value("edgefleet_fog_rejected_total",
                                               {"reason": reason})
        return value or 0.0


@pytest.fixture
def fog(tmp_path: Path) -> Fog:
    return Fog(tmp_path)


def test_binary_gzip_json_and_heartbeats_are_accepted(fog: Fog) -> None:
    one = batch(first=1)
    status, answer, _ = fog.post(gzip.compress(encode_binary(one)), encoding="gzip")
    assert (status, answer) == (202, {"status": "accepted"})
    two = batch(first=11)
    status, _, _ = fog.post(encode_json(two), content_type="application/json")
    assert status == 202
    assert fog.post(encode_binary(heartbeat()))[0] == 202
    assert [b.first_seq for b, _ in fog.publisher.batches] == [1, 11]
    # The publisher always gets the binary encoding, whatever the request carried.
    assert decode_binary(fog.publisher.batches[1][1]) == two
    assert fog.publisher.heartbeats == [heartbeat()]
    assert fog.registry.get_sample_value("edgefleet_fog_rows_accepted_total") == 20


@pytest.mark.parametrize("token", [None, "not-a-token-of-anyone-here", "short"])
def test_unauthenticated_requests_are_refused_before_decoding(fog: Fog, token: str | None) -> None:
    status, answer, _ = fog.post(encode_binary(batch()), token=token)
    assert status == 401 and answer["reason"] == "unauthenticated"
    assert fog.publisher.batches == [] and fog.rejected("unauthenticated") == 1


def test_a_token_cannot_write_another_devices_data(fog: Fog) -> None:
    status, answer, _ = fog.post(encode_binary(batch(device="edge-01")), token=fog.other_token)
    assert status == 403
    assert "edge-02" in str(answer["error"]) and "edge-01" in str(answer["error"])
    assert fog.publisher.batches == [] and fog.rejected("forbidden_device") == 1


def test_malformed_bodies_get_400_with_the_reason_and_nothing_is_published(fog: Fog) -> None:
    good = encode_binary(batch())
    cases = [
        (good[:-7], WIRE, None),  # truncated
        (b"hello", "text/plain", None),  # foreign
        (b'{"v": 1, "device": "edge-01", "readings": []}', "application/json", None),
        (gzip.compress(good)[:-10], WIRE, "gzip"),  # truncated gzip
        (b"not gzip at all", WIRE, "gzip"),
    ]
    for body, content_type, encoding in cases:
        status, answer, _ = fog.post(body, content_type=content_type, encoding=encoding)
        assert status == 400, (body[:20], answer)
        assert answer["reason"] == "malformed" and answer["error"]
    status, answer, _ = fog.post(b'{"v": 1, "device": "edge-01", "readings": []}',
                                 content_type="application/json")
    assert "readings" in str(answer["error"])  # names the field
    assert fog.publisher.batches == [] and fog.rejected("malformed") == len(cases) + 1


def test_oversize_bodies_and_gzip_bombs_get_413(tmp_path: Path) -> None:
    fog = Fog(tmp_path, IngestLimits(max_body_bytes=20_000, max_decoded_bytes=50_000))
    big = encode_binary(batch(rows=2000))
    assert len(big) > 20_000
    status, answer, _ = fog.post(big)
    assert status == 413 and answer["reason"] == "oversize"
    bomb = gzip.compress(b"EF" + b"\0" * 10_000_000)
    assert len(bomb) < 20_000
    status, answer, _ = fog.post(bomb, encoding="gzip")
    assert status == 413 and "decompressed" in str(answer["error"])
    assert fog.post(gzip.compress(big), encoding="gzip")[0] == 202  # fits once compressed
    assert fog.rejected("oversize") == 2


def test_unknown_content_encoding_is_415(fog: Fog) -> None:
    status, answer, _ = fog.post(encode_binary(batch()), encoding="br")
    assert status == 415 and answer["reason"] == "unsupported_encoding"


def test_a_replayed_batch_is_409_and_a_partial_overlap_goes_through(fog: Fog) -> None:
    body = encode_binary(batch(first=1, rows=10))
    assert fog.post(body)[0] == 202
    status, answer, _ = fog.post(body)
    assert status == 409 and answer["reason"] == "replayed"
    assert fog.post(encode_binary(batch(first=3, rows=4)))[0] == 409  # inside what was seen
    assert fog.post(encode_binary(batch(first=5, rows=10)))[0] == 202  # 11..14 are new
    assert len(fog.publisher.batches) == 2 and fog.rejected("replayed") == 2
    # Live data ahead of a backlog: the backlog is not a replay.
    assert fog.post(encode_binary(batch(first=100, rows=5)))[0] == 202
    assert fog.post(encode_binary(batch(first=15, rows=5)))[0] == 202


def test_backpressure_is_429_and_an_outage_503_both_with_retry_after(fog: Fog) -> None:
    body = encode_binary(batch())
    fog.publisher.fail = IngestBusy("queue full", retry_after=2)
    status, answer, headers = fog.post(body)
    assert status == 429 and headers["retry-after"] == "2" and answer["reason"] == "busy"
    fog.publisher.fail = IngestUnavailable("kafka down", retry_after=5)
    status, answer, headers = fog.post(body)
    assert status == 503 and headers["retry-after"] == "5" and "kafka down" in answer["error"]
    assert fog.client.get("/healthz").status_code == 503
    fog.publisher.fail = None
    assert fog.post(body)[0] == 202  # not remembered as accepted while it was refused
    assert fog.client.get("/healthz").status_code == 200


def test_metrics_endpoint_serves_the_counters(fog: Fog) -> None:
    fog.post(encode_binary(batch()), token=None)
    text = fog.client.get("/metrics").text
    assert 'edgefleet_fog_rejected_total{reason="unauthenticated"} 1.0' in text
    assert 'edgefleet_fog_requests_total{status="401"} 1.0' in text


def test_replay_guard_merges_ranges_and_stays_bounded() -> None:
    guard = ReplayGuard(max_ranges=3)
    guard.add("d", 1, 10)
    guard.add("d", 21, 30)
    guard.add("d", 11, 20)  # bridges the hole: one range
    assert guard.covered("d", 1, 30) and not guard.covered("d", 1, 31)
    for start in (100, 200, 300, 400):
        guard.add("d", start, start)
    assert not guard.covered("d", 1, 1)  # forgotten: the oldest range went first
    assert guard.covered("d", 400, 400) and not guard.covered("e", 1, 1)


def test_token_file_is_private_rotates_and_revokes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = add_device(path, "edge-01")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first not in path.read_text()  # only the hash is stored
    tokens = DeviceTokens(path)
    assert tokens.device_for(f"Bearer {first}") == "edge-01"
    second = add_device(path, "edge-01")  # rotation: the old token stops working
    assert tokens.device_for(f"Bearer {first}") is None
    assert tokens.device_for(f"Bearer {second}") == "edge-01"
    assert remove_device(path, "edge-01") and not remove_device(path, "edge-01")
    assert tokens.device_for(f"Bearer {second}") is None
    assert json.loads(path.read_text())["devices"] == {}
    with pytest.raises(ValueError, match="not a valid device name"):
        add_device(path, "bad name")
