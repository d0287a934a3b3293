"""Real server processes (``python -m server serve``) for the acceptance tests.

``start_server`` runs one process against a given database and keys directory; the
``server`` fixture is one such process on a clean database. Several processes may share
one database and one keys directory, as replicas do.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


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


@dataclass
class RunningServer:
    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


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
    port = free_port()
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
    running = RunningServer(url, env, process, log_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            running.stop()
            pytest.fail("server did not start: " + running.log())
        time.sleep(0.1)


@pytest.fixture
def server(clean_db: Settings, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """One real server on a clean database; yields (issuer URL, its environment for the CLI)."""
    keys = tmp_path / "keys"
    env = server_env(clean_db.database_url, keys, "http://unused")
    assert cli(env, "migrate").returncode == 0
    running = start_server(clean_db.database_url, keys, tmp_path / "server.log")
    try:
        yield running.url, running.env
    finally:
        running.stop()
