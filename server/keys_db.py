"""Signing keys in the database (``AUTH_KEY_STORE=database``): the ``signing_keys`` table.

The same lifecycle as the files store (``keys.py``: next → current → retired → pruned) where
the replicas already agree: every replica reads the table, none needs a shared directory.
Private keys are sealed with AES-256-GCM under ``AUTH_KEY_ENCRYPTION_KEY``
(``keycrypt.py``); only the current key's is ever opened, once per rotation, and no private
key leaves the process (not in logs, the JWKS, the admin API, nor on disk).

- **Reading** (``areload``): one ``SELECT`` of a few rows, compared by digest with what was
  loaded; only a change is parsed (in a worker thread: the signing key's import is slow).
  A failure (no current key, a key sealed under another encryption key, a row whose public
  key is not its kid) keeps the keys loaded before and is recorded in ``failure``, which
  ``/readyz`` reports.
- **Writing** (rotate, prune, import, rewrap): one transaction each, so a crash leaves the
  table as it was before or after, never between. On PostgreSQL each takes the same advisory
  lock (``pg_advisory_xact_lock``: two replicas or an operator never interleave) and sends
  ``NOTIFY token_server_keys`` on commit, so every replica reloads at once (the reload
  interval is the backstop). SQLite's ``BEGIN IMMEDIATE`` serialises writers already.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from joserfc.jwk import RSAKey
from sqlalchemy import Table, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .keycrypt import EncryptionKey, KeyDecryptError
from .keys import (
    KEY_STATES,
    RSA_BITS,
    KeyInfo,
    KeySet,
    KeyStore,
    KeysUnavailableError,
    PruneResult,
    ReloadFailure,
    make_keyset,
    public_half,
    rotation_too_soon,
    signing_info,
)
from .models import SigningKey

#: PostgreSQL ``NOTIFY`` channel of key changes, and the advisory lock of key writes.
CHANNEL = "token_server_keys"
LOCK_ID = 0x6B657973  # "keys"
TABLE = cast(Table, SigningKey.__table__)


class KeyStoreConflictError(RuntimeError):
    """The operation would leave the store inconsistent; the message says why and what to do."""


@dataclass(frozen=True)
class _Row:
    kid: str
    state: str
    alg: str
    public_jwk: str
    private_key: bytes
    encryption_key_id: str
    created_at: int
    activated_at: int | None
    retired_at: int | None

    @property
    def info(self) -> KeyInfo:
        return KeyInfo(self.kid, self.state, self.created_at, self.activated_at, self.retired_at)


class DatabaseKeyStore:
    """One per process. ``clock`` (seconds since the epoch) is injectable for tests."""

    def __init__(
        self,
        engine: AsyncEngine,
        encryption: EncryptionKey,
        alg: str = "RS256",
        *,
        clock: Callable[[], float] = time.time,
        previous: EncryptionKey | None = None,
    ) -> None:
        """``previous`` (``AUTH_KEY_ENCRYPTION_KEY_PREVIOUS``) only opens keys, never seals:
        replicas given the new key start before ``keys rewrap`` has moved the rows to it."""
        self.engine = engine
        self.encryption = encryption
        self.previous = previous
        self.alg = alg
        self.clock = clock
        self.failure: ReloadFailure | None = None
        self._keyset: KeySet | None = None
        self._version: bytes | None = None
        #: Kids whose sealed private key was checked (a kid is its key's thumbprint: once
        #: checked, never again).
        self._public: dict[str, RSAKey] = {}
        self._signing: tuple[str, RSAKey] | None = None  # the current key, opened once
        self._reloading = asyncio.Lock()
        #: Tests make a write fail between its steps (a crash mid-rotation).
        self.between_steps: Callable[[str], None] = lambda step: None

    @property
    def postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # -- reading -------------------------------------------------------------------------

    def keyset(self) -> KeySet:
        if self._keyset is None:
            raise KeysUnavailableError(
                "no signing keys loaded from the database: run `python -m server keys rotate`"
            )
        return self._keyset

    async def areload(self) -> bool:
        """Load the table again if it changed; True when something new was loaded. On
        failure: raises, keeps the keys loaded before, records ``failure``."""
        async with self._reloading:
            try:
                async with self.engine.connect() as connection:
                    rows = await _rows(connection)
                version = _version(rows)
                if self._keyset is not None and version == self._version:
                    changed = False
                else:
                    self._keyset = await asyncio.to_thread(self._build, rows)
                    self._version = version
                    changed = True
            except Exception as exc:
                self.failure = ReloadFailure.after(self.failure, exc)
                raise
            self.failure = None
            return changed

    def _build(self, rows: list[_Row]) -> KeySet:
        current = [row for row in rows if row.state == "current"]
        if not current:
            raise KeysUnavailableError(
                "no current signing key in the database: run `python -m server keys rotate` "
                "(or `keys import` to bring the keys of AUTH_KEYS_DIR)"
            )
        for row in rows:
            if row.state not in KEY_STATES:
                raise KeysUnavailableError(
                    f"signing_keys row {row.kid} has the state {row.state!r}, not one of "
                    f"{', '.join(KEY_STATES)}: restore the row from a backup"
                )
        chosen = signing_info([row.info for row in current])
        assert chosen is not None  # current is not empty
        signing_row = next(row for row in current if row.kid == chosen.kid)
        # Each key is checked against its sealed private half once: someone who can write the
        # table but lacks the encryption key cannot slip a public key of theirs into the JWKS
        # (and so into what this server accepts).
        ordered = [signing_row, *(row for row in rows if row is not signing_row)]
        public: dict[str, RSAKey] = {}
        for row in ordered:
            published = _public_key(row)  # the column is readable, and is the kid's key
            if row.kid not in self._public:
                self._check_sealed(row, published)
            public[row.kid] = published
        self._public = dict(public)
        signing = self._signing
        if signing is None or signing[0] != signing_row.kid:
            # Only a new signing key is opened: a rewrap (new sealed bytes, same key) leaves
            # the replicas that lack the new encryption key signing with the key they hold.
            signing = (signing_row.kid, self._open(signing_row))
            self._signing = signing
        infos = [row.info for row in rows]
        return make_keyset(infos, public, signing_row.kid, signing[1], self.alg)

    def _opener(self, row: _Row) -> EncryptionKey:
        for key in (self.encryption, self.previous):
            if key is not None and key.id == row.encryption_key_id:
                return key
        which = "the current signing key" if row.state == "current" else "the signing key"
        raise KeysUnavailableError(
            f"{which} {row.kid} is sealed under the encryption key "
            f"{row.encryption_key_id}, but AUTH_KEY_ENCRYPTION_KEY is {self.encryption.id}: "
            "set AUTH_KEY_ENCRYPTION_KEY (or AUTH_KEY_ENCRYPTION_KEY_PREVIOUS) to the key it "
            "was sealed with, or move every key to this one with `python -m server keys rewrap`"
        )

    def _check_sealed(self, row: _Row, published: RSAKey) -> None:
        """The private key sealed in ``row`` opens and is the key of its kid and of its
        ``public_jwk``: the public key comes from whoever holds the encryption key."""
        try:
            pem = self._opener(row).open(row.private_key, kid=row.kid)
        except KeyDecryptError as exc:
            raise KeysUnavailableError(f"{exc}: restore the row from a backup") from None
        try:
            sealed = public_half(row.kid, pem, Path(f"signing_keys/{row.kid}"))
        except KeysUnavailableError:
            raise KeysUnavailableError(
                f"the private key sealed in row {row.kid} is another key: restore the row"
            ) from None
        if sealed.as_dict() != published.as_dict():
            raise KeysUnavailableError(f"signing_keys row {row.kid}: public_jwk is another key")

    def _open(self, row: _Row) -> RSAKey:
        try:
            pem = self._opener(row).open(row.private_key, kid=row.kid)
            key = RSAKey.import_key(pem)
        except KeyDecryptError as exc:
            raise KeysUnavailableError(f"{exc}: restore the row from a backup") from None
        except Exception:  # joserfc/cryptography raise several types for a bad key
            raise KeysUnavailableError(
                f"the private key of {row.kid} opens but is not an RSA private key"
            ) from None
        if key.thumbprint() != row.kid or not key.as_dict(private=True).get("d"):
            raise KeysUnavailableError(
                f"the private key sealed in row {row.kid} is another key: restore the row"
            )
        return key

    async def alist(self) -> list[KeyInfo]:
        async with self.engine.connect() as connection:
            return [row.info for row in await _rows(connection)]

    # -- writing -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def try_writing(self, *, wait: bool = False) -> AsyncIterator[AsyncConnection | None]:
        """One transaction, serialised with every other key write of every replica, whose
        commit tells the other replicas (PostgreSQL ``NOTIFY``). ``wait``: for the lock;
        otherwise ``None`` at once when another replica holds it (the automatic rotation:
        exactly one replica acts, the others skip their turn)."""
        async with self.engine.begin() as connection:
            if self.postgresql:
                lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
                taken = await connection.scalar(text(f"SELECT {lock}(:id)"), {"id": LOCK_ID})
                if taken is False:
                    yield None
                    return
            yield connection
            if self.postgresql:
                await connection.execute(text("SELECT pg_notify(:c, '')"), {"c": CHANNEL})

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """``try_writing`` that waits for the lock (operators' commands)."""
        async with self.try_writing(wait=True) as connection:
            assert connection is not None
            yield connection

    async def ensure(self) -> bool:
        """A current and a next key when the table has none; True if created."""
        if await self.alist():
            return False  # every start but the first: no keys made for nothing
        fresh = await asyncio.to_thread(lambda: [generate_key(), generate_key()])
        async with self._writing() as connection:
            if await _rows(connection):
                return False
            await self._insert_pair(connection, fresh)
            return True

    async def arotate(self, *, min_next_age: int = 0) -> list[KeyInfo]:
        """next → current, current → retired, and a new next, in one transaction."""
        fresh = await asyncio.to_thread(generate_key)
        async with self._writing() as connection:
            return await self.rotate_in(connection, fresh, min_next_age=min_next_age)

    async def rotate_in(
        self, connection: AsyncConnection, fresh: RSAKey, *, min_next_age: int
    ) -> list[KeyInfo]:
        rows = await _rows(connection)
        self._check_sealed_here(rows)
        stamp = int(self.clock())
        nexts = [row for row in rows if row.state == "next"]
        if not nexts and not any(row.state == "current" for row in rows):
            await self._insert_pair(connection, [await asyncio.to_thread(generate_key), fresh])
            return [row.info for row in await _rows(connection)]
        # The oldest published next key signs (one only: a damaged table with two must not
        # end with two current keys). No minimum age (--force) means none: a next key stamped
        # by a replica whose clock runs ahead of this one's is not "published -1 s ago".
        promote = min(nexts, key=lambda row: (row.created_at, row.kid)) if nexts else None
        if promote is not None and min_next_age > 0:
            too_soon = rotation_too_soon(promote.info, stamp, min_next_age)
            if too_soon is not None:
                raise too_soon
        await connection.execute(
            update(TABLE)
            .where(TABLE.c.state == "current")
            .values(state="retired", retired_at=stamp)
        )
        self.between_steps("retired")
        if promote is not None:
            await connection.execute(
                update(TABLE)
                .where(TABLE.c.kid == promote.kid)
                .values(state="current", activated_at=stamp)
            )
        self.between_steps("promoted")
        if promote is None:
            await self._insert(connection, await asyncio.to_thread(generate_key), "current", stamp)
        await self._insert(connection, fresh, "next", stamp)
        return [row.info for row in await _rows(connection)]

    async def aprune(self, *, max_token_lifetime: int) -> PruneResult:
        async with self._writing() as connection:
            return await self.prune_in(connection, max_token_lifetime=max_token_lifetime)

    async def prune_in(
        self, connection: AsyncConnection, *, max_token_lifetime: int
    ) -> PruneResult:
        stamp = int(self.clock())
        removed: list[str] = []
        kept: list[str] = []
        for row in await _rows(connection):
            if row.state != "retired":
                continue
            if row.retired_at is None:
                # A damaged row (no release writes one): its retirement is counted from now,
                # recorded, so that it is pruned one token lifetime later, not never.
                await connection.execute(
                    update(TABLE).where(TABLE.c.kid == row.kid).values(retired_at=stamp)
                )
            safe_at = (row.retired_at or stamp) + max_token_lifetime
            if safe_at <= stamp:
                removed.append(row.kid)
            else:
                kept.append(
                    f"{row.kid}: tokens it signed may be valid for {safe_at - stamp} s more"
                )
        if removed:
            await connection.execute(delete(TABLE).where(TABLE.c.kid.in_(removed)))
        return PruneResult(removed, kept, [])

    async def import_files(self, files: KeyStore) -> tuple[list[str], list[str]]:
        """Copy the keys of a files store (``keys.json`` and its PEM files) into the table:
        (imported, already there). Idempotent (a key already there takes the state the files
        give it now); refused when the table holds other keys (two current keys could not
        both sign)."""
        infos = files.read_manifest()
        if not infos:
            raise KeyStoreConflictError(f"no keys in {files.directory} to import")
        pems: dict[str, bytes] = {}
        for info in infos:
            try:
                pems[info.kid] = files.private_pem(info.kid)
            except OSError as exc:  # a missing or unreadable file: one error line, no trace
                raise KeyStoreConflictError(
                    f"{files.directory}/{info.kid}.pem, listed in keys.json, cannot be read "
                    f"({exc.strerror or exc}): restore it, then import again"
                ) from None

        def parse(kid: str, pem: bytes) -> RSAKey:
            try:
                return RSAKey.import_key(pem)
            except Exception:  # joserfc/cryptography raise several types for a bad file
                raise KeyStoreConflictError(
                    f"{files.directory}/{kid}.pem: not a readable RSA private key (truncated "
                    "or damaged?): restore it from a backup, then import again"
                ) from None

        keys = await asyncio.to_thread(lambda: {kid: parse(kid, pem) for kid, pem in pems.items()})
        for kid, key in keys.items():
            if key.thumbprint() != kid:
                raise KeyStoreConflictError(f"{files.directory}/{kid}.pem holds another key")
        async with self._writing() as connection:
            present = {row.kid: row for row in await _rows(connection)}
            self._check_sealed_here(list(present.values()))
            strangers = sorted(set(present) - set(pems))
            if strangers:
                raise KeyStoreConflictError(
                    f"the database already holds other keys ({', '.join(strangers)}): import "
                    "into an empty store only (or delete those rows first)"
                )
            imported: list[str] = []
            for info in infos:
                if info.kid in present:
                    # Imported before, and the files rotated since (the database holds no key
                    # of its own, so it was not rotated): follow them, or there would be two
                    # current keys.
                    if present[info.kid].info != info:
                        await connection.execute(
                            update(TABLE)
                            .where(TABLE.c.kid == info.kid)
                            .values(
                                state=info.state,
                                created_at=info.created_at,
                                activated_at=info.activated_at,
                                retired_at=info.retired_at,
                            )
                        )
                    continue
                await connection.execute(
                    insert(TABLE).values(
                        **self._sealed(keys[info.kid]),
                        state=info.state,
                        created_at=info.created_at,
                        activated_at=info.activated_at,
                        retired_at=info.retired_at,
                    )
                )
                imported.append(info.kid)
            return imported, sorted(set(present) & set(pems))

    async def rewrap(self, old: EncryptionKey) -> tuple[list[str], list[str]]:
        """Seal every private key under this store's encryption key: those sealed under
        ``old`` are opened and sealed again (rewrapped), those already under the new one are
        left (so a rerun after a crash finishes the job). Refused, with nothing changed, when a
        row is sealed under neither."""
        async with self._writing() as connection:
            rows = await _rows(connection)
            unknown = [
                row.kid for row in rows if row.encryption_key_id not in (old.id, self.encryption.id)
            ]
            if unknown:
                raise KeyStoreConflictError(
                    f"keys sealed under neither the old nor the new encryption key: "
                    f"{', '.join(unknown)}"
                )
            done: list[str] = []
            for row in rows:
                if row.encryption_key_id == self.encryption.id:
                    continue
                try:
                    pem = old.open(row.private_key, kid=row.kid)
                except KeyDecryptError as exc:
                    raise KeyStoreConflictError(str(exc)) from None
                await connection.execute(
                    update(TABLE)
                    .where(TABLE.c.kid == row.kid)
                    .values(
                        private_key=self.encryption.seal(pem, kid=row.kid),
                        encryption_key_id=self.encryption.id,
                    )
                )
                done.append(row.kid)
            return done, [row.kid for row in rows if row.kid not in done]

    def _check_sealed_here(self, rows: list[_Row]) -> None:
        """Refuse to add a key sealed under this store's encryption key beside keys sealed
        under another: the servers (which have that other key) could not open it once it
        signs, and a mistyped AUTH_KEY_ENCRYPTION_KEY would go unnoticed until then."""
        others = sorted({row.encryption_key_id for row in rows} - {self.encryption.id})
        if others:
            raise KeyStoreConflictError(
                f"the signing keys in the database are sealed under the encryption key "
                f"{', '.join(others)}, but AUTH_KEY_ENCRYPTION_KEY is {self.encryption.id}: a "
                "key sealed now would not open where the others do: set "
                "AUTH_KEY_ENCRYPTION_KEY to the key they were sealed with, or move every key to "
                "this one first with `python -m server keys rewrap`"
            )

    async def publish_next_in(self, connection: AsyncConnection, key: RSAKey) -> None:
        """Add ``key`` as the next key (a store left without one)."""
        await self._insert(connection, key, "next", int(self.clock()))

    async def _insert_pair(self, connection: AsyncConnection, keys: list[RSAKey]) -> None:
        stamp = int(self.clock())
        await self._insert(connection, keys[0], "current", stamp)
        await self._insert(connection, keys[1], "next", stamp)

    async def _insert(
        self, connection: AsyncConnection, key: RSAKey, state: str, stamp: int
    ) -> None:
        await connection.execute(
            insert(TABLE).values(
                **self._sealed(key),
                state=state,
                created_at=stamp,
                activated_at=stamp if state == "current" else None,
            )
        )

    def _sealed(self, key: RSAKey) -> dict[str, Any]:
        kid = key.thumbprint()
        return {
            "kid": kid,
            "alg": "RS256",
            "public_jwk": json.dumps(dict(key.as_dict(private=False)), sort_keys=True),
            "private_key": self.encryption.seal(key.as_pem(private=True), kid=kid),
            "encryption_key_id": self.encryption.id,
        }


def generate_key() -> RSAKey:
    return RSAKey.generate_key(RSA_BITS, private=True)


async def infos_in(connection: AsyncConnection) -> list[KeyInfo]:
    """Every key's state and timestamps, read on ``connection`` (in its transaction)."""
    return [row.info for row in await _rows(connection)]


async def _rows(connection: AsyncConnection) -> list[_Row]:
    result = await connection.execute(select(TABLE).order_by(TABLE.c.created_at, TABLE.c.kid))
    return [_Row(**dict(row._mapping)) for row in result]


def _version(rows: list[_Row]) -> bytes:
    digest = hashlib.sha256()
    for row in rows:
        fields = (row.kid, row.state, row.alg, row.created_at, row.activated_at, row.retired_at)
        for value in (*fields, row.encryption_key_id):
            digest.update(repr(value).encode() + b"\x00")
        digest.update(hashlib.sha256(row.private_key).digest())
        digest.update(hashlib.sha256(row.public_jwk.encode()).digest())
    return digest.digest()


def _public_key(row: _Row) -> RSAKey:
    try:
        key = RSAKey.import_key(json.loads(row.public_jwk))
    except Exception:  # a damaged row: joserfc and json raise several types
        raise KeysUnavailableError(
            f"signing_keys row {row.kid}: its public key is not readable"
        ) from None
    if key.thumbprint() != row.kid or key.is_private:
        raise KeysUnavailableError(
            f"signing_keys row {row.kid}: its public key is another key (a kid is its key's "
            "RFC 7638 thumbprint): restore the row from a backup"
        )
    return key
