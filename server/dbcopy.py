"""Copy every row of one database into another, empty one at the same schema revision.

The move from the embedded default (SQLite) to PostgreSQL: ``migrate`` the new database, stop
the server, run ``python -m server copy-from SQLITE_URL`` with ``AUTH_DATABASE_URL`` naming the
PostgreSQL one, start the server on it. Users, clients (secret hashes included), sign-ins,
refresh tokens, codes, consents and deny-listed tokens arrive as they were: every live refresh
token keeps working. Tables are copied parents first, in one transaction on the target.
"""

from __future__ import annotations

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import assert_schema_at_head
from .models import Base

BATCH = 1000


class CopyRefusedError(RuntimeError):
    """The target is not empty (or a schema is not at head): nothing was copied."""


async def copy_database(source: AsyncEngine, target: AsyncEngine) -> dict[str, int]:
    """Rows copied per table, in the order they were copied."""
    await assert_schema_at_head(source)
    await assert_schema_at_head(target)
    tables = Base.metadata.sorted_tables  # parents before children (foreign keys)
    copied: dict[str, int] = {}
    async with source.connect() as reader, target.begin() as writer:
        for table in tables:
            present = await writer.scalar(select(func.count()).select_from(table))
            if present:
                noun = "row" if present == 1 else "rows"
                raise CopyRefusedError(
                    f"the target database is not empty ({table.name} holds {present} {noun}): "
                    "copy into a freshly migrated database"
                )
        for table in tables:
            copied[table.name] = 0
            rows = await reader.stream(select(table))
            async for batch in rows.mappings().partitions(BATCH):
                await writer.execute(insert(table), [dict(row) for row in batch])
                copied[table.name] += len(batch)
    return copied
