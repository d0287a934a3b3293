"""``python -m server keys …`` and ``serve`` with ``AUTH_KEY_STORE=database``, through ``main``
on SQLite and on PostgreSQL: the keys live in ``signing_keys``, nothing is written to
``AUTH_KEYS_DIR``, and every refusal is one ``error: …`` line (no traceback) naming the fix.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from joserfc.jwk import RSAKey
from sqlalchemy import select, text, update

from server.config import Settings
from server.db import create_engine
from server.keycrypt import parse_encryption_key
from server.keys import KeyStore
from server.keys_db import LOCK_ID, TABLE
from tests.conftest import Cli, Run

pytestmark = [
    pytest.mark.feature("key-store-database", "cli-keys"),
    pytest.mark.usefixtures("restore_logging"),
]

STRONG_SECRET = "q7Zr2LxW9mPb4TnV8cKd1HyF6sJg3RaE0uMwXo5BkQ_e-NhC"
HOW_TO_MAKE = 'make one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`'


@pytest.fixture(scope="session")
def rsa_pool() -> list[RSAKey]:
    return [RSAKey.generate_key(2048, private=True) for _ in range(8)]


@pytest.fixture(autouse=True)
def fast_keys(rsa_pool: list[RSAKey], monkeypatch: pytest.MonkeyPatch) -> None:
    """The database store's new keys come from a pool made once (the table is emptied
    between tests): 2048-bit generation is the slow part."""
    pool = iter(rsa_pool)
    monkeypatch.setattr("server.keys_db.generate_key", lambda: next(pool))


@pytest.fixture
def key() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def db(clean_db: Settings, environment: pytest.MonkeyPatch, tmp_path: Path, key: str) -> Settings:
    """An empty, migrated database on each backend; the environment on the database store,
    with AUTH_KEYS_DIR a directory that does not exist (and must not come to)."""
    environment.setenv("AUTH_DATABASE_URL", clean_db.database_url)
    environment.setenv("AUTH_KEYS_DIR", str(tmp_path / "no-keys-here"))
    environment.setenv("AUTH_KEY_STORE", "database")
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", key)
    return clean_db


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


def rows(settings: Settings) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        engine = create_engine(settings)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(select(TABLE).order_by(TABLE.c.kid))
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def states(settings: Settings) -> dict[str, str]:
    return {row["kid"]: row["state"] for row in rows(settings)}


def kid_in(settings: Settings, state: str) -> str:
    (kid,) = [kid for kid, value in states(settings).items() if value == state]
    return kid


def refused(result: Run) -> str:
    """The one error line of a refusal (exit 1, nothing on stdout, no traceback)."""
    assert result.code == 1, (result.out, result.err)
    assert result.out == ""
    assert "Traceback" not in result.err
    (message,) = result.messages
    assert message.startswith("error: ")
    return message


def no_secrets(result: Run, *keys: str) -> None:
    text = result.out + result.err
    assert "PRIVATE KEY" not in text
    for value in keys:
        assert value not in text


# -- rotate, list, prune -------------------------------------------------------------------


def test_rotate_list_prune_on_the_database(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str, tmp_path: Path
) -> None:
    empty = cli("keys", "list")
    assert (empty.code, empty.out) == (
        0,
        "no keys in the database: run `python -m server keys rotate`\n",
    )

    first = cli("keys", "rotate")
    assert (first.code, first.messages) == (0, [])
    current = kid_in(db, "current")
    assert first.out.splitlines()[0] == f"rotated: {current} now signs"
    upcoming = kid_in(db, "next")

    listing = cli("keys", "list")
    assert listing.code == 0
    header, *lines = listing.out.splitlines()
    assert header.split() == ["KID", "STATE", "CREATED", "ACTIVATED", "RETIRED"]
    assert {line.split()[0]: line.split()[1] for line in lines} == {
        current: "current",
        upcoming: "next",
    }

    second = cli("keys", "rotate", "--force")
    assert second.code == 0 and second.out.splitlines()[0] == f"rotated: {upcoming} now signs"
    assert states(db)[current] == "retired" and len(states(db)) == 3
    assert [(e["event"], e["kid"]) for e in second.logs if e.get("audit")] == [
        ("key.rotated", upcoming)
    ]

    environment.setenv("AUTH_ACCESS_TOKEN_TTL", "600")
    kept = cli("keys", "prune")
    assert kept.code == 0
    assert re.fullmatch(
        rf"kept {current}: tokens it signed may be valid for \d+ s more\n", kept.out
    )
    environment.setenv("AUTH_ACCESS_TOKEN_TTL", "60")
    assert current in states(db)

    for result in (empty, first, listing, second, kept):
        no_secrets(result, key)
    assert not (tmp_path / "no-keys-here").exists(), "no key on disk"
    for row in rows(db):
        assert row["encryption_key_id"] == parse_encryption_key(key).id


async def retire_long_ago(settings: Settings, kid: str) -> None:
    engine = create_engine(settings)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(TABLE).where(TABLE.c.kid == kid).values(retired_at=1_000_000_000)
            )
    finally:
        await engine.dispose()


def test_prune_removes_a_retired_key_whose_tokens_expired(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch
) -> None:
    assert cli("keys", "prune").out == "no retired keys\n"
    cli("keys", "rotate")
    retired = kid_in(db, "current")
    cli("keys", "rotate", "--force")
    environment.setenv("AUTH_ACCESS_TOKEN_TTL", "60")
    asyncio.run(retire_long_ago(db, retired))

    removed = cli("keys", "prune")
    assert (removed.code, removed.out) == (0, f"removed {retired}\n")
    assert retired not in states(db) and len(states(db)) == 2


def test_rotate_refuses_a_next_key_younger_than_the_jwks_max_age(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch
) -> None:
    cli("keys", "rotate")
    before = rows(db)
    environment.setenv("AUTH_KEY_ROTATION_INTERVAL", "1000")  # the JWKS may be cached 100 s
    message = refused(cli("keys", "rotate"))
    assert message.startswith(f"error: the next key {kid_in(db, 'next')} was published ")
    assert "may be cached for 100 s" in message and "pass --force" in message
    assert rows(db) == before


# -- import --------------------------------------------------------------------------------


def test_import_moves_the_files_into_the_database(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, tmp_path: Path, key: str
) -> None:
    directory = tmp_path / "keys"
    files = KeyStore(directory)
    files.ensure()
    files.rotate()
    manifest = {info.kid: info for info in files.read_manifest()}
    environment.setenv("AUTH_KEYS_DIR", str(directory))

    first = cli("keys", "import")
    assert first.code == 0, first.err
    lines = first.out.splitlines()
    assert sorted(lines[:3]) == sorted(f"imported {kid}" for kid in manifest)
    assert lines[3] == (f"the files in {directory} are no longer used: delete them when you wish")
    assert states(db) == {kid: info.state for kid, info in manifest.items()}
    for row in rows(db):
        info = manifest[row["kid"]]
        assert (row["created_at"], row["activated_at"], row["retired_at"]) == (
            info.created_at,
            info.activated_at,
            info.retired_at,
        )
    (audit,) = [e for e in first.logs if e.get("audit")]
    assert audit["event"] == "key.imported" and sorted(audit["kids"]) == sorted(manifest)

    again = cli("keys", "import")
    assert again.code == 0
    assert sorted(again.out.splitlines()[:3]) == sorted(f"already there: {kid}" for kid in manifest)
    # The files are left as they were, for the operator to delete.
    assert {info.kid for info in files.read_manifest()} == set(manifest)
    pems = [files.private_pem(kid).decode() for kid in manifest]
    for result in (first, again):
        no_secrets(result, key, *(pem.splitlines()[3] for pem in pems))


def test_import_refuses_a_database_with_other_keys(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, keys_dir: Path
) -> None:
    cli("keys", "rotate")
    before = rows(db)
    environment.setenv("AUTH_KEYS_DIR", str(keys_dir))
    message = refused(cli("keys", "import"))
    assert message.startswith("error: the database already holds other keys (")
    assert message.endswith("import into an empty store only (or delete those rows first)")
    assert rows(db) == before


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_import_of_a_damaged_key_file_is_one_error_line(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, tmp_path: Path, damage: str
) -> None:
    directory = tmp_path / "keys"
    files = KeyStore(directory)
    files.ensure()
    upcoming = next(info.kid for info in files.read_manifest() if info.state == "next")
    pem = directory / f"{upcoming}.pem"
    if damage == "missing":
        pem.unlink()
        expected = (
            f"error: {pem}, listed in keys.json, cannot be read (No such file or directory): "
            "restore it, then import again"
        )
    else:
        pem.write_bytes(pem.read_bytes()[:200])
        expected = (
            f"error: {pem}: not a readable RSA private key (truncated or damaged?): restore it "
            "from a backup, then import again"
        )
    environment.setenv("AUTH_KEYS_DIR", str(directory))
    assert refused(cli("keys", "import")) == expected
    assert rows(db) == []


def test_import_with_the_files_store_is_refused(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch
) -> None:
    environment.setenv("AUTH_KEY_STORE", "files")
    assert refused(cli("keys", "import")) == (
        "error: `keys import` works on the database store: set AUTH_KEY_STORE=database and "
        "AUTH_KEY_ENCRYPTION_KEY"
    )
    message = refused(cli("keys", "rewrap", "--old-key-file", "-"))
    assert message.startswith("error: `keys rewrap` works on the database store")
    assert rows(db) == []


# -- rewrap --------------------------------------------------------------------------------


def test_rewrap_moves_every_key_to_the_new_encryption_key(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str, tmp_path: Path
) -> None:
    cli("keys", "rotate")
    cli("keys", "rotate", "--force")
    kids = set(states(db))
    old_file = tmp_path / "old-key"
    old_file.write_text(key + "\n")
    new = secrets.token_urlsafe(32)
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", new)

    # Before the rewrap, no key is added under the new key beside the others.
    before = rows(db)
    assert refused(cli("keys", "rotate", "--force")) == (
        "error: the signing keys in the database are sealed under the encryption key "
        f"{parse_encryption_key(key).id}, but AUTH_KEY_ENCRYPTION_KEY is "
        f"{parse_encryption_key(new).id}: a key sealed now would not open where the others "
        "do: set AUTH_KEY_ENCRYPTION_KEY to the key they were sealed with, or move every key "
        "to this one first with `python -m server keys rewrap`"
    )
    assert rows(db) == before

    result = cli("keys", "rewrap", "--old-key-file", str(old_file))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert sorted(lines[:-1]) == sorted(f"rewrapped {kid}" for kid in kids)
    assert lines[-1] == "3 keys sealed anew, 0 were already under the new key"
    new_id = parse_encryption_key(new).id
    assert {row["encryption_key_id"] for row in rows(db)} == {new_id}
    (audit,) = [e for e in result.logs if e.get("audit")]
    assert audit["event"] == "key.rewrapped"
    assert audit["old_key_id"] == parse_encryption_key(key).id
    assert audit["encryption_key_id"] == new_id
    no_secrets(result, key, new)

    # Again, the old key from standard input: nothing left to do.
    again = cli("keys", "rewrap", "--old-key-file", "-", stdin=key)
    assert again.code == 0
    assert again.out == "0 keys sealed anew, 3 were already under the new key\n"
    # The keys work under the new key.
    assert cli("keys", "rotate", "--force").code == 0


def test_rewrap_with_a_wrong_old_key_changes_nothing(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str, tmp_path: Path
) -> None:
    cli("keys", "rotate")
    before = rows(db)
    wrong = secrets.token_urlsafe(32)
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", secrets.token_urlsafe(32))
    message = refused(cli("keys", "rewrap", "--old-key-file", "-", stdin=wrong))
    assert message == (
        "error: keys sealed under neither the old nor the new encryption key: "
        + ", ".join(sorted(kid for kid in states(db)))
    )
    assert rows(db) == before
    assert wrong not in message and key not in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", f"error: --old-key-file is not set: {HOW_TO_MAKE}"),
        ("a" * 43, f"error: --old-key-file is not random enough (weak): {HOW_TO_MAKE}"),
        ("not a key!", f"error: --old-key-file is not base64url: {HOW_TO_MAKE}"),
    ],
)
def test_rewrap_refuses_a_bad_old_key(cli: Cli, db: Settings, content: str, expected: str) -> None:
    message = refused(cli("keys", "rewrap", "--old-key-file", "-", stdin=content))
    assert message.startswith(expected)


def test_rewrap_refuses_an_unreadable_old_key_file(cli: Cli, db: Settings, tmp_path: Path) -> None:
    message = refused(cli("keys", "rewrap", "--old-key-file", str(tmp_path / "absent")))
    assert message == "error: cannot read --old-key-file: No such file or directory"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + secrets.token_bytes(30))
    message = refused(cli("keys", "rewrap", "--old-key-file", str(binary)))
    assert message == "error: --old-key-file is not text: it holds the key in base64url"


# -- the encryption key --------------------------------------------------------------------


@pytest.mark.parametrize("command", [("list",), ("rotate",), ("prune",), ("import",)])
def test_a_missing_encryption_key_is_refused(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    environment.delenv("AUTH_KEY_ENCRYPTION_KEY")
    assert refused(cli("keys", *command)) == (
        f"error: AUTH_KEY_ENCRYPTION_KEY is not set: {HOW_TO_MAKE} and keep it in your secret store"
    )
    assert rows(db) == []


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (base64.urlsafe_b64encode(b"\x07" * 32).decode(), "is not random enough (weak)"),
        ("correct-horse-battery-staple", "decodes to 21 bytes, not 32"),
        ("+" * 43, "is not base64url"),
    ],
)
def test_a_weak_or_malformed_encryption_key_is_refused(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, value: str, why: str
) -> None:
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", value)
    message = refused(cli("keys", "rotate"))
    assert message.startswith(f"error: AUTH_KEY_ENCRYPTION_KEY {why}: {HOW_TO_MAKE}")
    assert value not in message
    assert rows(db) == []


# -- serve ---------------------------------------------------------------------------------


def secure_production(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("AUTH_ENV", "production")
    environment.setenv("AUTH_ISSUER", "https://auth.example.com")
    environment.setenv("AUTH_SECRET_KEY", STRONG_SECRET)
    environment.delenv("AUTH_ARGON2_MEMORY_COST")
    environment.delenv("AUTH_ARGON2_TIME_COST")


@pytest.mark.feature("production-guard", "cli-serve")
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "is not set"),
        ("", "is not set"),
        ("A" * 43, "is not random enough (weak)"),
        ("c2hvcnQ", "decodes to 5 bytes, not 32"),
    ],
)
def test_production_refuses_the_database_store_without_a_good_key(
    cli: Cli,
    db: Settings,
    environment: pytest.MonkeyPatch,
    served: list[Any],
    value: str | None,
    why: str,
) -> None:
    secure_production(environment)
    if value is None:
        environment.delenv("AUTH_KEY_ENCRYPTION_KEY")
    else:
        environment.setenv("AUTH_KEY_ENCRYPTION_KEY", value)
    result = cli("serve")
    assert (result.code, result.out) == (1, "")
    assert "Traceback" not in result.err
    assert result.messages == [
        "error: refusing to start in production:",
        f"  - AUTH_KEY_STORE=database: AUTH_KEY_ENCRYPTION_KEY {why}: {HOW_TO_MAKE} and keep "
        "it in your secret store",
    ]
    assert served == []
    assert rows(db) == []


@pytest.mark.feature("production-guard", "cli-serve")
def test_production_needs_a_current_key_in_the_database(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, served: list[Any], tmp_path: Path
) -> None:
    secure_production(environment)
    assert refused(cli("serve")) == (
        "error: no current signing key in the database: run `python -m server keys rotate` "
        "(or `keys import` to bring the keys of AUTH_KEYS_DIR)"
    )
    assert rows(db) == [], "production never makes keys on its own"
    assert served == []


@pytest.mark.feature("production-guard", "cli-serve")
def test_production_refuses_keys_sealed_under_another_key(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, served: list[Any], key: str
) -> None:
    cli("keys", "rotate")
    secure_production(environment)
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", secrets.token_urlsafe(32))
    message = refused(cli("serve"))
    assert message.startswith(f"error: the current signing key {kid_in(db, 'current')} is sealed ")
    assert message.endswith("`python -m server keys rewrap`")
    assert served == []

    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", key)
    result = cli("serve")
    assert (result.code, result.messages) == (0, [])
    assert len(served) == 1


@pytest.mark.feature("cli-serve")
def test_serve_in_development_makes_the_first_keys_in_the_database(
    cli: Cli, db: Settings, served: list[Any], tmp_path: Path
) -> None:
    result = cli("serve")
    assert (result.code, result.messages) == (0, [])
    assert sorted(states(db).values()) == ["current", "next"]
    assert not (tmp_path / "no-keys-here").exists()
    assert len(served) == 1
    assert json.dumps(rows(db), default=str).count("PRIVATE KEY") == 0


# The advisory lock is PostgreSQL's (SQLite's writers queue on its file lock).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_key_write_blocked_by_a_held_lock_is_one_error_line(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str
) -> None:
    assert db.database_url.startswith("postgresql")
    assert cli("keys", "rotate").code == 0
    environment.setenv("AUTH_DB_STATEMENT_TIMEOUT", "0.5")

    async def hold_lock_while(run: Any) -> Run:
        engine = create_engine(db)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
                result: Run = await asyncio.to_thread(run)
                return result
        finally:
            await engine.dispose()

    before = rows(db)
    result = asyncio.run(hold_lock_while(lambda: cli("keys", "rotate", "--force")))
    message = refused(result)
    assert "another key write may hold the keys' lock" in message
    assert "INSERT" not in message and "SELECT" not in message  # never the statement
    no_secrets(result, key)
    assert rows(db) == before


@pytest.mark.parametrize("previous", ["short", "A" * 43, "not base64url!"])
def test_a_bad_previous_encryption_key_is_one_error_line(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str, previous: str
) -> None:
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY_PREVIOUS", previous)
    message = refused(cli("keys", "list"))
    assert message.startswith("error: AUTH_KEY_ENCRYPTION_KEY_PREVIOUS ")
    assert previous not in message and key not in message


def test_the_previous_encryption_key_opens_a_rewrap_in_progress(
    cli: Cli, db: Settings, environment: pytest.MonkeyPatch, key: str
) -> None:
    # Keys sealed under the old key; the commands given the new one and the old as previous
    # read them (list), and refuse to seal a new one beside them until the rewrap is done.
    assert cli("keys", "rotate").code == 0
    new = secrets.token_urlsafe(32)
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY", new)
    environment.setenv("AUTH_KEY_ENCRYPTION_KEY_PREVIOUS", key)
    assert cli("keys", "list").code == 0
    assert "keys rewrap" in refused(cli("keys", "rotate", "--force"))
