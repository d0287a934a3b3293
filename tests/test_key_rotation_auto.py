"""Automatic rotation of the database key store (SPEC.md "Signing keys in the database",
issue 22 item 4): ``server/key_rotation.py``.

Driven by an injected clock (epoch seconds, shared by the stores of competing replicas), one
``tick`` at a time: no sleeps. Each test has a database of its own (the advisory lock is per
database), with the ``signing_keys`` table only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from server import key_rotation
from server import main as server_main
from server.cli import main
from server.config import Settings
from server.db import create_engine
from server.key_rotation import PRUNE_MARGIN, AutoRotator, Tick, plan, signed_token_lifetime
from server.keycrypt import EncryptionKey, parse_encryption_key
from server.keys import KeyInfo, KeySet, KeyStore
from server.keys_db import LOCK_ID, TABLE, DatabaseKeyStore
from server.main import create_app
from server.metrics import REGISTRY
from tests.conftest import BACKENDS, Events, make_settings, migrate

pytestmark = pytest.mark.feature("key-store-database", "key-auto-rotation")

T0 = 1_700_000_000
INTERVAL = 3600  # AUTH_KEY_ROTATION_INTERVAL of these tests: a JWKS max-age of 360 s
TTL = 900  # AUTH_ACCESS_TOKEN_TTL: ID tokens live as long
STEP = 300  # the clock moves this much between ticks


class Clock:
    """Epoch seconds that move only when told."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@pytest.fixture(params=BACKENDS)
def keys_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own holding an empty ``signing_keys`` table."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    else:
        url = request.getfixturevalue("own_postgresql_url")

    async def create_table() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.begin() as connection:
                if request.param == "sqlite":
                    # As ``migrate`` leaves a server's file: in WAL mode (persistent). Else the
                    # replicas' first connections switch it at once, and that switch takes an
                    # exclusive lock SQLite may refuse without waiting ("database is locked":
                    # a flaky failure under the full suite's load).
                    await connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                await connection.run_sync(TABLE.create)
        finally:
            await engine.dispose()

    asyncio.run(create_table())
    yield url


def settings_for(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "key_store": "database",
        "key_encryption_key": secrets.token_urlsafe(32),
        "key_auto_rotate": True,
        "key_rotation_interval": INTERVAL,
        "access_token_ttl": TTL,
        **overrides,
    }
    return make_settings(url, tmp_path / "unused-keys", **values)


@contextlib.asynccontextmanager
async def replica(
    settings: Settings, clock: Clock, encryption: EncryptionKey | None = None
) -> AsyncIterator[tuple[DatabaseKeyStore, AutoRotator]]:
    """One server's store and rotator, on an engine of its own."""
    engine = create_engine(settings)
    try:
        store = DatabaseKeyStore(
            engine,
            encryption or parse_encryption_key(settings.key_encryption_key),
            clock=clock,
        )
        rotator = AutoRotator.from_settings(store, settings)
        # The tests reason in token lifetimes; the production margin (from_settings, checked
        # in test_a_server_runs_the_rotator_only_when_asked_and_stops_it) would only shift
        # every prune by it.
        rotator.max_token_lifetime = signed_token_lifetime(settings)
        yield store, rotator
    finally:
        await engine.dispose()


