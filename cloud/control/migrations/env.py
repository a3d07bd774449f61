"""Alembic environment for the control plane: run from `edgefleet.cloud.control.schema.migrate`,
which hands over an open connection (no ini file, no logging setup of its own)."""

from __future__ import annotations

from alembic import context

from edgefleet.cloud.control.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
