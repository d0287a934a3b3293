"""Engine, migrations and the schema-at-head check, on SQLite and on PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, select, text
from sqlalchemy.exc import IntegrityError

from server import db as server_db
from server import manage
from server.cli import cmd_migrate
from server.config import Settings
from server.db import (
    MIGRATIONS_DIR,
    InsecureDatabaseFileError,
    MigrationDeclarationError,
    SchemaNotAtHeadError,
    alembic_config,
    assert_schema_at_head,
    assert_schema_compatible,
    create_engine,
    head_revision,
    is_model_table,
    session_factory,
    transaction,
)
from server.deps import AppState
from server.main import create_app
from server.models import Base, Client
from tests.conftest import (
    make_settings,
    migrate,
    migrate_with,
    next_release,
)

TABLES = {
    "users",
    "clients",
    "registration_tokens",
    "refresh_families",
    "refresh_tokens",
    "revoked_access_tokens",
    "browser_sessions",
    "authorization_codes",
    "pushed_requests",
    "signing_keys",
    "consents",
    "webauthn_credentials",
    "totp_factors",
    "recovery_codes",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own, with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    else:
        yield request.getfixturevalue("own_postgresql_url")


async def schema_error(settings: Settings) -> SchemaNotAtHeadError | None:
    engine = create_engine(settings)
    try:
        await assert_schema_compatible(engine)
    except SchemaNotAtHeadError as exc:
        return exc
    finally:
        await engine.dispose()
    return None


async def table_names(settings: Settings) -> set[str]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            names: list[str] = await connection.run_sync(
                lambda sync: inspect(sync).get_table_names()
            )
    finally:
        await engine.dispose()
    return set(names)


@pytest.mark.feature("schema-at-head", "sqlite-backend")
async def test_empty_sqlite_database_is_not_at_head(tmp_path: Path, keys_dir: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", keys_dir)
    error = await schema_error(settings)
    assert error is not None
    assert str(error) == (
        f"database schema is at nothing, this code needs {head_revision()}: "
        "run `python -m server migrate` (same AUTH_DATABASE_URL) and start again"
    )


@pytest.mark.feature("schema-at-head", "postgres-backend")
async def test_empty_postgresql_database_is_not_at_head(
    empty_postgresql_url: str, keys_dir: Path
) -> None:
    error = await schema_error(make_settings(empty_postgresql_url, keys_dir))
    assert error is not None
    assert "database schema is at nothing" in str(error)
    assert "run `python -m server migrate`" in str(error)


@pytest.mark.feature(
    "migrations", "schema-at-head", "storage-models", "sqlite-backend", "postgres-backend"
)
async def test_migrate_brings_an_empty_database_to_head(
    fresh_database_url: str, keys_dir: Path
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    assert isinstance(await schema_error(settings), SchemaNotAtHeadError)
    assert not TABLES & await table_names(settings)

    await asyncio.to_thread(migrate, fresh_database_url)

    assert await schema_error(settings) is None
    assert await table_names(settings) == {*TABLES, "alembic_version", "schema_compatibility"}


@pytest.mark.feature("migrations", "sqlite-backend", "postgres-backend")
async def test_migrate_is_idempotent(fresh_database_url: str, keys_dir: Path) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    await asyncio.to_thread(migrate, fresh_database_url)
    engine = create_engine(settings)
    try:
        async with transaction(session_factory(engine)) as db:
            db.add(Client(client_id="kept", name="kept"))
    finally:
        await engine.dispose()

    await asyncio.to_thread(migrate, fresh_database_url)

    assert await schema_error(settings) is None
    engine = create_engine(settings)
    try:
        async with session_factory(engine)() as db:
            assert list(await db.scalars(select(Client.client_id))) == ["kept"]
    finally:
        await engine.dispose()


@pytest.mark.feature("schema-at-head")
async def test_schema_ahead_of_the_code_is_refused(fresh_database_url: str, keys_dir: Path) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    await asyncio.to_thread(migrate, fresh_database_url)
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    finally:
        await engine.dispose()
    error = await schema_error(settings)
    assert error is not None
    assert str(error) == (
        f"database schema is at ffff, a revision this code ({head_revision()}) does not know "
        "and with no record of which code runs on it: deploy the release that migrated it, or "
        "restore a backup taken before that migration"
    )


# -- the previous release against a newer schema (a rollout, or a rollback) ---------------
# This code plays the previous release; the next one is this code's migrations plus one more.


async def markers(settings: Settings) -> dict[str, str]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT revision, compatible_with FROM schema_compatibility")
            )
            return {revision: oldest for revision, oldest in rows}
    finally:
        await engine.dispose()


def declared() -> dict[str, str]:
    """Each of this code's migrations and the ``compatible_with`` its module declares."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return {
        migration.revision: getattr(migration.module, "compatible_with", None)
        for migration in script.walk_revisions()
    }


