"""Async engine, the guarded unit of work, and the schema-at-head check.

SQLite (aiosqlite) and PostgreSQL (asyncpg) run the same code. On SQLite every transaction
starts with ``BEGIN IMMEDIATE``: writers queue on the database lock (``busy_timeout``) instead
of failing with "database is locked" when a read transaction tries to upgrade to a write; a
writer that waits longer than ``AUTH_SQLITE_BUSY_TIMEOUT`` gets a 503, never a 500.

Every request reaches the database through ``Database``: the circuit breaker (breaker.py)
admits it or fails it fast, a connection is taken with connect faults retried (tenacity,
exponential backoff with full jitter, bounded), and the outcome is reported to the breaker.
``Database.run`` also retries a whole unit of work that lost its connection *before* its
commit, when nothing can have been written; a fault during the commit itself is never
retried, because the commit may have landed (the client gets a 503 and may try again).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from .breaker import Breaker, DatabaseUnavailable
from .config import Settings
from .observability import log

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
T = TypeVar("T")


class SchemaNotAtHeadError(RuntimeError):
    """The database schema is missing or older (or newer) than this code expects."""


class InsecureDatabaseFileError(RuntimeError):
    """An existing SQLite file another user could write; the message says which and the fix."""


def create_private_sqlite_file(path: Path) -> None:
    """Create the SQLite database file 0600, and the directories it needs 0700, whatever the
    umask: it holds password hashes and sign-ins. SQLite then creates ``-wal`` and ``-shm``
    with the database file's mode (it ``fchmod``s them to it). A directory that already exists
    is the operator's and keeps its mode; an existing file, ``-wal`` or ``-shm`` is checked by
    ``_check_private_sqlite_file`` (refused if others can write it, made 0600 if they can read
    it)."""
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile: not ours to change
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    try:
        # 0600 from the first byte, as the signing keys (keys.py); an empty file is an
        # empty SQLite database.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        _check_private_sqlite_file(path.parent / name)


def _check_private_sqlite_file(path: Path) -> None:
    """Refuse an existing database file (or its ``-wal``/``-shm``) that another user could
    write, as ssh's StrictModes and keys.py do: they could add an admin client or change a
    password hash, and there is no telling whether they did. One merely readable by others is
    made 0600 with a warning instead of refused: reading cannot plant anything, such files are
    what an older version or the sqlite3 shell made under umask 022, and the fix is safe (only
    our user opens it; SQLite gives -wal/-shm the database's mode). The warning matters: the
    password hashes may already have been copied, so the operator should judge whether to
    force password resets."""
    path = path.absolute()  # the message names the file wherever the server was started
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    fix = f"`chown` it to the server's user and run `chmod 600 {path}`"
    if info.st_uid not in {os.geteuid(), 0}:
        raise InsecureDatabaseFileError(
            f"refusing to open the SQLite database: {path} (mode {mode:o}, owner uid "
            f"{info.st_uid}) is owned by another user than the server's (uid {os.geteuid()}) "
            f"or root, who could have changed it: check it, then {fix}"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InsecureDatabaseFileError(
            f"refusing to open the SQLite database: {path} (mode {mode:o}, owner uid "
            f"{info.st_uid}) is writable by others (group or world), who could have changed "
            f"it: check it, then {fix}"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        try:
            os.chmod(path, 0o600)
        except PermissionError:
            raise InsecureDatabaseFileError(
                f"refusing to open the SQLite database: {path} (mode {mode:o}, owner uid "
                f"{info.st_uid}) is readable by others and holds password hashes: {fix}"
            ) from None
        log.warning(
            "sqlite.permissions_tightened", path=str(path), mode_was=f"{mode:o}", mode="600"
        )


def create_engine(settings: Settings) -> AsyncEngine:
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        busy = settings.sqlite_busy_timeout
        pool: dict[str, Any] = {}
        if url.database and url.database != ":memory:":
            create_private_sqlite_file(Path(url.database))
            # One connection per process: transactions queue for it in the pool (an async
            # wait) instead of in SQLite's busy handler, which sleeps in growing steps (p99 in
            # seconds under load). SQLite has one writer at a time anyway.
            pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": busy}
        engine = create_async_engine(url, connect_args={"timeout": busy}, **pool)
        _configure_sqlite(engine, busy_timeout_ms=int(busy * 1000))
        return engine
    statement_ms = int(settings.db_statement_timeout * 1000)
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        # No pre-ping (a round trip per checkout): a dead connection fails its first statement,
        # SQLAlchemy then invalidates the whole pool, and Database retries the unit.
        pool_recycle=settings.db_pool_recycle,
        connect_args={
            "timeout": settings.db_connect_timeout,
            # Client side: a statement (commit and ping included) on a silent network ends.
            "command_timeout": settings.db_statement_timeout,
            # Server side: the database stops working on a statement nobody waits for.
            "server_settings": {"statement_timeout": str(statement_ms)},
        },
    )


def _configure_sqlite(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so "begin" below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work outside a request (CLI): commits on success, rolls back on error."""
    async with factory() as session, session.begin():
        yield session


def is_unavailable(exc: BaseException) -> bool:
    """The database is down, unreachable, too slow or locked: a 503, not a bug (500).

    Connect failures arrive as the driver's own ``OSError`` (asyncpg re-raises them unwrapped,
    ``TimeoutError`` included); a connection lost mid-statement as a ``DBAPIError`` with
    ``connection_invalidated``; SQLite's "database is locked" as an ``OperationalError``.
    """
    if isinstance(exc, DatabaseUnavailable | OSError):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return False


def is_retryable(exc: BaseException) -> bool:
    """A fault after which running the unit again is safe and may well succeed.

    A refused or reset connection, or one lost mid-statement: the transaction was rolled back
    by the database. Not a timeout (waiting again only doubles the wait), not SQLite's lock
    (``busy_timeout`` already waited), not an open breaker.
    """
    if isinstance(exc, ConnectionError | NotCommitted):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, InterfaceError)
    return False


