"""The circuit breaker's states, and which database errors are retried or answered 503.

The breaker and ``Database.run`` are tested here with a controlled clock and controlled
faults; tests/test_db_faults.py and tests/acceptance/test_database_outage.py cut a real
network between the app and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from server import metrics
from server.breaker import Breaker, DatabaseUnavailable
from server.config import Settings
from server.db import Database, create_engine, is_retryable, is_unavailable

pytestmark = pytest.mark.feature("db-retry-breaker")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge() -> float:
    value = metrics.REGISTRY.get_sample_value("database_breaker_state")
    assert value is not None
    return value


class Probe:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    async def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionRefusedError("still down")


async def test_breaker_opens_after_threshold_consecutive_failures_and_fails_fast() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=5, clock=clock)
    probe = Probe()
    for _ in range(2):
        breaker.failure("ConnectionRefusedError")
    assert breaker.state == "closed"
    await breaker.admit(probe)  # still closed: admitted
    breaker.failure("ConnectionRefusedError")
    assert breaker.state == "open"
    assert gauge() == 2

    clock.now += 1.2
    with pytest.raises(DatabaseUnavailable) as raised:
        await breaker.admit(probe)
    assert raised.value.retry_after == 4  # ceil(5 - 1.2)
    assert probe.calls == 0  # no I/O while open


async def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = Breaker(threshold=3, cooldown=5, clock=Clock())
    breaker.failure("x")
    breaker.failure("x")
    breaker.success()
    breaker.failure("x")
    breaker.failure("x")
    assert breaker.state == "closed"


async def test_after_the_cooldown_one_probe_runs_and_its_success_closes_the_breaker() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=5, clock=clock)
    breaker.failure("x")
    clock.now += 5
    probe = Probe()
    await breaker.admit(probe)
    assert probe.calls == 1
    assert breaker.state == "closed"
    assert gauge() == 0
    await breaker.admit(probe)  # closed: no more probes
    assert probe.calls == 1


async def test_a_failed_probe_opens_the_breaker_for_another_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=5, clock=clock)
    breaker.failure("x")
    clock.now += 6
    with pytest.raises(DatabaseUnavailable) as raised:
        await breaker.admit(Probe(fail=True))
    assert raised.value.reason == "database probe failed"
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    assert breaker.state == "open"
    assert raised.value.retry_after == 5
    clock.now += 4.9
    with pytest.raises(DatabaseUnavailable):
        await breaker.admit(Probe())


async def test_while_one_request_probes_the_others_fail_fast() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=1, clock=clock)
    breaker.failure("x")
    clock.now += 2
    release = asyncio.Event()
    probes = 0

    async def slow_probe() -> None:
        nonlocal probes
        probes += 1
        await release.wait()

    prober = asyncio.create_task(breaker.admit(slow_probe))
    await asyncio.sleep(0)
    assert breaker.state == "half-open"
    assert gauge() == 1
    others = await asyncio.gather(
        *(breaker.admit(slow_probe) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(error, DatabaseUnavailable) for error in others)
    release.set()
    await prober
    assert probes == 1
    assert breaker.state == "closed"


def test_database_unavailable_never_asks_for_less_than_a_second() -> None:
    assert DatabaseUnavailable("x", 0).retry_after == 1


def invalidated() -> DBAPIError:
    return DBAPIError("SELECT 1", None, Exception("connection lost"), connection_invalidated=True)


def reset_while_connecting() -> DBAPIError:
    """What SQLAlchemy's asyncpg adapter raised when PostgreSQL's connection was reset during
    the connect handshake (seen in the outage test): a plain ``DBAPIError`` ("connection was
    closed in the middle of operation") whose cause is the ``ConnectionResetError``."""
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as reset:
            raise Exception("connection was closed in the middle of operation") from reset
    except Exception as adapted:
        error = DBAPIError(None, None, adapted)
        error.__cause__ = adapted
        return error


@pytest.mark.parametrize(
    ("error", "unavailable", "retryable"),
    [
        (ConnectionRefusedError(), True, True),
        (ConnectionResetError(), True, True),
        (TimeoutError(), True, False),  # waiting again only doubles the wait
        (OSError("no route"), True, False),
        (invalidated(), True, True),
        (reset_while_connecting(), True, True),
        (InterfaceError("x", None, Exception("closed")), True, True),
        (OperationalError("x", None, sqlite3.OperationalError("database is locked")), True, False),
        (DatabaseUnavailable("circuit breaker open"), True, False),
        (IntegrityError("x", None, Exception("duplicate")), False, False),
        (DBAPIError("x", None, Exception("syntax")), False, False),
        (ValueError("a bug"), False, False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_which_errors_are_a_503_and_which_are_retried(
    error: BaseException, unavailable: bool, retryable: bool
) -> None:
    assert is_unavailable(error) is unavailable
    assert is_retryable(error) is retryable


# -- Database.run: retries before the commit, never after ---------------------------------------


@pytest.fixture
async def database(settings: Settings) -> Database:
    return Database(settings.model_copy(update={"db_retry_attempts": 3}), create_engine(settings))


async def test_run_retries_a_unit_that_lost_its_connection_before_the_commit(
    database: Database,
) -> None:
    attempts = 0

    async def work(db: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise invalidated()
        return attempts

    try:
        assert await database.run(work) == 3
    finally:
        await database.engine.dispose()
    assert database.breaker.failures == 0  # the unit succeeded in the end


@pytest.mark.parametrize("unit", ["session", "core"])
async def test_a_refused_connection_is_retried_until_it_connects(
    database: Database, monkeypatch: pytest.MonkeyPatch, unit: str
) -> None:
    """The first attempt runs without tenacity, the retries with it (server/db.py: _retry):
    both must end with the unit run, on an ORM session and on a Core connection alike."""
    refused = 0
    name = "_session" if unit == "session" else "_connection"
    real = getattr(database, name)

    async def connect(*args: Any) -> Any:
        nonlocal refused
        if refused < 2:
            refused += 1
            raise ConnectionRefusedError("not yet")
        return await real(*args)

    monkeypatch.setattr(database, name, connect)

    async def work(db: Any) -> int:
        return (await db.execute(text("SELECT 7"))).scalar_one()

    try:
        run = database.run if unit == "session" else database.run_core
        assert await run(work) == 7
    finally:
        await database.engine.dispose()
    assert refused == 2
    assert database.breaker.failures == 0


async def test_run_gives_up_after_the_configured_attempts(database: Database) -> None:
    attempts = 0

    async def work(db: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionResetError("gone")

    try:
        with pytest.raises(ConnectionResetError):
            await database.run(work)
    finally:
        await database.engine.dispose()
    assert attempts == 3
    assert database.breaker.failures == 3


async def test_run_does_not_retry_a_timeout_or_a_bug(database: Database) -> None:
    for error in (TimeoutError(), ValueError("bug")):
        attempts = 0

        async def work(db: AsyncSession, error: BaseException = error) -> None:
            nonlocal attempts
            attempts += 1
            raise error

        with pytest.raises(type(error)):
            await database.run(work)
        assert attempts == 1
    await database.engine.dispose()


async def test_a_fault_during_the_commit_is_never_retried(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0

    async def failing_commit(self: AsyncSession) -> None:
        raise invalidated()

    monkeypatch.setattr(AsyncSession, "commit", failing_commit)

    async def work(db: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1

    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            await database.run(work)
    finally:
        await database.engine.dispose()
    assert attempts == 1  # the commit may have landed: running the unit again could not undo it
    assert raised.value.reason == "connection lost during commit"


async def test_an_error_that_is_not_a_fault_is_not_counted_against_the_database(
    database: Database,
) -> None:
    async def work(db: AsyncSession) -> None:
        raise IntegrityError("x", None, Exception("duplicate"))

    database.breaker.failure("earlier")
    try:
        with pytest.raises(IntegrityError):
            await database.run(work)
    finally:
        await database.engine.dispose()
    assert database.breaker.failures == 1
