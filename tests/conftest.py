"""Fixtures: every database test runs on SQLite and on PostgreSQL from one parametrised fixture.

PostgreSQL tests skip with a visible reason when no server answers, unless
``AUTH_TEST_REQUIRE_POSTGRES=1`` (set by .ci/run), which turns the skip into a failure.
Each run creates its own PostgreSQL database and drops only that one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from alembic import command
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from server import manage
from server.cli import main
from server.config import Settings
from server.db import MIGRATIONS_DIR, alembic_config, head_revision
from server.deps import AppState
from server.keys import KeyStore
from server.main import create_app
from server.models import Base
from server.observability import AUDIT_LISTENERS

#: Lists the seeds of the randomised tests at the end of every run, pytest-xdist's included
#: (the plugin must be loaded in the controlling process).
pytest_plugins = ["tests.seeds"]

PG_ADMIN_URL = os.environ.get(
    "AUTH_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = os.environ.get("AUTH_TEST_REQUIRE_POSTGRES") == "1"
BACKENDS = ["sqlite", "postgresql"]
# Cheap argon2 parameters keep the suite fast; test_passwords checks the real defaults.
FAST_ARGON2: dict[str, Any] = {"argon2_memory_cost": 1024, "argon2_time_cost": 1}


def migrate(url: str) -> None:
    command.upgrade(alembic_config(url), "head")


# -- the next release's migrations -------------------------------------------------------

#: The migration the next release adds, by kind: expand-only (a nullable column the code at
#: this head never reads: it keeps running) or contract (drops a table this code uses).
NEXT_MIGRATIONS = {
    "expand": (
        "op.add_column('clients', sa.Column('next_note', sa.Text(), nullable=True))",
        "op.drop_column('clients', 'next_note')",
    ),
    "contract": ("op.drop_table('consents')", "pass"),
}


def next_release(directory: Path, kind: str, *, compatible_with: str | None = None) -> str:
    """Write into ``directory`` the migrations the next release ships: a copy of this code's
    and one more, of ``kind``, which declares ``compatible_with`` (by default this code's head
    for an expand-only one, itself for a contract one). Returns its revision, which this code
    does not know."""
    head = head_revision()
    assert head is not None
    revision = f"{int(head) + 1:04d}"
    shutil.copytree(MIGRATIONS_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))
    if compatible_with is None:
        compatible_with = head if kind == "expand" else revision
    upgrade, downgrade = NEXT_MIGRATIONS[kind]
    (directory / "versions" / f"{revision}_next_release.py").write_text(
        f'''"""the next release: {kind}"""
import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {head!r}
branch_labels = None
depends_on = None
compatible_with = {compatible_with!r}


def upgrade() -> None:
    {upgrade}


def downgrade() -> None:
    {downgrade}
'''
    )
    return revision


def migrate_with(
    migrations: Path, url: str, revision: str = "head", *, downgrade: bool = False
) -> None:
    """Upgrade (or downgrade) ``url`` with the migrations in ``migrations``, as the release
    that ships them would."""
    config = alembic_config(url)
    config.set_main_option("script_location", str(migrations))
    (command.downgrade if downgrade else command.upgrade)(config, revision)


async def _pg_execute(url: str, sql: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    KeyStore(directory).ensure()
    return directory


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'auth.db'}"
    migrate(url)
    return url


def _new_pg_database() -> str:
    """Create a fresh database for this run; skip (or fail in CI) when PostgreSQL is absent."""
    name = f"tokenserver_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg_execute(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        reason = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}: {exc}"
        if REQUIRE_PG:
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_pg_database(url: str) -> None:
    name = make_url(url).database
    asyncio.run(_pg_execute(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    url = _new_pg_database()
    migrate(url)
    yield url
    _drop_pg_database(url)


@pytest.fixture
def own_postgresql_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, with no schema, dropped after it."""
    url = _new_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(url)


@pytest.fixture(scope="session")
def empty_postgresql_url() -> Iterator[str]:
    """A PostgreSQL database with no schema at all (for migration tests)."""
    url = _new_pg_database()
    yield url
    _drop_pg_database(url)


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.one_backend`` (on a test, class or module): its database tests run on
    SQLite only, because what they check does not depend on the database (the backend rule in
    CLAUDE.md). Every other database test runs on both."""
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "one_backend"
    ):
        # As a marker, so that pytest's fixture parametrization (which yields to a test's own
        # ``parametrize`` marks) leaves ``database_url`` alone, and pytest applies this one.
        metafunc.definition.add_marker(
            pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
        )


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def make_settings(database_url: str, keys_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "testing",
        "database_url": database_url,
        "keys_dir": keys_dir,
        **FAST_ARGON2,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir)


async def truncate(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(table.delete())
    finally:
        await engine.dispose()


@pytest.fixture
def clean_db(settings: Settings) -> Settings:
    """For synchronous tests (the CLI): empty tables, nothing else."""
    asyncio.run(truncate(settings.database_url))
    return settings


class SharedApps:
    """One started app per database and settings, for the whole session (each pytest-xdist
    worker has its own): building an app and running its start-up (schema check, key
    loading, engine) took about 0.1 s, paid by every test before. Each test gets it back
    reset (``reset_app``)."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self.apps: dict[str, FastAPI] = {}

    async def get(self, settings: Settings) -> FastAPI:
        """The app for exactly these settings (a module may override ``settings``)."""
        key = settings.model_dump_json()
        application = self.apps.get(key)
        if application is None:
            application = create_app(settings)
            await self.stack.enter_async_context(application.router.lifespan_context(application))
            self.apps[key] = application
        return application


