"""PostgreSQL from Debian's `postgresql` package: a private cluster in the data folder.

The cluster listens on 127.0.0.1 only (no Unix socket, so long data paths are fine),
with scram-sha-256 passwords for every connection. TimescaleDB is enabled when its
extension is installed; otherwise the stack runs on plain PostgreSQL and `status`
says so. As root the server runs as the `postgres` system user, which PostgreSQL
requires.
"""

from __future__ import annotations

import glob
import os
import pwd
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from .base import (
    LauncherError,
    LaunchSpec,
    MissingBinary,
    Service,
    StackContext,
    check_traversable,
    write_private,
)

__all__ = ["DATABASES", "PostgresService", "pg_url"]

SUPERUSER = "edgefleet"
# Databases the project uses: time series + control plane, and MLflow's backend store.
DATABASES = ("edgefleet", "mlflow")
_INSTALL = "apt-get install postgresql"


def pg_url(ctx: StackContext, database: str = "edgefleet", driver: str = "postgresql") -> str:
    password = ctx.secrets["postgres_password"]
    return f"{driver}://{SUPERUSER}:{password}@127.0.0.1:{ctx.port('postgres')}/{database}"


def _bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for bindir in reversed(candidates):
        if os.access(Path(bindir) / "postgres", os.X_OK):
            return Path(bindir)
    raise MissingBinary("postgres", "postgres", _INSTALL)


def _timescaledb_available(bindir: Path) -> bool:
    version = bindir.parent.name
    return Path(f"/usr/share/postgresql/{version}/extension/timescaledb.control").exists()


class PostgresService(Service):
    name: ClassVar[str] = "postgres"
    port_names: ClassVar[tuple[str, ...]] = ("postgres",)
    secret_names: ClassVar[tuple[str, ...]] = ("postgres_password",)
    # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to leave.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT

    def check_installed(self) -> None:
        _bindir()

    def _user(self, ctx: StackContext) -> str | None:
        return "postgres" if ctx.run_as_root else None

    def prepare(self, ctx: StackContext) -> None:
        bindir = _bindir()
        folder = ctx.dir_for(self.name)
        data = folder / "data"
        user = self._user(ctx)
        if user:
            check_traversable(folder, user, self.name)
        if (data / "PG_VERSION").exists():
            return
        data.mkdir(mode=0o700, exist_ok=True)
        pwfile = folder / "initdb.pw"
        write_private(pwfile, ctx.secrets["postgres_password"] + "\n")
        if user:
            entry = pwd.getpwnam(user)
            for path in (folder, data, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            result = subprocess.run(
                [
                    str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                    "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                    "--locale=C",
                ],
                user=user, capture_output=True, text=True, check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise LauncherError(f"postgres: initdb failed: {result.stderr.strip()[-500:]}")

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        bindir = _bindir()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(ctx.port(self.name)),
            "unix_socket_directories": "",
            "max_connections": "200",
            "logging_collector": "off",
        }
        if _timescaledb_available(bindir):
            settings["shared_preload_libraries"] = "timescaledb"
        argv = [str(bindir / "postgres"), "-D", str(ctx.dir_for(self.name) / "data")]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return LaunchSpec(argv=argv, user=self._user(ctx))

    def _connect(self, ctx: StackContext, database: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(pg_url(ctx, database), connect_timeout=2, autocommit=True)

    def is_ready(self, ctx: StackContext) -> bool:
        with self._connect(ctx) as conn:
            conn.execute("SELECT 1")
        return True

    def after_ready(self, ctx: StackContext) -> None:
        with self._connect(ctx) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for database in DATABASES:
                if database not in existing:
                    conn.execute(f'CREATE DATABASE "{database}"')
        if _timescaledb_available(_bindir()):
            with self._connect(ctx, "edgefleet") as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")

    def timescaledb_version(self, ctx: StackContext) -> str | None:
        with self._connect(ctx, "edgefleet") as conn:
            row = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
            ).fetchone()
        return None if row is None else str(row[0])

    def health(self, ctx: StackContext) -> tuple[bool, str]:
        try:
            with self._connect(ctx, "edgefleet") as conn:
                row = conn.execute("SHOW server_version").fetchone()
            server = row[0] if row else "?"
            timescale = self.timescaledb_version(ctx)
        except Exception as err:  # noqa: BLE001 - status reports any failure as unhealthy
            return False, f"127.0.0.1:{ctx.port(self.name)} not answering: {err}"
        flavour = (
            f"TimescaleDB {timescale}"
            if timescale
            else "plain PostgreSQL (TimescaleDB extension not installed)"
        )
        return True, f"127.0.0.1:{ctx.port(self.name)} PostgreSQL {server}, {flavour}"

    def exports(self, ctx: StackContext) -> dict[str, str]:
        return {
            "EDGEFLEET_PG_URL": pg_url(ctx),
            "EDGEFLEET_PG_TIMESCALEDB": "1" if _timescaledb_available(_bindir()) else "0",
        }
