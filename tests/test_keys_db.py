"""``server/keys_db.py``: signing keys in the ``signing_keys`` table (AUTH_KEY_STORE=database),
on SQLite and on PostgreSQL.

The lifecycle of the files store (next → current → retired → pruned), each write one
transaction; private keys sealed under AUTH_KEY_ENCRYPTION_KEY and opened only by a store
with that key; nothing private in the JWKS, the table's public column, or any log line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from server.db import create_engine
from server.keycrypt import EncryptionKey, parse_encryption_key
from server.keys import KeyInfo, KeyStore, KeysUnavailableError, RotationTooSoonError
from server.keys_db import TABLE, DatabaseKeyStore, KeyStoreConflictError
from server.main import _reload_keys
from tests.conftest import make_settings

pytestmark = pytest.mark.feature("key-store-database")

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
T0 = 1_900_000_000


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


def new_key() -> EncryptionKey:
    return parse_encryption_key(secrets.token_urlsafe(32))


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.fixture
async def engine(database_url: str, keys_dir: Path) -> AsyncIterator[AsyncEngine]:
    """The session's database of this backend, with an empty ``signing_keys`` table."""
    engine = create_engine(make_settings(database_url, keys_dir))
    async with engine.begin() as connection:
        await connection.execute(delete(TABLE))
    yield engine
    async with engine.begin() as connection:
        await connection.execute(delete(TABLE))
    await engine.dispose()


@pytest.fixture(scope="session")
def rsa_pool() -> list[RSAKey]:
    """Keys made once: a test makes at most a few, and the table is emptied between tests."""
    return [RSAKey.generate_key(2048, private=True) for _ in range(10)]


