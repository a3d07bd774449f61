"""The fog store on a real PostgreSQL from the project's launcher.

Each test works in a throwaway schema of the session stack's database, so it sees only its
own rows. The outage test runs its own private PostgreSQL, because it stops the server."""

from __future__ import annotations

import logging
import random
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from edgefleet.deploy.services import Launcher
from edgefleet.deploy.services.postgres import PostgresService
from edgefleet.fog_gateway.store import (
    Completeness,
    PgStore,
    StoreUnavailable,
    WriteResult,
    measure_copy_vs_naive,
)
from edgefleet.protocols.wire import Batch, Quality, Reading
from tests.conftest import make_stack_dir
from tests.unit.test_fog_store import SECOND, T0, inference_batch, make_batch, make_heartbeat

pytestmark = pytest.mark.integration

DAY = 86_400 * SECOND
MIDNIGHT = (T0 // DAY + 1) * DAY  # 2026-11-19T00:00Z, the day after T0's


@pytest.fixture
def pg_url(stack_env: dict[str, str]) -> str:
    return stack_env["EDGEFLEET_PG_URL"]


@pytest.fixture
def timescaledb(stack_env: dict[str, str]) -> bool:
    return stack_env["EDGEFLEET_PG_TIMESCALEDB"] == "1"


@pytest.fixture
def schema(pg_url: str) -> Iterator[str]:
    name = f"fogtest_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def store(pg_url: str, schema: str) -> Iterator[PgStore]:
    store = PgStore(pg_url, schema=schema)
    store.setup()
    yield store
    store.close()


def query(pg_url: str, schema: str, sql: str, params: tuple[Any, ...] | None = None) -> list[Any]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"SET search_path TO {schema}")
        return conn.execute(sql, params).fetchall()


def needs_plain_postgres(timescaledb: bool) -> None:
    if timescaledb:
        pytest.skip("daily partitions are the layout without TimescaleDB")


def test_setup_describes_the_layout_and_is_idempotent(
    store: PgStore, pg_url: str, schema: str, timescaledb: bool
) -> None:
    if timescaledb:
        assert store.description.startswith("timescaledb ")
    else:
        assert re.fullmatch(
            rf"postgresql \d+\.\d+, schema {schema}, no timescaledb: native range "
            "partitions by day",
            store.description,
        ), store.description
    again = PgStore(pg_url, schema=schema)
    assert again.setup() == store.description
    again.close()
    objects = query(
        pg_url, schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (schema,),
    )
    assert {"readings", "device_seq", "device_status", "store_meta", "completeness",
            "inferences"} <= {name for (name,) in objects}


def test_resends_overlaps_and_repeats_are_stored_once(store: PgStore) -> None:
    batch = make_batch("plc-1", 1, 50)
    assert store.write([batch]) == WriteResult(50, 0, 0, {})
    assert store.write([batch]) == WriteResult(0, 50, 0, {"plc-1": 50})
    result = store.write([make_batch("plc-1", 41, 20), make_batch("plc-2", 1, 5)])
    assert result == WriteResult(15, 10, 0, {"plc-1": 10})
    repeated = make_batch("plc-2", 6, 5)
    assert store.write([repeated, repeated]) == WriteResult(5, 5, 0, {"plc-2": 5})
    store.write([make_batch("plc-2", 21, 10)])  # seqs 11..20 never arrive
    assert store.count_rows() == 80
    assert store.completeness() == [
        Completeness("plc-1", 60, 60, 0, 60, 1.0),
        Completeness("plc-2", 20, 30, 10, 5, 20 / 30),
    ]


