"""The per-process client cache (server/clients.py): what it serves, for how long, and what
drops an entry. Replicas are in tests/acceptance/test_replicas.py."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import create_async_engine

from server import manage
from server.clients import ClientCache
from server.db import Database
from server.deps import AppState
from server.models import Client
from tests.conftest import MakeClient

pytestmark = pytest.mark.feature("client-cache")

CC = {"grant_type": "client_credentials"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loads:
    """A loader that counts its reads and can be held mid-read."""

    def __init__(self) -> None:
        self.count = 0
        self.rows: dict[str, Client] = {"app": Client(client_id="app", name="first")}
        self.gate: asyncio.Event | None = None

    async def __call__(self, client_id: str) -> Client | None:
        self.count += 1
        row = self.rows.get(client_id)
        if self.gate is not None:
            await self.gate.wait()
        return row


@pytest.mark.one_backend
async def test_an_entry_is_served_for_the_ttl_then_read_again() -> None:
    clock, loads = Clock(), Loads()
    cache = ClientCache(5, loads, trusted=True, clock=clock)
    first = await cache.get("app")
    clock.now += 4.9
    assert await cache.get("app") is first
    assert loads.count == 1
    clock.now += 0.2
    await cache.get("app")
    assert loads.count == 2


@pytest.mark.one_backend
async def test_unknown_clients_are_not_cached_and_invalidation_drops_an_entry() -> None:
    loads = Loads()
    cache = ClientCache(5, loads, trusted=True, clock=Clock())
    assert await cache.get("nobody") is None
    assert await cache.get("nobody") is None
    assert loads.count == 2
    await cache.get("app")
    cache.invalidate("app")
    await cache.get("app")
    assert loads.count == 4
    del loads.rows["app"]  # deleted
    cache.invalidate("app")
    assert await cache.get("app") is None
    assert cache.peek("app") is None


@pytest.mark.one_backend
async def test_a_read_overtaken_by_a_change_is_not_kept() -> None:
    """A read that started before an invalidation may hold the row as it was: the request
    that made it may use it, but it is not stored for the next one."""
    loads = Loads()
    cache = ClientCache(5, loads, trusted=True, clock=Clock())
    loads.gate = asyncio.Event()
    reading = asyncio.create_task(cache.get("app"))
    await asyncio.sleep(0)
    loads.rows["app"] = Client(client_id="app", name="changed")
    cache.invalidate("app")
    loads.gate.set()
    assert (await reading).name == "first"
    assert cache.peek("app").name == "first"  # for the request that read it
    loads.gate = None
    assert (await cache.get("app")).name == "changed"


@pytest.mark.one_backend
@pytest.mark.parametrize(("ttl", "trusted"), [(5, False), (0, True)])
async def test_an_untrusted_cache_reads_every_time(ttl: float, trusted: bool) -> None:
    """On PostgreSQL while the NOTIFY listener is not connected, and with a TTL of 0."""
    loads = Loads()
    cache = ClientCache(ttl, loads, trusted=trusted, clock=Clock())
    await cache.get("app")
    await cache.get("app")
    assert loads.count == 2
    cache.trust(True)  # the listener connected: a TTL of 0 still caches nothing
    await cache.get("app")
    await cache.get("app")
    assert loads.count == (3 if ttl else 4)


async def test_a_change_through_manage_is_seen_by_the_next_request(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient
) -> None:
    """The admin API and the CLI change clients through ``manage``, which drops the entry of
    every cache of the process once the change commits (and, on PostgreSQL, of every other
    process by NOTIFY: the replica test)."""
    creds = await make_client(grants=["client_credentials"])
    assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 200
    async with state.db.sessions() as db:
        secret = await manage.rotate_client_secret(db, creds.client_id)
        await db.commit()
    assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 401
    creds.secret = secret
    assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 200
    async with state.db.sessions() as db:
        await manage.update_client(db, creds.client_id, {"grant_types": ["password"]})
        await db.commit()
    withdrawn = await client.post("/oauth2/token", data=CC, headers=creds.basic)
    assert withdrawn.json()["error"] == "unauthorized_client"
    async with state.db.sessions() as db:
        await manage.delete_client(db, creds.client_id)
        await db.commit()
    assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 401


async def test_a_change_behind_its_back_is_seen_after_the_ttl(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An edit made without ``manage`` (by hand in SQL) is seen once the entry expires."""
    creds = await make_client(grants=["client_credentials"])
    assert (await client.post("/oauth2/token", data=CC, headers=creds.basic)).status_code == 200
    async with state.db.sessions() as db:
        await db.execute(update(Client).values(grant_types="password"))
        await db.commit()
    if state.clients.trusted:  # SQLite; on PostgreSQL also while the listener is connected
        response = await client.post("/oauth2/token", data=CC, headers=creds.basic)
        assert response.status_code == 200  # still cached
    expired = state.clients._clock() + state.clients.ttl + 1
    monkeypatch.setattr(state.clients, "_clock", lambda: expired)
    response = await client.post("/oauth2/token", data=CC, headers=creds.basic)
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


