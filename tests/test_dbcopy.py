"""Moving a SQLite deployment to PostgreSQL: ``migrate``, then ``copy-from``.

A server on SQLite signs people in; its database is copied into a freshly migrated PostgreSQL
one with the CLI (``server.cli.main``, in this process: tests/test_cli.py runs the entry points
as processes); a server on PostgreSQL then finds every user and client (secrets
included) and accepts every live refresh token, while a revoked one stays revoked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server import manage
from server.config import Settings
from server.db import SchemaNotAtHeadError, create_engine, head_revision
from server.dbcopy import copy_database
from server.deps import AppState
from server.main import create_app
from tests.conftest import (
    Cli,
    make_settings,
    migrate,
    migrate_with,
    next_release,
)

pytestmark = pytest.mark.feature("sqlite-to-postgres", "sqlite-backend", "postgres-backend")
PASSWORD = "correct horse battery"


def point_at(environment: pytest.MonkeyPatch, database_url: str, keys_dir: Path) -> None:
    environment.setenv("AUTH_DATABASE_URL", database_url)
    environment.setenv("AUTH_KEYS_DIR", str(keys_dir))


async def _populate(settings: Settings) -> dict[str, str]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            created = await manage.create_client(
                db, client_id="app", grants=["password", "refresh_token", "client_credentials"]
            )
            for name in ("ann", "bob", "cat"):
                await manage.create_user(db, state.passwords, username=name, password=PASSWORD)
            await db.commit()
        assert created.secret is not None
        auth = ("app", created.secret)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            tokens = {}
            for name in ("ann", "bob"):
                response = await http.post(
                    "/oauth2/token",
                    data={"grant_type": "password", "username": name, "password": PASSWORD},
                    auth=auth,
                )
                tokens[name] = response.json()["refresh_token"]
            revoked = await http.post("/oauth2/revoke", data={"token": tokens["bob"]}, auth=auth)
            assert revoked.status_code == 200
        return {"secret": created.secret, **tokens}


async def _check(settings: Settings, saved: dict[str, str]) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            assert sorted(u.username for u in await manage.list_users(db)) == ["ann", "bob", "cat"]
        auth = ("app", saved["secret"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            issued = await http.post(
                "/oauth2/token", data={"grant_type": "client_credentials"}, auth=auth
            )
            assert issued.status_code == 200, issued.text  # the secret's hash came along
            live = await http.post(
                "/oauth2/token",
                data={"grant_type": "refresh_token", "refresh_token": saved["ann"]},
                auth=auth,
            )
            assert live.status_code == 200, live.text  # a live sign-in keeps working
            dead = await http.post(
                "/oauth2/token",
                data={"grant_type": "refresh_token", "refresh_token": saved["bob"]},
                auth=auth,
            )
            assert dead.status_code == 400  # and a revoked one stays revoked
            signed_in = await http.post(
                "/oauth2/token",
                data={"grant_type": "password", "username": "cat", "password": PASSWORD},
                auth=auth,
            )
            assert signed_in.status_code == 200  # password hashes came along


def test_a_sqlite_deployment_moves_to_postgresql(
    tmp_path: Path,
    keys_dir: Path,
    own_postgresql_url: str,
    cli: Cli,
    environment: pytest.MonkeyPatch,
) -> None:
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
    migrate(sqlite_url)
    saved = asyncio.run(_populate(make_settings(sqlite_url, keys_dir)))

    point_at(environment, own_postgresql_url, keys_dir)
    assert cli("migrate").code == 0
    copied = cli("copy-from", sqlite_url)
    assert copied.code == 0, copied.err
    lines = dict(line.split(": ") for line in copied.out.splitlines())
    assert lines["users"] == "3"
    assert lines["clients"] == "1"
    assert lines["refresh_tokens"] == "2"

    asyncio.run(_check(make_settings(own_postgresql_url, keys_dir), saved))

    again = cli("copy-from", sqlite_url)  # never into a database that has rows
    assert again.code == 1
    assert "the target database is not empty (clients holds 1 row)" in again.err


def test_copy_refuses_a_source_that_is_not_migrated(
    tmp_path: Path, keys_dir: Path, cli: Cli, environment: pytest.MonkeyPatch
) -> None:
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    migrate(target)
    point_at(environment, target, keys_dir)
    result = cli("copy-from", f"sqlite+aiosqlite:///{tmp_path / 'nothing.db'}")
    assert result.code == 1
    assert "run `python -m server migrate`" in result.err


@pytest.mark.feature("schema-at-head", "rollback-compatible-schema")
def test_copy_refuses_a_schema_newer_than_the_code_even_a_compatible_one(
    tmp_path: Path, keys_dir: Path
) -> None:
    """A newer schema may hold columns this code does not know: copying would drop them."""
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    migrate(source)
    target = f"sqlite+aiosqlite:///{tmp_path / 'target.db'}"
    upcoming = next_release(tmp_path / "next", "expand")
    migrate_with(tmp_path / "next", target)

    async def copy() -> None:
        engines = [create_engine(make_settings(url, keys_dir)) for url in (source, target)]
        try:
            await copy_database(*engines)
        finally:
            for engine in engines:
                await engine.dispose()

    with pytest.raises(SchemaNotAtHeadError) as refused:
        asyncio.run(copy())
    assert str(refused.value) == (
        f"database schema is at {upcoming}, newer than this code ({head_revision()}), which "
        "would copy only the columns it knows: use the release that migrated it"
    )
