"""The durable store-and-forward buffer: every sample lands here before anything else.

`SqliteBuffer` turns source `Sample`s into wire `Reading`s by giving each one its device
and a per-device `seq`, stores them in one SQLite file, and hands them to the forwarder as
contiguous `Batch`es that leave the buffer only when the fog acknowledges them.

Contracts
---------
**seq.** Per device, seqs start at 1 and are assigned by `append` in call order. The
counter is stored in the same transaction as the rows, so after any restart the next seq
is exactly one past the last *committed* row: committed seqs never repeat and never skip.
The only gaps in a device's seq space are made on purpose, each one counted: rows dropped
by `when_full="drop_oldest"` (`dropped`), raw rows replaced by aggregates under
`when_full="downsample"` (`compacted`), acknowledged rows, and dead-lettered batches.

**Commits and what a crash loses.** `append` stages rows in memory and commits them in
transactions of at most `commit_rows` rows: as soon as `commit_rows` rows are staged, when
`commit_interval_s` has passed since the oldest staged row (checked by `append`,
`flush_if_due`, `claim_batch` and `stats`), and on `flush()`/`close()`. The journal is WAL
with `synchronous=NORMAL`: a committed transaction is in the WAL file when COMMIT returns,
so a *process* crash (kill -9, OOM kill, segfault) loses exactly the staged rows, at most
`commit_rows` plus the rows of the `append` call in progress, and never a committed one;
`committed_seq(device)` is the boundary. A *power cut* or kernel crash can also roll back
the transactions committed since the last WAL checkpoint (SQLite fsyncs the WAL only at
checkpoints under NORMAL); the file stays consistent, the rolled-back rows' seqs are
reissued, and set `synchronous="FULL"` (one fsync per commit, i.e. at most
1/`commit_interval_s` fsyncs per second plus one per `commit_rows` rows) to close that
window. Seqs that a crash made the buffer reissue were never visible outside the process:
nothing is claimable before it is committed.

**Forwarding is at-least-once.** `claim_batch` returns the oldest unacknowledged committed
rows of one device as a contiguous seq range and leases them for `claim_lease_s`;
`ack` deletes them (commit-on-acknowledge); `release` or an expired lease makes them
claimable again, and so does a restart (leases live in memory). `dead_letter` moves a
refused batch into the dead-letter tables, where it is counted, listed and kept until an
operator deletes it.

**Bounded.** Staged rows are bounded by `commit_rows` (plus the call in progress); reads
go through the primary key `(device_id, seq)` a batch at a time, never the whole backlog;
the series dictionary is bounded by `max_series`. The file is bounded by `max_bytes` and
the free-disk guard `min_free_bytes` (and optionally `max_rows`): see `BufferConfig` for
the `when_full` policies and the slack.

**Threading.** Every public method takes an internal lock, so calls are serialized and the
buffer is safe to share between threads; they block on disk I/O (a commit is typically
well under a millisecond, a commit that runs the full policy or `open` with its integrity
check can take much longer), so the asyncio agent calls them from one executor thread,
never on the event loop. One process owns a buffer file at a time: `open` takes an
exclusive `flock` on `<path>.lock` (released by the kernel when the process dies) and
raises `BufferLocked` if another process holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import (
    IDENTIFIER_PATTERN,
    MAX_BATCH_READINGS,
    Batch,
    Quality,
    Reading,
)

__all__ = [
    "AGGREGATE_SUFFIXES",
    "BufferConfig",
    "BufferFull",
    "BufferLocked",
    "BufferOpenError",
    "BufferStats",
    "DeadLetter",
    "DeviceStats",
    "SqliteBuffer",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
MAX_INT64: Final = 2**63 - 1
# Tag suffixes of the aggregate series that `when_full="downsample"` writes. A raw tag that
# already ends in one of these is indistinguishable from an aggregate on the wire.
AGGREGATE_SUFFIXES: Final = (":min", ":max", ":mean")
_KIND_RAW: Final = 0  # series kinds: raw, then 1, 2, 3 = min, max, mean
_QUALITY_CODE: Final[dict[Quality, int]] = {Quality.GOOD: 0, Quality.UNCERTAIN: 1, Quality.BAD: 2}
_QUALITY_OF_CODE: Final = (Quality.GOOD, Quality.UNCERTAIN, Quality.BAD)
_IDENTIFIER: Final = re.compile(IDENTIFIER_PATTERN)
_CORRUPTION_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE devices (
    device_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL,       -- one past the last committed seq
    depth INTEGER NOT NULL,          -- rows in `readings`
    dropped INTEGER NOT NULL,        -- rows deleted by drop_oldest
    compacted INTEGER NOT NULL,      -- raw rows replaced by aggregates
    aggregates INTEGER NOT NULL,     -- aggregate rows written
    compact_cursor INTEGER NOT NULL  -- rows with seq <= this were considered for compaction
);
CREATE TABLE series (
    series_id INTEGER PRIMARY KEY,
    asset TEXT NOT NULL,
    tag TEXT NOT NULL,
    kind INTEGER NOT NULL,
    UNIQUE (asset, tag, kind)
);
CREATE TABLE readings (
    device_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value REAL,
    quality INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE TABLE dlq_batches (
    dlq_id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at INTEGER NOT NULL
);
CREATE TABLE dlq_readings (
    dlq_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value REAL,
    quality INTEGER NOT NULL,
    PRIMARY KEY (dlq_id, seq)
) WITHOUT ROWID;
"""

# The hot-path queries; `SqliteBuffer.query_plans()` shows how SQLite runs them.
_SQL_INSERT: Final = (
    "INSERT INTO readings (device_id, seq, series_id, ts, value, quality) VALUES (?,?,?,?,?,?)"
)
_SQL_CLAIM: Final = (
    "SELECT seq, series_id, ts, value, quality FROM readings"
    " WHERE device_id = ? AND seq >= ? AND seq < ? ORDER BY seq LIMIT ?"
)
_SQL_ACK: Final = "DELETE FROM readings WHERE device_id = ? AND seq >= ? AND seq <= ?"
_SQL_HEAD: Final = "SELECT seq, ts FROM readings WHERE device_id = ? ORDER BY seq LIMIT 1"
_SQL_NTH_SEQ: Final = "SELECT seq FROM readings WHERE device_id = ? ORDER BY seq LIMIT 1 OFFSET ?"