async def table(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    """Every row, private key included, by kid."""
    columns = (TABLE.c.kid, TABLE.c.state, TABLE.c.created_at, TABLE.c.activated_at)
    async with engine.connect() as connection:
        result = await connection.execute(
            select(*columns, TABLE.c.retired_at, TABLE.c.private_key).order_by(TABLE.c.kid)
        )
        return [tuple(row) for row in result]


def by_state(infos: list[KeyInfo]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"current": [], "next": [], "retired": []}
    for info in infos:
        found[info.state].append(info.kid)
    return found


def verifies(token: str, keyset: KeySet) -> bool:
    """Checked as a resource server would, with PyJWT and the published JWKS only (the
    expiry is checked against the injected clock by the callers)."""
    kid = jwt.get_unverified_header(token)["kid"]
    published = {jwk["kid"]: jwk for jwk in json.loads(keyset.jwks_bytes)["keys"]}
    if kid not in published:
        return False
    key = jwt.PyJWK(published[kid]).key
    jwt.decode(token, key, algorithms=["RS256"], options={"verify_exp": False, "verify_aud": False})
    return True


def rotations(events: Events) -> list[dict[str, Any]]:
    return [fields for event, fields in events if event == "key.rotated"]


def pruned(events: Events) -> list[str]:
    return [kid for event, fields in events if event == "key.pruned" for kid in fields["kids"]]


# -- the rules -------------------------------------------------------------------------------


def test_the_longest_token_lifetime_bounds_pruning(tmp_path: Path) -> None:
    settings = make_settings("sqlite+aiosqlite://", tmp_path, access_token_ttl=1234)
    assert signed_token_lifetime(settings) == 1234  # access and ID tokens alike


def info(kid: str, state: str, created: int, activated: int | None = None) -> KeyInfo:
    return KeyInfo(kid, state, created, activated, created if state == "retired" else None)


def test_plan_waits_for_the_next_key_and_never_forces() -> None:
    keys = [info("c", "current", 0, 0), info("n", "next", 0)]
    rule = functools.partial(plan, interval=100, min_next_age=500, max_token_lifetime=50)
    assert not rule(keys, 99).rotate
    due_too_soon = rule(keys, 100)
    assert not due_too_soon.rotate and not due_too_soon.writes
    assert due_too_soon.waiting is not None and "rotating in 400 s" in due_too_soon.waiting
    assert rule(keys, 500).rotate
    nothing_signs = rule([info("n", "next", 0)], 10**6)
    assert not nothing_signs.writes, "the first pair is ensure()'s, not the loop's"
    no_next = rule([info("c", "current", 0, 0)], 10**6)
    assert no_next.publish_next and not no_next.rotate, "a key no verifier has seen never signs"
    retired = [*keys, info("r", "retired", 10)]
    assert rule(retired, 59).prune == []
    assert rule(retired, 60).prune == ["r"]
    # A damaged retired row without retired_at goes to prune_in, which dates it from now.
    undated = [*keys, KeyInfo("u", "retired", 10, None, None)]
    assert rule(undated, 20).prune == ["u"]


# -- one replica, several intervals ------------------------------------------------------------


async def test_rotates_every_interval_and_tokens_verify_until_they_expire(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, rotator):
        assert await store.ensure()
        await store.areload()
        first = store.keyset().kid
        tokens: list[tuple[str, str, int]] = []  # (token, kid, exp)
        retired_at: dict[str, int] = {}
        signers = [first]
        intervals = 4
        while clock.now < T0 + intervals * INTERVAL + TTL + STEP:
            clock.now += STEP
            before = store.keyset().kid
            tick = await rotator.tick()
            keyset = store.keyset()
            if tick.rotated is not None:
                assert tick.retired == before and keyset.kid == tick.rotated != before
                assert (clock.now - T0) % INTERVAL == 0, "on time, not before"
                retired_at[before] = clock.now
                signers.append(keyset.kid)
            else:
                assert keyset.kid == before
            states = by_state(await store.alist())
            assert len(states["current"]) == 1 and len(states["next"]) == 1
            assert states["current"] == [keyset.kid]
            # Every token still valid verifies against the JWKS served now.
            for token, kid, exp in tokens:
                if exp > clock.now:
                    assert verifies(token, keyset), f"a valid token of {kid} was refused"
            # A retired key is published until its last token expired (plus one tick), no longer.
            for kid, retired in retired_at.items():
                published = kid in keyset.public
                assert published == (clock.now < retired + TTL), (kid, clock.now - retired)
            if clock.now <= T0 + intervals * INTERVAL:
                token = keyset.sign({"sub": "u", "iat": clock.now, "exp": clock.now + TTL}, "JWT")
                tokens.append((token, keyset.kid, clock.now + TTL))

    assert len(signers) == intervals + 1 and len(set(signers)) == intervals + 1
    assert [fields["via"] for fields in rotations(events)] == ["auto"] * intervals
    assert [fields["kid"] for fields in rotations(events)] == signers[1:]
    assert pruned(events) == signers[:-1], "each retired key pruned, once"
    # Tokens signed just before each rotation were among those checked after it.
    for rotation in range(1, intervals + 1):
        last = T0 + rotation * INTERVAL - STEP
        assert any(exp == last + TTL for _, _, exp in tokens)


async def test_a_next_key_signs_only_after_the_jwks_max_age(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    """Even with an interval far below the JWKS max-age, the next key waits to be published
    that long: a tick right after a rotation does not rotate again."""
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, _):
        rotator = AutoRotator(store, interval=1, min_next_age=600, max_token_lifetime=TTL)
        await store.ensure()
        clock.now += 60
        waited = await rotator.tick()
        assert waited.rotated is None and waited.waiting is not None
        assert "published 60 s ago" in waited.waiting and "rotating in 540 s" in waited.waiting
        clock.now = T0 + 600
        assert (await rotator.tick()).rotated is not None
        for later in (1, 2, 599):  # due (interval 1 s), but the new next key is too new
            clock.now = T0 + 600 + later
            again = await rotator.tick()
            assert again.rotated is None and again.waiting is not None, later
        clock.now = T0 + 1200
        assert (await rotator.tick()).rotated is not None
    assert len(rotations(events)) == 2


async def test_a_store_without_a_next_key_gets_one_published_before_it_signs(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, rotator):
        await store.ensure()
        async with store.engine.begin() as connection:
            await connection.execute(TABLE.delete().where(TABLE.c.state == "next"))
        clock.now += 10 * INTERVAL
        tick = await rotator.tick()
        assert tick.rotated is None and tick.published is not None
        assert by_state(await store.alist())["next"] == [tick.published]
        assert tick.published in store.keyset().public, "published at once"
        clock.now += settings.jwks_max_age
        assert (await rotator.tick()).rotated == tick.published
    assert [event for event, _ in events if event.startswith("key.")] == [
        "key.published",
        "key.rotated",
    ]


# -- competing replicas ---------------------------------------------------------------------


async def test_competing_replicas_rotate_exactly_once_per_interval(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with (
        replica(settings, clock) as (store_a, rotator_a),
        replica(settings, clock) as (store_b, rotator_b),
    ):
        await asyncio.gather(store_a.ensure(), store_b.ensure())
        assert len(await table(store_a.engine)) == 2, "one pair, whoever ensured first"
        ticks: list[Tick] = []
        intervals = 4
        while clock.now < T0 + intervals * INTERVAL + TTL + STEP:
            clock.now += STEP
            for _ in range(3):
                ticks += await asyncio.gather(rotator_a.tick(), rotator_b.tick())
                states = by_state(await store_a.alist())
                assert len(states["current"]) == 1, f"two current keys at {clock.now - T0}"
                assert len(states["next"]) == 1
                assert len(states["retired"]) <= 1
        # Each replica signs with the one current key (the other's rotation, once reloaded).
        await store_a.areload()
        await store_b.areload()
        assert store_a.keyset().kid == store_b.keyset().kid
        assert store_a.keyset().jwks_bytes == store_b.keyset().jwks_bytes
    done = [tick for tick in ticks if tick.rotated is not None]
    assert len(done) == intervals, "exactly one rotation per due interval"
    assert len(rotations(events)) == intervals
    assert len({fields["kid"] for fields in rotations(events)}) == intervals
    assert len(pruned(events)) == intervals, "each retired key pruned once"
    assert sum(len(tick.pruned) for tick in ticks) == intervals


@pytest.mark.parametrize("keys_db_url", ["postgresql"], indirect=True)
async def test_a_replica_skips_its_turn_while_another_holds_the_lock(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    """PostgreSQL: ``pg_try_advisory_xact_lock``: the tick does not wait, changes nothing."""
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, rotator):
        await store.ensure()
        clock.now += INTERVAL
        before = await table(store.engine)
        other = create_async_engine(keys_db_url)
        try:
            async with other.begin() as holder:
                await holder.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
                tick = await asyncio.wait_for(rotator.tick(), 5)
                assert tick.busy and tick.rotated is None
                assert await table(store.engine) == before
        finally:
            await other.dispose()
        assert rotations(events) == []
        assert (await rotator.tick()).rotated is not None, "its turn comes at the next tick"


async def test_a_replica_with_another_encryption_key_makes_no_key(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    """During a ``keys rewrap`` (or a replica given the wrong key), the key a replica seals
    must open on every replica: only one whose key seals every row rotates; all prune."""
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    other = parse_encryption_key(secrets.token_urlsafe(32))
    async with (
        replica(settings, clock) as (store, rotator),
        replica(settings, clock, encryption=other) as (_, elsewhere),
    ):
        await store.ensure()
        clock.now += INTERVAL
        before = await table(store.engine)
        tick = await elsewhere.tick()
        assert tick.rotated is None and tick.waiting is not None
        assert "sealed under another encryption key" in tick.waiting
        assert "keys rewrap" in tick.waiting
        assert await table(store.engine) == before
        assert (await rotator.tick()).rotated is not None
        clock.now += TTL
        assert len((await elsewhere.tick()).pruned) == 1, "pruning needs no key"
    assert len(rotations(events)) == 1


# -- a crash in the middle of a rotation ----------------------------------------------------


@pytest.mark.parametrize("step", ["retired", "promoted"])
async def test_a_crash_between_the_steps_of_a_rotation_leaves_the_table_as_before(
    keys_db_url: str, tmp_path: Path, events: Events, step: str
) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, rotator):
        await store.ensure()
        await store.areload()
        signing = store.keyset().kid
        upcoming = by_state(await store.alist())["next"][0]
        clock.now += INTERVAL
        before = await table(store.engine)

        def crash(at: str) -> None:
            if at == step:
                raise RuntimeError(f"killed after {at}")

        store.between_steps = crash
        with pytest.raises(RuntimeError, match=f"killed after {step}"):
            await rotator.tick()
        assert await table(store.engine) == before, "rolled back"
        assert rotations(events) == []
        assert store.keyset().kid == signing

        store.between_steps = lambda at: None
        tick = await rotator.tick()
        assert tick.rotated == upcoming and tick.retired == signing
        states = by_state(await store.alist())
        assert states["current"] == [upcoming] and states["retired"] == [signing]
        assert len(states["next"]) == 1 and states["next"] != [upcoming]
        assert store.keyset().kid == upcoming
        assert len(rotations(events)) == 1


@pytest.mark.parametrize("keys_db_url", ["sqlite"], indirect=True)
async def test_the_loop_ticks_until_cancelled_and_outlives_a_failed_tick(
    keys_db_url: str, tmp_path: Path, events: Events
) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, _):
        rotator = AutoRotator(
            store,
            interval=INTERVAL,
            min_next_age=360,
            max_token_lifetime=TTL,
            period=0.01,
            jitter=lambda low, high: high,
        )
        await store.ensure()
        clock.now += INTERVAL
        failures = 0

        def crash_once(step: str) -> None:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise RuntimeError("killed")

        store.between_steps = crash_once
        task = asyncio.create_task(rotator.run())
        try:
            for _ in range(200):
                if rotations(events):
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.wait({task})
        assert failures == 1 and len(rotations(events)) == 1
        assert task.cancelled()
        assert len(by_state(await store.alist())["current"]) == 1


# -- metrics ------------------------------------------------------------------------------------


def key_age(state: str) -> float | None:
    return REGISTRY.get_sample_value("key_age_seconds", {"state": state})


@pytest.mark.feature("metrics")
@pytest.mark.parametrize("keys_db_url", ["sqlite"], indirect=True)
async def test_key_age_seconds_per_state(keys_db_url: str, tmp_path: Path) -> None:
    clock = Clock()
    settings = settings_for(keys_db_url, tmp_path)
    async with replica(settings, clock) as (store, rotator):
        await store.ensure()
        clock.now = T0 + 100
        await rotator.tick()
        assert (key_age("current"), key_age("next"), key_age("retired")) == (100, 100, None)
        clock.now = T0 + INTERVAL
        assert (await rotator.tick()).rotated is not None
        assert (key_age("current"), key_age("next"), key_age("retired")) == (0, 0, 0)
        clock.now = T0 + INTERVAL + 250
        await rotator.tick()
        assert (key_age("current"), key_age("next"), key_age("retired")) == (250, 250, 250)
        clock.now = T0 + INTERVAL + TTL
        assert (await rotator.tick()).pruned
        assert (key_age("current"), key_age("next"), key_age("retired")) == (TTL, TTL, None)


async def test_the_key_reloader_publishes_the_ages_of_either_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replica, rotating or not, files store or database: at each reload."""
    files = KeyStore(tmp_path / "keys")
    files.ensure()
    published: list[tuple[list[str], float]] = []

    def record(infos: list[KeyInfo], now: float) -> None:
        published.append((sorted(info.state for info in infos), now))

    monkeypatch.setattr(server_main, "set_key_ages", record)
    reloader = asyncio.create_task(server_main._reload_keys(files, 0.01))
    try:
        for _ in range(100):
            if published:
                break
            await asyncio.sleep(0.01)
    finally:
        reloader.cancel()
        await asyncio.wait({reloader})
    states, now = published[0]
    assert states == ["current", "next"]
    assert abs(now - time.time()) < 5


# -- start-up ---------------------------------------------------------------------------------


def test_auto_rotation_with_the_files_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        make_settings("sqlite+aiosqlite://", tmp_path, key_auto_rotate=True)
    message = str(refused.value)
    assert "AUTH_KEY_AUTO_ROTATE=true needs AUTH_KEY_STORE=database" in message
    assert "keys import" in message
    accepted = make_settings(
        "sqlite+aiosqlite://",
        tmp_path,
        key_auto_rotate=True,
        key_store="database",
        key_encryption_key=secrets.token_urlsafe(32),
    )
    assert accepted.key_auto_rotate


def test_the_command_line_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.setenv("AUTH_KEY_AUTO_ROTATE", "true")
    monkeypatch.setenv("AUTH_KEY_STORE", "files")
    assert main(["keys", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: AUTH_KEY_AUTO_ROTATE: ")
    assert "set AUTH_KEY_STORE=database" in err


@pytest.mark.parametrize("auto", [True, False])
async def test_a_server_runs_the_rotator_only_when_asked_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auto: bool
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
    await asyncio.to_thread(migrate, url)
    started = asyncio.Event()
    stopped = asyncio.Event()
    seen: list[AutoRotator] = []

    async def run(self: AutoRotator) -> None:
        seen.append(self)
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    monkeypatch.setattr(key_rotation.AutoRotator, "run", run)
    settings = settings_for(url, tmp_path, key_auto_rotate=auto)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0)
        assert started.is_set() == auto
        if auto:
            (rotator,) = seen
            assert rotator.store is app.state.auth.keys
            assert rotator.interval == INTERVAL and rotator.min_next_age == 360
            # The token lifetime, a margin for skew, and one reload interval.
            assert rotator.max_token_lifetime == TTL + PRUNE_MARGIN + 2
            assert rotator.period == 60
    assert stopped.is_set() == auto, "cancelled at shutdown"
