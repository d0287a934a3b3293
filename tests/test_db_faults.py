"""Real database faults under the app: a cut network to PostgreSQL, a locked SQLite file.

A ``FaultProxy`` sits between the app and PostgreSQL and resets or blackholes the connection;
SQLite is locked by a second writer holding ``BEGIN IMMEDIATE``. Every answer is a 503 with
``Retry-After`` in the endpoint's own format, never a 500 and never a hang; the breaker opens,
stops all I/O, and closes again by itself once the database is back.

The breaker's clock is the test's (``Clock``): a cooldown passes when the test moves it, so
nothing here waits for one, and no assertion is about how long anything took (the latency of
a 503 is a benchmark figure, not a test outcome).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from server import manage, metrics
from server.breaker import DatabaseUnavailable
from server.deps import AppState
from server.main import create_app, unavailable_response
from server.models import Client
from server.oauth import store
from tests.conftest import make_settings, migrate, truncate
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.feature("db-retry-breaker")

#: On the test's clock: it only passes when a test moves it.
COOLDOWN = 30.0
THRESHOLD = 3
#: Far above every timeout configured below: reaching it means a hang, not a slow answer.
HANG = 60


class Clock:
    """The breaker's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    app: FastAPI
    state: AppState
    http: httpx.AsyncClient
    proxy: FaultProxy | None
    secret: str
    clock: Clock

    async def token(self) -> httpx.Response:
        return await self.http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=("svc", self.secret),
        )


