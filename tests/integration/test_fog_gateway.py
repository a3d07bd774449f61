"""The fog gateway as users run it (`edgefleet fog run`), fed by the real edge agent
(`edgefleet agent run`): every row lands once, completeness says so, and the faults of
issue 5 (Kafka down, database down) cost no row. Kafka, PostgreSQL and Mosquitto come from
the project's launcher; the outages use private instances so the shared stack stays up."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from edgefleet.deploy.services import Launcher
from edgefleet.deploy.services.base import Service
from edgefleet.deploy.services.kafka import KafkaService
from edgefleet.deploy.services.postgres import PostgresService
from edgefleet.edge_agent.harness import AgentProcess, write_agent_config
from edgefleet.fog_gateway.auth import add_device
from edgefleet.fog_gateway.harness import FogProcess
from edgefleet.fog_gateway.store import Completeness, StoreUnavailable, open_store
from edgefleet.protocols.wire import Batch, Quality, Reading, encode_binary

from .. import waiting
from ..conftest import make_stack_dir

pytestmark = pytest.mark.integration


def synthetic(readings_per_s: float) -> dict[str, Any]:
    return {"type": "synthetic", "name": "line", "assets": 4, "tags": ["a", "b", "c", "d", "e"],
            "rows_per_s": readings_per_s / 20, "poll_interval_s": 0.1}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             *logs: Callable[[], str]) -> None:
    waiting.wait_for(condition, what, timeout_s, every_s=0.1, details=logs)


def completeness(store_url: str, device: str) -> Completeness | None:
    """The device's row, or None (also while the store is briefly busy: callers poll)."""
    store = open_store(store_url)
    try:
        return next((row for row in store.completeness() if row.device == device), None)
    except StoreUnavailable:
        return None
    finally:
        store.close()


