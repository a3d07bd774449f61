"""Connecting to the control plane's database and migrating it with Alembic.

URLs: `postgresql://…` (psycopg 3 is used: the driver is added when the URL names none),
`sqlite:///abs/path.db` for the embedded default. `migrate` upgrades to the newest
revision in `migrations/versions/` and is safe to run at every start; several control
plane processes starting at once on PostgreSQL serialise on an advisory lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event, text

__all__ = ["HEAD", "MIGRATIONS", "connect", "current_revision", "lock_fleet", "migrate",
           "reader"]

MIGRATIONS: Final = Path(__file__).parent / "migrations"
HEAD: Final = "0001"
_LOCK_KEY: Final = 0x45464C54  # "EFLT": the advisory lock migrations hold on PostgreSQL
_FLEET_LOCK_KEY: Final = 0x45464C57  # "EFLW": held by transactions writing many devices


def connect(url: str, **options: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and enforced foreign keys."""
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    # Requests run on the server's thread pool (40 threads) and each holds a connection
    # for its transaction: the pool must not be the smaller of the two, or requests wait
    # for a connection until they time out.
    options = {"pool_size": 20, "max_overflow": 30, "pool_timeout": 30, **options}
    if url.startswith("sqlite:"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **options)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # The driver's own transaction handling starts a transaction only at the first
            # write, so a read-modify-write could act on rows another transaction changed
            # meanwhile: take over, and begin every transaction explicitly (see below).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection: Any) -> None:
            # Writers take the write lock up front (serialised, never a stale snapshot);
            # readers (`connection.execution_options(sqlite_begin="BEGIN")`) read one
            # consistent snapshot beside them.
            connection.exec_driver_sql(
                connection.get_execution_options().get("sqlite_begin", "BEGIN IMMEDIATE"))

        return engine
    if url.startswith("postgresql+"):
        return create_engine(url, pool_pre_ping=True, **options)
    raise ValueError(f"unsupported control plane database URL {url.split(':', 1)[0]!r}: use "
                     "postgresql://… or sqlite:///…")


def reader(engine: Engine) -> Engine:
    """The same database for read-only transactions: on SQLite they take no write lock."""
    return engine.execution_options(sqlite_begin="BEGIN")


def lock_fleet(session: Any) -> None:
    """Serialise the transactions that write many device rows (the engine's tick, creating
    or changing a deployment, writing polls' `last_seen`): on PostgreSQL two of them
    locking overlapping rows in different orders deadlock, so they take one advisory lock
    first, held to the end of the transaction. Single-row writers (a report) need not.
    SQLite's writers are serialised by `BEGIN IMMEDIATE` already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FLEET_LOCK_KEY})


def migrate(engine: Engine) -> str:
    """Upgrade the schema to the newest revision; return it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return current_revision(engine) or ""


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