async def _harness(
    database_url: str, keys_dir: Path, proxy: FaultProxy | None, **extra: Any
) -> AsyncIterator[Harness]:
    # The harness's probe is client_credentials, which needs the database only to read its
    # client: with the cache on, a cached client keeps working through an outage
    # (test_a_cached_client_keeps_client_credentials_working_through_an_outage).
    extra.setdefault("client_cache_ttl", 0)
    settings = make_settings(
        database_url,
        keys_dir,
        db_connect_timeout=0.5,
        db_statement_timeout=1.0,
        db_breaker_threshold=THRESHOLD,
        db_breaker_cooldown=COOLDOWN,
        rate_limits_enabled=False,
        **extra,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        clock = Clock()
        state.db.breaker.clock = clock
        async with state.db.sessions() as db:
            created = await manage.create_client(
                db, client_id="svc", grants=["client_credentials"], scope="api"
            )
            await db.commit()
        assert created.secret is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Harness(app, state, http, proxy, created.secret, clock)


@pytest.fixture
async def pg(postgresql_url: str, keys_dir: Path) -> AsyncIterator[Harness]:
    await truncate(postgresql_url)
    url = make_url(postgresql_url)
    proxy = FaultProxy(url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        async for harness in _harness(proxied, keys_dir, proxy):
            yield harness
    finally:
        proxy.close()


def breaker_gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("database_breaker_state")


def assert_oauth_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["cache-control"] == "no-store"


async def wait_until_recovered(harness: Harness) -> httpx.Response:
    """Each round, the cooldown passes on the breaker's clock and the next request probes; a
    probe can still fail while the network settles (the breaker then opens again): bounded
    polling on the outcome, no waiting."""
    for _ in range(10):
        harness.clock.advance(COOLDOWN)
        response = await harness.token()
        if response.status_code == 200:
            return response
    raise AssertionError(f"no recovery: {response.status_code} {response.text}")


def unavailable(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(error, reason) of every 503 the app logged, in order."""
    return [(e["error"], e["reason"]) for e in logs if e["event"] == "database.unavailable"]


BREAKER_OPEN = ("DatabaseUnavailable", "circuit breaker open")
#: What the driver raises under each fault: the connect or statement timeout firing for a
#: blackhole (the request waited for a configured timeout, not indefinitely), a refused or
#: reset connection for a reset.
FAULT_ERRORS = {
    "reset": {"ConnectionRefusedError", "ConnectionResetError", "ConnectionDoesNotExistError"},
    "blackhole": {"TimeoutError"},
}


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_a_cut_database_gives_503s_from_the_open_breaker_then_recovery_without_restart(
    pg: Harness, mode: str
) -> None:
    assert (await pg.token()).status_code == 200
    assert pg.proxy is not None
    pg.proxy.cut(mode)  # type: ignore[arg-type]

    with capture_logs() as logs:
        for _ in range(THRESHOLD):
            async with asyncio.timeout(HANG):  # a hang guard, not a latency check
                assert_oauth_503(await pg.token())
    assert pg.state.db.breaker.state == "open"
    assert breaker_gauge() == 2
    # Until the breaker opened, requests met the fault itself (for a blackhole, the configured
    # connect or statement timeout ended the wait); once it opened, the breaker answered.
    seen = unavailable(logs)
    assert seen[0][0] in FAULT_ERRORS[mode], seen
    assert all(entry[0] in FAULT_ERRORS[mode] or entry == BREAKER_OPEN for entry in seen), seen
    opened = [e for e in logs if e["event"] == "database.breaker" and e["state"] == "open"]
    assert [e["failures"] for e in opened] == [THRESHOLD], logs

    # Open: 20 requests, every 503 the breaker's own, and not one reached the database: no
    # connection attempt at the proxy, no failure counted, Retry-After the whole cooldown
    # (the clock stood still), then what is left of it once the clock moves.
    connections_tried, failures = pg.proxy.accepted, pg.state.db.breaker.failures
    with capture_logs() as logs:
        for _ in range(20):
            response = await pg.token()
            assert_oauth_503(response)
            assert response.headers["retry-after"] == str(int(COOLDOWN))
        pg.clock.advance(COOLDOWN - 5)
        later = await pg.token()
    assert_oauth_503(later)
    assert later.headers["retry-after"] == "5"
    assert unavailable(logs) == [BREAKER_OPEN] * 21
    assert pg.proxy.accepted == connections_tried
    assert pg.state.db.breaker.failures == failures

    ready = await pg.http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["detail"].startswith("database: circuit breaker")

    pg.proxy.restore()
    recovered = await wait_until_recovered(pg)
    assert recovered.json()["token_type"] == "Bearer"
    assert pg.state.db.breaker.state == "closed"
    assert breaker_gauge() == 0
    assert (await pg.http.get("/readyz")).status_code == 200


async def test_pages_and_json_endpoints_answer_503_in_their_own_format(pg: Harness) -> None:
    assert pg.proxy is not None
    pg.proxy.cut("reset")
    page = await pg.http.get("/account", headers={"Cookie": "session=x"})
    assert page.status_code == 503
    assert page.headers["content-type"].startswith("text/html")
    assert "Try again shortly" in page.text
    assert page.headers["retry-after"]
    ready = await pg.http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error_code"] == "not_ready"
    for response in (page, ready):
        assert "Traceback" not in response.text
        assert "asyncpg" not in response.text


async def test_connections_dropped_between_requests_are_replaced_unseen(pg: Harness) -> None:
    assert pg.proxy is not None
    for _ in range(3):
        assert (await pg.token()).status_code == 200
        pg.proxy.drop_connections()  # as a database restart or failover does
    assert (await pg.token()).status_code == 200
    assert pg.state.db.breaker.failures == 0


async def test_a_unit_that_loses_its_connection_midway_runs_again_and_writes_once(
    pg: Harness,
) -> None:
    assert pg.proxy is not None
    proxy = pg.proxy
    attempts = 0

    async def work(db: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        db.add(Client(client_id="written-once", name="x"))
        await db.flush()  # the insert is on the wire, inside the open transaction
        if attempts == 1:
            proxy.drop_connections()  # the database loses the connection: it rolls back
            await db.execute(select(1))  # the next statement finds the connection gone
        return attempts

    assert await pg.state.db.run(work) == 2
    async with pg.state.db.sessions() as db:
        count = await db.scalar(
            select(func.count()).select_from(Client).where(Client.client_id == "written-once")
        )
    assert count == 1


# -- SQLite: a second writer holds the lock ----------------------------------------------------


@pytest.fixture
async def locked_sqlite(tmp_path: Path, keys_dir: Path) -> AsyncIterator[tuple[Harness, Path]]:
    path = tmp_path / "locked.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(migrate, url)
    async for harness in _harness(url, keys_dir, None, sqlite_busy_timeout=0.2):
        yield harness, path


class WriteLock:
    """Another process's writer: ``BEGIN IMMEDIATE`` held until released."""

    def __init__(self, path: Path) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(path,))

    def _hold(self, path: Path) -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        self.held.set()
        self.release.wait(timeout=30)
        connection.execute("ROLLBACK")
        connection.close()

    def __enter__(self) -> WriteLock:
        self.thread.start()
        assert self.held.wait(timeout=5)
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self.thread.join(timeout=10)


async def test_sqlite_locked_by_another_writer_gives_503_not_500(
    locked_sqlite: tuple[Harness, Path],
) -> None:
    harness, path = locked_sqlite
    issued = await harness.token()
    assert issued.status_code == 200
    revoke = {"token": issued.json()["access_token"]}
    with capture_logs() as logs, WriteLock(path) as lock:
        # What only reads takes no lock (WAL): the client is read, the token issued.
        assert (await harness.token()).status_code == 200
        async with asyncio.timeout(HANG):  # a hang guard, not a latency check
            locked = await harness.http.post(
                "/oauth2/revoke", data=revoke, auth=("svc", harness.secret)
            )
        assert_oauth_503(locked)
        page = await harness.http.get("/account", headers={"Cookie": "session=x"})
        assert page.status_code == 503
        # The other writer still holds the lock: the 503s are the busy timeout giving up,
        # not the lock released (waited out, the revocation would have been a 200).
        assert lock.thread.is_alive()
    assert [error for error, _ in unavailable(logs)] == ["OperationalError"] * 2
    assert all("database is locked" in reason for _, reason in unavailable(logs))
    # Two failures, below the threshold: the breaker stayed closed, so the lock released,
    # the very next request succeeds, and resets the count.
    assert harness.state.db.breaker.state == "closed"
    revoked = await harness.http.post("/oauth2/revoke", data=revoke, auth=("svc", harness.secret))
    assert revoked.status_code == 200
    assert harness.state.db.breaker.failures == 0


async def test_sqlite_concurrent_writers_queue_instead_of_failing(
    tmp_path: Path, keys_dir: Path
) -> None:
    """40 simultaneous token requests, each a write transaction, all succeed on one file."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}"
    await asyncio.to_thread(migrate, url)
    async for harness in _harness(url, keys_dir, None):
        async with harness.state.db.sessions() as db:
            user = await manage.create_user(
                db, harness.state.passwords, username="bob", password="correct horse battery"
            )
            await manage.create_client(
                db, client_id="app", grants=["password", "refresh_token"], scope="api", public=True
            )
            await db.commit()
        data = {
            "grant_type": "password",
            "username": user.username,
            "password": "correct horse battery",
            "client_id": "app",
        }
        responses = await asyncio.gather(
            *(harness.http.post("/oauth2/token", data=data) for _ in range(40))
        )
        assert [r.status_code for r in responses] == [200] * 40


# -- a connection lost during COMMIT: ask the database what happened ----------------------------


async def count_clients(harness: Harness, client_id: str) -> int:
    async with harness.state.db.sessions() as db:
        query = select(func.count()).select_from(Client).where(Client.client_id == client_id)
        return int(await db.scalar(query) or 0)


def lost_connection() -> DBAPIError:
    """What SQLAlchemy raises when asyncpg's connection dies under a statement."""
    return DBAPIError(
        "COMMIT", None, Exception("connection was closed"), connection_invalidated=True
    )


async def client_exists(db: AsyncSession, client_id: str) -> bool:
    return await db.get(Client, client_id) is not None


@pytest.mark.parametrize("landed", [True, False])
async def test_a_commit_whose_fate_is_unknown_is_settled_by_asking_the_database(
    pg: Harness, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    assert pg.proxy is not None
    proxy = pg.proxy
    real_commit = AsyncSession.commit
    commits = 0

    async def commit_then_lose_the_answer(self: AsyncSession) -> None:
        nonlocal commits
        commits += 1
        if commits == 1 and landed:
            # The database committed, and the answer was lost on the way back. The proxy cannot
            # cut between a COMMIT's arrival and its reply, so the driver's error is raised here.
            await real_commit(self)
            raise lost_connection()
        if commits == 1:
            proxy.drop_connections()  # the COMMIT goes out on a connection that is gone
        await real_commit(self)

    monkeypatch.setattr(AsyncSession, "commit", commit_then_lose_the_answer)
    attempts = 0

    async def work(db: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        db.add(Client(client_id=f"c{attempts}", name="x"))
        return attempts

    result = await pg.state.db.run(work, lambda db, result: client_exists(db, f"c{result}"))
    monkeypatch.undo()
    if landed:
        assert result == 1  # the first attempt's answer stands; nothing ran twice
        assert await count_clients(pg, "c1") == 1
    else:
        assert result == 2  # nothing had landed, so the unit ran again
        assert (await count_clients(pg, "c1"), await count_clients(pg, "c2")) == (0, 1)


async def test_without_a_way_to_settle_an_uncertain_commit_the_answer_is_503(
    pg: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pg.proxy is not None
    proxy = pg.proxy

    async def lose_the_answer(self: AsyncSession) -> None:
        proxy.drop_connections()
        await self.execute(select(1))

    monkeypatch.setattr(AsyncSession, "commit", lose_the_answer)

    async def work(db: AsyncSession) -> None:
        db.add(Client(client_id="unsure", name="x"))

    with pytest.raises(DatabaseUnavailable) as raised:
        await pg.state.db.run(work)
    assert raised.value.reason == "connection lost during commit"


async def test_a_rotation_committed_as_the_connection_died_is_answered_with_its_tokens(
    pg: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the check, the client would get a 503, retry, and lose the sign-in to reuse.
    (On PostgreSQL the rotation is one statement sent without BEGIN and COMMIT, so its own
    answer is the one that can be lost.)"""
    async with pg.state.db.sessions() as db:
        await manage.create_user(
            db, pg.state.passwords, username="dora", password="correct horse battery"
        )
        await manage.create_client(
            db, client_id="app", grants=["password", "refresh_token"], scope="api", public=True
        )
        await db.commit()
    signed_in = await pg.http.post(
        "/oauth2/token",
        data={
            "grant_type": "password",
            "username": "dora",
            "password": "correct horse battery",
            "client_id": "app",
        },
    )
    old = signed_in.json()["refresh_token"]
    real_execute = Connection.execute
    armed = True

    def rotate_then_die(self: Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        result = real_execute(self, statement, *args, **kwargs)
        if armed and statement is store._ROTATE_POSTGRESQL:
            # The rotation, sent without a transaction, ran; its answer is lost on the way
            # back (as a commit's can be when there is one).
            armed = False
            raise lost_connection()
        return result

    monkeypatch.setattr(Connection, "execute", rotate_then_die)
    rotated = await pg.http.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": old, "client_id": "app"},
    )
    monkeypatch.undo()
    assert rotated.status_code == 200, rotated.text
    assert not armed
    again = await pg.http.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": rotated.json()["refresh_token"],
            "client_id": "app",
        },
    )
    assert again.status_code == 200, again.text  # the tokens it got are the live ones


async def test_when_the_database_cannot_be_asked_the_uncertain_commit_is_a_503(
    pg: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pg.proxy is not None
    proxy = pg.proxy
    real_commit = AsyncSession.commit

    async def commit_then_lose_the_database(self: AsyncSession) -> None:
        await real_commit(self)
        proxy.cut("reset")  # gone before anyone can ask it what happened
        raise lost_connection()

    monkeypatch.setattr(AsyncSession, "commit", commit_then_lose_the_database)

    async def work(db: AsyncSession) -> None:
        db.add(Client(client_id="unknowable", name="x"))

    asked: list[bool] = []

    async def landed(db: AsyncSession, result: None) -> bool:
        asked.append(True)
        return await client_exists(db, "unknowable")  # the question itself cannot get through

    with pytest.raises(DatabaseUnavailable) as raised:
        await pg.state.db.run(work, landed)
    assert raised.value.reason == "connection lost during commit"
    assert asked in ([], [True])  # the question failed to connect, or failed on the wire
    monkeypatch.undo()
    proxy.restore()


# -- the token route's own check, on both backends -----------------------------------------------


@pytest.fixture
def lose_next_answer(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Arm: the next COMMIT lands, then the driver reports the connection lost."""
    real_commit = AsyncSession.commit
    armed: list[bool] = []

    async def commit(self: AsyncSession) -> None:
        await real_commit(self)
        if armed:
            armed.clear()
            raise lost_connection()

    monkeypatch.setattr(AsyncSession, "commit", commit)
    return lambda: armed.append(True)


async def test_uncertain_commits_at_every_oauth_endpoint_settle_without_a_503(
    state: AppState,
    client: httpx.AsyncClient,
    make_client: Any,
    make_user: Any,
    lose_next_answer: Any,
) -> None:
    user = await make_user()
    confidential = await make_client("conf", grants=["client_credentials", "password"])
    refreshing = await make_client("refr", grants=["password", "refresh_token"])
    password = {"grant_type": "password", "username": user.username, "password": user.password}

    lose_next_answer()  # client_credentials writes nothing: its answer stands
    issued = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers=confidential.basic
    )
    assert issued.status_code == 200, issued.text

    lose_next_answer()  # no refresh grant: the sign-in (family) row is what is checked
    signed_in = await client.post("/oauth2/token", data=password, headers=confidential.basic)
    assert signed_in.status_code == 200, signed_in.text
    assert "refresh_token" not in signed_in.json()
    introspected = await client.post(
        "/oauth2/introspect",
        data={"token": signed_in.json()["access_token"]},
        headers=confidential.basic,
    )
    assert introspected.json()["active"] is True

    first = await client.post("/oauth2/token", data=password, headers=refreshing.basic)
    old = first.json()["refresh_token"]
    await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": old},
        headers=refreshing.basic,
    )
    lose_next_answer()  # an error (a replay: the family is revoked) runs again, same answer
    replay = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": old},
        headers=refreshing.basic,
    )
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"

    lose_next_answer()  # revocation is idempotent: run again
    revoked = await client.post(
        "/oauth2/revoke",
        data={"token": signed_in.json()["access_token"]},
        headers=confidential.basic,
    )
    assert revoked.status_code == 200
    introspected = await client.post(
        "/oauth2/introspect",
        data={"token": signed_in.json()["access_token"]},
        headers=confidential.basic,
    )
    assert introspected.json() == {"active": False}


async def test_a_database_error_that_is_not_a_fault_is_a_plain_500(
    state: AppState, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any, **__: Any) -> None:
        raise DBAPIError("SELECT nonsense", None, Exception("syntax error at secret-ish place"))

    monkeypatch.setattr(state.db, "run_core", broken)
    response = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials", "client_id": "a"}
    )
    assert response.status_code == 500
    # RFC 6749 §5.2: the token endpoint's clients read an OAuth error object.
    assert response.json() == {
        "error": "server_error",
        "error_description": "The server met an unexpected error.",
    }
    assert "syntax" not in response.text


def test_other_json_endpoints_get_the_detail_and_error_code_format() -> None:
    response = unavailable_response("/api/v1/me", 7)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert json.loads(bytes(response.body)) == {
        "detail": "The service is briefly unavailable; try again shortly.",
        "error_code": "database_unavailable",
    }
