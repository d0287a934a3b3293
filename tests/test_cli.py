"""``python -m server …`` (SPEC.md "Operator contract"), driven in-process through ``main``.

Every database command runs on SQLite and on PostgreSQL (``clean_db``). Output on stdout is
what the operator (or a script) reads; stderr holds one ``error: …`` line on failure, plus the
JSON log lines, which ``Run.messages`` leaves out.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import ANY

import pytest
import uvicorn
from argon2 import PasswordHasher
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from server.cli import main
from server.config import Settings
from server.db import create_engine, head_revision, session_factory, transaction
from server.keys import MANIFEST, KeyStore
from server.manage import PRUNE_SKEW_MARGIN
from server.models import (
    AuthorizationCode,
    BrowserSession,
    Client,
    RecoveryCode,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    TotpFactor,
    User,
    WebAuthnCredential,
    sha256_hex,
)
from tests.conftest import (
    Cli,
    Run,
    _drop_pg_database,
    _new_pg_database,
    migrate_with,
    next_release,
)

pytestmark = pytest.mark.usefixtures("restore_logging")
T = TypeVar("T")

PASSWORD = "correct horse battery"
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43,}$")
STRONG_SECRET = "q7Zr2LxW9mPb4TnV8cKd1HyF6sJg3RaE0uMwXo5BkQ_e-NhC"  # 48 distinct characters
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def migrate_hint() -> str:
    return (
        f"error: database schema is at nothing, this code needs {head_revision()}: "
        "run `python -m server migrate` (same AUTH_DATABASE_URL) and start again"
    )


# -- running the command line --------------------------------------------------------


class Terminal(io.StringIO):
    """Standard input that is an interactive terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def db(clean_db: Settings, environment: pytest.MonkeyPatch) -> Settings:
    """An empty, migrated database on each backend, and the environment pointing at it."""
    environment.setenv("AUTH_DATABASE_URL", clean_db.database_url)
    environment.setenv("AUTH_KEYS_DIR", str(clean_db.keys_dir))
    return clean_db


