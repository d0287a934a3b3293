"""Graceful shutdown of a real server process: SIGTERM lets requests in flight finish."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.config import Settings

from .conftest import create_client, create_user, start_server

pytestmark = pytest.mark.feature("graceful-shutdown")
PASSWORD = "a long enough passphrase"


def test_sigterm_finishes_requests_in_flight_then_exits(clean_db: Settings, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    # Slow argon2 (about a quarter of a second per check) keeps requests in flight long enough
    # to send SIGTERM while they run.
    # (The user's hash carries them: checking a password uses the hash's own parameters.)
    slow = {"argon2_memory_cost": 65536, "argon2_time_cost": 6}
    secret = create_client(clean_db.database_url, "web").secret
    create_user(clean_db.database_url, "u", PASSWORD, argon2=slow)
    slow_env = {f"AUTH_{name.upper()}": str(value) for name, value in slow.items()}
    server = start_server(clean_db.database_url, keys, tmp_path / "server.log", **slow_env)
    try:
        results: list[int | str] = []
        connected = threading.Barrier(5)

        def grant() -> None:
            # Open the connection first, so the request below is in flight, not still connecting,
            # when SIGTERM arrives.
            with httpx.Client(base_url=server.url, timeout=30) as http:
                http.get("/healthz")
                connected.wait(timeout=30)
                try:
                    response = http.post(
                        "/oauth2/token",
                        data={"grant_type": "password", "username": "u", "password": PASSWORD},
                        auth=("web", secret),
                    )
                    results.append(response.status_code)
                except httpx.HTTPError as exc:
                    results.append(type(exc).__name__)

        workers = [threading.Thread(target=grant) for _ in range(4)]
        for worker in workers:
            worker.start()
        busy = psutil.Process(server.process.pid)
        before = sum(busy.cpu_times()[:2])
        connected.wait(timeout=30)
        # The four requests are being served once argon2 runs: the server has spent a
        # check's worth of CPU (about 0.25 s) since they were sent. Polled, not slept for a
        # fixed time: on a loaded machine a request may still sit unread in its socket,
        # and SIGTERM would then close that connection as idle.
        deadline = time.monotonic() + 30
        while sum(busy.cpu_times()[:2]) - before < 0.2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.join(timeout=60)
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM (exit by signal).
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        # Every request that was in flight got its answer; none was cut off.
        assert results == [200, 200, 200, 200], results
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/healthz", timeout=2)
        log = server.log()
        assert "Waiting for application shutdown" in log or "Shutting down" in log
    finally:
        server.stop()