async def test_the_cache_is_trusted_only_while_its_listener_is_connected(
    app: FastAPI, state: AppState
) -> None:
    """A notification sent while the LISTEN connection is down is lost: meanwhile the cache
    serves nothing, and the entries read before it reconnected are dropped."""
    listener = app.state.clients_listener
    if listener is None:
        assert state.clients.trusted  # SQLite: one process, bounded by the TTL
        return
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert state.clients.trusted
    async with state.db.engine.connect() as connection:
        await connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
        )
    async with asyncio.timeout(10):
        while listener.connected.is_set():
            await asyncio.sleep(0.01)
    assert not state.clients.trusted
    await asyncio.wait_for(listener.connected.wait(), 10)
    assert state.clients.trusted


async def test_a_cached_client_keeps_client_credentials_working_while_the_database_is_down(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """client_credentials reads nothing but its client: while the client is cached it needs
    no database at all. What does need one gets the usual 503."""
    creds = await make_client(grants=["client_credentials"])
    issued = await client.post("/oauth2/token", data=CC, headers=creds.basic)
    assert issued.status_code == 200
    dead = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    monkeypatch.setattr(state, "db", Database(state.settings, dead))
    try:
        if state.clients.trusted:  # on PostgreSQL: while its listener is connected
            again = await client.post("/oauth2/token", data=CC, headers=creds.basic)
            assert again.status_code == 200
        introspected = await client.post(
            "/oauth2/introspect",
            data={"token": issued.json()["access_token"]},
            headers=creds.basic,
        )
        assert introspected.status_code == 503
        assert introspected.json()["error"] == "temporarily_unavailable"
    finally:
        await dead.dispose()


@pytest.mark.parametrize(
    "client_id",
    ["%00", "a%00b", "x" * 5000, "é" * 300],
    ids=["nul", "inner-nul", "long", "long-utf8"],
)
async def test_a_client_id_no_client_can_have_is_refused_without_a_lookup(
    client: httpx.AsyncClient, state: AppState, client_id: str
) -> None:
    """HTTP Basic percent-decodes the client id (RFC 6749 §2.3.1), so ``%00`` arrives as NUL,
    which PostgreSQL refuses in a query: such ids, and ids longer than the column, are
    ``invalid_client`` at once, never a 500 and never a database read."""
    basic = base64.b64encode(f"{client_id}:secret".encode()).decode()
    headers = {"Authorization": "Basic " + basic}
    for path, data in [
        ("/oauth2/token", CC),
        ("/oauth2/token", {"grant_type": "refresh_token", "refresh_token": "x"}),
        ("/oauth2/introspect", {"token": "x"}),
        ("/oauth2/revoke", {"token": "x"}),
    ]:
        response = await client.post(path, data=data, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"] == "invalid_client"
