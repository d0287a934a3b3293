"""Key rotation with two real server processes sharing one database and one keys/ directory.

`keys rotate` run once from the CLI: both processes sign with the new key within seconds,
without a restart, and tokens signed before the rotation still verify (JWKS, introspection).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from server.config import Settings

from .conftest import FAST_ARGON2_ENV, RunningServer, cli, create_client, start_replicas

pytestmark = pytest.mark.feature("key-hot-reload", "key-lifecycle", "cli-keys", "introspection")
ISSUER = "http://tokens.test"  # one name for both replicas, as behind a load balancer
RELOAD_INTERVAL = 0.5  # AUTH_KEY_RELOAD_INTERVAL, seconds (2 by default)


@pytest.fixture
def replicas(clean_db: Settings, tmp_path: Path) -> Iterator[list[RunningServer]]:
    """Two processes on one (migrated, emptied) database and one keys/ directory."""
    keys = tmp_path / "keys"
    servers: list[RunningServer] = []
    try:
        servers = start_replicas(
            clean_db.database_url,
            keys,
            [tmp_path / "a.log", tmp_path / "b.log"],
            issuer=ISSUER,
            AUTH_KEY_RELOAD_INTERVAL=str(RELOAD_INTERVAL),
            **FAST_ARGON2_ENV,
        )
        yield servers
    finally:
        for running in servers:
            running.stop()


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def verify(server: RunningServer, token: str) -> dict[str, object]:
    key = jwt.PyJWKClient(server.url + "/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims: dict[str, object] = jwt.decode(
        token, key.key, algorithms=["RS256"], audience=ISSUER, issuer=ISSUER
    )
    return claims


def test_rotation_reaches_every_running_process(replicas: list[RunningServer]) -> None:
    a, b = replicas
    secret = create_client(a.database_url, "svc", scope="api").secret
    assert secret is not None

    def issue(server: RunningServer) -> str:
        response = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=("svc", secret),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def active(server: RunningServer, token: str) -> bool:
        response = httpx.post(
            server.url + "/oauth2/introspect",
            data={"token": token},
            auth=("svc", secret),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        result: bool = response.json()["active"]
        return result

    before = issue(b)
    old_kid = kid_of(before)
    assert kid_of(issue(a)) == old_kid

    rotated = cli(a.env, "keys", "rotate", "--force")
    assert rotated.returncode == 0, rotated.stderr
    manifest = json.loads((Path(a.env["AUTH_KEYS_DIR"]) / "keys.json").read_text())
    new_kid = next(k["kid"] for k in manifest["keys"] if k["state"] == "current")
    assert new_kid != old_kid
    assert rotated.stdout.startswith(f"rotated: {new_kid} now signs")

    # Each process re-reads keys/ every AUTH_KEY_RELOAD_INTERVAL (RELOAD_INTERVAL here). A
    # bounded wait, not a timing assertion: the test only fails if a process never switches.
    latest: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        latest = {"a": kid_of(issue(a)), "b": kid_of(issue(b))}
        if set(latest.values()) == {new_kid}:
            break
        time.sleep(0.2)
    assert latest == {"a": new_kid, "b": new_kid}, "a running process kept the old key"
    after = issue(b)

    for server in (a, b):
        # The old token still verifies offline (its key is published as retired) and online.
        assert verify(server, before)["client_id"] == "svc"
        assert verify(server, after)["client_id"] == "svc"
        assert active(server, before) and active(server, after)
        jwks = httpx.get(server.url + "/.well-known/jwks.json", timeout=10).json()
        assert {k["kid"] for k in jwks["keys"]} >= {old_kid, new_kid}
        assert all("d" not in k for k in jwks["keys"])

    # Pruning now would break `before`: the retired key is kept, with the reason.
    pruned = cli(a.env, "keys", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith(f"kept {old_kid}: tokens it signed may be valid for ")
    assert active(a, before)
    # Nothing secret reached either process's log.
    for server in (a, b):
        log = server.log()
        assert secret not in log and before not in log and "PRIVATE KEY" not in log
    assert "PRIVATE KEY" not in rotated.stdout + rotated.stderr + pruned.stdout + pruned.stderr