class Database:
    """The engine behind the circuit breaker; every request's unit of work goes through here."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)
        self.retry_attempts = settings.db_retry_attempts
        self.breaker = Breaker(
            threshold=settings.db_breaker_threshold, cooldown=settings.db_breaker_cooldown
        )

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self.retry_attempts),
            # Full jitter (random in [0, min(0.5 s, 50 ms * 2^n)]): replicas that lost the
            # database together do not come back in lockstep.
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            before_sleep=_log_retry,
            reraise=True,
        )

    async def probe(self) -> None:
        """``SELECT 1`` on a connection from the pool (the breaker's half-open test)."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session with its connection already taken; the outcome feeds the breaker.

        Raises ``DatabaseUnavailable`` at once, without I/O, while the breaker is open.
        """
        await self.breaker.admit(self.probe)
        try:
            db = await self._connected_session()
            async with db:
                yield db
        except BaseException as exc:
            if is_unavailable(exc):
                self.breaker.failure(type(exc).__name__)
            raise
        self.breaker.success()

    async def _connected_session(self) -> AsyncSession:
        async for attempt in self._retrying():
            with attempt:
                db = self.sessions()
                try:
                    await db.connection()  # checkout + pre-ping: connect faults surface here
                except BaseException:
                    await db.close()
                    raise
                return db
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        settle: Callable[[AsyncSession, T], Awaitable[bool]] | None = None,
    ) -> T:
        """Run ``work`` and commit, retrying the whole unit on a fault before the commit.

        A connection lost *during* the commit leaves its fate unknown. With ``settle``, a fresh
        connection asks the database: ``settle(db, result)`` is True when the unit's writes are
        there (the result stands and is returned) and False when they are not (the unit runs
        again; units whose writes are idempotent may always answer False). Without ``settle``,
        or while the database cannot be asked, the answer is a 503.
        """
        async for attempt in self._retrying():
            with attempt:
                try:
                    async with self.session() as db:
                        result = await work(db)
                        await _commit(db)
                    return result
                except CommitUncertain:
                    if settle is None or not await self._settled(settle, result):
                        raise
                    return result
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _settled(
        self, settle: Callable[[AsyncSession, T], Awaitable[bool]], result: T
    ) -> bool:
        """True if the commit landed; raises ``NotCommitted`` if it did not (run again)."""
        try:
            async with self.session() as db:
                landed = await settle(db, result)
        except Exception as exc:
            if is_unavailable(exc):
                return False  # cannot tell: the caller answers 503
            raise
        if not landed:
            raise NotCommitted("the commit did not land; running the unit again")
        log.info("database.commit_confirmed")
        return True


class CommitUncertain(DatabaseUnavailable):
    """The connection was lost during COMMIT: the writes may or may not be in the database."""


class NotCommitted(DatabaseUnavailable):
    """Checked after an uncertain commit: nothing was written, so the unit may run again."""


async def _commit(db: AsyncSession) -> None:
    try:
        await db.commit()
    except Exception as exc:
        if is_unavailable(exc):
            raise CommitUncertain("connection lost during commit") from exc
        raise


def _log_retry(retry_state: RetryCallState) -> None:
    error = retry_state.outcome.exception() if retry_state.outcome else None
    log.warning(
        "database.retry",
        attempt=retry_state.attempt_number,
        error=type(error).__name__,
        wait_ms=round(retry_state.upcoming_sleep * 1000),
    )


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


async def assert_schema_at_head(engine: AsyncEngine) -> None:
    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        revision = await connection.run_sync(current)
    head = head_revision()
    if revision != head:
        raise SchemaNotAtHeadError(
            f"database schema is at {revision or 'nothing'}, this code needs {head}: "
            "run `python -m server migrate` (same AUTH_DATABASE_URL) and start again"
        )
