"""Alembic environment: async engine, URL from the caller's config (built from Settings).

After every step it records in ``schema_compatibility`` which code runs on the schema the step
produced (each migration's ``compatible_with``; server/db.py, ``record_compatibility``), so that
an older release, which lacks the newer migration files, can tell whether it may run on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set
from typing import Any

from alembic import context
from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from server.db import declared_compatibility, is_model_table, record_compatibility
from server.models import Base

target_metadata = Base.metadata
script = context.script
# Every migration states which code runs on its schema: refuse to run one that does not.
declared_compatibility(script, script.get_heads())


#: The key of the PostgreSQL advisory lock every migration holds (any fixed 64-bit number;
#: this one is "tokenmig" in ASCII). A second ``migrate`` run at the same time waits for the
#: first, then finds the schema at head, instead of failing on half-created tables.
MIGRATION_LOCK_KEY = 0x746F6B656E6D6967


def on_version_apply(
    *, ctx: MigrationContext, step: MigrationInfo, heads: Set[str], run_args: dict[str, Any]
) -> None:
    """In the step's transaction: the markers of every migration the database is now at.

    Not after a ``stamp``, which runs nothing: the table may not be there. A revision without
    its marker is refused by older code, the safe side.
    """
    if not step.is_stamp:
        record_compatibility(ctx, script, heads)


def run_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Session level: it outlives the transaction below and ends with the connection.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=is_model_table,
        on_version_apply=on_version_apply,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        include_name=is_model_table,
        on_version_apply=on_version_apply,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async_migrations())
