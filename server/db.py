"""Async engine, the guarded unit of work, and the schema check (at head, or newer and
compatible with it).

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

import asyncio
import os
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    String,
    Table,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from .breaker import Breaker, DatabaseUnavailable
from .config import Settings
from .observability import log

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
T = TypeVar("T")
#: Execution option of a SQLite connection whose statements only read (``Database.connection``
#: with ``autocommit``): no transaction is begun for it.
READS_ONLY = "auth_reads_only"
H = TypeVar("H", AsyncSession, AsyncConnection)


class SchemaNotAtHeadError(RuntimeError):
    """The database schema is missing, older than this code's head, or newer and not marked
    compatible with it (the message is one line: what is wrong and what to do)."""


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
        if connection.get_execution_options().get(READS_ONLY):
            # Each statement reads on its own, from the last commit (WAL): no lock taken.
            return
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
    ``TimeoutError`` included), or, reset during the handshake, as a ``DBAPIError`` caused by
    one; a connection lost mid-statement as a ``DBAPIError`` with ``connection_invalidated``;
    SQLite's "database is locked" as an ``OperationalError``.
    """
    if isinstance(exc, DatabaseUnavailable | OSError):
        return True
    if isinstance(exc, DBAPIError):
        return (
            exc.connection_invalidated
            or isinstance(exc, OperationalError | InterfaceError)
            or _lost_connection(exc)
        )
    return False