async def create_client_and_get_a_token(settings: Settings) -> httpx.Response:
    """Start the app (its lifespan checks the schema), write a client, ask for a token."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.auth.db.sessions() as db:
            created = await manage.create_client(db, client_id="rollback", scope="api")
            await db.commit()
        assert created.secret is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials", "scope": "api"},
                auth=("rollback", created.secret),
            )


@pytest.mark.feature(
    "migrations",
    "schema-at-head",
    "app-factory",
    "sqlite-backend",
    "postgres-backend",
    "rollback-compatible-schema",
)
async def test_the_previous_release_runs_on_the_next_ones_expand_only_schema(
    fresh_database_url: str, keys_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    head = head_revision()
    upcoming = next_release(tmp_path / "next", "expand")
    await asyncio.to_thread(migrate_with, tmp_path / "next", fresh_database_url)
    recorded = RecordingLog()
    monkeypatch.setattr(server_db, "log", recorded)

    assert await schema_error(settings) is None
    ahead = [warning for warning in recorded.warnings if warning[0] == "database.schema_ahead"]
    assert ahead == [
        (
            "database.schema_ahead",
            {"revision": upcoming, "code_revision": head, "compatible_with": head},
        )
    ]
    response = await create_client_and_get_a_token(settings)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"


@pytest.mark.feature(
    "migrations",
    "schema-at-head",
    "sqlite-backend",
    "postgres-backend",
    "rollback-compatible-schema",
)
async def test_the_previous_release_refuses_the_next_ones_contract_schema(
    fresh_database_url: str, keys_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    upcoming = next_release(tmp_path / "next", "contract")
    await asyncio.to_thread(migrate_with, tmp_path / "next", fresh_database_url)

    error = await schema_error(settings)
    assert error is not None
    assert str(error) == (
        f"database schema is at {upcoming}, newer than this code ({head_revision()}) and not "
        f"compatible with it (it needs code at {upcoming} or later): deploy that release, or "
        "restore a backup taken before the migration"
    )
    with pytest.raises(SchemaNotAtHeadError, match=f"needs code at {upcoming} or later"):
        await create_client_and_get_a_token(settings)


@pytest.mark.feature("migrations", "schema-at-head", "rollback-compatible-schema")
def test_every_migration_declares_which_code_runs_on_its_schema() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revisions = declared()
    previous = None
    for migration in reversed(list(script.walk_revisions())):  # oldest first
        oldest = revisions[migration.revision]
        assert isinstance(oldest, str), migration.revision
        lineage = [m.revision for m in script.iterate_revisions(migration.revision, "base")]
        assert oldest in lineage, migration.revision  # itself or an ancestor
        if previous is not None:  # never older than what the parent's schema needs
            assert lineage.index(oldest) <= lineage.index(previous), migration.revision
        previous = oldest


@pytest.mark.feature(
    "migrations", "sqlite-backend", "postgres-backend", "rollback-compatible-schema"
)
async def test_migrate_records_every_migrations_marker(
    fresh_database_url: str, keys_dir: Path
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    await asyncio.to_thread(migrate, fresh_database_url)
    assert await markers(settings) == declared()


@pytest.mark.feature(
    "migrations", "sqlite-backend", "postgres-backend", "rollback-compatible-schema"
)
async def test_markers_follow_an_upgrade_from_0004_and_a_downgrade(
    fresh_database_url: str, keys_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    config = alembic_config(fresh_database_url)
    await asyncio.to_thread(command.upgrade, config, "0004")  # the last schema without markers
    assert "schema_compatibility" not in await table_names(settings)

    await asyncio.to_thread(command.upgrade, config, "head")
    assert await markers(settings) == declared()

    upcoming = next_release(tmp_path / "next", "expand")
    await asyncio.to_thread(migrate_with, tmp_path / "next", fresh_database_url)
    assert await markers(settings) == {**declared(), upcoming: head_revision()}
    await asyncio.to_thread(
        migrate_with, tmp_path / "next", fresh_database_url, "-1", downgrade=True
    )
    assert await markers(settings) == declared()


@pytest.mark.feature("migrations", "rollback-compatible-schema")
@pytest.mark.parametrize(
    ("kind", "compatible_with", "problem"),
    [
        ("expand", "", "is neither this revision nor an ancestor"),
        ("expand", "9999", "is neither this revision nor an ancestor"),
        ("expand", "0001", "is older than"),
    ],
    ids=["empty", "a-later-revision", "older-than-its-parent"],
)
def test_a_migration_with_an_impossible_compatible_with_is_not_run(
    tmp_path: Path, kind: str, compatible_with: str, problem: str
) -> None:
    next_release(tmp_path / "next", kind, compatible_with=compatible_with)
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(MigrationDeclarationError, match=problem):
        migrate_with(tmp_path / "next", url)
    assert not (tmp_path / "db.sqlite").exists()


@pytest.mark.feature("migrations", "rollback-compatible-schema")
def test_a_migration_without_compatible_with_is_not_run(tmp_path: Path) -> None:
    upcoming = next_release(tmp_path / "next", "expand")
    (path,) = (tmp_path / "next" / "versions").glob(f"{upcoming}_*.py")
    path.write_text(path.read_text().replace("compatible_with = ", "# compatible_with = "))
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(MigrationDeclarationError, match="does not declare `compatible_with"):
        migrate_with(tmp_path / "next", url)


@pytest.mark.feature("schema-at-head", "rollback-compatible-schema")
async def test_a_schema_with_several_heads_is_refused(
    fresh_database_url: str, keys_dir: Path
) -> None:
    settings = make_settings(fresh_database_url, keys_dir)
    await asyncio.to_thread(migrate, fresh_database_url)
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO alembic_version VALUES ('ffff')"))
    finally:
        await engine.dispose()
    error = await schema_error(settings)
    assert str(error) == (
        f"database schema has several heads ({head_revision()}, ffff), this code "
        f"({head_revision()}) has one: restore a backup taken before the branched migrations"
    )


@pytest.mark.feature("migrations")
def test_head_revision_is_the_single_head_of_the_migrations() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_heads() == [head_revision()]
    assert head_revision() is not None
    assert Path(script.dir) == MIGRATIONS_DIR


@pytest.mark.feature("migrations")
def test_alembic_config_escapes_percent_signs() -> None:
    url = "postgresql+asyncpg://auth:p%40ss@db/auth"
    assert alembic_config(url).get_main_option("sqlalchemy.url") == url


@pytest.mark.feature("migrations", "storage-models", "sqlite-backend", "postgres-backend")
async def test_migrations_match_the_models(settings: Settings) -> None:
    """The head schema is exactly what ``server.models`` describes: nothing to autogenerate."""

    def differences(connection: Connection) -> list[Any]:
        # As migrations/env.py configures autogenerate: schema_compatibility is bookkeeping.
        opts = {"compare_type": True, "include_name": is_model_table}
        context = MigrationContext.configure(connection, opts=opts)
        return list(compare_metadata(context, Base.metadata))

    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert diff == []


@pytest.mark.feature("sqlite-backend")
async def test_sqlite_engine_uses_wal_foreign_keys_and_a_busy_timeout(
    tmp_path: Path, keys_dir: Path
) -> None:
    path = tmp_path / "not" / "yet" / "there" / "auth.db"
    settings = make_settings(f"sqlite+aiosqlite:///{path}", keys_dir)
    engine = create_engine(settings)
    try:
        assert path.parent.is_dir()
        async with engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
    finally:
        await engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "busy_timeout": 10_000,
        "synchronous": 1,
    }


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process umask for the test, restored after it."""
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.feature("sqlite-backend", "file-permissions")
async def test_the_sqlite_database_is_created_private_whatever_the_umask(
    tmp_path: Path, keys_dir: Path, umask: int
) -> None:
    tmp_path.chmod(0o755)
    before = mode_of(tmp_path)
    # migrate creates the directory and the file; the server then runs on them (WAL).
    path = tmp_path / "data" / "auth.db"
    settings = make_settings(f"sqlite+aiosqlite:///{path}", keys_dir)
    assert await asyncio.to_thread(cmd_migrate, settings, argparse.Namespace()) == 0
    assert mode_of(path.parent) == 0o700
    assert mode_of(path) == 0o600
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/readyz")).status_code == 200
            # SQLite creates -wal and -shm with the database file's mode.
            for name in ("auth.db", "auth.db-wal", "auth.db-shm"):
                assert mode_of(path.parent / name) == 0o600, name
    # The server creating a database itself (before its schema check refuses it): the same.
    fresh = tmp_path / "new" / "deeper" / "auth.db"
    engine = create_engine(make_settings(f"sqlite+aiosqlite:///{fresh}", keys_dir))
    try:
        async with engine.connect() as connection:
            await connection.execute(text("CREATE TABLE t (x INTEGER)"))
            await connection.commit()
            for name in ("auth.db", "auth.db-wal", "auth.db-shm"):
                assert mode_of(fresh.parent / name) == 0o600, name
    finally:
        await engine.dispose()
    assert mode_of(fresh.parent) == mode_of(fresh.parent.parent) == 0o700
    # A directory that was already there is the operator's: its mode is left alone.
    assert mode_of(tmp_path) == before


