"""The control plane's schema on the launcher's PostgreSQL: Alembic's migrations produce
exactly the ORM's tables, twice in a row and from two processes at once."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from edgefleet.cloud.control.schema import HEAD, connect, current_revision, migrate

pytestmark = pytest.mark.integration


@pytest.fixture
def database(stack_env: dict[str, str]) -> Iterator[str]:
    import psycopg

    name = f"control_{secrets.token_hex(4)}"
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield urlunsplit(urlsplit(stack_env["EDGEFLEET_PG_URL"])._replace(path=f"/{name}"))
    with psycopg.connect(stack_env["EDGEFLEET_PG_URL"], autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_migrations_match_the_orm_on_postgresql(database: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from edgefleet.cloud.control.db import Base

    engine = connect(database)
    try:
        assert migrate(engine) == HEAD
        assert migrate(engine) == HEAD  # idempotent
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_two_control_planes_starting_at_once_migrate_once(database: str) -> None:
    code = ("import sys; from edgefleet.cloud.control.schema import connect, migrate; "
            "print(migrate(connect(sys.argv[1])))")
    runs = [subprocess.Popen([sys.executable, "-c", code, database], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == [HEAD, HEAD]
    engine = connect(database)
    try:
        assert current_revision(engine) == HEAD
    finally:
        engine.dispose()


def test_migrations_match_the_orm_on_sqlite(tmp_path: object) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from edgefleet.cloud.control.db import Base

    engine = connect(f"sqlite:///{tmp_path}/control.db")
    assert migrate(engine) == HEAD
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
