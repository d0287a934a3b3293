"""Real server processes (``python -m server serve``) for the acceptance tests.

``start_server`` runs one process against a given database and keys directory. Several
processes may share one database and one keys directory, as replicas do.

The ``server`` fixture is one process per backend shared by every test of the session (of one
pytest-xdist worker) that needs no server of its own. It runs on databases of its own (never
the unit tests' ones, which their fixtures truncate), with cheap argon2 and its request limits
out of the way (every test's requests come from 127.0.0.1); each test makes its own clients
and users on it, in-process (``RunningServer.new_client``, ``.new_user``), under unique names,
so that no test sees another's. Tests that need other settings, several replicas, a signal or
an empty database start their own processes with ``start_server`` (``start_replicas`` for
several at once), on ``fresh_database``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from server import manage
from server.config import Settings
from server.db import create_engine, session_factory
from server.passwords import Passwords
from tests.conftest import BACKENDS, FAST_ARGON2, _drop_pg_database, _new_pg_database, migrate

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

#: tests/conftest.py's FAST_ARGON2, for a server process (and its CLI) in its environment.
FAST_ARGON2_ENV = {f"AUTH_{name.upper()}": str(value) for name, value in FAST_ARGON2.items()}
#: Request limits a shared server never reaches: it sees every test's requests from 127.0.0.1.
#: (The throttling of failed passwords stays as configured: it counts per username.)
UNLIMITED_ENV = {
    f"AUTH_RATE_LIMIT_{name}": "100000/minute"
    for name in (
        "TOKEN_IP",
        "TOKEN_CLIENT",
        "TOKEN_ACCOUNT",
        "LOGIN_IP",
        "LOGIN_ACCOUNT",
        "AUTHORIZE",
    )
}


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def unique(prefix: str) -> str:
    """A client id or username no other test uses: ``prefix`` and 8 random hex digits."""
    return f"{prefix}-{secrets.token_hex(4)}"


def in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on an event loop of its own, in another thread: works
    also while Playwright's sync API keeps an event loop running in this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    """Rows of ``sql``, read straight from the database (not through a server)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [tuple(row) for row in await connection.execute(text(sql))]
    finally:
        await engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The real command line, ``python -m server ARGS``, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def server_env(database_url: str, keys_dir: Path, issuer: str, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTH_")},
        "AUTH_ENV": "development",
        "AUTH_DATABASE_URL": database_url,
        "AUTH_KEYS_DIR": str(keys_dir),
        "AUTH_ISSUER": issuer,
        **extra,
    }


@contextmanager
def fresh_database(backend: str, directory: Path) -> Iterator[str]:
    """A new database of ``backend`` ("sqlite": a file in ``directory``), migrated to head
    in-process; a PostgreSQL one is dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{directory / 'auth.db'}"
    else:
        url = _new_pg_database()
    try:
        migrate(url)
        yield url
    finally:
        if backend != "sqlite":
            _drop_pg_database(url)


def local_settings(database_url: str, **argon2: int) -> Settings:
    """Settings for working on ``database_url`` in this process: FAST_ARGON2 unless ``argon2``
    says otherwise (``argon2_memory_cost``, ``argon2_time_cost``)."""
    values: dict[str, Any] = {"env": "testing", "database_url": database_url}
    return Settings(_env_file=None, **values, **{**FAST_ARGON2, **argon2})  # type: ignore[call-arg]


@dataclass(frozen=True)
class NewClient:
    client_id: str
    secret: str | None


@dataclass(frozen=True)
class NewUser:
    id: str
    username: str
    password: str


def create_client(database_url: str, client_id: str, **kwargs: Any) -> NewClient:
    """``manage.create_client`` in-process on ``database_url`` (what ``clients create`` does)."""

    async def run() -> NewClient:
        engine = create_engine(local_settings(database_url))
        try:
            async with session_factory(engine)() as db:
                created = await manage.create_client(db, client_id=client_id, **kwargs)
                await db.commit()
        finally:
            await engine.dispose()
        return NewClient(created.client.client_id, created.secret)

    return in_thread(run())


def create_user(
    database_url: str, username: str, password: str, *, argon2: dict[str, int] | None = None,
    **kwargs: Any,
) -> NewUser:  # fmt: skip
    """``manage.create_user`` in-process on ``database_url`` (what ``users create`` does),
    hashed with tests/conftest.py's FAST_ARGON2 but for the parameters in ``argon2``
    (``argon2_memory_cost``, ``argon2_time_cost``)."""

    async def run() -> NewUser:
        settings = local_settings(database_url, **(argon2 or {}))
        engine = create_engine(settings)
        passwords = Passwords(settings)
        try:
            async with session_factory(engine)() as db:
                user = await manage.create_user(
                    db, passwords, username=username, password=password, **kwargs
                )
                await db.commit()
        finally:
            passwords.close()
            await engine.dispose()
        return NewUser(user.id, username, password)

    return in_thread(run())


@dataclass
class RunningServer:
    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def database_url(self) -> str:
        return self.env["AUTH_DATABASE_URL"]

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def new_client(self, prefix: str = "app", **kwargs: Any) -> NewClient:
        """A client of this test's own, ``PREFIX-<random>``; ``kwargs`` as for
        ``manage.create_client`` (``scope``, ``public``, ``grants``, ``redirect_uris``, …)."""
        return create_client(self.database_url, unique(prefix), **kwargs)

    def new_user(
        self, prefix: str = "user", password: str = "correct horse battery staple", **kwargs: Any
    ) -> NewUser:
        """A user of this test's own, ``PREFIX-<random>``, hashed with the argon2 parameters
        of this server's environment (FAST_ARGON2 for those it does not set)."""
        argon2 = {
            name: int(self.env[variable])
            for name in FAST_ARGON2
            if (variable := f"AUTH_{name.upper()}") in self.env
        }
        return create_user(self.database_url, unique(prefix), password, argon2=argon2, **kwargs)