class BufferConfig(BaseModel):
    """Where the buffer lives, how big it may get and what happens when it is full.

    Full means any of: the buffer's bytes (live database pages plus the WAL) exceed
    `max_bytes`; the filesystem's free space would drop below `min_free_bytes` if the
    file grew; `max_rows` (if set) unacknowledged rows are stored. Fullness is checked
    at the end of each commit, so the buffer can overshoot by one commit's worth of rows
    (at most `commit_rows` rows, plus the rows of one `append` call larger than that):
    that is the documented slack of every cap. On disk, the files can also exceed
    `max_bytes` by what one transaction writes to the WAL before it is checkpointed
    (roughly the pages that `commit_rows` rows, or one `compact_chunk_rows` compaction
    step, touch; the WAL is truncated after every policy pass) plus SQLite's 32 KiB `-shm`
    index: with a 1 MiB cap and 1,000-row commits the measured peak was cap + 80 KiB.

    `when_full`:
    * `block`: `append` raises `BufferFull` (accepting none of that call's samples) until
      acknowledgements bring usage back to `low_watermark` × cap. Accepted rows are never
      dropped. The caller holds its sources and retries (`SqliteBuffer.accepting()` tells
      it when to).
    * `drop_oldest`: in the same transaction, the oldest unacknowledged rows (of the
      device whose oldest row is oldest, repeatedly) are deleted until usage is at
      `low_watermark` × cap; each is counted in `dropped` per device. Their seqs become
      a gap on purpose: the fog's completeness accounting sees it, heartbeats explain it.
    * `downsample`: the oldest raw rows not yet considered are replaced, per
      (device, asset, tag, `downsample_bucket_s` bucket), by three aggregate readings with
      tags `<tag>:min`, `<tag>:max`, `<tag>:mean` at the bucket's start time, until usage is
      at `low_watermark` × cap. Replaced rows are counted in `compacted`, written ones in
      `aggregates`. Aggregates get fresh seqs from the device's counter (so batches stay
      contiguous and seqs never repeat); the replaced seqs become a counted gap. Aggregates
      are not compacted again: when nothing raw is left to compact the policy drops the
      oldest rows instead (counted in `dropped`). A bucket's aggregate quality is `good`
      if all its rows were good, `uncertain` otherwise, `bad` (value None) if no row had a
      value.
    In every policy, if nothing is left to drop (e.g. the disk is full of other files),
    `append` raises `BufferFull`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    max_bytes: Annotated[int, Field(ge=256 * 1024)] = 1024**3
    min_free_bytes: Annotated[int, Field(ge=0)] = 256 * 1024**2
    max_rows: Annotated[int, Field(ge=1)] | None = None
    when_full: Literal["block", "drop_oldest", "downsample"] = "block"
    # Full policies work down to this fraction of the cap, so they run in chunks rather
    # than on every commit; `block` also resumes accepting below it.
    low_watermark: Annotated[float, Field(ge=0.5, le=1.0)] = 0.9
    commit_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.1
    commit_rows: Annotated[int, Field(ge=1, le=100_000)] = 1000
    downsample_bucket_s: Annotated[float, Field(gt=0)] = 60.0
    # Rows read per downsample step (bounded memory while compacting).
    compact_chunk_rows: Annotated[int, Field(ge=16, le=1_000_000)] = 20_000
    claim_lease_s: Annotated[float, Field(gt=0)] = 30.0
    max_series: Annotated[int, Field(ge=1)] = 100_000
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    # `quick`: PRAGMA quick_check at open (O(file size)); a corrupt file is quarantined.
    check_on_open: Literal["quick", "none"] = "quick"
    cache_kib: Annotated[int, Field(ge=256, le=1024 * 1024)] = 4096

    @model_validator(mode="after")
    def _commit_fits_cap(self) -> BufferConfig:
        if self.max_rows is not None and self.commit_rows > self.max_rows:
            raise ValueError(
                f"commit_rows ({self.commit_rows}) must not exceed max_rows ({self.max_rows})"
            )
        return self

    def build(self) -> SqliteBuffer:
        """Open (or create) the buffer this config describes."""
        return SqliteBuffer.open(self)


class BufferFull(Exception):  # named like queue.Full: a signal the caller waits on
    """`append` refused a call: the buffer is full under `when_full="block"` (or nothing is
    left to drop). None of that call's samples were accepted; every earlier accepted row
    is kept. Wait until `SqliteBuffer.accepting()` is True (acks free space) and retry.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"buffer full: {reason}")
        self.reason = reason


class BufferLocked(RuntimeError):
    """Another process has this buffer file open."""


class BufferOpenError(RuntimeError):
    """The file is a healthy SQLite database but not a buffer this agent can use (another
    application's database, a newer schema). Never quarantined: it may be someone's data."""


