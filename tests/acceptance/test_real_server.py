"""A real server process (``python -m server serve``) set up with the real CLI.

Password grant → refresh → refresh again; the access token verifies against the JWKS with
PyJWT (not Authlib); replaying a rotated refresh token kills the family. The client and the
user are made by ``clients create`` and ``users create`` run as processes, as an operator runs
them. ``seed-demo`` wants an empty database: that test has a server of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from .conftest import (
    FAST_ARGON2_ENV,
    ROOT,
    RunningServer,
    cli,
    fresh_database,
    start_server,
    unique,
)

pytestmark = pytest.mark.feature(
    "cli-serve",
    "make-run",
    "grant-password",
    "grant-refresh",
    "refresh-reuse-detection",
    "access-token-jwt",
    "jwks-endpoint",
    "sqlite-backend",
    "postgres-backend",
)


def test_password_refresh_verify_and_reuse(server: RunningServer) -> None:
    issuer, env = server.url, server.env
    client_id, username = unique("web"), unique("carol")
    created = cli(
        env, "clients", "create", "--client-id", client_id, "--scope", "profile api", "--json"
    )
    assert created.returncode == 0, created.stderr
    client = json.loads(created.stdout)
    assert client["client_id"] == client_id
    user = cli(
        env,
        "users",
        "create",
        "--username",
        username,
        "--email",
        f"{username}@example.com",
        "--password-stdin",
        "--json",
        stdin="a long enough passphrase\n",
    )
    assert user.returncode == 0, user.stderr
    user_id = json.loads(user.stdout)["id"]

    auth = (client["client_id"], client["client_secret"])
    with httpx.Client(base_url=issuer, auth=auth, timeout=10) as http:
        first = http.post(
            "/oauth2/token",
            data={
                "grant_type": "password",
                "username": username,
                "password": "a long enough passphrase",
                "scope": "profile api",
            },
        )
        assert first.status_code == 200, first.text
        second = http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": first.json()["refresh_token"],
            },
        )
        assert second.status_code == 200, second.text
        third = http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": second.json()["refresh_token"],
            },
        )
        assert third.status_code == 200, third.text

        token = third.json()["access_token"]
        signing_key = jwt.PyJWKClient(issuer + "/.well-known/jwks.json").get_signing_key_from_jwt(
            token
        )
        claims = jwt.decode(
            token, signing_key.key, algorithms=["RS256"], audience=issuer, issuer=issuer
        )
        assert claims["sub"] == user_id
        assert claims["scope"] == "profile api"
        assert jwt.get_unverified_header(token)["typ"] == "at+jwt"

        replay = http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": first.json()["refresh_token"],
            },
        )
        assert replay.status_code == 400
        assert replay.json()["error"] == "invalid_grant"
        newest = http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": third.json()["refresh_token"],
            },
        )
        assert newest.status_code == 400, "the family must be dead after a reuse"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of the test's own on a new database, with no client and no user."""
    with fresh_database(request.param, tmp_path) as database_url:
        running = start_server(
            database_url, tmp_path / "keys", tmp_path / "server.log", **FAST_ARGON2_ENV
        )
        try:
            yield running
        finally:
            running.stop()


def test_demo_seed_prints_a_working_curl(empty_server: RunningServer, tmp_path: Path) -> None:
    issuer, env = empty_server.url, empty_server.env
    seeded = subprocess.run(
        [sys.executable, "-m", "server", "seed-demo"],
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert seeded.returncode == 0, seeded.stderr
    curl_line = next(line for line in seeded.stdout.splitlines() if "curl" in line)
    creds = json.loads((tmp_path / "data" / "demo-credentials.json").read_text())
    assert issuer + "/oauth2/token" in curl_line
    assert creds["client_secret"] in curl_line
    assert shutil.which("curl"), "curl is needed to run the printed command as a newcomer would"
    pasted = subprocess.run(
        ["bash", "-c", curl_line.strip()], capture_output=True, text=True, timeout=30, check=False
    )
    assert pasted.returncode == 0, pasted.stderr
    token = json.loads(pasted.stdout)["access_token"]
    signing_key = jwt.PyJWKClient(issuer + "/.well-known/jwks.json").get_signing_key_from_jwt(token)
    claims = jwt.decode(token, signing_key.key, algorithms=["RS256"], audience=issuer)
    assert claims["client_id"] == "demo-client"
    # The README's account API calls work with that token: the demo client has `account`.
    me = httpx.get(issuer + "/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200, me.text
    assert me.json()["username"] == "demo"
