"""`python -m server check URL`, the operator's self-test, against a real server process."""

from __future__ import annotations

import re

import pytest

from .conftest import NewClient, NewUser, RunningServer, cli, free_port

pytestmark = pytest.mark.feature("check-command")
PASSWORD = "a long enough passphrase"


def set_up(server: RunningServer) -> tuple[NewClient, NewUser]:
    """A client and a user of the test's own on the shared server."""
    client = server.new_client("web", scope="profile api")
    assert client.secret is not None
    return client, server.new_user("carol", PASSWORD)


def test_check_passes_against_a_real_server(server: RunningServer) -> None:
    client, user = set_up(server)
    secret = client.secret
    assert secret is not None

    result = cli(
        server.env,
        "check",
        server.url,
        "--client-id",
        client.client_id,
        # One argument with "=": a generated secret may begin with "-" (one in 64 does).
        f"--client-secret={secret}",
        "--username",
        user.username,
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )

    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    *checks, summary = lines
    assert all(line.startswith("PASS ") for line in checks), result.stdout
    names = {line.split()[1] for line in checks}
    assert names >= {
        "discovery",
        "jwks-hygiene",
        "jwks-cache",
        "token-error-format",
        "invalid-client",
        "client-credentials",
        "password-grant",
        "access-token-claims",
        "refresh-rotation",
        "refresh-reuse-detection",
        "revocation",
        "revoked-family-inactive",
        "revoked-access-token-inactive",
        "introspection-active",
        "introspection-hostile-tokens",
        "no-store-headers",
        "dpop-discovery",
        "dpop-bound-token",
        "dpop-proof-replay",
        "dpop-proof-wrong-htu",
        "par-refuses-unauthenticated",
    }
    assert summary == f"summary: {len(checks)} passed, 0 failed, 0 skipped"
    assert secret not in result.stdout + result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_check_fails_with_a_reason_and_exit_status(server: RunningServer) -> None:
    client, _ = set_up(server)
    # Credentials from the environment, as a CI job would pass them; the secret is wrong.
    env = {
        **server.env,
        "AUTH_CHECK_CLIENT_ID": client.client_id,
        "AUTH_CHECK_CLIENT_SECRET": "not-the-secret",
    }

    result = cli(env, "check", server.url)

    assert result.returncode == 1
    assert re.search(r"^FAIL client-credentials: .*invalid_client", result.stdout, re.M), (
        result.stdout
    )
    assert re.search(r"^PASS discovery$", result.stdout, re.M)
    assert re.fullmatch(
        r"summary: \d+ passed, [1-9]\d* failed, \d+ skipped", result.stdout.splitlines()[-1]
    )


def test_check_of_an_unreachable_server_fails(server: RunningServer) -> None:
    result = cli(server.env, "check", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "unreachable" in result.stdout
