"""Clients, read on every token request, cached in each process.

An entry is served for at most ``AUTH_CLIENT_CACHE_TTL`` seconds after it was read. On
PostgreSQL every change made through the CLI or the admin API is announced with ``NOTIFY`` in
the transaction that makes it (``announce``: PostgreSQL delivers it when that transaction
commits, and only then); each process listens on one connection of its own (``Listener``) and
drops the entry on arrival, so a deleted client, a rotated secret or a withdrawn grant stops
working on every replica as soon as the notification arrives. While that connection is down the
cache serves nothing (every lookup reads the database), so a lost notification can never keep a
stale client alive. On SQLite (one process per database) the TTL bounds how long a change made
by a CLI in another process takes to be seen.

Only clients that exist are cached: an unknown id is read from the database every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table, bindparam, event, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .boundary import column_length, text_problem
from .db import Database
from .models import Client
from .observability import log

#: The longest client id a row can hold.
CLIENT_ID_LENGTH = column_length(Client.client_id)
#: The expiry of an entry that must be read again.
STALE = float("-inf")
#: The PostgreSQL channel of client changes; the payload is a client id, or ``*`` for all.
CHANNEL = "auth_clients"
EVERY = "*"

Loader = Callable[[str], Awaitable["Client | None"]]
#: Every cache of this process (one per app), for ``announce``.
_CACHES: weakref.WeakSet[ClientCache] = weakref.WeakSet()


class ClientCache:
    """``get`` (async, may read the database) before a request's synchronous OAuth work;
    ``peek`` (sync) during it, for Authlib's ``query_client``."""

    def __init__(
        self,
        ttl: float,
        load: Loader,
        *,
        trusted: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._load = load
        self._clock = clock
        #: Whether entries may be served: always on SQLite, on PostgreSQL only while the
        #: listener is connected (a notification could be missed otherwise).
        self.trusted = trusted and ttl > 0
        self._entries: dict[str, tuple[float, Client]] = {}
        #: Bumped by every invalidation: a read that started before one may hold the row as
        #: it was before the change, so it is stored stale (for its own request's ``peek``).
        self._generation = 0
        _CACHES.add(self)

    async def get(self, client_id: str) -> Client | None:
        if text_problem(client_id, CLIENT_ID_LENGTH) is not None:
            # No client has it (HTTP Basic percent-decodes ``%00`` into a NUL, which
            # PostgreSQL refuses in a query): nothing to look up.
            return None
        entry = self._entries.get(client_id)
        if entry is not None and self.trusted and entry[0] > self._clock():
            return entry[1]
        generation = self._generation
        client = await self._load(client_id)
        if client is None:
            self._entries.pop(client_id, None)
            return None
        # Changed while it was read: kept for this request's ``peek``, served to no other.
        fresh = generation == self._generation
        self._entries[client_id] = (self._clock() + self.ttl if fresh else STALE, client)
        return client

    def peek(self, client_id: str) -> Client | None:
        """What ``get`` returned for this request just before, however old it is by now: a
        change that lands in between does not fail a request that began before it (as a
        transaction that read the row first would not), it only stops the next one."""
        entry = self._entries.get(client_id)
        return entry[1] if entry is not None else None

    def invalidate(self, client_id: str = EVERY) -> None:
        """The next ``get`` reads the client again. (The entry stays for ``peek``.)"""
        self._generation += 1
        ids = list(self._entries) if client_id == EVERY else [client_id]
        for each in ids:
            if (entry := self._entries.get(each)) is not None:
                self._entries[each] = (STALE, entry[1])

    def trust(self, trusted: bool) -> None:
        """The listener connected (True) or lost its connection (False)."""
        self.invalidate()
        self.trusted = trusted and self.ttl > 0


#: One client by id (``p_client_id``); ``server/documents.py`` reads with it too.
CLIENT_BY_ID = select(*cast(Table, Client.__table__).c).where(
    Client.__table__.c.client_id == bindparam("p_client_id")
)


def is_document_id(client_id: str) -> bool:
    """A URL: the client of a metadata document (``server/documents.py``), which no operator
    could have named so (``manage.CLIENT_ID_RE`` has no ``:`` or ``/``)."""
    return client_id.startswith(("https://", "http://"))


async def load(
    database: Database, client_id: str, *, documents: Loader | None = None
) -> Client | None:
    """One statement, outside any transaction of the request (no BEGIN on PostgreSQL), behind
    the circuit breaker like every unit of work. A URL-shaped id goes to ``documents`` (the
    metadata-document loader) when one is given."""
    if documents is not None and is_document_id(client_id):
        return await documents(client_id)

    async def read(connection: AsyncConnection) -> Client | None:
        row = (await connection.execute(CLIENT_BY_ID, {"p_client_id": client_id})).first()
        return Client(**row._mapping) if row is not None else None

    return await database.run_core(read, autocommit=True)


async def announce(db: AsyncSession, client_ids: Iterable[str]) -> None:
    """Tell every process that these clients changed, when the caller's transaction commits:
    this one directly (after the commit: before it, a request could read the old row again
    and keep it), the others on PostgreSQL by ``NOTIFY``, which PostgreSQL delivers on commit.
    Call it in the transaction that makes the change."""
    ids = list(dict.fromkeys(client_ids))

    def committed(_session: Any) -> None:
        for cache in list(_CACHES):
            for client_id in ids:
                cache.invalidate(client_id)

    event.listen(db.sync_session, "after_commit", committed, once=True)
    if db.get_bind().dialect.name == "postgresql":
        for client_id in ids:
            await db.execute(
                text("SELECT pg_notify(:channel, :id)"), {"channel": CHANNEL, "id": client_id}
            )


class Listener:
    """``LISTEN`` on a dedicated asyncpg connection for the life of the process, reconnecting
    with backoff; the cache is trusted only while it is connected."""

    def __init__(
        self,
        engine: AsyncEngine,
        cache: ClientCache | None,
        *,
        retry: float = 1.0,
        timeout: float = 5.0,
        channels: dict[str, Callable[[str], None]] | None = None,
    ) -> None:
        """``cache``: the client cache, invalidated by ``CHANNEL``; ``channels``: other
        channels and what a notification on each calls (``keys_db.CHANNEL``: reload now)."""
        self.engine = engine
        self.timeout = timeout
        self.cache = cache
        self.channels = dict(channels or {})
        self.retry = retry
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _notified(self, _connection: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == CHANNEL and self.cache is not None:
            self.cache.invalidate(payload)
        elif channel in self.channels:
            self.channels[channel](payload)

    def _lost(self, _connection: Any) -> None:
        self.lost.set()

    async def _run(self) -> None:
        failures = 0
        # A connection of its own, outside the pool: it is held for the life of the process.
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        while True:
            self.lost = asyncio.Event()
            connection: Any = None
            try:
                connection = await asyncpg.connect(*args, **kwargs, timeout=self.timeout)
                if self.cache is not None:
                    await connection.add_listener(CHANNEL, self._notified)
                for channel in self.channels:
                    await connection.add_listener(channel, self._notified)
                connection.add_termination_listener(self._lost)
                # Entries read before LISTEN took effect may predate a change: drop them.
                if self.cache is not None:
                    self.cache.trust(True)
                for notify in self.channels.values():
                    notify("")  # a change made while not listening is looked for now
                self.connected.set()
                failures = 0
                await self.lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning("clients.listen_failed", error=type(exc).__name__)
            finally:
                self.connected.clear()
                if self.cache is not None:
                    self.cache.trust(False)
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(min(self.retry * 2 ** min(failures, 5), 30.0))