@pytest.fixture(autouse=True)
def fast_keys(rsa_pool: list[RSAKey], monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's new keys come from ``rsa_pool`` (2048-bit generation is the slow part)."""
    pool = iter(rsa_pool)
    monkeypatch.setattr("server.keys_db.generate_key", lambda: next(pool))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def encryption() -> EncryptionKey:
    return new_key()


@pytest.fixture
def store(engine: AsyncEngine, encryption: EncryptionKey, clock: Clock) -> DatabaseKeyStore:
    return DatabaseKeyStore(engine, encryption, clock=clock)


async def table(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Every row, every column, in kid order: to compare before and after."""
    async with engine.connect() as connection:
        result = await connection.execute(select(TABLE).order_by(TABLE.c.kid))
        return [dict(row._mapping) for row in result]


def states(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["kid"]: row["state"] for row in rows}


def kid_in(rows: list[dict[str, Any]], state: str) -> str:
    (kid,) = [str(row["kid"]) for row in rows if row["state"] == state]
    return kid


async def set_row(engine: AsyncEngine, kid: str, **values: Any) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(TABLE).where(TABLE.c.kid == kid).values(**values))


def no_private_members(document: Any) -> None:
    """No JWK member of a private key anywhere in ``document`` (nested)."""
    if isinstance(document, dict):
        assert not PRIVATE_MEMBERS & set(document), document
        for value in document.values():
            no_private_members(value)
    elif isinstance(document, list):
        for value in document:
            no_private_members(value)


# -- creating and reading ------------------------------------------------------------------


async def test_ensure_creates_a_pair_once(
    store: DatabaseKeyStore,
    engine: AsyncEngine,
    encryption: EncryptionKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert await store.alist() == []
    assert await store.ensure() is True
    rows = await table(engine)
    assert sorted(states(rows).values()) == ["current", "next"]
    for row in rows:
        assert row["created_at"] == T0
        assert row["encryption_key_id"] == encryption.id
        assert row["alg"] == "RS256"
        assert RSAKey.import_key(json.loads(row["public_jwk"])).thumbprint() == row["kid"]
    current = next(row for row in rows if row["state"] == "current")
    assert current["activated_at"] == T0
    # Every later start: nothing created, and no key made for nothing (RSA is slow).
    monkeypatch.setattr("server.keys_db.generate_key", lambda: pytest.fail("a key was made"))
    assert await store.ensure() is False
    assert await table(engine) == rows
    # Another replica's ensure creates nothing either.
    assert await DatabaseKeyStore(engine, encryption).ensure() is False
    assert await table(engine) == rows


async def test_an_empty_table_has_no_keyset(store: DatabaseKeyStore) -> None:
    with pytest.raises(KeysUnavailableError, match="no signing keys loaded from the database"):
        store.keyset()
    with pytest.raises(KeysUnavailableError, match=r"keys rotate` \(or `keys import`"):
        await store.areload()
    assert store.failure is not None and store.failure.attempts == 1


async def test_areload_loads_only_a_change(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey, clock: Clock
) -> None:
    await store.ensure()
    assert await store.areload() is True
    rows = await table(engine)
    first = store.keyset()
    assert first.kid == kid_in(rows, "current")
    assert await store.areload() is False
    assert store.keyset() is first

    # Another replica (or the CLI) rotates: this one picks it up at its next reload.
    other = DatabaseKeyStore(engine, encryption, clock=clock)
    await other.arotate()
    assert await store.areload() is True
    assert store.keyset().kid == kid_in(rows, "next")
    assert await store.areload() is False
    assert store.failure is None


async def test_the_keyset_signs_with_the_current_key(store: DatabaseKeyStore) -> None:
    await store.ensure()
    await store.areload()
    keyset = store.keyset()
    token = keyset.sign({"sub": "alice"}, "at+jwt")
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": keyset.kid}

    assert jwt.decode(token, keyset.public[keyset.kid]).claims == {"sub": "alice"}


async def test_the_jwks_lists_current_next_retired_and_nothing_private(
    store: DatabaseKeyStore, engine: AsyncEngine, clock: Clock
) -> None:
    await store.ensure()
    clock.now += 10
    await store.arotate()
    await store.areload()
    rows = await table(engine)
    order = [kid_in(rows, "current"), kid_in(rows, "next"), kid_in(rows, "retired")]

    keyset = store.keyset()
    jwks = json.loads(keyset.jwks_bytes)
    assert [key["kid"] for key in jwks["keys"]] == order
    assert all(key["use"] == "sig" and key["alg"] == "RS256" for key in jwks["keys"])
    no_private_members(jwks)
    assert keyset.etag.startswith('"')
    for kid, key in keyset.public.items():
        assert not key.is_private, kid
        no_private_members(key.as_dict())
    for row in rows:
        public = json.loads(row["public_jwk"])
        no_private_members(public)
        assert public["kty"] == "RSA" and set(public) >= {"n", "e"}
        assert b"PRIVATE KEY" not in row["private_key"]
        assert b"BEGIN" not in row["private_key"]
    for info in await store.alist():
        no_private_members(info.__dict__)


# -- what does not open --------------------------------------------------------------------


async def test_a_wrong_encryption_key_is_refused_naming_the_fix(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    current = kid_in(await table(engine), "current")
    wrong = new_key()
    replica = DatabaseKeyStore(engine, wrong)
    with pytest.raises(KeysUnavailableError) as refused:
        await replica.areload()
    message = str(refused.value)
    assert message == (
        f"the current signing key {current} is sealed under the encryption key "
        f"{encryption.id}, but AUTH_KEY_ENCRYPTION_KEY is {wrong.id}: set "
        "AUTH_KEY_ENCRYPTION_KEY (or AUTH_KEY_ENCRYPTION_KEY_PREVIOUS) to the key it was sealed "
        "with, or move every key to this one with `python -m server keys rewrap`"
    )
    assert replica.failure is not None
    assert replica.failure.reason == message and replica.failure.attempts == 1
    with pytest.raises(KeysUnavailableError):
        await replica.areload()
    assert replica.failure.attempts == 2
    with pytest.raises(KeysUnavailableError):
        replica.keyset()
    for key in (encryption, wrong):
        assert b64url(key.raw) not in message


async def test_a_running_replica_keeps_its_keys_when_they_are_rewrapped_away(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    await store.areload()
    before = store.keyset()
    newer = DatabaseKeyStore(engine, new_key())
    await newer.rewrap(encryption)
    # The same keys, sealed anew: the replica keeps signing with the key it holds and stays
    # ready (a rewrap must not take every running replica out of service at once).
    assert await store.areload() is True
    assert store.failure is None and store.keyset().kid == before.kid
    # A new signing key it cannot open (a rotation under the new encryption key) is refused,
    # keeping the keys loaded before and naming the fix.
    await newer.arotate(min_next_age=0)
    with pytest.raises(KeysUnavailableError, match="keys rewrap"):
        await store.areload()
    assert store.keyset().kid == before.kid and store.failure is not None
    # Given the new key, it loads again, and the failure is gone.
    store.encryption = newer.encryption
    assert await store.areload() is True
    assert store.failure is None and store.keyset().kid != before.kid


async def test_the_previous_encryption_key_opens_but_never_seals(
    engine: AsyncEngine, encryption: EncryptionKey, store: DatabaseKeyStore
) -> None:
    # A replica given the new key (and the old one as previous) starts before the rewrap.
    await store.ensure()
    newer = DatabaseKeyStore(engine, new_key(), previous=encryption)
    assert await newer.areload() is True
    assert newer.keyset().kid == (await store.areload(), store.keyset().kid)[1]
    # It seals nothing beside keys sealed under the old key (the old replicas could not open
    # it) until the rewrap is done; then it may.
    with pytest.raises(KeyStoreConflictError, match="rewrap"):
        await newer.arotate(min_next_age=0)
    await newer.rewrap(encryption)
    await newer.arotate(min_next_age=0)
    assert {row["encryption_key_id"] for row in await table(engine)} == {newer.encryption.id}


async def test_an_unknown_state_is_refused(store: DatabaseKeyStore, engine: AsyncEngine) -> None:
    await store.ensure()
    rows = await table(engine)
    await set_row(engine, kid_in(rows, "next"), state="Retired")
    with pytest.raises(KeysUnavailableError, match="state 'Retired'"):
        await store.areload()


async def test_a_public_key_slipped_into_the_table_is_refused(
    store: DatabaseKeyStore, engine: AsyncEngine
) -> None:
    # Someone who can write the table but lacks the encryption key adds a key of theirs as
    # "retired", to have tokens they sign accepted: its sealed half does not open.
    await store.ensure()
    await store.areload()
    rows = await table(engine)
    mallory = RSAKey.generate_key(2048, private=True)
    template = next(row for row in rows if row["state"] == "next")
    async with engine.begin() as connection:
        await connection.execute(
            TABLE.insert().values(
                {
                    **template,
                    "kid": mallory.thumbprint(),
                    "state": "retired",
                    "public_jwk": json.dumps(dict(mallory.as_dict(private=False))),
                    "retired_at": template["created_at"],
                }
            )
        )
    with pytest.raises(KeysUnavailableError):
        await store.areload()
    assert mallory.thumbprint() not in store.keyset().public


async def test_a_rotation_without_a_current_key_promotes_the_published_next_one(
    store: DatabaseKeyStore, engine: AsyncEngine
) -> None:
    await store.ensure()
    rows = await table(engine)
    published = kid_in(rows, "next")
    async with engine.begin() as connection:
        await connection.execute(TABLE.delete().where(TABLE.c.state == "current"))
    infos = await store.arotate(min_next_age=0)
    states = [info.state for info in infos]
    assert next(info.kid for info in infos if info.state == "current") == published
    assert states.count("current") == 1 and states.count("next") == 1
    await store.arotate(min_next_age=0)
    assert [r["state"] for r in await table(engine)].count("current") == 1


async def test_a_row_whose_public_key_is_another_key_is_refused(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    rows = await table(engine)
    public = {row["kid"]: row["public_jwk"] for row in rows}
    sealed = {row["kid"]: row["private_key"] for row in rows}
    upcoming = kid_in(rows, "next")
    stranger = RSAKey.generate_key(2048, private=True)
    await set_row(engine, upcoming, public_jwk=json.dumps(dict(stranger.as_dict(private=False))))
    with pytest.raises(KeysUnavailableError) as refused:
        await store.areload()
    assert str(refused.value).startswith(
        f"signing_keys row {upcoming}: its public key is another key"
    )
    await set_row(engine, upcoming, public_jwk=public[upcoming])
    assert await store.areload() is True

    # The key's own private JWK in the public column: refused, never published.
    current = kid_in(rows, "current")
    pem = encryption.open(sealed[current], kid=current)
    private = json.dumps(dict(RSAKey.import_key(pem).as_dict(private=True)))
    await set_row(engine, current, public_jwk=private)
    with pytest.raises(KeysUnavailableError, match=f"row {current}: its public key is another"):
        await store.areload()
    await set_row(engine, current, public_jwk=public[current])
    await set_row(engine, upcoming, public_jwk="{not json")
    with pytest.raises(KeysUnavailableError, match="its public key is not readable"):
        await store.areload()
    assert b"PRIVATE" not in store.keyset().jwks_bytes
    no_private_members(json.loads(store.keyset().jwks_bytes))
    assert store.failure is not None and store.failure.attempts == 2  # since the success


async def test_an_altered_sealed_key_is_refused(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    rows = await table(engine)
    current, upcoming = kid_in(rows, "current"), kid_in(rows, "next")
    sealed = {row["kid"]: row["private_key"] for row in rows}

    flipped = bytearray(sealed[current])
    flipped[40] ^= 0x01
    await set_row(engine, current, private_key=bytes(flipped))
    with pytest.raises(KeysUnavailableError) as refused:
        await store.areload()
    assert str(refused.value) == (
        f"the private key of {current} does not open with the encryption key {encryption.id}: "
        "it was altered, or sealed under another key: restore the row from a backup"
    )

    # The next key's sealed private key, copied into the current row: bound to its own kid.
    await set_row(engine, current, private_key=sealed[upcoming])
    with pytest.raises(KeysUnavailableError, match=f"the private key of {current} does not open"):
        await store.areload()

    # Another key sealed properly for this row (someone with the encryption key): refused.
    stranger = RSAKey.generate_key(2048, private=True)
    await set_row(
        engine, current, private_key=encryption.seal(stranger.as_pem(private=True), kid=current)
    )
    with pytest.raises(KeysUnavailableError, match=f"sealed in row {current} is another key"):
        await store.areload()

    # Put back, it loads.
    await set_row(engine, current, private_key=sealed[current])
    assert await store.areload() is True
    assert store.keyset().kid == current and store.failure is None


async def test_force_rotates_a_next_key_stamped_by_a_clock_ahead(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey, clock: Clock
) -> None:
    """Replicas' clocks differ: a next key created by one a little ahead is not "too young"
    for `keys rotate --force` (no minimum age) on another."""
    ahead = DatabaseKeyStore(engine, encryption, clock=Clock(T0 + 5))
    await ahead.ensure()
    upcoming = kid_in(await table(engine), "next")
    await store.arotate(min_next_age=0)
    assert states(await table(engine))[upcoming] == "current"


# -- import from files ---------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> KeyStore:
    """A files store with a current, a next and a retired key."""
    directory = KeyStore(tmp_path / "keys")
    directory.ensure()
    directory.rotate()
    return directory


def infos_by_kid(infos: list[KeyInfo]) -> dict[str, KeyInfo]:
    return {info.kid: info for info in infos}


async def test_import_from_files_is_idempotent_and_keeps_states_and_times(
    store: DatabaseKeyStore, engine: AsyncEngine, files: KeyStore
) -> None:
    manifest = files.read_manifest()
    assert sorted(info.state for info in manifest) == ["current", "next", "retired"]
    imported, present = await store.import_files(files)
    assert sorted(imported) == sorted(info.kid for info in manifest) and present == []
    assert infos_by_kid(await store.alist()) == infos_by_kid(manifest)
    rows = await table(engine)

    again = await store.import_files(files)
    assert again == ([], sorted(info.kid for info in manifest))
    assert await table(engine) == rows

    # The database now serves what the files did: same signing key, same JWKS.
    await store.areload()
    from_files = files.load()
    assert store.keyset().kid == from_files.kid
    assert json.loads(store.keyset().jwks_bytes) == json.loads(from_files.jwks_bytes)


async def test_import_refuses_a_database_with_other_keys(
    store: DatabaseKeyStore, engine: AsyncEngine, files: KeyStore
) -> None:
    await store.ensure()
    rows = await table(engine)
    with pytest.raises(KeyStoreConflictError) as refused:
        await store.import_files(files)
    assert str(refused.value) == (
        f"the database already holds other keys ({', '.join(sorted(states(rows)))}): import "
        "into an empty store only (or delete those rows first)"
    )
    assert await table(engine) == rows


async def test_import_of_an_empty_directory_is_refused(
    store: DatabaseKeyStore, engine: AsyncEngine, tmp_path: Path
) -> None:
    with pytest.raises(KeyStoreConflictError, match=r"no keys in .* to import"):
        await store.import_files(KeyStore(tmp_path / "none"))
    assert await table(engine) == []


async def test_import_again_after_the_files_rotated_follows_them(
    store: DatabaseKeyStore, engine: AsyncEngine, files: KeyStore
) -> None:
    """An operator imports, rotates the files once more (the replicas still on files), then
    imports again: the database follows, with one current key, never two."""
    await store.import_files(files)
    files.rotate()
    manifest = files.read_manifest()
    imported, _present = await store.import_files(files)
    assert len(imported) == 1
    assert infos_by_kid(await store.alist()) == infos_by_kid(manifest)
    assert sorted(states(await table(engine)).values()) == [
        "current",
        "next",
        "retired",
        "retired",
    ]
    await store.areload()
    assert store.keyset().kid == files.load().kid


# -- rewrap --------------------------------------------------------------------------------


async def test_rewrap_moves_every_key_and_is_idempotent(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    await store.arotate()
    before = await table(engine)
    newer = DatabaseKeyStore(engine, new_key())

    done, left = await newer.rewrap(encryption)
    assert sorted(done) == sorted(states(before)) and left == []
    after = await table(engine)
    for old_row, new_row in zip(before, after, strict=True):
        assert new_row["encryption_key_id"] == newer.encryption.id
        assert new_row["private_key"] != old_row["private_key"]
        assert newer.encryption.open(new_row["private_key"], kid=new_row["kid"]) == (
            encryption.open(old_row["private_key"], kid=old_row["kid"])
        )
        unchanged = {
            k: v for k, v in new_row.items() if k not in ("private_key", "encryption_key_id")
        }
        assert unchanged == {
            k: v for k, v in old_row.items() if k not in ("private_key", "encryption_key_id")
        }
    assert await newer.areload() is True
    assert newer.keyset().kid == kid_in(before, "current")

    assert await newer.rewrap(encryption) == ([], sorted(states(before)))
    assert await table(engine) == after


async def test_rewrap_refuses_a_row_under_neither_key_and_changes_nothing(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    rows = await table(engine)
    third = DatabaseKeyStore(engine, new_key())
    # One row sealed under a third key (as if half-rewrapped to another key).
    stray = rows[1]
    pem = encryption.open(stray["private_key"], kid=stray["kid"])
    await set_row(
        engine,
        stray["kid"],
        private_key=third.encryption.seal(pem, kid=stray["kid"]),
        encryption_key_id=third.encryption.id,
    )
    before = await table(engine)
    newer = DatabaseKeyStore(engine, new_key())
    with pytest.raises(KeyStoreConflictError) as refused:
        await newer.rewrap(encryption)
    assert str(refused.value) == (
        f"keys sealed under neither the old nor the new encryption key: {stray['kid']}"
    )
    assert await table(engine) == before


async def test_rewrap_with_a_wrong_old_key_changes_nothing(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    await store.ensure()
    before = await table(engine)
    newer = DatabaseKeyStore(engine, new_key())
    with pytest.raises(KeyStoreConflictError, match="keys sealed under neither"):
        await newer.rewrap(new_key())
    assert await table(engine) == before


async def test_rewrap_of_an_altered_row_changes_no_row(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    """One transaction: a row that does not open leaves the rows before it as they were."""
    await store.ensure()
    rows = await table(engine)
    last = max(rows, key=lambda row: (row["created_at"], row["kid"]))
    flipped = bytearray(last["private_key"])
    flipped[-1] ^= 0x01
    await set_row(engine, last["kid"], private_key=bytes(flipped))
    before = await table(engine)
    with pytest.raises(KeyStoreConflictError, match=f"the private key of {last['kid']}"):
        await DatabaseKeyStore(engine, new_key()).rewrap(encryption)
    assert await table(engine) == before


# -- rotation ------------------------------------------------------------------------------


async def test_rotate_promotes_next_and_retires_current(
    store: DatabaseKeyStore, engine: AsyncEngine, clock: Clock
) -> None:
    await store.ensure()
    before = await table(engine)
    clock.now += 3600
    infos = await store.arotate(min_next_age=600)
    after = infos_by_kid(infos)
    assert after[kid_in(before, "current")].state == "retired"
    assert after[kid_in(before, "current")].retired_at == T0 + 3600
    assert after[kid_in(before, "next")].state == "current"
    assert after[kid_in(before, "next")].activated_at == T0 + 3600
    fresh = [info for info in infos if info.kid not in states(before)]
    assert [(info.state, info.created_at) for info in fresh] == [("next", T0 + 3600)]
    assert infos_by_kid(await store.alist()) == after


async def test_rotate_on_an_empty_table_creates_a_pair(store: DatabaseKeyStore) -> None:
    infos = await store.arotate(min_next_age=600)
    assert sorted(info.state for info in infos) == ["current", "next"]


async def test_rotate_refuses_a_next_key_too_young(
    store: DatabaseKeyStore, engine: AsyncEngine, clock: Clock
) -> None:
    await store.ensure()
    before = await table(engine)
    clock.now += 100
    with pytest.raises(RotationTooSoonError) as refused:
        await store.arotate(min_next_age=600)
    assert str(refused.value).startswith(
        f"the next key {kid_in(before, 'next')} was published 100 s ago, but a JWKS may be "
        "cached for 600 s"
    )
    assert "rotate in 500 s" in str(refused.value)
    assert await table(engine) == before
    clock.now += 500
    await store.arotate(min_next_age=600)


@pytest.mark.parametrize("step", ["retired", "promoted"])
async def test_a_crash_between_the_steps_of_a_rotation_changes_nothing(
    store: DatabaseKeyStore, engine: AsyncEngine, clock: Clock, step: str
) -> None:
    await store.ensure()
    before = await table(engine)

    def crash(at: str) -> None:
        if at == step:
            raise RuntimeError(f"killed after {at}")

    store.between_steps = crash
    clock.now += 3600
    with pytest.raises(RuntimeError, match=f"killed after {step}"):
        await store.arotate()
    assert await table(engine) == before
    # The next attempt (this replica or another) rotates from the state before.
    store.between_steps = lambda at: None
    await store.arotate()
    after = await table(engine)
    assert states(after)[kid_in(before, "next")] == "current"
    assert states(after)[kid_in(before, "current")] == "retired"
    assert len(after) == 3


# -- pruning -------------------------------------------------------------------------------


async def test_prune_removes_only_retired_keys_past_the_token_lifetime(
    store: DatabaseKeyStore, engine: AsyncEngine, clock: Clock
) -> None:
    await store.ensure()
    first = kid_in(await table(engine), "current")
    clock.now = T0 + 1000
    await store.arotate()
    second = kid_in(await table(engine), "current")
    clock.now = T0 + 2000
    await store.arotate()
    rows = await table(engine)
    assert states(rows)[first] == states(rows)[second] == "retired"

    nothing = await store.aprune(max_token_lifetime=3600)
    assert nothing.removed == []
    assert sorted(nothing.kept) == sorted(
        [
            f"{first}: tokens it signed may be valid for 2600 s more",
            f"{second}: tokens it signed may be valid for 3600 s more",
        ]
    )
    assert await table(engine) == rows

    clock.now = T0 + 1000 + 3600  # every token of the first has expired, not the second's
    pruned = await store.aprune(max_token_lifetime=3600)
    assert pruned.removed == [first]
    assert pruned.kept == [f"{second}: tokens it signed may be valid for 1000 s more"]
    assert pruned.orphans == []
    left = await table(engine)
    assert left == [row for row in rows if row["kid"] != first]
    assert sorted(states(left).values()) == ["current", "next", "retired"]

    clock.now = T0 + 10**6
    assert (await store.aprune(max_token_lifetime=3600)).removed == [second]
    assert sorted(states(await table(engine)).values()) == ["current", "next"]


# -- no private key material in any log ----------------------------------------------------


@contextlib.contextmanager
def every_log_line(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """What structlog and logging record meanwhile, as text."""
    lines: list[str] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        yield lines
    lines.extend(json.dumps(entry, default=str) for entry in logs)
    lines.extend(record.getMessage() for record in caplog.records)


async def test_no_private_key_material_in_logs_or_errors(
    store: DatabaseKeyStore,
    engine: AsyncEngine,
    encryption: EncryptionKey,
    files: KeyStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets_seen = [b64url(encryption.raw)]
    texts: list[str] = []
    newer = DatabaseKeyStore(engine, new_key())
    secrets_seen.append(b64url(newer.encryption.raw))
    with every_log_line(caplog) as lines:
        await store.import_files(files)
        await store.areload()
        await store.arotate()
        with pytest.raises(KeyStoreConflictError) as conflict:
            await store.import_files(files)
        texts.append(str(conflict.value))
        await newer.rewrap(encryption)
        # The running replica still has the old key: its reloader logs the failure.
        wake = asyncio.Event()
        reloader = asyncio.create_task(_reload_keys(store, 60, wake))
        wake.set()
        for _ in range(100):
            if store.failure is not None:
                break
            await asyncio.sleep(0.01)
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader
        assert store.failure is not None
        texts.append(store.failure.reason)
        with pytest.raises(KeyStoreConflictError) as wrong:
            await DatabaseKeyStore(engine, new_key()).rewrap(new_key())
        texts.append(str(wrong.value))
    failed = [line for line in lines if "keys.reload_failed" in line]
    assert failed and "keys rewrap" in failed[0]
    pems = [files.private_pem(info.kid).decode() for info in files.read_manifest()]
    bodies = [pem.splitlines()[5] for pem in pems]  # a line from inside each PEM body
    for text in [*lines, *texts, repr(store), repr(encryption), repr(store.keyset())]:
        assert "PRIVATE KEY" not in text
        for secret in secrets_seen:
            assert secret not in text and secret[:12] not in text
        for body in bodies:
            assert body not in text


async def test_no_key_is_added_beside_keys_sealed_under_another_encryption_key(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey, files: KeyStore
) -> None:
    """A mistyped AUTH_KEY_ENCRYPTION_KEY on the CLI must not seal a new next key that the
    servers could not open once it signs."""
    await store.import_files(files)
    before = await table(engine)
    wrong = DatabaseKeyStore(engine, new_key())
    with pytest.raises(KeyStoreConflictError) as refused:
        await wrong.arotate()
    assert str(refused.value).startswith(
        f"the signing keys in the database are sealed under the encryption key "
        f"{encryption.id}, but AUTH_KEY_ENCRYPTION_KEY is {wrong.encryption.id}: "
    )
    assert str(refused.value).endswith("`python -m server keys rewrap`")
    with pytest.raises(KeyStoreConflictError, match="sealed under the encryption key"):
        await wrong.import_files(files)
    assert await table(engine) == before
    # Pruning seals nothing: allowed.
    assert (await wrong.aprune(max_token_lifetime=10**12)).removed == []


async def test_concurrent_rotations_serialise(
    store: DatabaseKeyStore, engine: AsyncEngine, encryption: EncryptionKey, clock: Clock
) -> None:
    """Two replicas (or an operator and a replica) rotating at once: the writes do not
    interleave (advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), so the second sees
    the first's new next key, too young, and refuses; one current key, never two."""
    await store.ensure()
    clock.now += 3600
    other = DatabaseKeyStore(engine, encryption, clock=clock)
    results = await asyncio.gather(
        store.arotate(min_next_age=600), other.arotate(min_next_age=600), return_exceptions=True
    )
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(refusals) == 1 and isinstance(refusals[0], RotationTooSoonError), results
    assert sorted(states(await table(engine)).values()) == ["current", "next", "retired"]


async def test_a_retired_key_without_retired_at_is_pruned_a_lifetime_later(
    engine: AsyncEngine, encryption: EncryptionKey
) -> None:
    clock = [1_700_000_000.0]
    store = DatabaseKeyStore(engine, encryption, clock=lambda: clock[0])
    await store.ensure()
    await store.arotate(min_next_age=0)
    retired = kid_in(await table(engine), "retired")
    await set_row(engine, retired, retired_at=None)  # damaged: no release writes this
    kept = await store.aprune(max_token_lifetime=900)
    assert kept.removed == [] and kept.kept[0].startswith(retired)
    assert {row["kid"]: row["retired_at"] for row in await table(engine)}[retired] == clock[0]
    clock[0] += 900
    assert (await store.aprune(max_token_lifetime=900)).removed == [retired]


async def test_a_change_of_creation_time_alone_is_reloaded(
    store: DatabaseKeyStore, engine: AsyncEngine
) -> None:
    await store.ensure()
    await store.areload()
    upcoming = kid_in(await table(engine), "next")
    await set_row(engine, upcoming, created_at=12345)
    assert await store.areload() is True
    assert {i.kid: i.created_at for i in store.keyset().infos}[upcoming] == 12345