@pytest.fixture(scope="session")
async def shared_apps() -> AsyncIterator[SharedApps]:
    apps = SharedApps()
    async with apps.stack:
        yield apps


async def reset_app(application: FastAPI) -> None:
    """What a test may leave behind in a shared app: rows, rate-limit and throttle counts, an
    open circuit breaker. Anything else a test changes it changes through ``monkeypatch``
    (undone after it) or on an app of its own (``create_app``)."""
    state: AppState = application.state.auth
    async with state.db.engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(table.delete())
    await state.limiter.storage.reset()
    state.db.breaker.success()
    state.clients.invalidate()  # the rows it cached are gone


@pytest.fixture
async def app(settings: Settings, shared_apps: SharedApps) -> FastAPI:
    """The session's app for this test's database, reset: empty tables, no counts."""
    application = await shared_apps.get(settings)
    await reset_app(application)
    return application


@pytest.fixture
def state(app: FastAPI) -> AppState:
    result: AppState = app.state.auth
    return result


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@dataclass
class ClientCreds:
    client_id: str
    secret: str | None

    @property
    def basic(self) -> dict[str, str]:
        raw = f"{self.client_id}:{self.secret}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


@dataclass
class UserCreds:
    id: str
    username: str
    password: str


MakeClient = Callable[..., Awaitable[ClientCreds]]
MakeUser = Callable[..., Awaitable[UserCreds]]


@pytest.fixture
def make_client(state: AppState) -> MakeClient:
    async def factory(client_id: str = "app", **kwargs: Any) -> ClientCreds:
        kwargs.setdefault("scope", "profile email api")
        async with state.db.sessions() as db:
            created = await manage.create_client(db, client_id=client_id, **kwargs)
            await db.commit()
        return ClientCreds(client_id, created.secret)

    return factory


@pytest.fixture
def make_user(state: AppState) -> MakeUser:
    async def factory(
        username: str = "alice", password: str = "correct horse battery", **kwargs: Any
    ) -> UserCreds:
        async with state.db.sessions() as db:
            user = await manage.create_user(
                db, state.passwords, username=username, password=password, **kwargs
            )
            await db.commit()
        return UserCreds(user.id, username, password)

    return factory


#: Audit events seen during a test: (event, fields).
Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def events() -> Iterator[Events]:
    seen: Events = []

    def record(event: str, fields: dict[str, Any]) -> None:
        seen.append((event, fields))

    AUDIT_LISTENERS.append(record)
    yield seen
    AUDIT_LISTENERS.remove(record)


async def password_grant(
    http: httpx.AsyncClient, creds: ClientCreds, user: UserCreds, **extra: str
) -> httpx.Response:
    data = {"grant_type": "password", "username": user.username, "password": user.password}
    return await http.post("/oauth2/token", data={**data, **extra}, headers=creds.basic)


async def refresh_grant(
    http: httpx.AsyncClient, creds: ClientCreds, refresh_token: str, **extra: str
) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return await http.post("/oauth2/token", data=data, headers=creds.basic)


# -- a browser on the hosted pages ---------------------------------------------------------

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: httpx.Response) -> str:
    match = CSRF_RE.search(page.text)
    assert match is not None, page.text[:500]
    return match.group(1)


@pytest.fixture
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A cookie-keeping client that does not follow redirects, like a browser step by step."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


async def sign_in(http: httpx.AsyncClient, user: UserCreds, next_url: str = "") -> httpx.Response:
    page = await http.get("/login", params={"next": next_url} if next_url else None)
    assert page.status_code == 200, page.text
    response = await http.post(
        "/login",
        data={
            "csrf_token": csrf_of(page),
            "username": user.username,
            "password": user.password,
            "next": next_url,
        },
    )
    assert response.status_code == 303, response.text
    return response


# -- the command line, in this process ---------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def messages(self) -> list[str]:
        """stderr without the JSON log lines: what the operator reads."""
        return [line for line in self.err.splitlines() if not line.startswith("{")]

    @property
    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err.splitlines() if line.startswith("{")]

    def json(self) -> Any:
        lines = self.out.splitlines()
        assert len(lines) == 1, self.out
        return json.loads(lines[0])


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
        self.capsys = capsys
        self.monkeypatch = monkeypatch

    def __call__(self, *argv: str, stdin: str | io.StringIO | None = None) -> Run:
        source = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin or "")
        self.monkeypatch.setattr("sys.stdin", source)
        self.capsys.readouterr()
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        return Run(code, out, err)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``main`` points structlog at the captured stderr: put the previous setup back after."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A clean ``AUTH_*`` environment in a directory of the test's own (no stray ``.env``)."""
    for name in list(os.environ):
        if name.startswith("AUTH_") and not name.startswith("AUTH_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTH_ENV", "testing")
    monkeypatch.setenv("AUTH_ARGON2_MEMORY_COST", "1024")
    monkeypatch.setenv("AUTH_ARGON2_TIME_COST", "1")
    return monkeypatch


@pytest.fixture
def cli(
    environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> Cli:
    return Cli(capsys, environment)