def test_rows_written_around_the_store_still_dedupe(
    store: PgStore, pg_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A row the store's seq accounting does not know about (inserted by hand): the fast
    # path for fresh seqs meets a conflict and the write is redone through ON CONFLICT.
    batch = make_batch("plc-9", 1, 10)
    stray = batch.readings[4]
    store.write([make_batch("plc-9", 1, 1)])
    query(
        pg_url, schema,
        "INSERT INTO readings VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING seq",
        (stray.device, stray.seq, datetime.fromtimestamp(stray.ts / 1e9, UTC), stray.asset,
         stray.tag, stray.value, "good"),
    )
    with caplog.at_level(logging.WARNING, logger="edgefleet.fog_gateway.store"):
        assert store.write([batch]) == WriteResult(8, 2, 0, {"plc-9": 2})
    assert "careful mode" in caplog.text
    assert store.count_rows() == 10


def test_values_quality_and_timestamps(store: PgStore, pg_url: str, schema: str) -> None:
    readings = (
        Reading("plc-1", "press-1", "temp", T0 + 1_999, None, Quality.BAD, 1),
        Reading("plc-1", "press-1", "temp", T0 + 5_000, -2.5e300, Quality.UNCERTAIN, 2),
    )
    batch = Batch(device="plc-1", first_seq=1, last_seq=2, readings=readings, sent_at=T0)
    assert store.write([batch]).readings == 2
    assert store.write([batch]).duplicates == 2  # the µs truncation is the same every time
    rows = query(pg_url, schema, "SELECT seq, ts, value, quality FROM readings ORDER BY seq")
    expected_ts = datetime.fromtimestamp(T0 // 1000 / 1e6, UTC)
    assert rows == [
        (1, expected_ts.replace(microsecond=1), None, "bad"),
        (2, expected_ts.replace(microsecond=5), -2.5e300, "uncertain"),
    ]


def test_the_newest_heartbeat_wins(store: PgStore) -> None:
    newer = make_heartbeat("plc-1", T0 + 10 * SECOND, buffer_depth=5, buffer_oldest_ts=T0,
                           status="running\x00")
    assert store.write([], [newer]).heartbeats == 1
    older = make_heartbeat("plc-1", T0, buffer_depth=99)
    assert store.write([make_batch("plc-1", 1, 3)], [older, older]) == WriteResult(3, 0, 0, {})
    (status,) = store.device_status()
    assert (status["last_seen"], status["buffer_depth"], status["buffer_oldest_ts"]) == (
        T0 + 10 * SECOND, 5, T0,
    )
    assert status["status"] == "running"  # NUL, which PostgreSQL text cannot hold, dropped
    assert status["model_version"] is None
    assert isinstance(status["updated_at"], int)


def test_the_inferences_view_pivots_model_outputs(
    store: PgStore, pg_url: str, schema: str
) -> None:
    store.write([inference_batch("plc-1")])
    rows = query(
        pg_url, schema,
        "SELECT device, asset, model_version, score, is_anomaly FROM inferences "
        "ORDER BY model_version",
    )
    assert rows == [
        ("plc-1", "press-1", "iforest:2", 0.75, True),
        ("plc-1", "press-1", "v1", 0.25, False),
    ]


def test_rows_of_two_days_land_in_two_daily_partitions(
    store: PgStore, pg_url: str, schema: str, timescaledb: bool
) -> None:
    needs_plain_postgres(timescaledb)
    # Seq s has ts MIDNIGHT + (s - 6) s: seqs 1..5 fall on 2026-11-18, 6..10 on the 19th.
    store.write([make_batch("plc-1", 1, 10, t0=MIDNIGHT - 6 * SECOND)])
    rows = query(
        pg_url, schema,
        "SELECT tableoid::regclass::text, count(*), min(seq), max(seq) FROM readings "
        "GROUP BY 1 ORDER BY 1",
    )
    assert rows == [("readings_p20261118", 5, 1, 5), ("readings_p20261119", 5, 6, 10)]


def test_retention_drops_old_partitions_only(
    store: PgStore, pg_url: str, schema: str, timescaledb: bool
) -> None:
    needs_plain_postgres(timescaledb)
    old = T0 - 100 * DAY  # 2026-08-10
    store.write([make_batch("plc-1", 1, 10, t0=old, step_ns=1)])
    store.write([make_batch("plc-1", 11, 10, step_ns=1)])
    now = datetime.fromtimestamp(T0 / 1e9, UTC)
    assert store.drop_partitions_older_than(101, now=now) == []
    # Another store object (another sink worker) applies retention ...
    other = PgStore(pg_url, schema=schema)
    assert other.drop_partitions_older_than(30, now=now) == ["readings_p20260810"]
    other.close()
    assert store.count_rows() == 10
    assert store.completeness() == [Completeness("plc-1", 20, 20, 0, 0, 1.0)]  # cumulative
    # ... so this object's cache of partitions is stale: a late row of that day still lands.
    assert store.write([make_batch("plc-1", 21, 1, t0=old, step_ns=1)]).readings == 1
    rows = query(pg_url, schema, "SELECT tableoid::regclass::text, count(*) FROM readings "
                 "GROUP BY 1 ORDER BY 1")
    assert rows == [("readings_p20260810", 1), ("readings_p20261118", 10)]


def test_a_write_that_fails_midway_leaves_nothing(store: PgStore) -> None:
    store.write([make_batch("plc-1", 1, 10)])
    # Readings go in first; the heartbeat then fails on the server (bigint out of range).
    bad = make_heartbeat("plc-1", T0, applied_generation=2**70)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        store.write([make_batch("plc-1", 11, 10), make_batch("plc-2", 1, 5)], [bad])
    assert store.count_rows() == 10
    assert store.completeness() == [Completeness("plc-1", 10, 10, 0, 0, 1.0)]
    assert store.device_status() == []
    assert store.write([make_batch("plc-1", 11, 10)]) == WriteResult(10, 0, 0, {})


def test_a_connection_lost_mid_write_leaves_nothing_and_the_store_reconnects(
    store: PgStore, pg_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The server drops the store's connection in the middle of the write transaction,
    # after the readings went in: a trigger on the heartbeat upsert terminates its backend.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"SET search_path TO {schema}")
        conn.execute("""CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$""")
        conn.execute("""CREATE TRIGGER die BEFORE INSERT ON device_status FOR EACH ROW
            WHEN (NEW.device = 'doomed') EXECUTE FUNCTION die()""")
    caplog.set_level(logging.INFO, logger="edgefleet.fog_gateway.store")
    store.write([make_batch("plc-1", 1, 10)])
    with pytest.raises(StoreUnavailable, match="unavailable") as caught:
        store.write([make_batch("plc-1", 11, 10), make_batch("plc-2", 1, 5)],
                    [make_heartbeat("doomed", T0)])
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert store.count_rows() == 10  # the same object reconnects on its next call
    assert store.completeness() == [Completeness("plc-1", 10, 10, 0, 0, 1.0)]
    assert store.write([make_batch("plc-1", 11, 10)]).readings == 10
    assert "unavailable" in caplog.text and "reachable again" in caplog.text


def test_concurrent_writers_store_each_row_once(pg_url: str, schema: str) -> None:
    calls = [[make_batch(device, first, 40) for device in ("a", "b", "c")]
             for first in range(1, 400, 25)]  # neighbouring calls overlap by 15 seqs
    results: list[WriteResult] = []
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        store = PgStore(pg_url, schema=schema)
        try:
            order = list(calls)
            random.Random(seed).shuffle(order)
            for call in order:
                results.append(store.write(call))
        except BaseException as err:
            errors.append(err)
        finally:
            store.close()

    setup = PgStore(pg_url, schema=schema)
    setup.setup()
    setup.close()
    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    distinct = 3 * (375 + 40)  # seqs 1..415 per device
    sent = 2 * sum(len(b.readings) for call in calls for b in call)
    assert sum(r.readings for r in results) == distinct
    assert sum(r.duplicates for r in results) == sent - distinct
    check = PgStore(pg_url, schema=schema)
    assert check.count_rows() == distinct
    assert [(c.received, c.missing) for c in check.completeness()] == [(415, 0)] * 3
    assert sum(c.duplicates for c in check.completeness()) == sent - distinct
    check.close()


def test_the_store_is_unavailable_while_its_server_is_down() -> None:
    root = make_stack_dir("edgefleet-fogstore-")
    launcher = Launcher(root, services=[PostgresService()])
    try:
        url = launcher.up()["EDGEFLEET_PG_URL"]
        password = launcher.context().secrets["postgres_password"]
        port = int(re.findall(r":(\d+)/", url)[0])
        store = PgStore(url, connect_timeout_s=2)
        store.setup()
        assert store.write([make_batch("plc-1", 1, 10)]).readings == 10

        launcher.down()
        with pytest.raises(StoreUnavailable) as caught:
            store.write([make_batch("plc-1", 11, 10)], [make_heartbeat("plc-1", T0)])
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message and password not in message
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        with pytest.raises(StoreUnavailable):
            store.completeness()  # still down: each call fails fast, nothing is queued

        launcher.up(ports={"postgres": port})
        assert store.count_rows() == 10  # nothing of the failed write is there
        assert store.write([make_batch("plc-1", 11, 10)], [make_heartbeat("plc-1", T0)]) == (
            WriteResult(10, 0, 1, {})
        )
        assert store.completeness() == [Completeness("plc-1", 20, 20, 0, 0, 1.0)]
        store.close()
    finally:
        launcher.down()
        shutil.rmtree(root.parent, ignore_errors=True)


def test_measure_copy_vs_naive_reports_both_rates(pg_url: str) -> None:
    def bench_schemas() -> set[str]:
        rows = query(pg_url, "public", "SELECT nspname FROM pg_namespace "
                     "WHERE nspname LIKE 'edgefleet_bench_%'")
        return {name for (name,) in rows}

    before = bench_schemas()
    figures = measure_copy_vs_naive(pg_url, rows=6_000, batch_rows=2_000)
    assert set(figures) == {"copy_rows_per_s", "naive_insert_rows_per_s"}
    assert all(value > 0 for value in figures.values())
    assert bench_schemas() <= before  # its throwaway schema is gone