class _CorruptFile(Exception):
    """SQLite reports the file corrupt or not a database: it is quarantined."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceStats:
    committed_seq: int  # last committed seq (0: none yet)
    depth: int  # unacknowledged committed rows
    dropped: int
    compacted: int
    aggregates: int


@dataclasses.dataclass(frozen=True, slots=True)
class BufferStats:
    """Counters for metrics and heartbeats. `*_total` and per-device counters persist
    across restarts; `commits`, `staged`, `appends_refused`, `coerced` count since open."""

    depth: int  # committed, unacknowledged rows
    staged: int  # accepted, not yet committed rows (a crash loses these)
    oldest_unacked_ts: int | None  # ts of the first unacked row in seq order, min over devices
    bytes_on_disk: int  # database + WAL + shared-memory files
    used_bytes: int  # what the cap is checked against: live pages + WAL
    dropped_total: int
    compacted_total: int
    aggregates_total: int
    dlq_batches: int
    dlq_rows: int
    commits: int
    full: bool  # appends are being refused (block, or nothing left to drop)
    full_reason: str | None
    appends_refused: int
    coerced: int  # samples stored as quality bad: value None with quality good, or NaN/inf
    quarantined_total: int  # corrupt files moved aside, ever (persisted in the new file)
    quarantined_path: str | None  # the last one
    devices: dict[str, DeviceStats]


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    dlq_id: int
    device: str
    first_seq: int
    last_seq: int
    rows: int
    reason: str
    dead_at_ns: int


@dataclasses.dataclass(slots=True)
class _Device:
    device_id: int
    name: str
    next_seq: int  # next seq to assign (staged rows included)
    committed_next: int  # one past the last committed seq
    depth: int
    dropped: int
    compacted: int
    aggregates: int
    compact_cursor: int


@dataclasses.dataclass(slots=True)
class _Lease:
    first_seq: int
    last_seq: int
    expires: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Usage:
    used: int
    cap: float
    depth: int
    max_rows: int | None
    reason: str | None  # set when over the cap

    def over(self, fraction: float = 1.0) -> bool:
        if self.used > self.cap * fraction:
            return True
        return self.max_rows is not None and self.depth > self.max_rows * fraction


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def _wal_pages(config: BufferConfig, page_size: int) -> int:
    """WAL auto-checkpoint threshold: about a tenth of the cap, SQLite's default at most."""
    return min(1000, max(16, config.max_bytes // page_size // 10))


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class SqliteBuffer:
    """See the module docstring for the contracts. Create with `SqliteBuffer.open`."""

    def __init__(
        self,
        config: BufferConfig,
        conn: sqlite3.Connection,
        lock_fd: int,
        *,
        clock: Callable[[], float],
        disk_free: Callable[[Path], int],
    ) -> None:
        """Internal: use `open`, which does the I/O and recovery."""
        self.config = config
        # Set by `open` when it moved a corrupt file aside: the quarantined file's path.
        self.quarantined_at_open: str | None = None
        self._conn = conn
        self._lock_fd = lock_fd
        self._clock = clock
        self._disk_free = disk_free
        self._lock = threading.RLock()
        self._closed = False
        self._devices: dict[str, _Device] = {}
        self._devices_by_id: dict[int, _Device] = {}
        self._series: dict[tuple[str, str, int], int] = {}
        self._series_by_id: dict[int, tuple[str, str, int]] = {}
        self._pending_series: list[tuple[int, str, str, int]] = []
        self._pending_devices: list[_Device] = []
        self._leases: dict[int, list[_Lease]] = {}
        self._staged: list[tuple[int, int, int, int, float | None, int]] = []
        self._staged_since = 0.0
        self._rr = 0  # round-robin position for claim_batch(device=None)
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._bucket_ns = max(1, round(config.downsample_bucket_s * 1e9))
        self._full_reason: str | None = None
        self._checkpoint_after_commit = False
        self._full_checked = 0.0
        self.commits = 0
        self.appends_refused = 0
        self.coerced = 0
        self._load_state()

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        config: BufferConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        disk_free: Callable[[Path], int] = _disk_free,
    ) -> SqliteBuffer:
        """Open or create the buffer at `config.path`, recovering after a crash.

        A file SQLite reports as corrupt or not a database (at open or in `quick_check`)
        is quarantined: it and its `-wal`/`-shm` files are renamed to
        `<name>.corrupt-<UTC time>[-wal|-shm]`, an ERROR is logged, a fresh buffer is
        created and `stats().quarantined_total`/`quarantined_path` report it. `clock`
        (monotonic seconds) and `disk_free` (free bytes of the filesystem holding a path)
        are injectable for tests.
        """
        path = config.path
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(lock_fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BufferLocked(f"buffer {path} is open in another process") from err
            raise
        try:
            quarantined: str | None = None
            try:
                conn = cls._connect(config)
            except _CorruptFile as err:
                quarantined = cls._quarantine(path, str(err))
                conn = cls._connect(config)
            if quarantined is not None:
                with conn:
                    conn.execute(
                        "UPDATE meta SET value = value + 1 WHERE key = 'quarantined_total'"
                    )
                    conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('quarantined_path', ?)",
                        (quarantined,),
                    )
            buffer = cls(config, conn, lock_fd, clock=clock, disk_free=disk_free)
            buffer.quarantined_at_open = quarantined
            return buffer
        except BaseException:
            os.close(lock_fd)  # closing the descriptor releases the flock
            raise

    @staticmethod
    def _connect(config: BufferConfig) -> sqlite3.Connection:
        """Connect, check integrity, create the schema if new. Raises DatabaseError with
        a corruption code for a file that must be quarantined."""
        conn = sqlite3.connect(
            config.path, isolation_level=None, check_same_thread=False, timeout=5.0
        )
        try:
            SqliteBuffer._prepare(conn, config)
        except sqlite3.DatabaseError as err:
            conn.close()
            if getattr(err, "sqlite_errorcode", 0) & 0xFF in _CORRUPTION_CODES:
                raise _CorruptFile(str(err)) from err
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _prepare(conn: sqlite3.Connection, config: BufferConfig) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch {config.path} to WAL ({mode})")
        # NORMAL: see the module docstring for what survives a power cut vs a crash.
        conn.execute(f"PRAGMA synchronous={config.synchronous}")
        conn.execute(f"PRAGMA cache_size=-{config.cache_kib}")
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        # Keep the WAL to about a tenth of the cap; it counts against max_bytes.
        wal_pages = _wal_pages(config, page_size)
        conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
        conn.execute(f"PRAGMA journal_size_limit={wal_pages * page_size}")
        if config.check_on_open == "quick":
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise _CorruptFile("quick_check: " + "; ".join(map(str, problems)))
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables:
            # One transaction: a crash while creating leaves an empty file, not half a schema.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT INTO meta VALUES ('quarantined_total', 0)")
            conn.execute("COMMIT")
        elif "meta" not in tables:
            raise BufferOpenError(
                f"{config.path} is an SQLite database but not an edgefleet buffer"
            )
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise BufferOpenError(
                f"{config.path} has buffer schema {version and version[0]}, "
                f"this agent reads {SCHEMA_VERSION}"
            )

    @staticmethod
    def _quarantine(path: Path, why: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
        log.error(
            "buffer file %s is corrupt (%s): quarantined as %s, starting a fresh buffer; "
            "rows in the quarantined file are not forwarded",
            path,
            why,
            target,
        )
        return str(target)

    def _load_state(self) -> None:
        for row in self._conn.execute(
            "SELECT device_id, name, next_seq, depth, dropped, compacted, aggregates,"
            " compact_cursor FROM devices"
        ):
            device = _Device(row[0], row[1], row[2], *row[2:])
            self._devices[device.name] = device
            self._devices_by_id[device.device_id] = device
        for series_id, asset, tag, kind in self._conn.execute(
            "SELECT series_id, asset, tag, kind FROM series"
        ):
            self._series[(asset, tag, kind)] = series_id
            self._series_by_id[series_id] = (asset, tag, kind)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Commit staged rows, checkpoint the WAL into the database and release the file."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush()
                with contextlib.suppress(sqlite3.OperationalError):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._closed = True
                self._conn.close()
                os.close(self._lock_fd)

    def __enter__(self) -> SqliteBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- appending ----------------------------------------------------------------------

    def append(self, device: str, samples: Sequence[Sample]) -> list[int]:
        """Accept `samples` from `device` and return the seq given to each, in order.

        All or nothing: a sample that cannot become a valid Reading (an asset or tag that
        is not an identifier, a timestamp outside 0..2**63-1, too many distinct series)
        raises ValueError and none of the call's samples are accepted; under a full
        `block` buffer BufferFull is raised likewise. A value None with quality good, or a
        NaN/inf value, is stored as value None with quality bad and counted in `coerced`.
        Accepted rows are staged and committed as the module docstring says.
        """
        with self._lock:
            self._check_open()
            if self._full_reason is not None and not self._recheck_full():
                self.appends_refused += 1
                raise BufferFull(self._full_reason)
            if self._staged and len(self._staged) + len(samples) > self.config.commit_rows:
                # Commit what is staged first, so transactions stay full but within
                # commit_rows; before any seq of this call is assigned (see _flush).
                self._commit_accepted(due_only=False)
                if self._full_reason is not None:
                    self.appends_refused += 1
                    raise BufferFull(self._full_reason)
            dev = self._devices.get(device) or self._new_device(device)
            dev_id = dev.device_id
            seq = dev.next_seq
            series = self._series
            quality_code = _QUALITY_CODE
            isfinite = math.isfinite
            rows: list[tuple[int, int, int, int, float | None, int]] = []
            add = rows.append
            for index, sample in enumerate(samples):
                series_id = series.get((sample.asset, sample.tag, _KIND_RAW))
                if series_id is None:
                    series_id = self._new_series(sample.asset, sample.tag, _KIND_RAW, index)
                ts = sample.ts_ns
                if not 0 <= ts <= MAX_INT64:
                    raise ValueError(f"samples[{index}].ts_ns={ts!r} is outside 0..2**63-1")
                try:
                    quality = quality_code[sample.quality]
                except KeyError:
                    raise ValueError(
                        f"samples[{index}].quality={sample.quality!r} is not a Quality"
                    ) from None
                value = sample.value
                if value is None:
                    if quality == 0:
                        quality = 2
                        self.coerced += 1
                elif not isfinite(value):
                    value = None
                    quality = 2
                    self.coerced += 1
                add((dev_id, seq, series_id, ts, value, quality))
                seq += 1
            if not rows:
                return []
            dev.next_seq = seq
            if not self._staged:
                self._staged_since = self._clock()
            self._staged.extend(rows)
            # The rows are accepted from here on: a failed commit keeps them staged (it is
            # retried) and refuses further appends, rather than failing this call.
            self._commit_accepted(due_only=len(self._staged) < self.config.commit_rows)
            return list(range(seq - len(rows), seq))

    def _new_device(self, name: str) -> _Device:
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise ValueError(f"device name {name!r} is not an identifier ({IDENTIFIER_PATTERN})")
        device_id = max(self._devices_by_id, default=0) + 1
        device = _Device(device_id, name, 1, 1, 0, 0, 0, 0, 0)
        self._devices[name] = device
        self._devices_by_id[device_id] = device
        self._pending_devices.append(device)
        return device

    def _new_series(self, asset: str, tag: str, kind: int, index: int = -1) -> int:
        where = f"samples[{index}]" if index >= 0 else "aggregate"
        for field, name in (("asset", asset), ("tag", tag)):
            if not isinstance(name, str) or not _IDENTIFIER.match(name):
                raise ValueError(f"{where}.{field}={name!r} is not an identifier")
        if len(self._series) >= self.config.max_series:
            raise ValueError(
                f"{where}: more than max_series={self.config.max_series} distinct "
                f"(asset, tag) series; refusing {asset}/{tag}"
            )
        series_id = max(self._series_by_id, default=0) + 1
        self._series[(asset, tag, kind)] = series_id
        self._series_by_id[series_id] = (asset, tag, kind)
        self._pending_series.append((series_id, asset, tag, kind))
        return series_id

    # --- committing ---------------------------------------------------------------------

    def flush(self) -> int:
        """Commit every staged row now; return how many were committed."""
        with self._lock:
            self._check_open()
            return self._flush()

    def flush_if_due(self) -> int:
        """Commit staged rows if the oldest has waited `commit_interval_s`. The agent calls
        this (or `claim_batch`/`stats`, which do it too) at least that often when its
        sources go quiet, so the commit latency bound holds without a timer thread."""
        with self._lock:
            self._check_open()
            return self._flush_if_due()

    def _commit_accepted(self, due_only: bool) -> None:
        try:
            if due_only:
                self._flush_if_due()
            else:
                self._flush()
        except sqlite3.Error as err:
            if self._full_reason is None:
                log.error("buffer commit failed, refusing appends until it succeeds: %s", err)
            self._full_reason = f"commit failed: {err}"
            self._full_checked = self._clock()

    def _flush_if_due(self) -> int:
        if self._staged and self._clock() - self._staged_since >= self.config.commit_interval_s:
            return self._flush()
        return 0

    def committed_seq(self, device: str) -> int:
        """The last seq of `device` that is committed (0 if none): a crash loses none of
        the rows at or below it that were not acknowledged, dropped or compacted."""
        with self._lock:
            dev = self._devices.get(device)
            return 0 if dev is None else dev.committed_next - 1

    def _flush(self) -> int:
        """Commit staged rows in transactions of at most commit_rows. The full policy runs
        in the last one, when nothing is staged, so the seqs it gives aggregates follow
        every assigned seq and a crash can never leave an uncounted gap."""
        committed = 0
        staged = self._staged
        if not staged and not self._pending_devices and not self._pending_series:
            return 0
        step = self.config.commit_rows
        start = 0
        try:
            while True:
                chunk = staged[start : start + step]
                last = start + step >= len(staged)
                with self._write():
                    if chunk:
                        self._conn.executemany(_SQL_INSERT, chunk)
                        # Rows are staged in seq order per device: the last one wins.
                        last_seq = dict(
                            zip(map(itemgetter(0), chunk), map(itemgetter(1), chunk), strict=True)
                        )
                        for device_id, rows in Counter(map(itemgetter(0), chunk)).items():
                            dev = self._devices_by_id[device_id]
                            dev.depth += rows
                            dev.committed_next = last_seq[device_id] + 1
                    if last:
                        self._enforce_cap()
                if self._checkpoint_after_commit:
                    self._checkpoint_after_commit = False
                    with contextlib.suppress(sqlite3.OperationalError):
                        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                committed += len(chunk)
                start += len(chunk)
                if last:
                    break
        finally:
            del staged[:start]
            if staged:
                self._staged_since = self._clock()
        return committed

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; in-memory device state is restored if it fails."""
        snapshot = {k: dataclasses.replace(v) for k, v in self._devices_by_id.items()}
        pending_devices = list(self._pending_devices)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            if self._pending_series:
                conn.executemany("INSERT INTO series VALUES (?,?,?,?)", self._pending_series)
            if self._pending_devices:
                conn.executemany(
                    "INSERT INTO devices VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (
                            d.device_id,
                            d.name,
                            d.committed_next,
                            d.depth,
                            d.dropped,
                            d.compacted,
                            d.aggregates,
                            d.compact_cursor,
                        )
                        for d in self._pending_devices
                    ],
                )
            conn.executemany(
                "UPDATE devices SET next_seq=?, depth=?, dropped=?, compacted=?, aggregates=?,"
                " compact_cursor=? WHERE device_id=?",
                [
                    (
                        d.committed_next,
                        d.depth,
                        d.dropped,
                        d.compacted,
                        d.aggregates,
                        d.compact_cursor,
                        d.device_id,
                    )
                    for d in self._devices_by_id.values()
                ],
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            # The snapshot was taken with every staged row's seq already assigned, so
            # restoring next_seq too gives back only the seqs this transaction allocated.
            for device_id, saved in snapshot.items():
                dev = self._devices_by_id[device_id]
                for field in dataclasses.fields(_Device):
                    setattr(dev, field.name, getattr(saved, field.name))
            self._pending_devices = pending_devices
            raise
        self._pending_series.clear()
        self._pending_devices.clear()
        self.commits += 1

    # --- the full policy ----------------------------------------------------------------

    def _usage(self) -> _Usage:
        conn = self._conn
        page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
        freelist = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        wal = _file_size(Path(f"{self.config.path}-wal"))
        on_disk = page_count * self._page_size + wal + _file_size(Path(f"{self.config.path}-shm"))
        used = (page_count - freelist) * self._page_size + wal
        cap: float = self.config.max_bytes
        reason = "max_bytes"
        if self.config.min_free_bytes:
            # Growing the file may use the free space above the guard; pages inside the
            # file (used or free) are ours already.
            free = self._disk_free(self.config.path.parent)
            disk_cap = on_disk + free - self.config.min_free_bytes
            if disk_cap < cap:
                cap, reason = disk_cap, "min_free_bytes"
        depth = sum(d.depth for d in self._devices_by_id.values())
        usage = _Usage(used, cap, depth, self.config.max_rows, None)
        if usage.used > usage.cap:
            return dataclasses.replace(usage, reason=reason)
        if usage.over():
            return dataclasses.replace(usage, reason="max_rows")
        return usage

    def _enforce_cap(self) -> None:
        """Inside the last commit of a flush: apply `when_full` if over the cap."""
        usage = self._usage()
        if not usage.over():
            return
        policy = self.config.when_full
        if policy == "block":
            self._set_full(usage.reason)
            return
        reason = usage.reason
        before = {d.device_id: (d.dropped, d.compacted) for d in self._devices_by_id.values()}
        low = self.config.low_watermark
        while usage.over(low):
            freed = self._compact_step(usage) if policy == "downsample" else 0
            if not freed:
                freed = self._drop_step(usage)
            if not freed:
                break
            usage = self._usage()
        # The pass's transaction may have stretched the WAL: give it back after commit.
        self._checkpoint_after_commit = True
        for dev in self._devices_by_id.values():
            dropped, compacted = before.get(dev.device_id, (0, 0))
            if (dev.dropped, dev.compacted) != (dropped, compacted):
                log.warning(
                    "buffer full (%s, policy %s): %s dropped %d and downsampled %d of its "
                    "oldest rows (totals %d and %d)",
                    reason,
                    policy,
                    dev.name,
                    dev.dropped - dropped,
                    dev.compacted - compacted,
                    dev.dropped,
                    dev.compacted,
                )
        if usage.over():
            self._set_full(f"{reason} and nothing left to {policy.replace('_', ' ')}")

    def _rows_to_free(self, usage: _Usage) -> int:
        low = self.config.low_watermark
        rows = 0
        if usage.max_rows is not None and usage.depth > usage.max_rows * low:
            rows = usage.depth - math.floor(usage.max_rows * low)
        excess = usage.used - usage.cap * low
        if excess > 0 and usage.depth:
            per_row = max(1.0, usage.used / usage.depth)
            rows = max(rows, math.ceil(excess / per_row), 64)
        return max(rows, 1)

    def _oldest_device(self, after_cursor: bool) -> tuple[_Device, int] | None:
        """The device whose first row (after its compaction cursor, if asked) is oldest,
        with that row's seq."""
        best: tuple[int, _Device, int] | None = None
        for dev in self._devices_by_id.values():
            if dev.depth == 0:
                continue
            floor = dev.compact_cursor + 1 if after_cursor else 0
            row = self._conn.execute(
                "SELECT seq, ts FROM readings WHERE device_id = ? AND seq >= ?"
                " ORDER BY seq LIMIT 1",
                (dev.device_id, floor),
            ).fetchone()
            if row is not None and (best is None or row[1] < best[0]):
                best = (row[1], dev, row[0])
        return None if best is None else (best[1], best[2])

    def _drop_step(self, usage: _Usage) -> int:
        found = self._oldest_device(after_cursor=False)
        if found is None:
            return 0
        dev, _ = found
        rows = min(self._rows_to_free(usage), dev.depth)
        nth = self._conn.execute(_SQL_NTH_SEQ, (dev.device_id, rows - 1)).fetchone()
        dropped = self._conn.execute(_SQL_ACK, (dev.device_id, 0, nth[0])).rowcount
        dev.depth -= dropped
        dev.dropped += dropped
        return int(dropped)

    def _compact_step(self, usage: _Usage) -> int:
        """Replace the oldest not-yet-considered raw rows of one device by aggregates.
        Returns the net number of rows freed (0 when nothing raw is left to compact)."""
        while True:
            found = self._oldest_device(after_cursor=True)
            if found is None:
                return 0
            dev, first = found
            chunk = self._conn.execute(
                _SQL_CLAIM,
                (dev.device_id, first, MAX_INT64, self.config.compact_chunk_rows),
            ).fetchall()
            freed = self._compact_rows(dev, chunk)
            dev.compact_cursor = chunk[-1][0]
            if freed > 0:
                return freed

    def _compact_rows(
        self, dev: _Device, chunk: list[tuple[int, int, int, float | None, int]]
    ) -> int:
        kinds = self._series_by_id
        groups: dict[tuple[int, int], list[tuple[int, float | None, int]]] = {}
        bucket_ns = self._bucket_ns
        for seq, series_id, ts, value, quality in chunk:
            if kinds[series_id][2] != _KIND_RAW:
                continue  # aggregates are kept as they are
            key = (series_id, ts - ts % bucket_ns)
            groups.setdefault(key, []).append((seq, value, quality))
        raw = sum(map(len, groups.values()))
        if raw == 0 or 3 * len(groups) >= raw:
            return 0  # nothing to gain here: move the cursor on
        aggregates: list[tuple[int, int, int, int, float | None, int]] = []
        seq = dev.next_seq
        for (series_id, bucket_ts), members in sorted(
            groups.items(), key=lambda item: (item[0][1], item[0][0])
        ):
            asset, tag, _ = kinds[series_id]
            values = [v for _, v, _ in members if v is not None]
            if not values:
                stats: tuple[float | None, ...] = (None, None, None)
                quality = 2
            else:
                stats = (min(values), max(values), math.fsum(values) / len(values))
                quality = 0 if all(q == 0 for _, _, q in members) else 1
            base = tag[: 128 - max(map(len, AGGREGATE_SUFFIXES))]
            for kind, (suffix, value) in enumerate(zip(AGGREGATE_SUFFIXES, stats, strict=True), 1):
                agg_id = self._series.get((asset, base + suffix, kind))
                if agg_id is None:
                    agg_id = self._new_series(asset, base + suffix, kind)
                aggregates.append((dev.device_id, seq, agg_id, bucket_ts, value, quality))
                seq += 1
        self._conn.executemany(
            "DELETE FROM readings WHERE device_id = ? AND seq = ?",
            [(dev.device_id, s) for members in groups.values() for s, _, _ in members],
        )
        self._conn.executemany(_SQL_INSERT, aggregates)
        dev.next_seq = dev.committed_next = seq
        dev.depth += len(aggregates) - raw
        dev.compacted += raw
        dev.aggregates += len(aggregates)
        return raw - len(aggregates)

    def _set_full(self, reason: str | None) -> None:
        if self._full_reason is None:
            log.warning("buffer full (%s): refusing appends until space is freed", reason)
        self._full_reason = reason or "full"
        self._full_checked = self._clock()

    def _recheck_full(self) -> bool:
        """True (and no longer full) if usage is back under the low watermark. Checked at
        most once per commit interval while full."""
        now = self._clock()
        if now - self._full_checked < self.config.commit_interval_s:
            return False
        return self._update_full()

    def _update_full(self) -> bool:
        self._full_checked = self._clock()
        if self._staged:
            try:
                self._flush()
            except sqlite3.Error:
                return False
        usage = self._usage()
        if usage.over(self.config.low_watermark):
            return False
        log.warning("buffer accepting appends again (was full: %s)", self._full_reason)
        self._full_reason = None
        return True

    def accepting(self) -> bool:
        """Whether `append` would accept samples now (rechecks usage if it was full)."""
        with self._lock:
            self._check_open()
            return self._full_reason is None or self._update_full()

    # --- forwarding ---------------------------------------------------------------------

    def claim_batch(
        self, device: str | None = None, max_rows: int = 1000, *, min_seq: int = 0
    ) -> Batch | None:
        """The oldest unacknowledged, unleased committed rows of one device, as a Batch.

        With `device` None the devices take turns (round robin), so one device's backlog
        cannot starve another's. The batch is the longest contiguous seq range from the
        first claimable row, up to `max_rows` (1..MAX_BATCH_READINGS), stopping at a gap or
        at a leased range. Its rows stay in the buffer, leased for `claim_lease_s`, until
        `ack`; `release` or lease expiry makes them claimable again. None if there is
        nothing to claim.

        `min_seq` skips rows below it: the forwarder claims live data (from the seq where
        an outage ended) ahead of the backlog this way.
        """
        if not 1 <= max_rows <= MAX_BATCH_READINGS:
            raise ValueError(f"max_rows must be 1..{MAX_BATCH_READINGS}, got {max_rows}")
        with self._lock:
            self._check_open()
            self._commit_accepted(due_only=True)
            if device is not None:
                dev = self._devices.get(device)
                return None if dev is None else self._claim_from(dev, max_rows, min_seq)
            devices = list(self._devices_by_id.values())
            for offset in range(len(devices)):
                dev = devices[(self._rr + offset) % len(devices)]
                batch = self._claim_from(dev, max_rows, min_seq)
                if batch is not None:
                    self._rr = (self._rr + offset + 1) % len(devices)
                    return batch
            return None

    def _claim_from(self, dev: _Device, max_rows: int, min_seq: int = 0) -> Batch | None:
        if dev.depth == 0:
            return None
        now = self._clock()
        leases = sorted(
            (lease for lease in self._leases.get(dev.device_id, ()) if lease.expires > now),
            key=lambda lease: lease.first_seq,
        )
        self._leases[dev.device_id] = leases
        start = min_seq
        rows: list[Any] = []
        # Find the first row that no live lease covers; leases are few (batches in flight).
        for lease in [*leases, None]:
            stop = MAX_INT64 if lease is None else lease.first_seq
            if start < stop:
                rows = self._conn.execute(
                    _SQL_CLAIM, (dev.device_id, start, stop, max_rows)
                ).fetchall()
                if rows:
                    break
            if lease is not None:
                start = max(start, lease.last_seq + 1)
        if not rows:
            return None
        first_seq = rows[0][0]
        count = len(rows)
        if rows[-1][0] - first_seq + 1 != count:
            count = next(i for i, row in enumerate(rows) if row[0] != first_seq + i)
        series = self._series_by_id
        name = dev.name
        qualities = _QUALITY_OF_CODE
        readings = tuple(
            Reading(name, series[sid][0], series[sid][1], ts, value, qualities[q], seq)
            for seq, sid, ts, value, q in rows[:count]
        )
        last_seq = first_seq + count - 1
        leases.append(_Lease(first_seq, last_seq, now + self.config.claim_lease_s))
        return Batch(
            device=name,
            first_seq=first_seq,
            last_seq=last_seq,
            readings=readings,
            sent_at=time.time_ns(),
        )

    def ack(self, device: str, last_seq: int, *, first_seq: int | None = None) -> int:
        """The fog has stored `device`'s rows up to `last_seq` (from `first_seq`, if given;
        otherwise every row up to `last_seq`, a cumulative ack): delete them in one
        committed transaction and return how many were deleted. Acknowledging a seq that
        was never committed is a ValueError. Acking a range twice is harmless."""
        with self._lock:
            self._check_open()
            dev = self._devices.get(device)
            if dev is None or last_seq >= dev.committed_next:
                committed = 0 if dev is None else dev.committed_next - 1
                raise ValueError(
                    f"cannot ack {device!r} up to seq {last_seq}: last committed seq is {committed}"
                )
            low = 0 if first_seq is None else first_seq
            with self._write():
                deleted = int(self._conn.execute(_SQL_ACK, (dev.device_id, low, last_seq)).rowcount)
                dev.depth -= deleted
            self._forget_leases(dev, low, last_seq)
            if self._full_reason is not None:
                self._update_full()
            return deleted

    def release(self, device: str, first_seq: int) -> None:
        """Give back the claim on the batch starting at `first_seq` (the send failed and
        will be retried): its rows are claimable again at once."""
        with self._lock:
            dev = self._devices.get(device)
            if dev is not None:
                self._leases[dev.device_id] = [
                    lease
                    for lease in self._leases.get(dev.device_id, ())
                    if lease.first_seq != first_seq
                ]

    def release_all(self) -> int:
        """Give back every claim (the forwarder stopped: nothing is in flight); returns how
        many were dropped."""
        with self._lock:
            dropped = sum(len(leases) for leases in self._leases.values())
            self._leases.clear()
            return dropped

    def _forget_leases(self, dev: _Device, low: int, high: int) -> None:
        self._leases[dev.device_id] = [
            lease
            for lease in self._leases.get(dev.device_id, ())
            if lease.last_seq < low or lease.first_seq > high
        ]

    # --- dead letters -------------------------------------------------------------------

    def dead_letter(self, batch: Batch, reason: str) -> int:
        """Move a batch the fog refused for good (a 4xx) out of the forwarding queue into
        the dead-letter tables, exactly as it was sent, and return its DLQ id. Its rows
        leave `readings` in the same transaction: never retried, never silently lost."""
        with self._lock:
            self._check_open()
            dev = self._devices.get(batch.device)
            if dev is None or batch.last_seq >= dev.committed_next:
                raise ValueError(f"batch {batch.device}:{batch.first_seq} is not in this buffer")
            rows = []
            for reading in batch.readings:
                series_id = self._series.get((reading.asset, reading.tag, _KIND_RAW))
                if series_id is None:
                    series_id = self._new_series(reading.asset, reading.tag, _KIND_RAW)
                rows.append(
                    (
                        series_id,
                        reading.seq,
                        reading.ts,
                        reading.value,
                        _QUALITY_CODE[reading.quality],
                    )
                )
            with self._write():
                cursor = self._conn.execute(
                    "INSERT INTO dlq_batches (device, first_seq, last_seq, rows, reason, dead_at)"
                    " VALUES (?,?,?,?,?,?)",
                    (
                        batch.device,
                        batch.first_seq,
                        batch.last_seq,
                        len(rows),
                        reason[:2000],
                        time.time_ns(),
                    ),
                )
                dlq_id = int(cursor.lastrowid or 0)
                self._conn.executemany(
                    "INSERT INTO dlq_readings (dlq_id, series_id, seq, ts, value, quality)"
                    " VALUES (?,?,?,?,?,?)",
                    [(dlq_id, *row) for row in rows],
                )
                deleted = self._conn.execute(
                    _SQL_ACK, (dev.device_id, batch.first_seq, batch.last_seq)
                ).rowcount
                dev.depth -= int(deleted)
            self._forget_leases(dev, batch.first_seq, batch.last_seq)
            log.error(
                "dead-lettered batch %s seqs %d..%d (%d rows) as DLQ #%d: %s",
                batch.device,
                batch.first_seq,
                batch.last_seq,
                len(rows),
                dlq_id,
                reason,
            )
            return dlq_id

    def dlq_list(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest `limit` dead-lettered batches (summaries, not their rows)."""
        with self._lock:
            self._check_open()
            return [
                DeadLetter(*row)
                for row in self._conn.execute(
                    "SELECT dlq_id, device, first_seq, last_seq, rows, reason, dead_at"
                    " FROM dlq_batches ORDER BY dlq_id LIMIT ?",
                    (limit,),
                )
            ]

    def dlq_batch(self, dlq_id: int) -> Batch:
        """A dead-lettered batch, rebuilt exactly as it was refused (KeyError if unknown)."""
        with self._lock:
            self._check_open()
            head = self._conn.execute(
                "SELECT device, dead_at FROM dlq_batches WHERE dlq_id = ?", (dlq_id,)
            ).fetchone()
            if head is None:
                raise KeyError(dlq_id)
            series = self._series_by_id
            readings = tuple(
                Reading(
                    head[0], series[sid][0], series[sid][1], ts, value, _QUALITY_OF_CODE[q], seq
                )
                for seq, sid, ts, value, q in self._conn.execute(
                    "SELECT seq, series_id, ts, value, quality FROM dlq_readings"
                    " WHERE dlq_id = ? ORDER BY seq",
                    (dlq_id,),
                )
            )
            return Batch(
                device=head[0],
                first_seq=readings[0].seq,
                last_seq=readings[-1].seq,
                readings=readings,
                sent_at=head[1],
            )

    def dlq_delete(self, dlq_id: int) -> bool:
        """Delete a dead-lettered batch (an operator's decision); False if unknown."""
        with self._lock:
            self._check_open()
            with self._write():
                self._conn.execute("DELETE FROM dlq_readings WHERE dlq_id = ?", (dlq_id,))
                found = self._conn.execute(
                    "DELETE FROM dlq_batches WHERE dlq_id = ?", (dlq_id,)
                ).rowcount
            return bool(found)

    # --- observing ----------------------------------------------------------------------

    def stats(self) -> BufferStats:
        with self._lock:
            self._check_open()
            self._commit_accepted(due_only=True)
            conn = self._conn
            oldest: int | None = None
            for dev in self._devices_by_id.values():
                if dev.depth:
                    row = conn.execute(_SQL_HEAD, (dev.device_id,)).fetchone()
                    if row is not None and (oldest is None or row[1] < oldest):
                        oldest = row[1]
            dlq_batches, dlq_rows = conn.execute(
                "SELECT count(*), coalesce(sum(rows), 0) FROM dlq_batches"
            ).fetchone()
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            usage = self._usage()
            path = self.config.path
            devices = {
                d.name: DeviceStats(
                    d.committed_next - 1, d.depth, d.dropped, d.compacted, d.aggregates
                )
                for d in self._devices_by_id.values()
            }
            return BufferStats(
                depth=sum(d.depth for d in devices.values()),
                staged=len(self._staged),
                oldest_unacked_ts=oldest,
                bytes_on_disk=sum(_file_size(Path(f"{path}{s}")) for s in ("", "-wal", "-shm")),
                used_bytes=usage.used,
                dropped_total=sum(d.dropped for d in devices.values()),
                compacted_total=sum(d.compacted for d in devices.values()),
                aggregates_total=sum(d.aggregates for d in devices.values()),
                dlq_batches=int(dlq_batches),
                dlq_rows=int(dlq_rows),
                commits=self.commits,
                full=self._full_reason is not None,
                full_reason=self._full_reason,
                appends_refused=self.appends_refused,
                coerced=self.coerced,
                quarantined_total=int(meta.get("quarantined_total", 0)),
                quarantined_path=meta.get("quarantined_path"),
                devices=devices,
            )

    def verify(self) -> list[str]:
        """Check the stored counters against the rows (O(rows); for diagnostics and
        tests). Returns the problems found, empty when consistent."""
        with self._lock:
            self._check_open()
            problems = []
            for dev in self._devices_by_id.values():
                count, high = self._conn.execute(
                    "SELECT count(*), max(seq) FROM readings WHERE device_id = ?",
                    (dev.device_id,),
                ).fetchone()
                if count != dev.depth:
                    problems.append(f"{dev.name}: depth {dev.depth} but {count} rows")
                if high is not None and high >= dev.committed_next:
                    problems.append(
                        f"{dev.name}: row seq {high} at or above next seq {dev.committed_next}"
                    )
            orphans = self._conn.execute(
                "SELECT count(*) FROM readings"
                " WHERE series_id NOT IN (SELECT series_id FROM series)"
            ).fetchone()[0]
            if orphans:
                problems.append(f"{orphans} rows reference unknown series")
            return problems

    def query_plans(self) -> dict[str, str]:
        """How SQLite runs the hot-path queries (EXPLAIN QUERY PLAN), for diagnostics:
        claims and acks must search the primary key, never scan."""
        with self._lock:
            self._check_open()
            plans = {}
            for name, sql, params in (
                ("claim", _SQL_CLAIM, (1, 0, MAX_INT64, 1)),
                ("ack", _SQL_ACK, (1, 0, 1)),
                ("head", _SQL_HEAD, (1,)),
                ("nth_seq", _SQL_NTH_SEQ, (1, 0)),
            ):
                rows = self._conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
                plans[name] = "; ".join(str(row[-1]) for row in rows)
            return plans

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"buffer {self.config.path} is closed")
