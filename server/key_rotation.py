"""Automatic rotation of the database key store (``AUTH_KEY_AUTO_ROTATE=true``).

Every replica runs an ``AutoRotator``; each of its steps (``tick``) does, in one transaction
under the advisory lock of key writes (``DatabaseKeyStore.try_writing``: when another replica
holds it, that one acts and this one skips its turn):

- **rotate** (next → current → retired, and a new next) once the current key has signed for
  ``AUTH_KEY_ROTATION_INTERVAL``, but only when the next key has been published for at least
  the JWKS max-age (a verifier's cached JWKS must hold it before it signs): otherwise it waits,
  and never forces;
- **prune** retired keys once every token they signed has expired (retired at + the longest
  lifetime of a token they sign);
- **publish** a next key when the store has none (a store damaged or imported so), rather
  than let a rotation promote a key no verifier has seen.

No key is made while a row is sealed under another encryption key than this replica's (a
``keys rewrap`` under way, or replicas given different ``AUTH_KEY_ENCRYPTION_KEY``): the key
it would seal could not be opened by the replicas holding the other one. The replicas whose
key seals every row act; pruning goes on regardless.

The decision is taken twice: on a plain read, to do nothing (and take no lock, send no
``NOTIFY``) when nothing is due, and again on the rows read under the lock, since another
replica may have acted in between. A new RSA key is generated before the lock is taken (in a
worker thread, tens of milliseconds), so the lock is held for a few statements only. A crash
between the steps of a rotation rolls the transaction back: the table is as before, and the
next tick rotates. Every action is an audit event (``key.rotated`` with ``via="auto"``,
``key.pruned``, ``key.published``) after its commit, and the store reloads at once.

The first pair of an empty store is not created here (``ensure()`` does it at start-up
outside production; ``keys rotate`` or ``keys import`` in production).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from . import keys_db
from .config import Settings
from .keys import KeyInfo, signing_info
from .keys_db import TABLE, DatabaseKeyStore, infos_in
from .metrics import set_key_ages
from .observability import audit, log

#: The longest pause between two ticks (seconds); a tenth of the rotation interval if shorter.
MAX_PERIOD = 60.0
#: Each pause is the period times a random factor in this range, so that replicas started
#: together do not all contend for the lock at the same instant.
JITTER = (0.8, 1.2)


#: Seconds a retired key outlives its last token's expiry before it is pruned (clock skew
#: between replicas, a replica that has not reloaded yet); as ``manage.PRUNE_SKEW_MARGIN``.
PRUNE_MARGIN = 300


def signed_token_lifetime(settings: Settings) -> int:
    """The longest a token signed by a key stays valid: access tokens, and ID tokens, whose
    ``exp`` is also ``iat + AUTH_ACCESS_TOKEN_TTL`` (oauth/server.py ``id_token``)."""
    return settings.access_token_ttl


@dataclass(frozen=True)
class Plan:
    """What a tick should do with these keys at this time."""

    rotate: bool = False
    publish_next: bool = False
    prune: list[str] = field(default_factory=list)
    #: Why a rotation that is due waits (the next key is too new), or None.
    waiting: str | None = None

    @property
    def writes(self) -> bool:
        return self.rotate or self.publish_next or bool(self.prune)


@dataclass(frozen=True)
class Tick:
    """What a tick did."""

    #: Another replica held the lock: it acts, this one did nothing.
    busy: bool = False
    #: The key that signs after a rotation, and the one it retired.
    rotated: str | None = None
    retired: str | None = None
    #: A next key published because the store had none.
    published: str | None = None
    pruned: list[str] = field(default_factory=list)
    waiting: str | None = None


def plan(
    infos: list[KeyInfo],
    now: int,
    *,
    interval: int,
    min_next_age: int,
    max_token_lifetime: int,
    sealed_elsewhere: list[str] | None = None,
) -> Plan:
    """The rules, on the keys' states and timestamps (epoch seconds); ``sealed_elsewhere``:
    the kids sealed under another encryption key than this replica's."""
    current = [info for info in infos if info.state == "current"]
    upcoming = [info for info in infos if info.state == "next"]
    prune = [
        info.kid
        for info in infos
        if info.state == "retired"
        # A damaged row without retired_at is handed to prune_in, which dates it from now.
        and (info.retired_at is None or info.retired_at + max_token_lifetime <= now)
    ]
    if not current:
        # Nothing signs: not this loop's business (the server did not start with such a store,
        # or an operator is at work); ``keys rotate`` creates a pair.
        return Plan(prune=prune)
    if sealed_elsewhere:
        return Plan(
            prune=prune,
            waiting=(
                f"keys sealed under another encryption key than this replica's "
                f"({', '.join(sealed_elsewhere)}): rotating only once every row is sealed "
                "under its AUTH_KEY_ENCRYPTION_KEY (finish `keys rewrap`, and give every "
                "replica the same key)"
            ),
        )
    signing = signing_info(infos)
    assert signing is not None
    if not upcoming:
        return Plan(publish_next=True, prune=prune)
    due = (signing.activated_at or signing.created_at) + interval <= now
    if not due:
        return Plan(prune=prune)
    # The key a rotation promotes: the oldest published one (DatabaseKeyStore.rotate_in).
    promoted = min(upcoming, key=lambda info: (info.created_at, info.kid))
    age = now - promoted.created_at
    if age < min_next_age:
        return Plan(
            prune=prune,
            waiting=(
                f"rotation due but the next key {promoted.kid} was published {age} s ago, and "
                f"a JWKS may be cached for {min_next_age} s: rotating in {min_next_age - age} s"
            ),
        )
    return Plan(rotate=True, prune=prune)