def launch_server(
    database_url: str,
    keys_dir: Path,
    log_path: Path,
    *,
    issuer: str | None = None,
    port: int | None = None,
    **extra_env: str,
) -> RunningServer:
    """Start ``python -m server serve`` on ``port`` (a free one by default); not waiting."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = server_env(database_url, keys_dir, issuer or url, **extra_env)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return RunningServer(url, env, process, log_path)


def wait_until_up(running: RunningServer) -> None:
    """Poll /healthz every 0.1 s until it answers; fail (and stop it) if the process exits or
    30 s pass."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(running.url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if running.process.poll() is not None or time.monotonic() > deadline:
            running.stop()
            pytest.fail("server did not start: " + running.log())
        time.sleep(0.1)


def start_server(
    database_url: str,
    keys_dir: Path,
    log_path: Path,
    *,
    issuer: str | None = None,
    **extra_env: str,
) -> RunningServer:
    """Start ``python -m server serve`` on a free port and wait until /healthz answers.

    ``issuer`` defaults to the process's own URL; replicas behind one name share it.
    """
    running = launch_server(database_url, keys_dir, log_path, issuer=issuer, **extra_env)
    wait_until_up(running)
    return running


def start_replicas(
    database_url: str,
    keys_dir: Path,
    log_paths: list[Path],
    *,
    issuer: str,
    **extra_env: str,
) -> list[RunningServer]:
    """One process per log path on one database and one keys directory, behind ``issuer``:
    all started at once (as a deployment starts its replicas), then each waited for."""
    ports: set[int] = set()
    while len(ports) < len(log_paths):
        ports.add(free_port())
    replicas = [
        launch_server(database_url, keys_dir, log, issuer=issuer, port=port, **extra_env)
        for log, port in zip(log_paths, sorted(ports), strict=True)
    ]
    try:
        for running in replicas:
            wait_until_up(running)
    except BaseException:
        for running in replicas:
            running.stop()
        raise
    return replicas


class SharedServers:
    """One server per backend, started when a test first asks for it, stopped (and its
    database dropped) at the end of the session."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        self.directory = directory
        self.stack = stack
        self.running: dict[str, RunningServer] = {}

    def get(self, backend: str) -> RunningServer:
        if backend not in self.running:
            directory = self.directory / backend
            directory.mkdir()
            url = self.stack.enter_context(fresh_database(backend, directory))
            running = start_server(
                url,
                directory / "keys",
                directory / "server.log",
                **FAST_ARGON2_ENV,
                **UNLIMITED_ENV,
            )
            self.stack.callback(running.stop)
            self.running[backend] = running
        return self.running[backend]


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    with ExitStack() as stack:
        yield SharedServers(tmp_path_factory.mktemp("shared-server"), stack)


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, shared_servers: SharedServers) -> RunningServer:
    """The shared server of this backend (see the module's docstring): make clients and users
    of the test's own on it with ``new_client`` and ``new_user``."""
    return shared_servers.get(request.param)
