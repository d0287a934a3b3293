"""Alembic environment: async engine, URL from the caller's config (built from Settings)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from server.models import Base

target_metadata = Base.metadata


#: The key of the PostgreSQL advisory lock every migration holds (any fixed 64-bit number;
#: this one is "tokenmig" in ASCII). A second ``migrate`` run at the same time waits for the
#: first, then finds the schema at head, instead of failing on half-created tables.
MIGRATION_LOCK_KEY = 0x746F6B656E6D6967


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
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async_migrations())
