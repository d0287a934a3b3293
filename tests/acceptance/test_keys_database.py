"""Signing keys in PostgreSQL (AUTH_KEY_STORE=database): three real server processes, each with
an AUTH_KEYS_DIR of its own, one database and one AUTH_KEY_ENCRYPTION_KEY.

They agree on the JWKS without sharing a directory; a CLI `keys rotate` reaches all three
through PostgreSQL NOTIFY long before their reload interval (30 s here); tokens signed before
still verify; no key is ever written to disk. A replica given the new encryption key (and the
old one as AUTH_KEY_ENCRYPTION_KEY_PREVIOUS) starts before `keys rewrap`; the rewrap takes no
replica out of service; once a key sealed under the new one signs, the replicas holding only
the old one keep signing but fail /readyz, naming the fix.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from server.keycrypt import parse_encryption_key

from .conftest import (
    FAST_ARGON2_ENV,
    RunningServer,
    cli,
    create_client,
    fetch,
    free_port,
    fresh_database,
    in_thread,
    launch_server,
    server_env,
    wait_until_up,
)

pytestmark = pytest.mark.feature("key-store-database", "key-hot-reload", "postgres-backend")
ISSUER = "http://keys-db.test"
RELOAD_INTERVAL = 30  # AUTH_KEY_RELOAD_INTERVAL: the polling backstop, never reached here
PICKUP_LIMIT = 5.0  # seconds: NOTIFY brings a rotation well within this


def keys_env(key: str) -> dict[str, str]:
    return {
        "AUTH_KEY_STORE": "database",
        "AUTH_KEY_ENCRYPTION_KEY": key,
        "AUTH_KEY_RELOAD_INTERVAL": str(RELOAD_INTERVAL),
        **FAST_ARGON2_ENV,
    }


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    with fresh_database("postgresql", tmp_path) as url:
        yield url


@pytest.fixture
def key() -> str:
    return secrets.token_urlsafe(32)


def launch(
    url: str, key: str, directory: Path, name: str, previous: str | None = None
) -> RunningServer:
    extra = {"AUTH_KEY_ENCRYPTION_KEY_PREVIOUS": previous} if previous else {}
    return launch_server(
        url,
        directory / f"keys-{name}",
        directory / f"{name}.log",
        issuer=ISSUER,
        port=free_port(),
        **keys_env(key),
        **extra,
    )


@pytest.fixture
def replicas(database: str, key: str, tmp_path: Path) -> Iterator[list[RunningServer]]:
    """Three processes started at once on an empty table: exactly one creates the first pair."""
    servers = [launch(database, key, tmp_path, name) for name in "abc"]
    try:
        for running in servers:
            wait_until_up(running)
        yield servers
    finally:
        for running in servers:
            running.stop()


def jwks(server: RunningServer) -> bytes:
    response = httpx.get(server.url + "/.well-known/jwks.json", timeout=10)
    assert response.status_code == 200
    return response.content


def kids(server: RunningServer) -> list[str]:
    return [key["kid"] for key in httpx.get(server.url + "/.well-known/jwks.json").json()["keys"]]


def issue(server: RunningServer, secret: str) -> str:
    response = httpx.post(
        server.url + "/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=("svc", secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def verify(server: RunningServer, token: str) -> None:
    key = jwt.PyJWKClient(server.url + "/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=ISSUER, issuer=ISSUER)
    assert claims["client_id"] == "svc"


def table(url: str) -> dict[str, str]:
    return {
        str(kid): str(state)
        for kid, state in in_thread(fetch(url, "SELECT kid, state FROM signing_keys"))
    }


def test_three_replicas_share_keys_and_pick_up_a_rotation_and_a_rewrap(
    replicas: list[RunningServer], database: str, key: str, tmp_path: Path
) -> None:
    first = table(database)
    assert sorted(first.values()) == ["current", "next"], "one replica created the first pair"
    current = next(kid for kid, state in first.items() if state == "current")
    upcoming = next(kid for kid, state in first.items() if state == "next")
    served = {jwks(server) for server in replicas}
    assert len(served) == 1, "the three replicas serve the same JWKS"
    assert kids(replicas[0]) == [current, upcoming]

    secret = create_client(database, "svc", scope="api").secret
    assert secret is not None
    before = [issue(server, secret) for server in replicas]
    assert {kid_of(token) for token in before} == {current}

    # -- a CLI rotation reaches every replica through NOTIFY ------------------------------
    env = {**replicas[0].env, "AUTH_KEYS_DIR": str(tmp_path / "keys-cli")}
    rotated = cli(env, "keys", "rotate", "--force")
    started = time.monotonic()  # committed (and notified) when the command has returned
    assert rotated.returncode == 0, rotated.stderr
    assert rotated.stdout.startswith(f"rotated: {upcoming} now signs")
    picked_up: dict[str, float] = {}
    deadline = started + RELOAD_INTERVAL / 2
    while len(picked_up) < len(replicas) and time.monotonic() < deadline:
        for name, server in zip("abc", replicas, strict=True):
            if name not in picked_up and kid_of(issue(server, secret)) == upcoming:
                picked_up[name] = time.monotonic() - started
        time.sleep(0.05)
    print(f"rotation picked up after (s): {picked_up}", file=sys.stderr)
    assert set(picked_up) == set("abc"), f"a replica kept the old key: {picked_up}"
    assert max(picked_up.values()) < PICKUP_LIMIT, picked_up
    served = {jwks(server) for server in replicas}
    assert len(served) == 1
    assert kids(replicas[1])[:2] == [
        upcoming,
        next(k for k, s in table(database).items() if s == "next"),
    ]
    assert current in kids(replicas[2]), "the retired key is still published"
    for server in replicas:
        for token in before:
            verify(server, token)  # signed before the rotation, by any replica

    # -- nothing on disk, nothing secret in the logs ---------------------------------------
    for name in ("a", "b", "c", "cli"):
        directory = tmp_path / f"keys-{name}"
        assert not directory.exists() or not any(directory.iterdir()), directory
    for server in replicas:
        log = server.log()
        assert "PRIVATE KEY" not in log and key not in log and secret not in log
    assert "PRIVATE KEY" not in rotated.stdout + rotated.stderr

    # -- the keys moved to a new encryption key, with every replica serving throughout -----
    new = secrets.token_urlsafe(32)
    old_id, new_id = parse_encryption_key(key).id, parse_encryption_key(new).id
    # Before the rewrap, a replica given the new key and the old one as previous starts.
    fresh = launch(database, new, tmp_path, "fresh", previous=key)
    try:
        wait_until_up(fresh)
        assert httpx.get(fresh.url + "/readyz", timeout=10).status_code == 200
        assert jwks(fresh) == jwks(replicas[0])
        assert kid_of(issue(fresh, secret)) == upcoming
        old_file = tmp_path / "old-key"
        old_file.write_text(key)
        rewrapped = cli(
            {**env, "AUTH_KEY_ENCRYPTION_KEY": new},
            "keys",
            "rewrap",
            "--old-key-file",
            str(old_file),
        )
        assert rewrapped.returncode == 0, rewrapped.stderr
        assert rewrapped.stdout.endswith("3 keys sealed anew, 0 were already under the new key\n")
        # The rows changed (NOTIFY), the keys did not: every replica stays ready and signs
        # with the key it holds, the old-key ones included.
        time.sleep(1.0)
        for server in [*replicas, fresh]:
            assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
            assert kid_of(issue(server, secret)) == upcoming

        # A replica started with the old key alone now refuses to start, naming the fix ...
        stale = launch(database, key, tmp_path, "stale")
        assert stale.process.wait(timeout=30) == 1
        assert "keys rewrap" in stale.log() and "Traceback" not in stale.log()

        # ... and once a key sealed under the new one signs, the old-key replicas keep
        # signing with what they hold but leave /readyz, naming the fix; the fresh one signs
        # with the new key.
        rotated = cli({**env, "AUTH_KEY_ENCRYPTION_KEY": new}, "keys", "rotate", "--force")
        assert rotated.returncode == 0, rotated.stderr
        started = time.monotonic()
        not_ready: dict[str, str] = {}
        while len(not_ready) < len(replicas) and time.monotonic() < started + PICKUP_LIMIT:
            for name, server in zip("abc", replicas, strict=True):
                ready = httpx.get(server.url + "/readyz", timeout=10)
                if ready.status_code == 503:
                    not_ready[name] = ready.json()["detail"]
            time.sleep(0.05)
        assert set(not_ready) == set("abc"), not_ready
        for detail in not_ready.values():
            assert detail.startswith("keys: reloading has failed for ")
            assert f"still signing with {upcoming}: the " in detail
            assert " signing key " in detail
            assert (
                f"under the encryption key {new_id}, but AUTH_KEY_ENCRYPTION_KEY is {old_id}"
                in (detail)
            )
            assert detail.endswith("`python -m server keys rewrap`")
        assert {kid_of(issue(server, secret)) for server in replicas} == {upcoming}
        newest = kid_of(issue(fresh, secret))
        assert newest != upcoming
        for token in before:
            verify(fresh, token)
        assert "PRIVATE KEY" not in fresh.log() and new not in fresh.log()
    finally:
        fresh.stop()
    assert not (tmp_path / "keys-fresh").exists() or not any((tmp_path / "keys-fresh").iterdir())


@pytest.mark.feature("production-guard", "cli-serve")
@pytest.mark.parametrize(
    ("value", "why"), [(None, "is not set"), ("A" * 43, "is not random enough (weak)")]
)
def test_production_refuses_the_database_store_without_a_good_key(
    tmp_path: Path, value: str | None, why: str
) -> None:
    env = server_env(
        "sqlite+aiosqlite:///" + str(tmp_path / "unused.db"),
        tmp_path / "keys",
        "https://auth.example.com",
        AUTH_ENV="production",
        AUTH_SECRET_KEY=secrets.token_urlsafe(48),
        AUTH_KEY_STORE="database",
    )
    if value is not None:
        env["AUTH_KEY_ENCRYPTION_KEY"] = value
    result = cli(env, "serve", "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert (
        f"  - AUTH_KEY_STORE=database: AUTH_KEY_ENCRYPTION_KEY {why}: make one with "
        '`python -c "import secrets; print(secrets.token_urlsafe(32))"` and keep it in your '
        "secret store"
    ) in result.stderr.splitlines()
    assert not (tmp_path / "keys").exists() and not (tmp_path / "unused.db").exists()