def _lost_connection(exc: BaseException) -> bool:
    """Whether a driver error was caused by a reset or refused connection: asyncpg's adapter
    wraps a reset during the connect handshake in a plain ``DBAPIError``, not an
    ``InterfaceError``, and keeps the ``ConnectionError`` as the cause."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, ConnectionError):
            return True
        cause = cause.__cause__
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
        return (
            exc.connection_invalidated or isinstance(exc, InterfaceError) or _lost_connection(exc)
        )
    return False


class Database:
    """The engine behind the circuit breaker; every request's unit of work goes through here."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.engine = engine
        #: The same pool, for units whose statements each stand alone (``autocommit``): on
        #: PostgreSQL no BEGIN and COMMIT round trips; on SQLite, where only reads are sent
        #: this way, no BEGIN IMMEDIATE, the write lock (``_configure_sqlite``). Not
        #: SQLAlchemy's AUTOCOMMIT level there: resetting it when a connection returns to the
        #: pool would undo the driver setting ``_configure_sqlite`` makes. Set once here, not
        #: per connection (each ``execution_options`` call is a trip through the greenlet).
        self.standalone = engine.execution_options(
            **(
                {"isolation_level": "AUTOCOMMIT"}
                if engine.dialect.name == "postgresql"
                else {READS_ONLY: True}
            )
        )
        self.sessions = session_factory(engine)
        self.retry_attempts = settings.db_retry_attempts
        self.breaker = Breaker(
            threshold=settings.db_breaker_threshold, cooldown=settings.db_breaker_cooldown
        )

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, and after a retryable fault again, up to ``retry_attempts`` in all, with
        exponential backoff and full jitter (random in [0, min(0.5 s, 50 ms * 2^n)]): replicas
        that lost the database together do not come back in lockstep.

        The first attempt runs bare and tenacity takes over only after a fault: building its
        retry objects cost about 30 µs a unit of work (two per unit), a fifth of a cached
        introspection's round trip (bench/notes.md).
        """
        try:
            return await call()
        except BaseException as exc:
            if self.retry_attempts <= 1 or not is_retryable(exc):
                raise
            wait = random.uniform(0, FIRST_WAIT)  # noqa: S311 (jitter, not a secret)
            _log_retry_after(1, exc, wait)
        await asyncio.sleep(wait)
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=stop_after_attempt(self.retry_attempts - 1),
            wait=wait_random_exponential(multiplier=FIRST_WAIT * 2, max=0.5),
            before_sleep=lambda state: _log_retry_after(
                state.attempt_number + 1,
                state.outcome.exception() if state.outcome else None,
                state.upcoming_sleep,
            ),
            reraise=True,
        )

        async def attempt() -> T:  # a coroutine function: tenacity awaits only those
            return await call()

        result: T = await retrying(attempt)
        return result

    async def probe(self) -> None:
        """``SELECT 1`` on a connection from the pool (the breaker's half-open test)."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    @asynccontextmanager
    async def _guarded(self, opened: Callable[[], Awaitable[H]]) -> AsyncIterator[H]:
        """``opened()`` behind the breaker, connect faults retried; the outcome feeds the
        breaker. Raises ``DatabaseUnavailable`` at once, without I/O, while it is open."""
        await self.breaker.admit(self.probe)
        try:
            handle = await self._retry(opened)
            try:
                yield handle
            finally:
                await handle.close()
        except BaseException as exc:
            if is_unavailable(exc):
                self.breaker.failure(type(exc).__name__)
            raise
        self.breaker.success()

    async def _session(self) -> AsyncSession:
        db = self.sessions()
        try:
            await db.connection()  # checkout: connect faults surface here
        except BaseException:
            await db.close()
            raise
        return db

    async def _connection(self, autocommit: bool) -> AsyncConnection:
        return await (self.standalone if autocommit else self.engine).connect()

    def session(self) -> AbstractAsyncContextManager[AsyncSession]:
        """An ORM session with its connection already taken (the pages, the JSON APIs)."""
        return self._guarded(self._session)

    def connection(
        self, *, autocommit: bool = False
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        """A Core connection (the token path: no ORM session, see ``server/oauth/store.py``).
        Its first statement begins a transaction, except with ``autocommit``, where each
        statement stands alone: for units that only read, and on PostgreSQL for a unit whose
        one write is a single atomic statement (the refresh grant's)."""
        return self._guarded(lambda: self._connection(autocommit))

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        settle: Callable[[AsyncSession, T], Awaitable[bool]] | None = None,
    ) -> T:
        """Run ``work`` on a session and commit, retrying the whole unit on a fault before the
        commit; see ``_run``."""
        return await self._run(self.session, work, settle)

    async def run_core(
        self,
        work: Callable[[AsyncConnection], Awaitable[T]],
        settle: Callable[[AsyncConnection, T], Awaitable[bool]] | None = None,
        *,
        autocommit: bool = False,
    ) -> T:
        """``run`` on a Core connection (``connection``). With ``autocommit`` nothing is
        committed: each statement stood alone. A unit whose one write is sent that way raises
        ``CommitUncertain`` itself, with its result, when the answer to it is lost
        (``store.rotate``), and ``settle`` decides as after a commit."""
        return await self._run(
            lambda: self.connection(autocommit=autocommit), work, settle, commit=not autocommit
        )

    async def _run(
        self,
        unit: Callable[[], AbstractAsyncContextManager[H]],
        work: Callable[[H], Awaitable[T]],
        settle: Callable[[H, T], Awaitable[bool]] | None,
        *,
        commit: bool = True,
    ) -> T:
        """Run ``work`` and commit, retrying the whole unit on a fault before the commit.

        A connection lost *during* the commit leaves its fate unknown. With ``settle``, a fresh
        connection asks the database: ``settle(db, result)`` is True when the unit's writes are
        there (the result stands and is returned) and False when they are not (the unit runs
        again; units whose writes are idempotent may always answer False). Without ``settle``,
        or while the database cannot be asked, the answer is a 503.
        """

        async def once() -> T:
            try:
                async with unit() as db:
                    result = await work(db)
                    if commit:
                        await _commit(db)
                return result
            except CommitUncertain as uncertain:
                # A commit, or a unit's one atomic write sent without a transaction, whose
                # answer was lost: the unit's result travels on the exception in the latter.
                if uncertain.has_result:
                    result = uncertain.result
                if settle is None or not await self._settled(unit, settle, result):
                    raise
                return result

        return await self._retry(once)

    async def _settled(
        self,
        unit: Callable[[], AbstractAsyncContextManager[H]],
        settle: Callable[[H, T], Awaitable[bool]],
        result: T,
    ) -> bool:
        """True if the commit landed; raises ``NotCommitted`` if it did not (run again)."""
        try:
            async with unit() as db:
                landed = await settle(db, result)
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("database.commit_unknown", error=type(exc).__name__)
                return False  # cannot tell: the caller answers 503
            raise
        if not landed:
            raise NotCommitted("the commit did not land; running the unit again")
        log.info("database.commit_confirmed")
        return True


class CommitUncertain(DatabaseUnavailable):
    """The connection was lost during COMMIT, or during a unit's one atomic write sent without
    a transaction: the writes may or may not be in the database. ``result``: what the unit
    answers if they are, when it is raised from inside the unit (``with_result``)."""

    has_result = False
    result: Any = None

    def with_result(self, result: Any) -> CommitUncertain:
        self.has_result, self.result = True, result
        return self


class NotCommitted(DatabaseUnavailable):
    """Checked after an uncertain commit: nothing was written, so the unit may run again."""


async def _commit(db: AsyncSession | AsyncConnection) -> None:
    try:
        await db.commit()
    except Exception as exc:
        if is_unavailable(exc):
            raise CommitUncertain("connection lost during commit") from exc
        raise


#: Seconds: the most the first retry waits (tenacity's ``wait_random_exponential`` doubles it
#: for each further attempt, up to 0.5 s).
FIRST_WAIT = 0.05


def _log_retry_after(attempt: int, error: BaseException | None, wait: float) -> None:
    log.warning(
        "database.retry",
        attempt=attempt,
        error=type(error).__name__,
        wait_ms=round(wait * 1000),
    )


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def _migrations() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str | None:
    return _migrations().get_current_head()


# -- which schemas this code runs on ------------------------------------------------------
#
# Migrations are expand-only wherever possible, so that during a rollout (and a rollback) the
# previous release keeps running on the schema the next one migrated to. That release does not
# have the newer migration files, so the database tells it: every migration module declares
# ``compatible_with``, the oldest code revision that runs correctly on the schema it produces
# (an expand-only migration names the revision before it, a contract migration itself), and
# migrations/env.py copies those declarations into ``schema_compatibility`` after every step.

#: One row per migration applied: (revision, compatible_with). Created by migration
#: ``COMPATIBILITY_SINCE``; every later release reads it, so its shape must never change. Not
#: one of the models: it is bookkeeping, like ``alembic_version`` (copy-from leaves it alone).
COMPATIBILITY_TABLE = Table(
    "schema_compatibility",
    MetaData(),
    Column("revision", String(32), primary_key=True),
    Column("compatible_with", String(32), nullable=False),
)
#: The migration that creates ``schema_compatibility``: schemas before it have no markers.
COMPATIBILITY_SINCE = "0005"


class MigrationDeclarationError(RuntimeError):
    """A migration module whose ``compatible_with`` is missing or impossible."""


def _lineage(script: ScriptDirectory, revision: str) -> set[str]:
    """``revision`` and all its ancestors."""
    return {migration.revision for migration in script.iterate_revisions(revision, "base")}


def _declared(script: ScriptDirectory, migration: Script) -> str:
    where = f"migration {migration.revision} ({Path(migration.path).name})"
    value = getattr(migration.module, "compatible_with", None)
    if not isinstance(value, str):
        raise MigrationDeclarationError(
            f"{where} does not declare `compatible_with: str`: the oldest code revision that "
            "runs correctly on the schema it produces (the revision before it for an "
            "expand-only migration, itself for a contract one)"
        )
    if value not in _lineage(script, migration.revision):
        raise MigrationDeclarationError(
            f"{where}: compatible_with = {value!r} is neither this revision nor an ancestor"
        )
    parents = migration.down_revision
    for parent in (parents,) if isinstance(parents, str) else parents or ():
        before = getattr(script.get_revision(parent).module, "compatible_with", None)
        if isinstance(before, str) and before not in _lineage(script, value):
            raise MigrationDeclarationError(
                f"{where}: compatible_with = {value!r} is older than {parent}'s ({before!r}): "
                f"code that cannot run on {parent}'s schema cannot run on this one either"
            )
    return value


def declared_compatibility(script: ScriptDirectory, heads: Iterable[str]) -> dict[str, str]:
    """``compatible_with`` of every migration from ``heads`` down to the base, checked."""
    return {
        migration.revision: _declared(script, migration)
        for migration in script.iterate_revisions(tuple(heads), "base")
    }


def record_compatibility(
    context: MigrationContext, script: ScriptDirectory, heads: Iterable[str]
) -> None:
    """Make ``schema_compatibility`` hold the markers of the migrations up to ``heads`` (what
    the database is at after a step), if it exists by then. Runs in the step's transaction
    (migrations/env.py, ``on_version_apply``), online or offline (``--sql``)."""
    markers = declared_compatibility(script, heads)
    if COMPATIBILITY_SINCE not in markers:
        return  # not created yet (or dropped by this downgrade)
    context.execute(COMPATIBILITY_TABLE.delete())
    rows = [{"revision": rev, "compatible_with": oldest} for rev, oldest in markers.items()]
    context.execute(COMPATIBILITY_TABLE.insert().values(rows))


def is_model_table(name: str | None, type_: str, _parents: Mapping[str, str | None]) -> bool:
    """Autogenerate's ``include_name``: leave the bookkeeping table alone (no drop_table)."""
    return not (type_ == "table" and name == COMPATIBILITY_TABLE.name)


@dataclass(frozen=True)
class SchemaState:
    """The database's schema revision against this code's migrations."""

    revision: str | None  # None: no schema at all
    head: str  # this code's
    known: bool  # the revision is one of this code's migrations
    #: For a revision this code does not know: its recorded ``compatible_with``, if any.
    compatible_with: str | None
    #: This code runs correctly on it: at head, or newer and marked compatible with head.
    runs: bool

    @property
    def at_head(self) -> bool:
        return self.revision == self.head

    @property
    def ahead(self) -> bool:
        return self.revision is not None and not self.known

    def problem(self) -> str:
        """One line: why this code does not run on the schema, and what to do."""
        if not self.ahead:
            return (
                f"database schema is at {self.revision or 'nothing'}, this code needs "
                f"{self.head}: run `python -m server migrate` (same AUTH_DATABASE_URL) and "
                "start again"
            )
        if self.compatible_with is None:
            return (
                f"database schema is at {self.revision}, a revision this code ({self.head}) "
                "does not know and with no record of which code runs on it: deploy the "
                "release that migrated it, or restore a backup taken before that migration"
            )
        return (
            f"database schema is at {self.revision}, newer than this code ({self.head}) and "
            f"not compatible with it (it needs code at {self.compatible_with} or later): "
            "deploy that release, or restore a backup taken before the migration"
        )


async def schema_state(engine: AsyncEngine) -> SchemaState:
    script = _migrations()
    head = script.get_current_head()
    assert head is not None
    known = _lineage(script, head)

    def read(connection: Connection) -> tuple[tuple[str, ...], str | None]:
        heads = MigrationContext.configure(connection).get_current_heads()
        if len(heads) != 1 or heads[0] in known:
            return heads, None
        if not inspect(connection).has_table(COMPATIBILITY_TABLE.name):
            return heads, None
        marker = connection.scalar(
            select(COMPATIBILITY_TABLE.c.compatible_with).where(
                COMPATIBILITY_TABLE.c.revision == heads[0]
            )
        )
        return heads, marker

    async with engine.connect() as connection:
        heads, marker = await connection.run_sync(read)
    if len(heads) > 1:
        raise SchemaNotAtHeadError(
            f"database schema has several heads ({', '.join(sorted(heads))}), this code "
            f"({head}) has one: restore a backup taken before the branched migrations"
        )
    revision = heads[0] if heads else None
    if revision is None or revision in known:
        return SchemaState(revision, head, True, None, runs=revision == head)
    return SchemaState(revision, head, False, marker, runs=marker is not None and marker in known)


async def assert_schema_compatible(engine: AsyncEngine) -> SchemaState:
    """Refuse a schema this code does not run on: none, older than head, or newer and not
    marked compatible with head (``SchemaNotAtHeadError``, one line). A newer, compatible one
    (the previous release during a rollout or a rollback) is accepted with a warning."""
    state = await schema_state(engine)
    if not state.runs:
        raise SchemaNotAtHeadError(state.problem())
    if state.ahead:
        log.warning(
            "database.schema_ahead",
            revision=state.revision,
            code_revision=state.head,
            compatible_with=state.compatible_with,
        )
    return state


async def assert_schema_at_head(engine: AsyncEngine) -> None:
    """Exactly this code's head: for copy-from, which copies only the tables and columns this
    code knows (a newer schema may hold more)."""
    state = await schema_state(engine)
    if state.at_head:
        return
    if state.runs:
        raise SchemaNotAtHeadError(
            f"database schema is at {state.revision}, newer than this code ({state.head}), "
            "which would copy only the columns it knows: use the release that migrated it"
        )
    raise SchemaNotAtHeadError(state.problem())