@pytest.mark.feature("sqlite-backend")
async def test_sqlite_in_memory_url_creates_no_directory(
    tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    engine = create_engine(make_settings("sqlite+aiosqlite:///:memory:", keys_dir))
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.feature("sqlite-backend")
async def test_sqlite_enforces_foreign_keys(tmp_path: Path, keys_dir: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fk.db'}"
    await asyncio.to_thread(migrate, url)
    engine = create_engine(make_settings(url, keys_dir))
    orphan = text(
        "INSERT INTO refresh_families (id, client_id, user_id, scope, auth_time,"
        " created_at, last_used_at, expires_at)"
        " VALUES ('f', 'nobody', 'nobody', '', 0, 0, 0, 0)"
    )
    try:
        with pytest.raises(IntegrityError, match="FOREIGN KEY constraint failed"):
            async with engine.begin() as connection:
                await connection.execute(orphan)
        async with engine.connect() as connection:
            count = await connection.execute(text("SELECT count(*) FROM refresh_families"))
            assert count.scalar() == 0
    finally:
        await engine.dispose()


@pytest.mark.feature("postgres-backend")
async def test_postgresql_engine_uses_the_configured_pool(
    postgresql_url: str, keys_dir: Path
) -> None:
    engine = create_engine(
        make_settings(postgresql_url, keys_dir, db_pool_size=3, db_max_overflow=2)
    )
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.sync_engine.pool._max_overflow == 2  # type: ignore[attr-defined]
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()


@pytest.mark.feature("storage-models", "sqlite-backend", "postgres-backend")
async def test_transaction_commits_on_success_and_rolls_back_on_error(settings: Settings) -> None:
    committed, rolled_back = f"ok-{uuid.uuid4().hex[:8]}", f"no-{uuid.uuid4().hex[:8]}"
    engine = create_engine(settings)
    factory = session_factory(engine)
    try:
        async with transaction(factory) as db:
            db.add(Client(client_id=committed))
        with pytest.raises(RuntimeError, match="boom"):
            async with transaction(factory) as db:
                db.add(Client(client_id=rolled_back))
                await db.flush()
                raise RuntimeError("boom")
        async with factory() as db:
            found = set(
                await db.scalars(
                    select(Client.client_id).where(Client.client_id.in_([committed, rolled_back]))
                )
            )
            stored = await db.get(Client, committed)
    finally:
        await engine.dispose()
    assert found == {committed}
    assert stored is not None
    # Column defaults apply on insert, the same on both backends.
    assert (stored.name, stored.secret_hash, stored.is_admin, stored.grant_types) == (
        "",
        None,
        False,
        "",
    )
    assert stored.created_at > 1_700_000_000


class RecordingLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


def migrated_sqlite(tmp_path: Path, keys_dir: Path) -> tuple[Settings, Path]:
    path = tmp_path / "data" / "auth.db"
    settings = make_settings(f"sqlite+aiosqlite:///{path}", keys_dir)
    assert cmd_migrate(settings, argparse.Namespace()) == 0
    return settings, path


@pytest.mark.feature("sqlite-backend", "file-permissions")
@pytest.mark.parametrize("name", ["auth.db", "auth.db-wal", "auth.db-shm"])
@pytest.mark.parametrize("mode", [0o666, 0o660, 0o602], ids=oct)
def test_an_existing_sqlite_file_others_can_write_is_refused(
    tmp_path: Path, keys_dir: Path, name: str, mode: int
) -> None:
    settings, path = migrated_sqlite(tmp_path, keys_dir)
    target = path.parent / name
    target.touch()
    target.chmod(mode)

    for attempt in (
        lambda: create_engine(settings),
        lambda: cmd_migrate(settings, argparse.Namespace()),
    ):
        with pytest.raises(InsecureDatabaseFileError) as refused:
            attempt()
        message = str(refused.value)
        assert "\n" not in message
        assert str(target) in message and f"mode {mode:o}" in message
        assert "chmod 600" in message
    assert mode_of(target) == mode  # refused, not silently "fixed": someone may have written it


@pytest.mark.feature("sqlite-backend", "file-permissions")
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_an_existing_sqlite_file_owned_by_another_user_is_refused(
    tmp_path: Path, keys_dir: Path
) -> None:
    settings, path = migrated_sqlite(tmp_path, keys_dir)
    os.chown(path, 65534, -1)

    with pytest.raises(InsecureDatabaseFileError, match="owner uid 65534"):
        create_engine(settings)


@pytest.mark.feature("sqlite-backend", "file-permissions")
async def test_an_existing_sqlite_file_others_can_read_is_made_private_with_a_warning(
    tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, path = await asyncio.to_thread(migrated_sqlite, tmp_path, keys_dir)
    path.chmod(0o644)  # e.g. made by an older version, or by the sqlite3 shell under umask 022
    recorded = RecordingLog()
    monkeypatch.setattr(server_db, "log", recorded)

    engine = create_engine(settings)
    try:
        await assert_schema_at_head(engine)
    finally:
        await engine.dispose()
    assert mode_of(path) == 0o600
    assert recorded.warnings == [
        ("sqlite.permissions_tightened", {"path": str(path), "mode_was": "644", "mode": "600"})
    ]


@pytest.mark.feature("postgres-backend")
async def test_a_worker_busier_than_its_old_pool_connects_only_once(
    postgresql_url: str, keys_dir: Path
) -> None:
    """16 requests at once, rounds of them: the pool opens connections in the first round and
    keeps them. With the old default of 10 + 10 overflow, every round opened (and dropped) 6
    connections inside requests, since an overflow connection is closed when it is returned."""
    settings = make_settings(postgresql_url, keys_dir, rate_limits_enabled=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        connects: list[object] = []
        event.listen(state.db.engine.sync_engine, "connect", lambda *_: connects.append(1))
        async with state.db.sessions() as db:
            created = await manage.create_client(
                db, client_id=f"busy-{uuid.uuid4().hex[:8]}", grants=["client_credentials"]
            )
            await db.commit()
        assert created.secret is not None
        auth = (created.client.client_id, created.secret)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

            async def burst() -> set[int]:
                answers = await asyncio.gather(
                    *(
                        http.post(
                            "/oauth2/token", data={"grant_type": "client_credentials"}, auth=auth
                        )
                        for _ in range(16)
                    )
                )
                return {answer.status_code for answer in answers}

            assert await burst() == {200}
            opened = len(connects)
            assert 0 < opened <= settings.db_pool_size
            for _ in range(3):
                assert await burst() == {200}
            assert len(connects) == opened, "connections were opened inside later requests"