class AutoRotator:
    """One per process, on the database store. ``tick`` is one step (tests call it directly,
    with the store's injected clock); ``run`` repeats it until cancelled."""

    def __init__(
        self,
        store: DatabaseKeyStore,
        *,
        interval: int,
        min_next_age: int,
        max_token_lifetime: int,
        period: float | None = None,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.store = store
        self.interval = interval
        self.min_next_age = min_next_age
        self.max_token_lifetime = max_token_lifetime
        self.period = period if period is not None else min(MAX_PERIOD, interval / 10)
        self.jitter = jitter
        self._said: str | None = None  # the last waiting or failure reason logged

    @classmethod
    def from_settings(cls, store: DatabaseKeyStore, settings: Settings) -> AutoRotator:
        return cls(
            store,
            interval=settings.key_rotation_interval,
            min_next_age=settings.jwks_max_age,
            # Kept past the last token's expiry by a margin: the clock of the replica that
            # stamped retired_at may lag this one's, and a replica that has not reloaded yet
            # (a lost NOTIFY, then AUTH_KEY_RELOAD_INTERVAL) still signs with the old key.
            max_token_lifetime=signed_token_lifetime(settings)
            + PRUNE_MARGIN
            + math.ceil(settings.key_reload_interval),
        )

    async def _plan(self, connection: AsyncConnection) -> tuple[list[KeyInfo], Plan]:
        infos = await infos_in(connection)
        foreign = await connection.scalars(
            select(TABLE.c.kid)
            .where(TABLE.c.encryption_key_id != self.store.encryption.id)
            .order_by(TABLE.c.kid)
        )
        return infos, plan(
            infos,
            int(self.store.clock()),
            interval=self.interval,
            min_next_age=self.min_next_age,
            max_token_lifetime=self.max_token_lifetime,
            sealed_elsewhere=list(foreign),
        )

    async def tick(self) -> Tick:
        """Rotate, prune or publish if due, as the one replica holding the lock."""
        store = self.store
        async with store.engine.connect() as reading:
            infos, first = await self._plan(reading)
        if not first.writes:
            set_key_ages(infos, store.clock())
            return Tick(waiting=first.waiting)
        making = first.rotate or first.publish_next
        fresh = await asyncio.to_thread(keys_db.generate_key) if making else None
        rotated = retired = published = None
        pruned: list[str] = []
        async with store.try_writing() as connection:
            if connection is None:
                return Tick(busy=True)
            infos, again = await self._plan(connection)
            if again.rotate and fresh is not None:
                retired = _kid(signing_info(infos))
                after = await store.rotate_in(connection, fresh, min_next_age=self.min_next_age)
                rotated = _kid(signing_info(after))
            elif again.publish_next and fresh is not None:
                await store.publish_next_in(connection, fresh)
                published = fresh.thumbprint()
            if again.prune:
                result = await store.prune_in(
                    connection, max_token_lifetime=self.max_token_lifetime
                )
                pruned = result.removed
        # Committed: say what was done, and sign with it at once.
        if rotated is not None:
            audit("key.rotated", kid=rotated, retired=retired, via="auto")
        if published is not None:
            audit("key.published", kid=published, via="auto")
        if pruned:
            audit("key.pruned", kids=pruned, via="auto")
        if rotated or published or pruned:
            try:
                await store.areload()
            except Exception as exc:  # done and committed: the reloader reports, /readyz too
                log.error("keys.reload_failed", error=str(exc), after="auto rotation")
        set_key_ages(await store.alist(), store.clock())
        return Tick(
            rotated=rotated,
            retired=retired,
            published=published,
            pruned=pruned,
            waiting=again.waiting,
        )

    async def run(self) -> None:
        """Tick until cancelled, every ``period`` (with jitter). A failed tick is logged once
        per reason and retried at the next one."""
        await asyncio.sleep(self.period * self.jitter(0.0, 1.0))
        while True:
            try:
                tick = await self.tick()
                said = tick.waiting
                if said is not None and said != self._said:
                    log.warning("keys.auto_rotate_waiting", reason=said)
            except Exception as exc:  # keep trying: the next tick may succeed
                said = f"{type(exc).__name__}: {exc}"
                if said != self._said:
                    log.error("keys.auto_rotate_failed", error=said)
            self._said = said
            await asyncio.sleep(self.period * self.jitter(*JITTER))


def _kid(info: KeyInfo | None) -> str | None:
    return None if info is None else info.kid
