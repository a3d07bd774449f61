"""`edgefleet bench fog`: the fog tier's throughput against real PostgreSQL and Kafka.

Figures (one JSON object):

* `copy_rows_per_s`, `naive_insert_rows_per_s`: rows into PostgreSQL through the sink's
  path (binary COPY into staging, INSERT … ON CONFLICT DO NOTHING), and by plain
  executemany INSERTs of the same rows, in the same run (`store.measure_copy_vs_naive`).
* `kafka_msgs_per_s`: 200-byte messages produced and confirmed by one process through
  the idempotent, acks=all, lz4 producer (`kafka.measure_kafka_throughput`).
* `e2e_rows_per_s`: `edgefleet fog run` as a separate process (HTTP ingest → Kafka → two
  sink workers → PostgreSQL); client threads POST gzip binary batches of 5,000 rows for
  `EDGEFLEET_BENCH_SECONDS` (default 60), never more than 300,000 rows ahead of the
  database; the figure is the rows that reached the database divided by the time from the
  first request until the last of them landed (a sink that lags is charged for it).
  `ingest_rows_per_s` is the rate of rows answered 202, `drain_s` how long the database
  took to catch up after the clients stopped, `e2e_rows_lost` accepted minus stored.
* `dup_rows_in_db`: a second, shorter run (a sixth as long) in which every batch is sent
  twice, with the gateway's replay guard off so that every second copy travels through
  Kafka to the database: rows stored more than once for one `(device, seq)`, counted by
  the database. `duplicates_removed` counts the copies the store recognised.

Services: when `EDGEFLEET_PG_URL` and `EDGEFLEET_KAFKA_BOOTSTRAP` are set (e.g. by
`eval "$(edgefleet services env)"`), those are used; otherwise the bench starts its own
PostgreSQL and Kafka-protocol broker with the project's launcher and stops them after.
Knobs: `EDGEFLEET_BENCH_SECONDS`, `EDGEFLEET_BENCH_COPY_ROWS` (200,000),
`EDGEFLEET_BENCH_KAFKA_MESSAGES` (300,000), `EDGEFLEET_BENCH_CLIENTS` (4).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from edgefleet.protocols.wire import Batch, Quality, Reading, encode_binary

__all__ = ["bench_fog"]

BATCH_ROWS: Final = 5_000
TAGS: Final = ("flow", "pressure", "temperature", "vibration", "current")


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@contextlib.contextmanager
def _services() -> Iterator[dict[str, str]]:
    if os.environ.get("EDGEFLEET_PG_URL") and os.environ.get("EDGEFLEET_KAFKA_BOOTSTRAP"):
        yield {"EDGEFLEET_PG_URL": os.environ["EDGEFLEET_PG_URL"],
               "EDGEFLEET_KAFKA_BOOTSTRAP": os.environ["EDGEFLEET_KAFKA_BOOTSTRAP"]}
        return
    from edgefleet.deploy.services import Launcher
    from edgefleet.deploy.services.kafka import KafkaService
    from edgefleet.deploy.services.postgres import PostgresService

    folder = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fog-", dir="/tmp"))
    os.chmod(folder, 0o755)  # noqa: S103 - the postgres system user must traverse it
    launcher = Launcher(folder / "stack", services=[PostgresService(), KafkaService()])
    try:
        launcher.up()
        yield launcher.env()
    finally:
        launcher.down()
        shutil.rmtree(folder, ignore_errors=True)


def _batch(device: str, first_seq: int, t0_ns: int) -> bytes:
    readings = tuple(
        Reading(device=device, asset=f"pump-{(i // 5) % 20:02d}", tag=TAGS[i % 5],
                ts=t0_ns + (first_seq + i) * 1_000_000, value=float((first_seq + i) % 997),
                quality=Quality.GOOD, seq=first_seq + i)
        for i in range(BATCH_ROWS)
    )
    batch = Batch(device=device, first_seq=first_seq, last_seq=first_seq + BATCH_ROWS - 1,
                  readings=readings, sent_at=t0_ns)
    return gzip.compress(encode_binary(batch), compresslevel=1)


class _Load:
    """Client threads, one per device, POSTing gzip binary batches of 5,000 rows.

    Closed loop: a client waits while the rows accepted (202) run more than `max_lag_rows`
    ahead of the rows in the database, so what is measured is the rate the whole path
    sustains, not how fast Kafka can buffer. Batches are encoded by the clients as they go.
    """

    def __init__(self, url: str, tokens: dict[str, str], store_url: str, *,
                 copies: int, max_lag_rows: int = 300_000) -> None:
        self.url = url
        self.tokens = tokens
        self.store_url = store_url
        self.copies = copies
        self.max_lag_rows = max_lag_rows
        self.accepted = dict.fromkeys(tokens, 0)
        self.landed = 0
        self.landed_at = 0.0
        self.duplicates = 0
        self.t0_ns = time.time_ns() - 86_400 * 10**9
        self._stop = threading.Event()

    def _client(self, device: str, stop_at: float) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {self.tokens[device]}",
                   "Content-Type": "application/vnd.edgefleet.wire",
                   "Content-Encoding": "gzip"}
        with httpx.Client(headers=headers, timeout=60) as http:
            while time.monotonic() < stop_at:
                if sum(self.accepted.values()) - self.landed > self.max_lag_rows:
                    time.sleep(0.01)
                    continue
                body = _batch(device, 1 + self.accepted[device], self.t0_ns)
                for _copy in range(self.copies):
                    while True:
                        status = http.post(self.url, content=body).status_code
                        if status == 202:
                            break
                        if status not in (429, 503):
                            raise RuntimeError(f"ingest answered {status}")
                        time.sleep(0.05)
                self.accepted[device] += BATCH_ROWS

    def _watch(self) -> None:
        from .store import open_store

        store = open_store(self.store_url)
        try:
            while not self._stop.is_set():
                rows = [r for r in store.completeness() if r.device in self.tokens]
                landed = sum(r.received for r in rows)
                self.duplicates = sum(r.duplicates for r in rows)
                if landed != self.landed:
                    self.landed, self.landed_at = landed, time.monotonic()
                time.sleep(0.2)
        finally:
            store.close()

    def run(self, seconds: float, drain_timeout_s: float = 300) -> dict[str, float]:
        watcher = threading.Thread(target=self._watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        stop_at = started + seconds
        clients = [threading.Thread(target=self._client, args=(device, stop_at))
                   for device in self.tokens]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        sent_done = time.monotonic()
        accepted = sum(self.accepted.values())
        deadline = sent_done + drain_timeout_s
        while self.landed < accepted and time.monotonic() < deadline:
            time.sleep(0.1)
        self._stop.set()
        watcher.join()
        return {"landed": self.landed, "accepted": accepted, "started": started,
                "sent_done": sent_done, "landed_at": max(self.landed_at, started + 1e-9),
                "duplicates": self.duplicates}


def _e2e(env: dict[str, str], seconds: int, clients: int) -> dict[str, Any]:
    from .auth import add_device
    from .harness import FogProcess

    run = uuid.uuid4().hex[:8]
    pg_url = env["EDGEFLEET_PG_URL"]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-fog-e2e-") as tmp:
        root = Path(tmp)
        devices = [f"bench-{run}-{i}" for i in range(2 * clients)]
        tokens = {device: add_device(root / "tokens.json", device) for device in devices}
        sustained = {device: tokens[device] for device in devices[:clients]}
        doubled = {device: tokens[device] for device in devices[clients:]}
        settings = {
            "store": pg_url,
            "kafka": {"bootstrap": env["EDGEFLEET_KAFKA_BOOTSTRAP"], "partitions": 4},
            "sink": {"workers": 2, "group_id": f"edgefleet-bench-{run}"},
            # Off, so that in the second run every second copy reaches the database.
            "limits": {"replay_ranges_per_device": 0},
            "log_level": "WARNING",
        }
        with FogProcess(root, settings) as fog:
            one = _Load(fog.url, sustained, pg_url, copies=1).run(seconds)
            two = _Load(fog.url, doubled, pg_url, copies=2).run(max(5, seconds // 6))
            status = fog.stop()
        if status != 0:
            raise RuntimeError(f"fog gateway exited with {status}")
    return {
        "e2e_rows_per_s": round(one["landed"] / (one["landed_at"] - one["started"])),
        "ingest_rows_per_s": round(one["accepted"] / (one["sent_done"] - one["started"])),
        "e2e_rows": one["landed"],
        "e2e_rows_lost": one["accepted"] - one["landed"],
        "drain_s": round(max(0.0, one["landed_at"] - one["sent_done"]), 2),
        "dup_rows_in_db": _duplicate_rows(pg_url, list(doubled)),
        "dup_run_rows": two["landed"],
        "dup_run_rows_lost": two["accepted"] - two["landed"],
        "duplicates_removed": two["duplicates"],
        "e2e_clients": clients,
        "e2e_seconds": seconds,
    }


def _duplicate_rows(pg_url: str, devices: list[str]) -> int:
    """Rows beyond the first for any (device, seq), counted by the database itself."""
    import psycopg

    with psycopg.connect(pg_url) as connection:
        row = connection.execute(
            "SELECT count(*) - count(DISTINCT (device, seq)) FROM readings "
            "WHERE device = ANY(%s)", (devices,)
        ).fetchone()
    return int(row[0]) if row else 0


def bench_fog() -> dict[str, Any]:
    from .kafka import measure_kafka_throughput
    from .store import measure_copy_vs_naive

    seconds = _env("EDGEFLEET_BENCH_SECONDS", 60)
    figures: dict[str, Any] = {}
    with _services() as env:
        figures.update(measure_copy_vs_naive(
            env["EDGEFLEET_PG_URL"], rows=_env("EDGEFLEET_BENCH_COPY_ROWS", 200_000)
        ))
        figures.update(measure_kafka_throughput(
            env["EDGEFLEET_KAFKA_BOOTSTRAP"],
            messages=_env("EDGEFLEET_BENCH_KAFKA_MESSAGES", 300_000),
        ))
        figures.update(_e2e(env, seconds, _env("EDGEFLEET_BENCH_CLIENTS", 4)))
    figures["cpus"] = os.cpu_count() or 0
    return {key: round(value) if isinstance(value, float) and value > 1000 else value
            for key, value in figures.items()}
