"""oauth4webapi (Node), a spec-strict client library independent of ours, registers clients
(RFC 7591) and authenticates them with private_key_jwt and client_secret_jwt (RFC 7523 §2.2)
against a real server; PyJWT verifies what it obtained.

Needs Node.js and the packages of tests/interop_node (``make install`` runs ``npm ci`` there).
Without them the test is skipped, unless ``AUTH_TEST_REQUIRE_NODE=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jwt
import pytest

from .conftest import RunningServer, cli

pytestmark = pytest.mark.feature("client-auth-private-key-jwt", "client-registration")

PACKAGE = Path(__file__).resolve().parent.parent / "interop_node"


def node() -> str:
    found = shutil.which("node")
    ready = (PACKAGE / "node_modules" / "oauth4webapi").is_dir()
    if found is None or not ready:
        reason = "node or tests/interop_node/node_modules missing (run `make install`)"
        if os.environ.get("AUTH_TEST_REQUIRE_NODE") == "1":
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_NODE=1)")
        pytest.skip(reason)
    return found


def verify(server: RunningServer, metadata: dict[str, Any], token: str) -> dict[str, Any]:
    key = jwt.PyJWKClient(metadata["jwks_uri"]).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["RS256"], audience=server.url, issuer=server.url
    )
    return claims


def test_oauth4webapi_registers_and_authenticates_with_keys(server: RunningServer) -> None:
    executable = node()
    issued = cli(server.env, "clients", "registration-token", "--json")
    assert issued.returncode == 0, issued.stderr
    run = subprocess.run(
        [executable, str(PACKAGE / "registration.mjs")],
        env={
            **os.environ,
            "ISSUER": server.url,
            "INITIAL_ACCESS_TOKEN": json.loads(issued.stdout)["token"],
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    metadata = seen["metadata"]
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    for method in ("private_key_jwt", "client_secret_jwt"):
        result = seen[method]
        assert result["method"] == method
        assert result["token_type"].lower() == "bearer"
        claims = verify(server, metadata, result["access_token"])
        assert claims["client_id"] == result["client_id"] == claims["sub"]
        assert result["introspection"]["active"] is True
        assert result["introspection"]["client_id"] == result["client_id"]
    assert seen["private_key_jwt"]["has_secret"] is False
    # The same assertion twice: its jti is accepted once.
    assert seen["replay"]["status"] == 401
    assert seen["replay"]["body"]["error"] == "invalid_client"