def metric(fog: FogProcess, name: str) -> float:
    text = httpx.get(fog.base_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def agent_config(folder: Path, fog: FogProcess, device: str, token: str,
                 readings_per_s: float) -> Path:
    (folder / "token").write_text(token)
    return write_agent_config(
        folder, fog_url=fog.url, device=device, sources=[synthetic(readings_per_s)],
        fog={"token_file": str(folder / "token"), "batch_max_wait_s": 0.2,
             "backoff_initial_s": 0.1, "backoff_cap_s": 1.0},
        heartbeat={"interval_s": 1.0},
    )


def sent_rows(agent_folder: Path) -> int:
    """The last seq the agent's buffer committed: the fog should hold 1..that."""
    import sqlite3

    with sqlite3.connect(agent_folder / "buffer.db") as connection:
        row = connection.execute("SELECT max(next_seq) - 1 FROM devices").fetchone()
    return int(row[0] or 0)


def test_agent_to_embedded_fog_lands_every_row_once(tmp_path: Path) -> None:
    fog_dir, agent_dir = tmp_path / "fog", tmp_path / "agent"
    agent_dir.mkdir()
    token = add_device(fog_dir / "tokens.json", "edge-emb")
    store_url = f"sqlite:///{fog_dir / 'fog.db'}"
    with FogProcess(fog_dir, {"store": store_url}) as fog:
        config = agent_config(agent_dir, fog, "edge-emb", token, 2000)
        with AgentProcess(config) as agent:
            wait_for(lambda: (completeness(store_url, "edge-emb") or _EMPTY).received > 5000,
                     60, "5,000 rows in the store", agent.log, fog.log)
            assert agent.stop() == 0  # drains before exiting
        expected = sent_rows(agent_dir)
        row = completeness(store_url, "edge-emb")
        assert row is not None
        assert (row.received, row.expected, row.missing) == (expected, expected, 0)
        assert row.ratio == 1.0
        store = open_store(store_url)
        [status] = [s for s in store.device_status() if s["device"] == "edge-emb"]
        store.close()
        assert status["agent_version"]
        assert metric(fog, "edgefleet_fog_completeness_ratio") == 1.0
        assert fog.stop() == 0
    assert "Traceback" not in fog.log()


_EMPTY = Completeness(device="", received=0, expected=0, missing=0, duplicates=0, ratio=1.0)


@contextlib.contextmanager
def private_service(service: Service) -> Iterator[Launcher]:
    """One service of this test's own, to be stopped and started again (`down`/`up` keep
    its port); the shared stack stays up."""
    root = make_stack_dir(f"edgefleet-it-{service.name}-")
    launcher = Launcher(root, services=[service])
    launcher.up()
    try:
        yield launcher
    finally:
        launcher.down()
        shutil.rmtree(root.parent, ignore_errors=True)


@pytest.fixture
def private_kafka() -> Iterator[Launcher]:
    with private_service(KafkaService()) as launcher:  # memory storage: a restart empties it
        yield launcher


@pytest.fixture
def private_postgres() -> Iterator[Launcher]:
    with private_service(PostgresService()) as launcher:
        yield launcher


def post_status(fog: FogProcess, body: bytes, token: str) -> int:
    response = httpx.post(fog.url, content=body, timeout=30, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/vnd.edgefleet.wire"})
    return response.status_code


def test_agent_through_kafka_to_postgres_exactly_once(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    fog_dir, agent_dir = tmp_path / "fog", tmp_path / "agent"
    agent_dir.mkdir()
    device = f"edge-k-{int(time.time())}"
    token = add_device(fog_dir / "tokens.json", device)
    store_url = stack_env["EDGEFLEET_PG_URL"]
    settings = {"store": store_url, "sink": {"workers": 2, "group_id": f"it-{device}"},
                "kafka": {"bootstrap": stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"], "partitions": 2}}
    with FogProcess(fog_dir, settings) as fog:
        config = agent_config(agent_dir, fog, device, token, 3000)
        with AgentProcess(config) as agent:
            wait_for(lambda: (completeness(store_url, device) or _EMPTY).received > 5000,
                     90, "5,000 rows in PostgreSQL", agent.log, fog.log)
            assert agent.stop() == 0
        expected = sent_rows(agent_dir)
        wait_for(lambda: (completeness(store_url, device) or _EMPTY).received == expected,
                 60, f"all {expected} rows in PostgreSQL", fog.log)
        row = completeness(store_url, device)
        assert row is not None and (row.expected, row.missing, row.ratio) == (expected, 0, 1.0)
        # Replaying a batch the agent already delivered is refused 409; nothing is written.
        reading = Reading(device=device, asset="a0", tag="a", ts=1, value=1.0,
                          quality=Quality.GOOD, seq=1)
        body = encode_binary(Batch(device=device, first_seq=1, last_seq=1,
                                   readings=(reading,), sent_at=1))
        assert post_status(fog, body, token) == 409
        assert fog.stop() == 0
    with psycopg.connect(store_url) as connection:
        [(rows, distinct)] = connection.execute(
            "SELECT count(*), count(DISTINCT seq) FROM readings WHERE device = %s", (device,)
        ).fetchall()
    assert rows == distinct == expected


def test_kafka_down_answers_503_and_the_agent_loses_nothing(
    tmp_path: Path, private_kafka: Launcher
) -> None:
    fog_dir, agent_dir = tmp_path / "fog", tmp_path / "agent"
    agent_dir.mkdir()
    token = add_device(fog_dir / "tokens.json", "edge-kd")
    store_url = f"sqlite:///{fog_dir / 'fog.db'}"
    bootstrap = private_kafka.env()["EDGEFLEET_KAFKA_BOOTSTRAP"]
    settings = {"store": store_url, "sink": {"workers": 1},
                "kafka": {"bootstrap": bootstrap, "partitions": 1, "message_timeout_ms": 3000}}

    def stored() -> int:
        return (completeness(store_url, "edge-kd") or _EMPTY).received

    with FogProcess(fog_dir, settings) as fog:
        config = agent_config(agent_dir, fog, "edge-kd", token, 1000)
        with AgentProcess(config) as agent:
            wait_for(lambda: stored() > 1000, 60, "rows through Kafka", agent.log, fog.log)
            assert agent.stop() == 0
        # The test broker keeps messages in memory only: a restart would lose any it had
        # acknowledged but the sink had not yet consumed (a real Kafka keeps them). So the
        # outage starts once everything sent so far is stored.
        wait_for(lambda: stored() == sent_rows(agent_dir), 60, "the sink to catch up", fog.log)
        private_kafka.down()
        with AgentProcess(config) as agent:  # the same buffer: seqs continue
            wait_for(lambda: metric(fog, 'edgefleet_fog_rejected_total{reason="unavailable"}')
                     > 0, 60, "503s while Kafka is down", fog.log, agent.log)
            assert httpx.get(fog.base_url + "/healthz", timeout=10).status_code == 503
            before = stored()
            private_kafka.up()  # same port, empty: the gateway recreates its topics
            wait_for(lambda: stored() > before + 1000, 90,
                     "rows flowing again after Kafka came back", agent.log, fog.log)
            assert agent.stop() == 0
        expected = sent_rows(agent_dir)
        wait_for(lambda: stored() == expected, 60, f"all {expected} rows stored", fog.log)
        row = completeness(store_url, "edge-kd")
        assert row is not None and row.missing == 0 and row.ratio == 1.0
        assert fog.stop() == 0


def test_database_down_pauses_the_sink_and_it_resumes_without_loss(
    tmp_path: Path, stack_env: dict[str, str], private_postgres: Launcher
) -> None:
    fog_dir, agent_dir = tmp_path / "fog", tmp_path / "agent"
    agent_dir.mkdir()
    device = f"edge-dbd-{int(time.time())}"
    token = add_device(fog_dir / "tokens.json", device)
    store_url = private_postgres.env()["EDGEFLEET_PG_URL"]
    settings = {"store": store_url, "sink": {"workers": 1, "group_id": f"it-{device}"},
                "kafka": {"bootstrap": stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"], "partitions": 1}}
    with FogProcess(fog_dir, settings) as fog:
        config = agent_config(agent_dir, fog, device, token, 1000)
        with AgentProcess(config) as agent:
            wait_for(lambda: (completeness(store_url, device) or _EMPTY).received > 1000,
                     60, "rows in PostgreSQL", agent.log, fog.log)
            private_postgres.down()
            wait_for(lambda: metric(fog, "edgefleet_fog_sink_paused") == 1, 60,
                     "the sink to pause", fog.log)
            accepted = metric(fog, "edgefleet_fog_rows_accepted_total")
            wait_for(lambda: metric(fog, "edgefleet_fog_rows_accepted_total") > accepted + 2000,
                     60, "ingest to keep accepting into Kafka meanwhile", fog.log)
            private_postgres.up()
            wait_for(lambda: metric(fog, "edgefleet_fog_sink_paused") == 0, 90,
                     "the sink to resume", fog.log)
            assert agent.stop() == 0
        expected = sent_rows(agent_dir)
        wait_for(lambda: (completeness(store_url, device) or _EMPTY).received == expected,
                 90, f"all {expected} rows stored", fog.log)
        row = completeness(store_url, device)
        assert row is not None and row.missing == 0
        assert fog.stop() == 0


def test_agent_over_mqtt_through_the_bridge_lands_every_row_once(
    tmp_path: Path, stack: Launcher, stack_env: dict[str, str]
) -> None:
    from edgefleet.protocols.mqtt import parse_broker_url

    fog_dir, agent_dir = tmp_path / "fog", tmp_path / "agent"
    agent_dir.mkdir()
    device = f"edge-mq-{int(time.time())}"
    password = stack.add_mqtt_device(device)  # confined to edgefleet/devices/<device>/#
    url = stack_env["EDGEFLEET_MQTT_URL"]
    service = parse_broker_url(url)  # the fog's own account, which may read every topic
    store_url = f"sqlite:///{fog_dir / 'fog.db'}"
    settings = {
        "store": store_url, "sink": {"workers": 1, "group_id": f"it-{device}"},
        "kafka": {"bootstrap": stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"], "partitions": 1},
        "mqtt": {"url": f"mqtt://{service.host}:{service.port}", "prefix": "edgefleet/devices",
                 "username": service.username, "password": service.password},
    }
    add_device(fog_dir / "tokens.json", device)  # HTTP is not used; MQTT authenticates
    with FogProcess(fog_dir, settings) as fog:
        (agent_dir / "token").write_text(password)
        config = write_agent_config(
            agent_dir, fog_url=f"mqtt://{service.host}:{service.port}/edgefleet/devices",
            device=device, sources=[synthetic(2000)],
            fog={"token_file": str(agent_dir / "token"), "batch_max_wait_s": 0.2},
            heartbeat={"interval_s": 1.0},
        )

        def statuses() -> list[str]:
            store = open_store(store_url)
            try:
                return [status["device"] for status in store.device_status()]
            except StoreUnavailable:
                return []
            finally:
                store.close()

        with AgentProcess(config) as agent:
            wait_for(lambda: (completeness(store_url, device) or _EMPTY).received > 4000,
                     90, "rows through Mosquitto, the bridge and Kafka", agent.log, fog.log)
            # Heartbeats are periodic: wait for one while the agent still runs.
            # `in`, not `==`: the sink's new consumer group reads the shared broker's topics
            # from the start, so earlier tests' devices land in this store too.
            wait_for(lambda: device in statuses(), 60, "the agent's heartbeat", fog.log,
                     agent.log, lambda: "\n".join(
                         line for line in httpx.get(fog.base_url + "/metrics").text.splitlines()
                         if line.startswith(("edgefleet_fog_bridge", "edgefleet_fog_sink"))))
            assert agent.stop() == 0
        expected = sent_rows(agent_dir)
        wait_for(lambda: (completeness(store_url, device) or _EMPTY).received == expected,
                 60, f"all {expected} rows stored", fog.log)
        row = completeness(store_url, device)
        assert row is not None and row.missing == 0 and row.ratio == 1.0
        assert fog.stop() == 0


def test_bad_requests_are_refused_counted_and_write_nothing(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    import gzip

    fog_dir = tmp_path / "fog"
    device, other = f"edge-bad-{int(time.time())}", f"edge-oth-{int(time.time())}"
    token = add_device(fog_dir / "tokens.json", device)
    other_token = add_device(fog_dir / "tokens.json", other)
    store_url = stack_env["EDGEFLEET_PG_URL"]
    settings = {"store": store_url, "sink": {"workers": 1, "group_id": f"it-{device}"},
                "kafka": {"bootstrap": stack_env["EDGEFLEET_KAFKA_BOOTSTRAP"], "partitions": 1},
                "limits": {"max_body_bytes": 64 * 1024}}

    def batch(first: int, rows: int, of: str = device) -> bytes:
        readings = tuple(Reading(device=of, asset="a0", tag="a", ts=10**18 + i, value=float(i),
                                 quality=Quality.GOOD, seq=first + i) for i in range(rows))
        return encode_binary(Batch(device=of, first_seq=first, last_seq=first + rows - 1,
                                   readings=readings, sent_at=10**18))

    with FogProcess(fog_dir, settings) as fog:
        good = batch(1, 100)
        cases = {
            "malformed": (good[:-5], token, 400),
            "oversize": (batch(101, 9000), token, 413),
            "unauthenticated": (good, "x" * 43, 401),
            "forbidden_device": (good, other_token, 403),
        }
        for reason, (body, bearer, status) in cases.items():
            assert post_status(fog, body, bearer) == status, reason
        assert post_status(fog, gzip.compress(good), token) == 400  # gzip body, no header
        assert post_status(fog, good, token) == 202
        assert post_status(fog, good, token) == 409  # replayed
        wait_for(lambda: (completeness(store_url, device) or _EMPTY).received == 100, 30,
                 "the one good batch in PostgreSQL", fog.log)
        for reason in ("unauthenticated", "forbidden_device", "oversize", "replayed"):
            assert metric(fog, f'edgefleet_fog_rejected_total{{reason="{reason}"}}') == 1
        assert metric(fog, 'edgefleet_fog_rejected_total{reason="malformed"}') == 2
        assert fog.stop() == 0
    with psycopg.connect(store_url) as connection:
        [(rows,)] = connection.execute(
            "SELECT count(*) FROM readings WHERE device = ANY(%s)", ([device, other],)
        ).fetchall()
    assert rows == 100  # only the accepted batch, once