@pytest.fixture
def own_keys(keys_dir: Path, tmp_path: Path, environment: pytest.MonkeyPatch) -> Path:
    """A copy of the session's keys that this test may rotate and prune."""
    directory = tmp_path / "keys"
    shutil.copytree(keys_dir, directory)
    environment.setenv("AUTH_KEYS_DIR", str(directory))
    return directory


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(
    request: pytest.FixtureRequest, tmp_path: Path, environment: pytest.MonkeyPatch, keys_dir: Path
) -> Iterator[str]:
    """A new database with no schema, and the environment pointing at it."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'unmigrated.db'}"
    else:
        url = _new_pg_database()
    environment.setenv("AUTH_DATABASE_URL", url)
    environment.setenv("AUTH_KEYS_DIR", str(keys_dir))
    try:
        yield url
    finally:
        if request.param == "postgresql":
            _drop_pg_database(url)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Record what ``serve`` hands to uvicorn instead of starting a server."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


# -- looking at the database directly --------------------------------------------------


def in_db(settings: Settings, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(settings)
        try:
            async with transaction(session_factory(engine)) as session:
                return await action(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def client_row(settings: Settings, client_id: str) -> Client | None:
    async def get(session: AsyncSession) -> Client | None:
        return await session.get(Client, client_id)

    return in_db(settings, get)


def all_clients(settings: Settings) -> list[str]:
    async def ids(session: AsyncSession) -> list[str]:
        return list(await session.scalars(select(Client.client_id).order_by(Client.client_id)))

    return in_db(settings, ids)


def all_users(settings: Settings) -> list[User]:
    async def users(session: AsyncSession) -> list[User]:
        return list(await session.scalars(select(User).order_by(User.username_key)))

    return in_db(settings, users)


def user_row(settings: Settings, username: str) -> User:
    (user,) = [u for u in all_users(settings) if u.username == username]
    return user


def add_family(
    settings: Settings, client_id: str, user_id: str, *, revoked_reason: str | None = None
) -> str:
    async def add(session: AsyncSession) -> str:
        stamp = int(time.time())
        family = RefreshFamily(
            client_id=client_id,
            user_id=user_id,
            scope="profile",
            auth_time=stamp,
            expires_at=stamp + 86_400,
            revoked_at=stamp - 10 if revoked_reason else None,
            revoked_reason=revoked_reason,
        )
        session.add(family)
        await session.flush()
        return family.id

    return in_db(settings, add)


def families(settings: Settings) -> dict[str, RefreshFamily]:
    async def rows(session: AsyncSession) -> dict[str, RefreshFamily]:
        return {f.id: f for f in await session.scalars(select(RefreshFamily))}

    return in_db(settings, rows)


def verifies(password_hash: str, password: str) -> bool:
    try:
        return PasswordHasher().verify(password_hash, password)
    except Exception:
        return False


def manifest_states(directory: Path) -> dict[str, str]:
    data = json.loads((directory / MANIFEST).read_text())
    return {entry["kid"]: entry["state"] for entry in data["keys"]}


def kid_in(directory: Path, state: str) -> str:
    (kid,) = [kid for kid, s in manifest_states(directory).items() if s == state]
    return kid


# -- migrate ----------------------------------------------------------------------------


@pytest.mark.feature("cli-migrate", "migrations", "sqlite-backend", "postgres-backend")
def test_migrate_is_idempotent(cli: Cli, db: Settings) -> None:
    for _ in range(2):
        result = cli("migrate")
        assert (result.code, result.out, result.messages) == (
            0,
            "database schema is at head\n",
            [],
        )
    assert cli("clients", "list").code == 0


@pytest.mark.feature("cli-migrate", "schema-at-head", "sqlite-backend", "postgres-backend")
@pytest.mark.parametrize(
    "argv",
    [
        ("clients", "list"),
        ("clients", "create", "--client-id", "app"),
        ("users", "list"),
        ("users", "disable", "alice"),
        ("seed-demo",),
        ("serve",),
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_unmigrated_database_is_refused_with_the_migrate_hint(
    cli: Cli, unmigrated_url: str, argv: tuple[str, ...], served: list[Any]
) -> None:
    result = cli(*argv)
    assert (result.code, result.out, result.messages) == (1, "", [migrate_hint()])
    assert served == []

    assert cli("migrate").code == 0
    assert cli("clients", "list").code == 0


@pytest.mark.feature(
    "cli-migrate",
    "schema-at-head",
    "sqlite-backend",
    "postgres-backend",
    "rollback-compatible-schema",
)
def test_the_previous_releases_migrate_and_serve_on_the_next_ones_expand_only_schema(
    cli: Cli, unmigrated_url: str, tmp_path: Path, served: list[Any]
) -> None:
    """A rollback: the next release migrated (expand-only), this one's migrate job and
    servers run again."""
    head = head_revision()
    upcoming = next_release(tmp_path / "next", "expand")
    migrate_with(tmp_path / "next", unmigrated_url)

    result = cli("migrate")
    assert (result.code, result.out, result.messages) == (
        0,
        f"database schema is at {upcoming}, ahead of this release ({head}) and compatible with "
        "it: nothing to migrate\n",
        [],
    )
    assert asyncio.run(_current_revision(unmigrated_url)) == upcoming
    result = cli("serve")
    assert (result.code, result.messages) == (0, [])
    assert len(served) == 1
    assert [log for log in result.logs if log["event"] == "database.schema_ahead"] == [
        {
            "event": "database.schema_ahead",
            "level": "warning",
            "revision": upcoming,
            "code_revision": head,
            "compatible_with": head,
            "timestamp": ANY,
        }
    ]
    assert cli("clients", "create", "--client-id", "after-rollback").code == 0


@pytest.mark.feature(
    "cli-migrate",
    "schema-at-head",
    "sqlite-backend",
    "postgres-backend",
    "rollback-compatible-schema",
)
def test_the_previous_releases_migrate_and_serve_refuse_the_next_ones_contract_schema(
    cli: Cli, unmigrated_url: str, tmp_path: Path, served: list[Any]
) -> None:
    upcoming = next_release(tmp_path / "next", "contract")
    migrate_with(tmp_path / "next", unmigrated_url)
    refusal = (
        f"error: database schema is at {upcoming}, newer than this code ({head_revision()}) "
        f"and not compatible with it (it needs code at {upcoming} or later): deploy that "
        "release, or restore a backup taken before the migration"
    )

    for argv in (("migrate",), ("serve",), ("clients", "list")):
        result = cli(*argv)
        assert (result.code, result.out, result.messages) == (1, "", [refusal]), argv
    assert served == []
    assert asyncio.run(_current_revision(unmigrated_url)) == upcoming


@pytest.mark.feature("cli-migrate", "sqlite-backend")
def test_migrate_creates_the_default_sqlite_database(cli: Cli, tmp_path: Path) -> None:
    # No AUTH_DATABASE_URL: the default, ./data/auth.db, relative to the working directory.
    assert not (tmp_path / "data").exists()
    result = cli("migrate")
    assert (result.code, result.out) == (0, "database schema is at head\n")
    assert (tmp_path / "data" / "auth.db").is_file()
    assert cli("users", "list").code == 0


@pytest.mark.feature("cli-migrate", "sqlite-backend", "file-permissions")
def test_migrate_refuses_a_sqlite_database_others_can_write_in_one_line(
    cli: Cli, tmp_path: Path
) -> None:
    assert cli("migrate").code == 0
    path = tmp_path / "data" / "auth.db"
    path.chmod(0o666)

    result = cli("migrate")
    assert (result.code, result.out) == (1, "")
    assert len(result.messages) == 1
    assert result.messages[0].startswith(f"error: refusing to open the SQLite database: {path} ")
    assert "writable by others" in result.messages[0]


@pytest.mark.feature("cli-keys")
def test_keys_rotate_refuses_a_keys_directory_others_can_write(cli: Cli, own_keys: Path) -> None:
    own_keys.chmod(0o777)
    before = (own_keys / "keys.json").read_bytes()

    result = cli("keys", "rotate", "--force")
    assert (result.code, result.out) == (1, "")
    assert result.messages[0].startswith(f"error: refusing to use signing keys: {own_keys} ")
    assert (own_keys / "keys.json").read_bytes() == before


# -- clients ----------------------------------------------------------------------------


@pytest.mark.feature("cli-clients", "client-secrets", "sqlite-backend", "postgres-backend")
def test_clients_create_json_prints_the_secret_once_and_stores_its_hash(
    cli: Cli, db: Settings
) -> None:
    result = cli("clients", "create", "--client-id", "svc", "--scope", "api profile", "--json")
    assert result.code == 0
    assert result.messages == []
    body = result.json()
    assert body["client_id"] == "svc"
    secret = body["client_secret"]
    assert SECRET_RE.match(secret)
    assert body["public"] is False
    assert body["admin"] is False
    assert body["grant_types"] == ["password", "refresh_token", "client_credentials"]
    assert body["scope"] == "api profile"

    row = client_row(db, "svc")
    assert row is not None
    assert row.secret_hash == sha256_hex(secret)
    stored = " ".join(str(value) for value in vars(row).values())
    assert secret not in stored
    assert row.check_client_secret(secret) is True
    assert row.check_client_secret(secret[:-1]) is False
    assert secret not in result.err  # never logged


@pytest.mark.feature("cli-clients", "client-secrets", "sqlite-backend", "postgres-backend")
def test_clients_create_text_output(cli: Cli, db: Settings) -> None:
    result = cli("clients", "create", "--client-id", "web", "--name", "Web app")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0] == "created client web"
    assert lines[1].startswith("client_secret: ")
    secret = lines[1].removeprefix("client_secret: ")
    assert SECRET_RE.match(secret)
    assert lines[2:] == ["(shown once: store it now, only its hash is kept)"]
    row = client_row(db, "web")
    assert row is not None
    assert row.name == "Web app"
    assert row.check_client_secret(secret)


@pytest.mark.feature("cli-clients", "client-secrets", "sqlite-backend", "postgres-backend")
def test_each_client_gets_a_different_secret(cli: Cli, db: Settings) -> None:
    secrets = {
        cli("clients", "create", "--client-id", f"c{i}", "--json").json()["client_secret"]
        for i in range(3)
    }
    assert len(secrets) == 3


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_public_client_has_no_secret(cli: Cli, db: Settings) -> None:
    result = cli("clients", "create", "--client-id", "mobile", "--public", "--json")
    assert result.code == 0
    body = result.json()
    assert body["client_secret"] is None
    assert body["public"] is True
    assert body["grant_types"] == ["password", "refresh_token"]
    row = client_row(db, "mobile")
    assert row is not None
    assert row.secret_hash is None
    assert row.is_public

    text = cli("clients", "create", "--client-id", "cli-tool", "--public")
    assert (text.code, text.out) == (0, "created client cli-tool\n")


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_admin_client_gets_the_admin_scope(cli: Cli, db: Settings) -> None:
    body = cli(
        "clients", "create", "--client-id", "ops", "--admin", "--scope", "api", "--json"
    ).json()
    assert body["admin"] is True
    assert body["scope"] == "api admin"
    also = cli(
        "clients", "create", "--client-id", "ops2", "--admin", "--scope", "admin api", "--json"
    ).json()
    assert also["scope"] == "admin api"
    row = client_row(db, "ops")
    assert row is not None
    assert (row.is_admin, row.scope, row.scope_list) == (True, "api admin", ["api", "admin"])


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_grants_and_redirect_uris_are_stored(cli: Cli, db: Settings) -> None:
    result = cli(
        "clients",
        "create",
        "--client-id",
        "spa",
        "--public",
        "--grant",
        "authorization_code",
        "--grant",
        "refresh_token",
        "--grant",
        "refresh_token",
        "--redirect-uri",
        "https://app.example.com/callback",
        "--redirect-uri",
        "com.example.app:/oauth2redirect",
        "--json",
    )
    assert result.code == 0, result.messages
    body = result.json()
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    assert body["redirect_uris"] == [
        "https://app.example.com/callback",
        "com.example.app:/oauth2redirect",
    ]
    row = client_row(db, "spa")
    assert row is not None
    assert row.check_redirect_uri("https://app.example.com/callback")
    assert not row.check_redirect_uri("https://app.example.com/callback/evil")


@pytest.mark.one_backend
@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--client-id", "bad id!"],
            "error: client id must be 1-100 characters of A-Z a-z 0-9 . _ ~ -",
        ),
        (
            ["--client-id", "x" * 101],
            "error: client id must be 1-100 characters of A-Z a-z 0-9 . _ ~ -",
        ),
        (
            ["--client-id", "app", "--grant", "implicit"],
            "error: unsupported grant 'implicit'; choose from authorization_code, password, "
            "refresh_token, client_credentials",
        ),
        (
            ["--client-id", "app", "--public", "--grant", "client_credentials"],
            "error: a public client cannot use client_credentials (it has no secret)",
        ),
        (
            ["--client-id", "app", "--scope", "admin"],
            "error: only an --admin client may be given the admin scope",
        ),
        (
            ["--client-id", "app", "--scope", 'api "quoted"'],
            "error: invalid scope token '\"quoted\"'",
        ),
        (
            ["--client-id", "app", "--grant", "authorization_code"],
            "error: the authorization_code grant needs at least one --redirect-uri",
        ),
        (
            ["--client-id", "app", "--grant", "authorization_code", "--redirect-uri", "/cb"],
            "error: redirect URI '/cb' must be absolute, without a fragment or spaces",
        ),
        (
            [
                "--client-id",
                "app",
                "--grant",
                "authorization_code",
                "--redirect-uri",
                "https://app.example.com/cb#frag",
            ],
            "error: redirect URI 'https://app.example.com/cb#frag' must be absolute, "
            "without a fragment or spaces",
        ),
        (
            ["--client-id", "app", "--refresh-retry-window", "301"],
            "error: refresh retry window must be 0-300 seconds (or unset)",
        ),
    ],
    ids=[
        "bad-client-id",
        "long-client-id",
        "bad-grant",
        "public-client-credentials",
        "admin-scope-without-admin",
        "bad-scope-token",
        "code-without-redirect",
        "relative-redirect",
        "redirect-with-fragment",
        "retry-window-too-long",
    ],
)
def test_clients_create_refuses_bad_input_with_one_line(
    cli: Cli, db: Settings, extra: list[str], message: str
) -> None:
    result = cli("clients", "create", *extra, "--json")
    assert (result.code, result.out, result.messages) == (1, "", [message])
    assert all_clients(db) == []


@pytest.mark.feature("cli-clients", "refresh-retries")
def test_a_client_is_created_with_its_own_refresh_retry_window(cli: Cli, db: Settings) -> None:
    made = cli(
        "clients", "create", "--client-id", "mobile", "--refresh-retry-window", "30", "--json"
    )
    assert made.json()["refresh_retry_window"] == 30
    plain = cli("clients", "create", "--client-id", "web", "--json")
    assert plain.json()["refresh_retry_window"] is None  # AUTH_REFRESH_RETRY_WINDOW


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_duplicate_client_id_is_refused(cli: Cli, db: Settings) -> None:
    first = cli("clients", "create", "--client-id", "X", "--json").json()
    result = cli("clients", "create", "--client-id", "X", "--public")
    assert (result.code, result.out, result.messages) == (
        1,
        "",
        ["error: client 'X' already exists"],
    )
    row = client_row(db, "X")
    assert row is not None
    assert row.check_client_secret(first["client_secret"])  # the original is untouched


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_clients_list_and_show(cli: Cli, db: Settings) -> None:
    empty = cli("clients", "list")
    assert (empty.code, empty.out) == (0, "")
    assert cli("clients", "list", "--json").json() == []
    cli("clients", "create", "--client-id", "zeta", "--scope", "api")
    cli("clients", "create", "--client-id", "alpha", "--public")

    listing = cli("clients", "list")
    assert listing.code == 0
    rows = [line.split() for line in listing.out.splitlines()]
    assert rows == [
        ["alpha", "public", "password", "refresh_token"],
        ["zeta", "confidential", "password", "refresh_token", "client_credentials", "api"],
    ]
    as_json = cli("clients", "list", "--json").json()
    assert [c["client_id"] for c in as_json] == ["alpha", "zeta"]
    assert all("client_secret" not in c and "secret_hash" not in c for c in as_json)

    shown = cli("clients", "show", "zeta")
    assert shown.code == 0
    body = json.loads(shown.out)
    assert body == {
        "client_id": "zeta",
        "name": "zeta",
        "public": False,
        "admin": False,
        "resource_server": False,
        "first_party": False,
        "grant_types": ["password", "refresh_token", "client_credentials"],
        "scope": "api",
        "redirect_uris": [],
        "post_logout_redirect_uris": [],
        "refresh_retry_window": None,
        "token_endpoint_auth_method": "client_secret_basic",
        "resources": None,
        "origin": None,
        "dpop_bound_access_tokens": False,
        "require_pushed_authorization_requests": False,
        "created_at": body["created_at"],
    }
    assert abs(body["created_at"] - time.time()) < 60

    missing = cli("clients", "show", "nope")
    assert (missing.code, missing.out, missing.messages) == (1, "", ["error: no client 'nope'"])


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_clients_delete_removes_the_client_and_its_token_families(cli: Cli, db: Settings) -> None:
    cli("clients", "create", "--client-id", "gone")
    cli("clients", "create", "--client-id", "stays")
    user = cli(
        "users",
        "create",
        "--username",
        "alice",
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    ).json()
    doomed = add_family(db, "gone", user["id"])
    kept = add_family(db, "stays", user["id"])

    result = cli("clients", "delete", "gone")

    assert (result.code, result.out) == (
        0,
        "deleted client gone and every token family it held\n",
    )
    assert all_clients(db) == ["stays"]
    assert set(families(db)) == {kept}
    assert doomed not in families(db)
    again = cli("clients", "delete", "gone")
    assert (again.code, again.messages) == (1, ["error: no client 'gone'"])


@pytest.mark.feature("cli-clients", "client-secrets", "sqlite-backend", "postgres-backend")
def test_clients_rotate_secret(cli: Cli, db: Settings) -> None:
    old = cli("clients", "create", "--client-id", "svc", "--json").json()["client_secret"]

    text = cli("clients", "rotate-secret", "svc")
    assert text.code == 0
    lines = text.out.splitlines()
    assert lines[1:] == ["(shown once; the previous secret no longer works)"]
    new = lines[0].removeprefix("client_secret: ")
    assert SECRET_RE.match(new)
    assert new != old
    row = client_row(db, "svc")
    assert row is not None
    assert row.check_client_secret(new) is True
    assert row.check_client_secret(old) is False

    body = cli("clients", "rotate-secret", "svc", "--json").json()
    assert body["client_id"] == "svc"
    newest = body["client_secret"]
    assert SECRET_RE.match(newest)
    row = client_row(db, "svc")
    assert row is not None
    assert row.secret_hash == sha256_hex(newest)
    assert row.check_client_secret(new) is False


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_rotate_secret_refuses_public_and_unknown_clients(cli: Cli, db: Settings) -> None:
    cli("clients", "create", "--client-id", "pub", "--public")
    public = cli("clients", "rotate-secret", "pub")
    assert (public.code, public.out, public.messages) == (
        1,
        "",
        ["error: client 'pub' is public: it has no secret"],
    )
    row = client_row(db, "pub")
    assert row is not None
    assert row.secret_hash is None
    unknown = cli("clients", "rotate-secret", "ghost")
    assert (unknown.code, unknown.messages) == (1, ["error: no client 'ghost'"])


# -- users ------------------------------------------------------------------------------


@pytest.mark.feature("cli-users", "password-hashing", "sqlite-backend", "postgres-backend")
def test_users_create_json(cli: Cli, db: Settings) -> None:
    result = cli(
        "users",
        "create",
        "--username",
        "Alice",
        "--email",
        "alice@example.com",
        "--password-stdin",
        "--json",
        stdin=PASSWORD + "\n",
    )
    assert result.code == 0, result.messages
    body = result.json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert (body["username"], body["email"], body["disabled"]) == (
        "Alice",
        "alice@example.com",
        False,
    )
    user = user_row(db, "Alice")
    assert (user.id, user.username_key, user.email) == (body["id"], "alice", "alice@example.com")
    assert user.password_hash.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
    assert verifies(user.password_hash, PASSWORD)
    assert PASSWORD not in result.out + result.err


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_users_create_text_and_stdin_without_newline(cli: Cli, db: Settings) -> None:
    result = cli("users", "create", "--username", "bob", "--password-stdin", stdin=PASSWORD)
    user = user_row(db, "bob")
    assert (result.code, result.out) == (0, f"created user bob ({user.id})\n")
    assert user.email is None
    assert verifies(user.password_hash, PASSWORD)  # no newline to strip: taken as is


@pytest.mark.feature("cli-users", "password-hashing", "sqlite-backend", "postgres-backend")
@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short", "error: password must be at least 8 characters"),
        ("password123", "error: password is too common or too simple"),
        ("carol-smith", "error: password must not be the username"),
        ("x" * 300, "error: password must be at most 256 characters"),
    ],
    ids=["short", "common", "username", "too-long"],
)
def test_users_create_refuses_a_weak_password(
    cli: Cli, db: Settings, password: str, message: str
) -> None:
    result = cli(
        "users", "create", "--username", "Carol-Smith", "--password-stdin", stdin=password + "\n"
    )
    assert (result.code, result.out, result.messages) == (1, "", [message])
    assert all_users(db) == []


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
@pytest.mark.parametrize("again", ["alice", "ALICE", "ａｌｉｃｅ"])
def test_users_create_refuses_a_duplicate_username_case_insensitively(
    cli: Cli, db: Settings, again: str
) -> None:
    first = cli("users", "create", "--username", "Alice", "--password-stdin", stdin=PASSWORD)
    assert first.code == 0
    result = cli("users", "create", "--username", again, "--password-stdin", stdin=PASSWORD)
    assert (result.code, result.out, result.messages) == (
        1,
        "",
        [f"error: user {again!r} already exists"],
    )
    assert [u.username for u in all_users(db)] == ["Alice"]


@pytest.mark.one_backend
@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend", "username-profile")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--username", "no spaces"], "error: username must be 1-150 letters, digits or . @ + - _"),
        (
            ["--username", "p\u0430ypal"],  # a Cyrillic а among Latin letters
            "error: username must not mix letters of different scripts",
        ),
        (
            ["--username", "paypal\u3164"],  # HANGUL FILLER, invisible
            "error: username must not contain U+3164: usernames are made of visible letters"
            " and digits",
        ),
        (["--username", "x" * 151], "error: username must be 1-150 letters, digits or . @ + - _"),
        (
            ["--username", "dave", "--email", "not-an-email"],
            "error: 'not-an-email' is not a valid email address",
        ),
    ],
    ids=["space", "mixed-script", "invisible", "too-long", "email"],
)
def test_users_create_refuses_bad_identity(
    cli: Cli, db: Settings, extra: list[str], message: str
) -> None:
    result = cli("users", "create", *extra, "--password-stdin", stdin=PASSWORD)
    assert (result.code, result.out, result.messages) == (1, "", [message])
    assert all_users(db) == []


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
@pytest.mark.parametrize("stdin", ["", "\n"])
def test_empty_stdin_is_refused(cli: Cli, db: Settings, stdin: str) -> None:
    message = "error: no password on standard input (use --password-stdin with a pipe)"
    create = cli("users", "create", "--username", "erin", "--password-stdin", stdin=stdin)
    assert (create.code, create.out, create.messages) == (1, "", [message])
    assert all_users(db) == []

    cli("users", "create", "--username", "erin", "--password-stdin", stdin=PASSWORD)
    before = user_row(db, "erin").password_hash
    change = cli("users", "set-password", "erin", "--password-stdin", stdin=stdin)
    assert (change.code, change.out, change.messages) == (1, "", [message])
    assert user_row(db, "erin").password_hash == before


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_password_is_prompted_for_on_a_terminal(
    cli: Cli, db: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return PASSWORD

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    result = cli("users", "create", "--username", "tty", "--password-stdin", stdin=Terminal())
    assert result.code == 0, result.messages
    assert prompts == ["password: "]
    assert verifies(user_row(db, "tty").password_hash, PASSWORD)


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_users_list(cli: Cli, db: Settings) -> None:
    assert cli("users", "list").out == ""
    cli(
        "users",
        "create",
        "--username",
        "zoe",
        "--email",
        "zoe@example.com",
        "--password-stdin",
        stdin=PASSWORD,
    )
    cli("users", "create", "--username", "Adam", "--password-stdin", stdin=PASSWORD)
    cli("users", "disable", "zoe")

    listing = cli("users", "list")
    assert listing.code == 0
    ids = {u.username: u.id for u in all_users(db)}
    assert [line.split() for line in listing.out.splitlines()] == [
        ["Adam", "active", "-", ids["Adam"]],
        ["zoe", "disabled", "zoe@example.com", ids["zoe"]],
    ]
    as_json = cli("users", "list", "--json").json()
    assert [(u["username"], u["disabled"], u["id"]) for u in as_json] == [
        ("Adam", False, ids["Adam"]),
        ("zoe", True, ids["zoe"]),
    ]
    assert all("password_hash" not in u for u in as_json)


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_users_disable_revokes_every_sign_in(cli: Cli, db: Settings) -> None:
    cli("clients", "create", "--client-id", "app")
    alice = cli(
        "users", "create", "--username", "alice", "--password-stdin", "--json", stdin=PASSWORD
    ).json()
    bob = cli(
        "users", "create", "--username", "bob", "--password-stdin", "--json", stdin=PASSWORD
    ).json()
    live = [add_family(db, "app", alice["id"]), add_family(db, "app", alice["id"])]
    earlier = add_family(db, "app", alice["id"], revoked_reason="signed_out")
    bobs = add_family(db, "app", bob["id"])
    before = int(time.time())

    result = cli("users", "disable", "ALICE")

    assert (result.code, result.out) == (0, "disabled ALICE; revoked 2 session(s)\n")
    assert user_row(db, "alice").disabled is True
    assert user_row(db, "bob").disabled is False
    rows = families(db)
    for family_id in live:
        assert rows[family_id].revoked_reason == "user_disabled"
        assert (rows[family_id].revoked_at or 0) >= before
    assert rows[earlier].revoked_reason == "signed_out"
    assert (rows[earlier].revoked_at or before) < before
    assert (rows[bobs].revoked_at, rows[bobs].revoked_reason) == (None, None)

    again = cli("users", "disable", "alice")
    assert (again.code, again.out) == (0, "disabled alice; revoked 0 session(s)\n")


@pytest.mark.feature("cli-users", "password-hashing", "sqlite-backend", "postgres-backend")
def test_users_set_password_changes_the_hash_and_revokes_sign_ins(cli: Cli, db: Settings) -> None:
    cli("clients", "create", "--client-id", "app")
    alice = cli(
        "users", "create", "--username", "alice", "--password-stdin", "--json", stdin=PASSWORD
    ).json()
    family = add_family(db, "app", alice["id"])
    before = user_row(db, "alice")
    new_password = "another long passphrase"

    result = cli("users", "set-password", "alice", "--password-stdin", stdin=new_password + "\n")

    assert (result.code, result.out) == (0, "password changed for alice; revoked 1 session(s)\n")
    after = user_row(db, "alice")
    assert after.password_hash != before.password_hash
    assert verifies(after.password_hash, new_password)
    assert not verifies(after.password_hash, PASSWORD)
    assert after.password_changed_at >= before.password_changed_at
    row = families(db)[family]
    assert row.revoked_reason == "password_changed"
    assert row.revoked_at is not None


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_users_set_password_refuses_a_weak_password(cli: Cli, db: Settings) -> None:
    cli("users", "create", "--username", "alice", "--password-stdin", stdin=PASSWORD)
    before = user_row(db, "alice").password_hash
    result = cli("users", "set-password", "alice", "--password-stdin", stdin="Alice\n")
    assert (result.code, result.messages) == (1, ["error: password must be at least 8 characters"])
    same = cli("users", "set-password", "alice", "--password-stdin", stdin="ALICE" * 2)
    assert same.code == 0  # "alicealice" is not the username
    named = cli("users", "set-password", "ALICE", "--password-stdin", stdin="alice")
    assert named.code == 1
    assert user_row(db, "alice").password_hash != before


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_unknown_user_is_an_error(cli: Cli, db: Settings) -> None:
    disable = cli("users", "disable", "x")
    assert (disable.code, disable.out, disable.messages) == (1, "", ["error: no user 'x'"])
    change = cli("users", "set-password", "x", "--password-stdin", stdin=PASSWORD)
    assert (change.code, change.out, change.messages) == (1, "", ["error: no user 'x'"])


# -- keys -------------------------------------------------------------------------------


@pytest.mark.feature("cli-keys", "key-lifecycle")
def test_keys_list_shows_current_and_next(cli: Cli, own_keys: Path) -> None:
    result = cli("keys", "list")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split() == ["KID", "STATE", "CREATED", "ACTIVATED", "RETIRED"]
    by_kid = {row.split()[0]: row.split() for row in rows}
    current, upcoming = kid_in(own_keys, "current"), kid_in(own_keys, "next")
    assert set(by_kid) == {current, upcoming}
    assert by_kid[current][1] == "current"
    assert by_kid[upcoming][1] == "next"
    # current: created, activated (date + time each), never retired
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", by_kid[current][2])
    assert by_kid[current][-1] == "-"
    assert by_kid[upcoming][-2:] == ["-", "-"]


@pytest.mark.feature("cli-keys")
def test_keys_list_on_an_empty_directory(
    cli: Cli, tmp_path: Path, environment: pytest.MonkeyPatch
) -> None:
    environment.setenv("AUTH_KEYS_DIR", str(tmp_path / "none"))
    result = cli("keys", "list")
    assert (result.code, result.out) == (
        0,
        f"no keys in {tmp_path / 'none'}: run `python -m server keys rotate`\n",
    )


@pytest.mark.feature("cli-keys", "key-lifecycle")
def test_keys_rotate_promotes_next_and_prints_it(cli: Cli, own_keys: Path) -> None:
    old_current, old_next = kid_in(own_keys, "current"), kid_in(own_keys, "next")

    result = cli("keys", "rotate", "--force")

    assert (result.code, result.messages) == (0, [])
    first, *listing = result.out.splitlines()
    assert first == f"rotated: {old_next} now signs"
    states = manifest_states(own_keys)
    assert states[old_current] == "retired"
    assert states[old_next] == "current"
    assert len(states) == 3
    new_next = kid_in(own_keys, "next")
    # ... followed by the new state of every key, as `keys list` shows it.
    assert "\n".join(listing) + "\n" == cli("keys", "list").out
    assert [line.split()[:2] for line in listing[1:]] == [
        [old_current, "retired"],
        [old_next, "current"],
        [new_next, "next"],
    ]
    assert [(e["event"], e["kid"]) for e in result.logs if e.get("audit")] == [
        ("key.rotated", old_next)
    ]


@pytest.mark.feature("cli-keys", "key-lifecycle")
def test_keys_rotate_refuses_a_next_key_younger_than_the_jwks_max_age(
    cli: Cli, own_keys: Path, environment: pytest.MonkeyPatch
) -> None:
    # 1,000 s between rotations: the JWKS may be cached for 100 s.
    environment.setenv("AUTH_KEY_ROTATION_INTERVAL", "1000")
    before = (own_keys / MANIFEST).read_text()
    data = json.loads(before)
    for entry in data["keys"]:
        if entry["state"] == "next":
            entry["created_at"] = int(time.time()) - 40
    (own_keys / MANIFEST).write_text(json.dumps(data))
    young = (own_keys / MANIFEST).read_text()

    refused = cli("keys", "rotate")

    assert refused.code == 1
    assert refused.out == ""
    assert len(refused.messages) == 1
    match = re.fullmatch(
        rf"error: the next key {kid_in(own_keys, 'next')} was published (\d+) s ago, but a JWKS "
        r"may be cached for 100 s, so verifiers might not know it yet: rotate in (\d+) s, or "
        r"pass --force if no verifier caches the JWKS \(or all refetch it on an unknown kid\)\n",
        refused.messages[0] + "\n",
    )
    assert match is not None, refused.messages
    assert 40 <= int(match.group(1)) <= 45
    assert int(match.group(1)) + int(match.group(2)) == 100
    assert (own_keys / MANIFEST).read_text() == young, "nothing may change on a refusal"

    # Once the next key has been published for the whole max-age, rotation goes ahead.
    for entry in data["keys"]:
        if entry["state"] == "next":
            entry["created_at"] = int(time.time()) - 100
    (own_keys / MANIFEST).write_text(json.dumps(data))
    assert cli("keys", "rotate").code == 0


@pytest.mark.feature("cli-keys", "key-lifecycle")
def test_keys_rotate_creates_keys_in_an_empty_directory(
    cli: Cli, tmp_path: Path, environment: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "fresh-keys"
    environment.setenv("AUTH_KEYS_DIR", str(directory))
    result = cli("keys", "rotate")
    assert result.code == 0
    assert result.out.splitlines()[0] == f"rotated: {kid_in(directory, 'current')} now signs"
    assert sorted(manifest_states(directory).values()) == ["current", "next"]


@pytest.mark.feature("cli-keys", "key-lifecycle")
def test_keys_prune(cli: Cli, own_keys: Path, environment: pytest.MonkeyPatch) -> None:
    nothing = cli("keys", "prune")
    assert (nothing.code, nothing.out) == (0, "no retired keys\n")

    cli("keys", "rotate", "--force")
    retired = kid_in(own_keys, "retired")
    environment.setenv("AUTH_ACCESS_TOKEN_TTL", "600")
    kept = cli("keys", "prune")
    assert kept.code == 0
    match = re.fullmatch(
        rf"kept {retired}: tokens it signed may be valid for (\d+) s more\n", kept.out
    )
    assert match is not None, kept.out
    assert 595 <= int(match.group(1)) <= 600
    assert (own_keys / f"{retired}.pem").exists()

    data = json.loads((own_keys / MANIFEST).read_text())
    for entry in data["keys"]:
        if entry["kid"] == retired:
            entry["retired_at"] -= 601
    (own_keys / MANIFEST).write_text(json.dumps(data))
    removed = cli("keys", "prune")
    assert (removed.code, removed.out) == (0, f"removed {retired}\n")
    assert retired not in manifest_states(own_keys)
    assert not (own_keys / f"{retired}.pem").exists()

    orphan = KeyStore(own_keys)._generate("next")  # a rotation killed before keys.json
    swept = cli("keys", "prune")
    assert (swept.code, swept.out) == (
        0,
        f"removed {orphan.kid}.pem: keys.json does not list it (left by an interrupted "
        "rotation)\nno retired keys\n",
    )
    assert not (own_keys / f"{orphan.kid}.pem").exists()


# -- seed-demo ----------------------------------------------------------------------------


@pytest.mark.feature(
    "cli-clients", "cli-users", "sqlite-backend", "postgres-backend", "account-api-scope"
)
def test_seed_demo_seeds_an_empty_database_once(cli: Cli, db: Settings, tmp_path: Path) -> None:
    result = cli("seed-demo")

    assert result.code == 0
    record = tmp_path / "data" / "demo-credentials.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    creds = json.loads(record.read_text())
    assert set(creds) == {"client_id", "client_secret", "username", "password"}
    assert (creds["client_id"], creds["username"]) == ("demo-client", "demo")
    assert "  client_id:     demo-client\n" in result.out
    assert f"  client_secret: {creds['client_secret']}\n" in result.out
    assert f"  password:      {creds['password']}\n" in result.out
    (curl,) = [line for line in result.out.splitlines() if "curl" in line]
    assert curl.strip().startswith(f"curl -s -u 'demo-client:{creds['client_secret']}' ")
    assert "-d grant_type=password -d username=demo" in curl
    assert curl.endswith("http://127.0.0.1:8000/oauth2/token")

    client = client_row(db, "demo-client")
    assert client is not None
    assert client.check_client_secret(creds["client_secret"])
    assert client.check_grant_type("password")
    assert client.scope == "profile email api account"
    assert client.is_first_party  # the account API, password change included, works for it
    demo = user_row(db, "demo")
    assert demo.email == "demo@example.com"
    assert verifies(demo.password_hash, creds["password"])

    again = cli("seed-demo")
    assert (again.code, again.out) == (
        0,
        "demo data not seeded: the database already has clients or users "
        "(saved in data/demo-credentials.json)\n",
    )
    assert all_clients(db) == ["demo-client"]
    assert json.loads(record.read_text()) == creds


@pytest.mark.feature("cli-users", "sqlite-backend", "postgres-backend")
def test_seed_demo_leaves_a_database_with_users_alone(
    cli: Cli, db: Settings, tmp_path: Path, environment: pytest.MonkeyPatch
) -> None:
    environment.setenv("AUTH_ISSUER", "https://auth.example.com/")
    cli("users", "create", "--username", "real", "--password-stdin", stdin=PASSWORD)
    result = cli("seed-demo")
    assert (result.code, result.out) == (
        0,
        "demo data not seeded: the database already has clients or users\n",
    )
    assert all_clients(db) == []
    assert not (tmp_path / "data").exists()


# -- serve (never starts a real server) ---------------------------------------------------


@pytest.mark.feature("cli-serve", "production-guard")
def test_serve_refuses_insecure_production_settings(
    cli: Cli, tmp_path: Path, environment: pytest.MonkeyPatch, served: list[Any]
) -> None:
    empty = tmp_path / "no-keys"
    environment.setenv("AUTH_ENV", "production")
    environment.setenv("AUTH_KEYS_DIR", str(empty))

    result = cli("serve")

    assert (result.code, result.out) == (1, "")
    header, *reasons = result.messages
    assert header == "error: refusing to start in production:"
    assert len(reasons) == 4
    assert reasons[0] == (
        "  - AUTH_ISSUER='http://127.0.0.1:8000' is not https: set it to the public https URL"
    )
    assert reasons[1].startswith("  - AUTH_SECRET_KEY is the development default")
    assert reasons[3].startswith("  - AUTH_ARGON2_MEMORY_COST/AUTH_ARGON2_TIME_COST are below")
    assert reasons[2] == (
        f"  - no signing keys in AUTH_KEYS_DIR={str(empty)!r}: "
        "run `python -m server keys rotate` to create them"
    )
    assert served == []
    assert not empty.exists()  # production never makes keys on its own


def secure_production(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("AUTH_ENV", "production")
    environment.setenv("AUTH_ISSUER", "https://auth.example.com")
    environment.setenv("AUTH_SECRET_KEY", STRONG_SECRET)
    environment.delenv("AUTH_ARGON2_MEMORY_COST")
    environment.delenv("AUTH_ARGON2_TIME_COST")


@pytest.mark.feature("cli-serve", "production-guard")
def test_serve_in_production_needs_a_current_key(
    cli: Cli, db: Settings, tmp_path: Path, environment: pytest.MonkeyPatch, served: list[Any]
) -> None:
    secure_production(environment)
    directory = tmp_path / "stray-keys"
    directory.mkdir()
    shutil.copy(next(db.keys_dir.glob("*.pem")), directory)  # a key file, but no keys.json
    environment.setenv("AUTH_KEYS_DIR", str(directory))

    result = cli("serve")

    assert (result.code, result.out, result.messages) == (
        1,
        "",
        [
            f"error: no current signing key in {directory}: "
            "run `python -m server keys rotate` to create one"
        ],
    )
    assert served == []


@pytest.mark.feature("cli-serve", "production-guard", "sqlite-backend", "postgres-backend")
def test_serve_in_production_with_secure_settings_hands_over_to_uvicorn(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, served: list[Any]
) -> None:
    secure_production(environment)
    environment.setenv("AUTH_TRUSTED_PROXIES", "192.0.2.1")  # the proxy in front
    result = cli("serve", "--host", "192.0.2.10", "--port", "8443", "--workers", "4")
    assert (result.code, result.messages) == (0, [])
    ((args, kwargs),) = served
    assert args == ("server.main:app_factory",)
    assert (kwargs["factory"], kwargs["host"], kwargs["port"], kwargs["workers"]) == (
        True,
        "192.0.2.10",
        8443,
        4,
    )


@pytest.mark.feature("cli-serve", "production-guard", "header-limits")
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "auth.internal"])  # noqa: S104
def test_serve_in_production_refuses_an_exposed_address_without_a_proxy(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, served: list[Any], host: str
) -> None:
    secure_production(environment)
    result = cli("serve", "--host", host)
    assert (result.code, result.out) == (1, "")
    (message,) = result.messages
    assert message.startswith(
        f"error: refusing to listen on {host} in production without a proxy in front: "
    )
    assert "AUTH_TRUSTED_PROXIES" in message
    assert served == []


@pytest.mark.feature("cli-serve", "production-guard", "header-limits")
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_serve_in_production_on_loopback_needs_no_proxy_setting(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, served: list[Any], host: str
) -> None:
    # A proxy on the same host (the systemd unit in deploy/) reaches it over loopback.
    secure_production(environment)
    result = cli("serve", "--host", host)
    assert (result.code, result.messages) == (0, [])
    ((_, kwargs),) = served
    assert kwargs["host"] == host


@pytest.mark.feature("cli-serve", "sqlite-backend", "postgres-backend")
def test_serve_passes_options_through_to_uvicorn(cli: Cli, db: Settings, served: list[Any]) -> None:
    result = cli("serve", "--host", "127.0.0.2", "--port", "8123", "--workers", "3")
    assert (result.code, result.out, result.messages) == (0, "", [])
    ((args, kwargs),) = served
    assert args == ("server.main:app_factory",)
    assert kwargs["factory"] is True
    assert (kwargs["host"], kwargs["port"], kwargs["workers"]) == ("127.0.0.2", 8123, 3)
    assert kwargs["log_level"] == "info"
    assert kwargs["proxy_headers"] is False  # forwarding headers: only AUTH_TRUSTED_PROXIES


@pytest.mark.feature("cli-serve", "sqlite-backend")
@pytest.mark.parametrize(("port", "expected"), [(None, 8000), ("8100", 8100)])
def test_serve_defaults_and_port_from_the_environment(
    cli: Cli,
    tmp_path: Path,
    environment: pytest.MonkeyPatch,
    served: list[Any],
    port: str | None,
    expected: int,
) -> None:
    if port is not None:
        environment.setenv("PORT", port)
    keys = tmp_path / "dev-keys"
    environment.setenv("AUTH_KEYS_DIR", str(keys))
    assert cli("migrate").code == 0

    result = cli("serve")

    assert result.code == 0, result.messages
    ((_, kwargs),) = served
    assert (kwargs["host"], kwargs["port"], kwargs["workers"]) == ("127.0.0.1", expected, 1)
    # Outside production, serve makes development keys when there are none.
    assert sorted(manifest_states(keys).values()) == ["current", "next"]


# -- settings errors and usage ----------------------------------------------------------


@pytest.mark.feature("settings", "cli-serve", "cli-clients")
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "Input should be a valid integer, unable to parse string as an integer"),
        ("5", "Input should be greater than or equal to 30"),
    ],
)
@pytest.mark.parametrize("argv", [("serve",), ("clients", "list"), ("keys", "list")])
def test_invalid_setting_is_one_line_naming_the_variable(
    cli: Cli,
    environment: pytest.MonkeyPatch,
    served: list[Any],
    argv: tuple[str, ...],
    value: str,
    message: str,
) -> None:
    environment.setenv("AUTH_ACCESS_TOKEN_TTL", value)
    result = cli(*argv)
    assert (result.code, result.out, result.messages) == (
        1,
        "",
        [f"error: AUTH_ACCESS_TOKEN_TTL: {message}"],
    )
    assert served == []


@pytest.mark.feature("cli-serve")
@pytest.mark.parametrize(
    "argv",
    [[], ["nonsense"], ["keys"], ["clients", "create"], ["users", "create", "--username", "u"]],
)
def test_usage_errors_exit_with_status_2(
    cli: Cli, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("usage: python -m server")


@pytest.mark.feature("cli-keys")
@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "server"], [str(Path(sys.executable).parent / "token-server")]],
    ids=["python-m-server", "console-script"],
)
def test_entry_points_run_the_command_line(
    command: list[str], own_keys: Path, tmp_path: Path
) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AUTH_")}
    environment["AUTH_KEYS_DIR"] = str(own_keys)
    environment["PYTHONPATH"] = str(PROJECT_ROOT)
    completed = subprocess.run(
        [*command, "keys", "list"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert kid_in(own_keys, "current") in completed.stdout
    failed = subprocess.run(
        [*command, "users", "disable", "x"],
        capture_output=True,
        text=True,
        env={**environment, "AUTH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'e.db'}"},
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1] == migrate_hint()


# -- tokens prune -------------------------------------------------------------------------


@pytest.mark.feature("token-cleanup", "cli-tokens", "operator-error-lines")
def test_tokens_prune_deletes_only_what_can_no_longer_matter(cli: Cli, db: Settings) -> None:
    cli("clients", "create", "--client-id", "web")
    cli("users", "create", "--username", "ann", "--password-stdin", stdin="a long passphrase\n")
    user_id = user_row(db, "ann").id
    ttl = db.access_token_ttl
    stamp = int(time.time())

    async def seed(session: AsyncSession) -> None:
        def family(fid: str, *, expires_at: int, revoked_at: int | None = None) -> None:
            session.add(
                RefreshFamily(
                    id=fid,
                    client_id="web",
                    user_id=user_id,
                    auth_time=stamp,
                    expires_at=expires_at,
                    revoked_at=revoked_at,
                    revoked_reason=None if revoked_at is None else "revoked",
                )
            )
            session.add(
                RefreshToken(
                    family_id=fid,
                    token_hash=sha256_hex(fid),
                    expires_at=stamp + 60,
                    rotated_at=stamp - 5,  # rotated: still kept while the family lives
                )
            )

        family("live", expires_at=stamp + 86_400)
        # Revoked moments ago: its access tokens may still be presented (and refused) for a
        # while, and the account page may show it; kept.
        family("revoked-now", expires_at=stamp + 86_400, revoked_at=stamp - 5)
        family("revoked-long-ago", expires_at=stamp + 86_400, revoked_at=stamp - ttl - 1)
        # Past its cap, but an access token issued just before the cap may still live; kept.
        family("capped-just-now", expires_at=stamp - 5)
        family("capped-long-ago", expires_at=stamp - ttl - 1)
        await session.flush()
        session.add(RevokedAccessToken(jti="live-jti", client_id="web", expires_at=stamp + 60))
        session.add(
            RevokedAccessToken(
                jti="dead-jti", client_id="web", expires_at=stamp - PRUNE_SKEW_MARGIN - 1
            )
        )

    in_db(db, seed)

    result = cli("tokens", "prune")

    assert (result.code, result.messages) == (0, [])
    assert result.out == (
        "deleted 2 ended sign-ins (with their refresh tokens), "
        "1 expired access-token revocations, 0 expired authorization codes, "
        "0 ended browser sessions and 0 expired pushed authorization requests\n"
    )
    assert sorted(families(db)) == ["capped-just-now", "live", "revoked-now"]

    async def leftovers(session: AsyncSession) -> tuple[list[str], list[str]]:
        tokens = await session.scalars(select(RefreshToken.family_id))
        jtis = await session.scalars(select(RevokedAccessToken.jti))
        return sorted(tokens), list(jtis)

    assert in_db(db, leftovers) == (["capped-just-now", "live", "revoked-now"], ["live-jti"])
    assert [e["event"] for e in result.logs if e.get("audit")] == ["tokens.pruned"]
    again = cli("tokens", "prune")
    assert again.out.startswith("deleted 0 ended sign-ins")


@pytest.mark.feature("growth-limits", "token-cleanup", "cli-tokens")
def test_tokens_prune_deletes_expired_codes_and_ended_browser_sessions(
    cli: Cli, db: Settings
) -> None:
    cli("clients", "create", "--client-id", "web")
    cli("users", "create", "--username", "ann", "--password-stdin", stdin="a long passphrase\n")
    user_id = user_row(db, "ann").id
    margin = max(db.access_token_ttl, db.authorization_code_ttl)
    stamp = int(time.time())
    long_ago = stamp - margin - 1

    async def seed(session: AsyncSession) -> None:
        def browser(sid: str, *, expires_at: int, ended_at: int | None = None) -> None:
            session.add(
                BrowserSession(
                    id=sid,
                    token_hash=sha256_hex(sid),
                    user_id=user_id,
                    auth_time=stamp - 90_000,
                    created_at=stamp - 90_000,
                    expires_at=expires_at,
                    ended_at=ended_at,
                )
            )

        browser("live", expires_at=stamp + 3600)
        browser("ended-just-now", expires_at=stamp + 3600, ended_at=stamp - 5)
        browser("ended-long-ago", expires_at=stamp + 3600, ended_at=long_ago)
        browser("expired-just-now", expires_at=stamp - 5)
        browser("expired-long-ago", expires_at=long_ago)
        await session.flush()
        for fid, revoked_at in (("live", None), ("revoked", stamp - 5)):
            session.add(
                RefreshFamily(
                    id=fid,
                    client_id="web",
                    user_id=user_id,
                    auth_time=stamp,
                    expires_at=stamp + 86_400,
                    revoked_at=revoked_at,
                    # Created through a browser session that expired long ago.
                    browser_session_id="expired-long-ago",
                )
            )
        await session.flush()

        def code(
            name: str, *, expires_at: int, used: bool = False, family: str | None = None
        ) -> None:
            session.add(
                AuthorizationCode(
                    code_hash=sha256_hex(name),
                    client_id="web",
                    user_id=user_id,
                    browser_session_id="live",
                    redirect_uri="https://app.example/cb",
                    auth_time=stamp,
                    created_at=expires_at - 60,
                    expires_at=expires_at,
                    used_at=expires_at - 30 if used else None,
                    family_id=family,
                )
            )

        code("live", expires_at=stamp + 30)
        code("expired-just-now", expires_at=stamp - 5)
        code("expired-long-ago", expires_at=long_ago)
        code("used-long-ago", expires_at=long_ago, used=True)
        # Its sign-in still lives: a replay of the code must still revoke it (RFC 6749 §4.1.2).
        code("used-live-family", expires_at=long_ago, used=True, family="live")
        code("used-revoked-family", expires_at=long_ago, used=True, family="revoked")

    in_db(db, seed)

    result = cli("tokens", "prune")

    assert (result.code, result.messages) == (0, [])
    assert result.out == (
        "deleted 0 ended sign-ins (with their refresh tokens), "
        "0 expired access-token revocations, 3 expired authorization codes, "
        "2 ended browser sessions and 0 expired pushed authorization requests\n"
    )

    async def leftovers(session: AsyncSession) -> tuple[list[str], list[str], list[str | None]]:
        sessions = await session.scalars(select(BrowserSession.id))
        codes = await session.scalars(select(AuthorizationCode.code_hash))
        links = await session.scalars(select(RefreshFamily.browser_session_id))
        return sorted(sessions), sorted(codes), list(links)

    sessions, codes, links = in_db(db, leftovers)
    assert sessions == ["ended-just-now", "expired-just-now", "live"]
    kept = ["expired-just-now", "live", "used-live-family"]
    assert codes == sorted(sha256_hex(name) for name in kept)
    assert links == [None, None]  # the families live on, unlinked from the deleted session
    (event,) = [e for e in result.logs if e.get("audit")]
    assert event["event"] == "tokens.pruned"
    assert (event["authorization_codes"], event["browser_sessions"]) == (3, 2)


# -- operational failures: one line, no traceback -------------------------------------------


def assert_one_error_line(result: Run) -> str:
    assert result.code != 0
    assert "Traceback" not in result.err
    (line,) = result.messages
    assert line.startswith("error: "), line
    return line


@pytest.mark.feature("cli-keys", "operator-error-lines")
@pytest.mark.parametrize("content", ["", "{not json", '{"keys": [{"kid": 1}]}', "[]"])
def test_a_malformed_keys_json_is_one_error_line_naming_the_file(
    cli: Cli, own_keys: Path, content: str
) -> None:
    (own_keys / MANIFEST).write_text(content)

    for command in (("keys", "list"), ("keys", "rotate", "--force"), ("keys", "prune")):
        line = assert_one_error_line(cli(*command))
        assert str(own_keys / MANIFEST) in line, line
    assert (own_keys / MANIFEST).read_text() == content, "nothing may change on a refusal"


@pytest.mark.feature("cli-serve", "cli-keys", "operator-error-lines")
@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_a_damaged_pem_is_one_error_line_naming_the_file(
    cli: Cli, db: Settings, own_keys: Path, damage: str
) -> None:
    pem = own_keys / f"{kid_in(own_keys, 'current')}.pem"
    if damage == "truncated":
        pem.write_bytes(pem.read_bytes()[:100])
    else:
        pem.unlink()
        pem.mkdir()  # reading it fails even as root

    line = assert_one_error_line(cli("serve"))
    assert str(pem) in line, line


@pytest.mark.feature("cli-serve", "cli-migrate", "postgres-backend", "operator-error-lines")
@pytest.mark.parametrize("command", [("serve",), ("migrate",), ("users", "list")])
def test_an_unreachable_postgresql_is_one_error_line_without_the_password(
    cli: Cli, environment: pytest.MonkeyPatch, keys_dir: Path, command: tuple[str, ...]
) -> None:
    environment.setenv("AUTH_KEYS_DIR", str(keys_dir))
    environment.setenv(
        "AUTH_DATABASE_URL", "postgresql+asyncpg://tokens:s3cret-pw@127.0.0.1:1/authdb"
    )

    result = cli(*command)

    line = assert_one_error_line(result)
    assert "127.0.0.1:1" in line and "authdb" in line, line
    assert "s3cret-pw" not in result.err + result.out


@pytest.mark.feature("cli-serve", "cli-migrate", "sqlite-backend", "operator-error-lines")
@pytest.mark.parametrize("command", [("serve",), ("migrate",), ("users", "list")])
def test_a_sqlite_path_that_cannot_be_created_is_one_error_line(
    cli: Cli,
    environment: pytest.MonkeyPatch,
    keys_dir: Path,
    tmp_path: Path,
    command: tuple[str, ...],
) -> None:
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "data" / "auth.db"  # its directory cannot be made
    environment.setenv("AUTH_KEYS_DIR", str(keys_dir))
    environment.setenv("AUTH_DATABASE_URL", f"sqlite+aiosqlite:///{path}")

    line = assert_one_error_line(cli(*command))
    assert str(path.parent) in line, line


@pytest.mark.feature("cli-migrate", "migrations", "postgres-backend", "operator-error-lines")
def test_two_concurrent_migrations_of_a_fresh_postgresql_both_succeed(tmp_path: Path) -> None:
    url = _new_pg_database()
    try:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
        environment.update(AUTH_ENV="testing", AUTH_DATABASE_URL=url, PYTHONPATH=str(PROJECT_ROOT))
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "server", "migrate"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
                cwd=tmp_path,
            )
            for _ in range(2)
        ]
        results = [(run.communicate(timeout=120), run.returncode) for run in runs]
        for (out, err), code in results:
            assert (code, out) == (0, "database schema is at head\n"), err
        assert asyncio.run(_current_revision(url)) == head_revision()
    finally:
        _drop_pg_database(url)


async def _current_revision(url: str) -> str | None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return (
                await connection.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar()
    finally:
        await engine.dispose()


# -- client authentication methods and resources (issue 19) ------------------------------


def _public_jwks() -> dict[str, Any]:
    from joserfc.jwk import ECKey

    return {"keys": [ECKey.generate_key("P-256", parameters={"kid": "k1"}).as_dict(private=False)]}


@pytest.mark.feature("client-auth-private-key-jwt", "cli-clients")
def test_clients_create_private_key_jwt_from_a_jwks_file_or_uri(
    cli: Cli, db: Settings, tmp_path: Path
) -> None:
    jwks = _public_jwks()
    (tmp_path / "jwks.json").write_text(json.dumps(jwks, indent=2))
    made = cli(
        "clients", "create", "--client-id", "bank", "--auth-method", "private_key_jwt",
        "--jwks-file", str(tmp_path / "jwks.json"), "--grant", "client_credentials", "--json",
    )  # fmt: skip
    assert made.code == 0, made.err
    view = made.json()
    assert view["token_endpoint_auth_method"] == "private_key_jwt"
    assert view["client_secret"] is None and view["public"] is False
    assert view["jwks"] == jwks and "jwks_uri" not in view
    row = client_row(db, "bank")
    assert row is not None and row.auth_method == "private_key_jwt"
    assert row.secret_sealed is None and not row.uses_secret
    text = cli(
        "clients", "create", "--client-id", "remote", "--auth-method", "private_key_jwt",
        "--jwks-uri", "https://client.example/jwks.json", "--grant", "client_credentials",
    )  # fmt: skip
    assert text.code == 0 and "client_secret" not in text.out, text.out
    shown = json.loads(cli("clients", "show", "remote").out)
    assert shown["jwks_uri"] == "https://client.example/jwks.json" and "jwks" not in shown
    # No secret to rotate: it rotates its keys.
    refused = cli("clients", "rotate-secret", "bank")
    assert refused.code == 1 and "private_key_jwt" in refused.messages[0]


@pytest.mark.feature("client-auth-client-secret-jwt", "cli-clients")
def test_clients_create_client_secret_jwt_seals_its_secret(cli: Cli, db: Settings) -> None:
    from server.config import DEV_SECRET_KEY
    from server.secretbox import unseal

    made = cli(
        "clients", "create", "--client-id", "hmac", "--auth-method", "client_secret_jwt",
        "--grant", "client_credentials", "--json",
    )  # fmt: skip
    assert made.code == 0, made.err
    secret = made.json()["client_secret"]
    assert SECRET_RE.match(secret)
    assert made.json()["token_endpoint_auth_method"] == "client_secret_jwt"
    row = client_row(db, "hmac")
    assert row is not None and row.secret_sealed is not None
    assert unseal(DEV_SECRET_KEY, row.secret_sealed, context="hmac") == secret
    # The secret keys assertions only: sent as such it is refused.
    assert row.check_client_secret(secret) is False
    rotated = cli("clients", "rotate-secret", "hmac", "--json").json()["client_secret"]
    row = client_row(db, "hmac")
    assert row is not None and row.secret_sealed is not None
    assert unseal(DEV_SECRET_KEY, row.secret_sealed, context="hmac") == rotated != secret


@pytest.mark.feature("client-auth-private-key-jwt", "cli-clients")
def test_clients_create_auth_method_refusals(cli: Cli, db: Settings, tmp_path: Path) -> None:
    from joserfc.jwk import ECKey

    private = {"keys": [ECKey.generate_key("P-256").as_dict(private=True)]}
    (tmp_path / "private.json").write_text(json.dumps(private))
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "huge.json").write_text(" " * 70_000 + "{}")
    (tmp_path / "good.json").write_text(json.dumps(_public_jwks()))
    pk = ["--auth-method", "private_key_jwt"]
    cases = [
        (["--public", *pk, "--jwks-file", str(tmp_path / "good.json")], "public client"),
        (pk, "needs its public keys"),
        (["--jwks-uri", "https://client.example/jwks"], "only for private_key_jwt"),
        (["--auth-method", "client_secret_jwt", "--jwks-file", str(tmp_path / "good.json")],
         "only for private_key_jwt"),
        ([*pk, "--jwks-file", str(tmp_path / "private.json")], "public keys only"),
        ([*pk, "--jwks-file", str(tmp_path / "garbage.json")], "not JSON"),
        ([*pk, "--jwks-file", str(tmp_path / "huge.json")], "larger than"),
        ([*pk, "--jwks-file", str(tmp_path / "missing.json")], "cannot read --jwks-file"),
        ([*pk, "--jwks-uri", "ftp://client.example/jwks"], "https URL"),
        ([*pk, "--jwks-uri", "https://user@client.example/jwks"], "https URL"),
    ]  # fmt: skip
    for extra, message in cases:
        result = cli("clients", "create", "--client-id", "x", *extra, "--json")
        assert result.code == 1 and result.out == "", (extra, result.out)
        assert len(result.messages) == 1 and message in result.messages[0], (extra, result.err)
    assert all_clients(db) == []


@pytest.mark.feature("client-auth-private-key-jwt", "cli-clients")
def test_clients_create_with_resources(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch
) -> None:
    unset = cli("clients", "create", "--client-id", "any", "--json").json()
    assert unset["resources"] is None  # every one of AUTH_RESOURCES
    none_configured = cli(
        "clients", "create", "--client-id", "x", "--resource", "https://api.example"
    )
    assert none_configured.code == 1 and "AUTH_RESOURCES" in none_configured.messages[0]
    environment.setenv("AUTH_RESOURCES", "https://api.example,https://reports.example")
    made = cli(
        "clients", "create", "--client-id", "narrow", "--resource", "https://api.example",
        "--resource", "https://api.example", "--json",
    )  # fmt: skip
    assert made.json()["resources"] == ["https://api.example"]
    row = client_row(db, "narrow")
    assert row is not None and row.resources == "https://api.example"
    unknown = cli(
        "clients", "create", "--client-id", "y", "--resource", "https://elsewhere.example"
    )
    assert unknown.code == 1 and "not one of AUTH_RESOURCES" in unknown.messages[0]
    assert json.loads(cli("clients", "show", "any").out)["origin"] is None


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_clients_create_dpop_bound(cli: Cli, db: Settings) -> None:
    body = cli("clients", "create", "--client-id", "fapi", "--dpop-bound", "--json").json()
    assert body["dpop_bound_access_tokens"] is True
    row = client_row(db, "fapi")
    assert row is not None and row.dpop_bound is True
    plain = cli("clients", "create", "--client-id", "plain", "--json").json()
    assert plain["dpop_bound_access_tokens"] is False


@pytest.mark.feature("cli-clients", "sqlite-backend", "postgres-backend")
def test_clients_create_require_par(cli: Cli, db: Settings) -> None:
    """RFC 9126 §6 ``require_pushed_authorization_requests``, set by ``--require-par``."""
    body = cli("clients", "create", "--client-id", "pushy", "--require-par", "--json").json()
    assert body["require_pushed_authorization_requests"] is True
    assert body["dpop_bound_access_tokens"] is False
    row = client_row(db, "pushy")
    assert row is not None and row.require_par is True and row.dpop_bound is False
    shown = json.loads(cli("clients", "show", "pushy").out)
    assert shown["require_pushed_authorization_requests"] is True
    plain = cli("clients", "create", "--client-id", "plain", "--json").json()
    assert plain["require_pushed_authorization_requests"] is False
    plain_row = client_row(db, "plain")
    assert plain_row is not None and plain_row.require_par is False


@pytest.mark.feature("mfa-factor-management")
def test_users_reset_factors_removes_every_factor_and_ends_the_browsers(
    cli: Cli, db: Settings
) -> None:
    """For an operator without the admin API: what ``DELETE /admin/v1/users/{id}/factors``
    does (a person who lost their phone and their recovery codes)."""
    alice = cli(
        "users", "create", "--username", "alice", "--password-stdin", "--json", stdin=PASSWORD
    ).json()
    bob = cli(
        "users", "create", "--username", "bob", "--password-stdin", "--json", stdin=PASSWORD
    ).json()

    async def seed(session: AsyncSession) -> None:
        for person in (alice["id"], bob["id"]):
            session.add(TotpFactor(user_id=person, secret_sealed="x", confirmed_at=1))
            session.add(RecoveryCode(code_hash="h" + person, user_id=person))
            session.add(
                WebAuthnCredential(
                    user_id=person, credential_id="c" + person, public_key=b"k", name="Key"
                )
            )
            session.add(
                BrowserSession(
                    token_hash="t" + person, user_id=person, auth_time=1, expires_at=2**40
                )
            )
        await session.commit()

    in_db(db, seed)
    result = cli("users", "reset-factors", "ALICE")
    assert (result.code, result.out) == (
        0,
        "reset the second factors of ALICE: 2 removed, 1 browser session(s) ended\n",
    )

    async def left(session: AsyncSession) -> list[tuple[str, ...]]:
        rows = []
        for model in (TotpFactor, RecoveryCode, WebAuthnCredential):
            rows += [(model.__tablename__, r.user_id) for r in await session.scalars(select(model))]
        sessions = await session.scalars(
            select(BrowserSession).where(BrowserSession.ended_at.is_(None))
        )
        return sorted(rows + [("live_session", s.user_id) for s in sessions])

    assert in_db(db, left) == sorted(
        [
            ("totp_factors", bob["id"]),
            ("recovery_codes", bob["id"]),
            ("webauthn_credentials", bob["id"]),
            ("live_session", bob["id"]),
        ]
    )
    unknown = cli("users", "reset-factors", "nobody")
    assert (unknown.code, unknown.messages) == (1, ["error: no user 'nobody'"])
