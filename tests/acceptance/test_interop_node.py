"""oauth4webapi (Node), a spec-strict client library independent of ours, against a real server:
it registers clients (RFC 7591) and authenticates them with private_key_jwt and
client_secret_jwt (RFC 7523 §2.2); it pushes authorization requests (RFC 9126) with DPoP
(RFC 9449), signs in and consents through the pages, and redeems, uses and refreshes the
DPoP-bound tokens, with and without server-demanded DPoP nonces. PyJWT verifies what it
obtained.

Needs Node.js and the packages of tests/interop_node (``make install`` runs ``npm ci`` there).
Without them the test is skipped, unless ``AUTH_TEST_REQUIRE_NODE=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from joserfc.jwk import ECKey

from server.config import DEV_SECRET_KEY
from server.db import create_engine, session_factory
from server.models import TotpFactor, now
from server.secretbox import seal
from tests.conftest import BACKENDS

from .conftest import (
    FAST_ARGON2_ENV,
    UNLIMITED_ENV,
    RunningServer,
    cli,
    fresh_database,
    in_thread,
    local_settings,
    start_server,
)

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


@pytest.mark.feature("client-auth-private-key-jwt", "client-registration")
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


# -- PAR and DPoP (tests/interop_node/par_dpop.mjs) -----------------------------------------

REDIRECT_URI = "https://interop.example/callback"
SCOPE = "openid profile"
URN_PREFIX = "urn:ietf:params:oauth:request_uri:"


@pytest.fixture
def node_executable() -> str:
    """``node``, found before any server of the test starts (see ``node``)."""
    return node()


@pytest.fixture(params=BACKENDS)
def nonce_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of this test's own that demands DPoP nonces (``AUTH_DPOP_REQUIRE_NONCE``)."""
    with fresh_database(request.param, tmp_path) as database_url:
        running = start_server(
            database_url,
            tmp_path / "keys",
            tmp_path / "server.log",
            **FAST_ARGON2_ENV,
            **UNLIMITED_ENV,
            AUTH_DPOP_REQUIRE_NONCE="true",
        )
        try:
            yield running
        finally:
            running.stop()


def run_par_dpop(executable: str, server: RunningServer) -> dict[str, Any]:
    """Make a private_key_jwt client, a public client and a user on ``server``; run
    par_dpop.mjs with them; what it printed."""
    key = ECKey.generate_key(
        "P-256", parameters={"kid": "interop-par", "alg": "ES256", "use": "sig"}, private=True
    )
    common: dict[str, Any] = {
        "grants": ["authorization_code", "refresh_token"],
        "scope": SCOPE,
        "redirect_uris": [REDIRECT_URI],
        "name": "oauth4webapi interop",
    }
    by_key = server.new_client(
        "interop-pkj",
        auth_method="private_key_jwt",
        jwks={"keys": [key.as_dict(private=False)]},
        **common,
    )
    public = server.new_client("interop-public", public=True, **common)
    user = server.new_user("interop")
    run = subprocess.run(
        [executable, str(PACKAGE / "par_dpop.mjs")],
        env={
            **os.environ,
            "ISSUER": server.url,
            "REDIRECT_URI": REDIRECT_URI,
            "USER_NAME": user.username,
            "USER_PASSWORD": user.password,
            "KEY_CLIENT_ID": by_key.client_id,
            "KEY_CLIENT_JWK": json.dumps(key.as_dict(private=True)),
            "PUBLIC_CLIENT_ID": public.client_id,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr + "\n" + server.log()[-4000:]
    seen: dict[str, Any] = json.loads(run.stdout)
    seen["user_id"] = user.id
    seen["client_ids"] = {"private_key_jwt": by_key.client_id, "public": public.client_id}
    return seen


def check_par_dpop(server: RunningServer, seen: dict[str, Any]) -> None:
    """What both runs must show, with or without nonces."""
    metadata = seen["metadata"]
    assert metadata["issuer"] == server.url
    assert metadata["pushed_authorization_request_endpoint"] == server.url + "/oauth2/par"
    assert "ES256" in metadata["dpop_signing_alg_values_supported"]
    for name in ("private_key_jwt", "public"):
        result = seen[name]
        assert result["client_id"] == seen["client_ids"][name]
        # The thumbprint oauth4webapi computed is RFC 7638's (joserfc agrees).
        jkt = result["jkt"]
        assert ECKey.import_key(result["public_jwk"]).thumbprint() == jkt
        assert result["par"]["request_uri"].startswith(URN_PREFIX)
        assert result["par"]["expires_in"] == 60
        # authorize -> /login 302, sign-in page 200, POST /login 303, consent page 200,
        # POST /consent 303 to the client.
        assert result["browser"]["steps"] == [302, 200, 303, 200, 303]
        assert result["browser"]["callback"].startswith(REDIRECT_URI + "?")
        # The consent form carries only what the browser sent: the pushed request's handle.
        assert set(result["browser"]["consent_fields"]) >= {"csrf_token", "request_uri"}
        assert "code_challenge" not in result["browser"]["consent_fields"]
        callback = result["callback"]
        assert callback["iss"] == server.url
        assert callback["code"]
        # RFC 9449 §10: the code is bound to the key of the proof sent to /oauth2/par.
        assert result["code_with_other_key"] == {
            "refused": True,
            "status": 400,
            "error": "invalid_grant",
        }
        token = result["token"]
        assert token["token_type"] == "dpop"  # oauth4webapi lower-cases it
        assert token["has_refresh_token"] is True
        assert set(token["scope"].split()) == set(SCOPE.split())
        assert token["id_token_sub"] == seen["user_id"]
        for access_token in (token["access_token"], result["refresh"]["access_token"]):
            claims = verify(server, metadata, access_token)
            assert claims["cnf"] == {"jkt": jkt}
            assert claims["client_id"] == result["client_id"]
            assert claims["sub"] == seen["user_id"]
        assert result["refresh"]["token_type"] == "dpop"
        assert result["userinfo"]["sub"] == seen["user_id"]
        assert result["refreshed_userinfo"]["sub"] == seen["user_id"]
        # The bound token sent as a Bearer token is refused (RFC 9449 §7.2) with an
        # invalid_token challenge in the DPoP scheme it needs (§7.1).
        bearer = result["bound_token_as_bearer"]
        assert bearer["refused"] is True
        assert bearer["status"] == 401
        assert [(c["scheme"], c["parameters"]["error"]) for c in bearer["challenges"]] == [
            ("dpop", "invalid_token")
        ]
    # A public client's refresh token is bound to the key; a confidential one's is not (and
    # is not tried with another key).
    assert seen["public"]["refresh_with_other_key"] == {
        "refused": True,
        "status": 400,
        "error": "invalid_grant",
    }
    assert seen["private_key_jwt"]["refresh_with_other_key"] is None


@pytest.mark.feature("par", "dpop-tokens", "dpop-code-binding")
def test_oauth4webapi_pushes_signs_in_and_uses_dpop_bound_tokens(
    node_executable: str, server: RunningServer
) -> None:
    seen = run_par_dpop(node_executable, server)
    check_par_dpop(server, seen)
    # No nonce demanded: no retry anywhere.
    for name in ("private_key_jwt", "public"):
        assert seen[name]["retries"] == {}
        assert seen[name]["other_key_retries"] == {}


@pytest.mark.feature("par", "dpop-tokens", "dpop-code-binding")
def test_oauth4webapi_retries_with_the_dpop_nonces_the_server_demands(
    node_executable: str, nonce_server: RunningServer
) -> None:
    seen = run_par_dpop(node_executable, nonce_server)
    check_par_dpop(nonce_server, seen)
    # The public client's run takes a new DPoP handle (no nonce cached) at every step: each
    # endpoint answers use_dpop_nonce once, and the retry with its DPoP-Nonce succeeds.
    assert seen["public"]["retries"] == {
        "par": 1,
        "token": 1,
        "userinfo": 1,
        "refresh": 1,
        "userinfo_after_refresh": 1,
    }
    assert seen["public"]["other_key_retries"] == {"token": 1, "refresh": 1}
    # The private_key_jwt client's run keeps one handle: the nonce learnt at /oauth2/par is
    # good at the token endpoint and /userinfo too (one origin), so only PAR retries.
    assert seen["private_key_jwt"]["retries"] == {"par": 1}
    assert seen["private_key_jwt"]["other_key_retries"] == {"token": 1}


# -- amr and acr after a second factor (tests/interop_node/mfa_claims.mjs) -----------------

TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # base32, 160 bits (RFC 4226 §4)


def add_totp(server: RunningServer, user_id: str, secret: str) -> None:
    """A confirmed one-time code app for ``user_id``, sealed as the server seals its own."""

    async def run() -> None:
        settings = local_settings(server.database_url)
        secret_key = server.env.get("AUTH_SECRET_KEY", DEV_SECRET_KEY)
        engine = create_engine(settings)
        try:
            async with session_factory(engine)() as db:
                db.add(
                    TotpFactor(
                        user_id=user_id,
                        secret_sealed=seal(secret_key, secret, context="totp:" + user_id),
                        confirmed_at=now(),
                    )
                )
                await db.commit()
        finally:
            await engine.dispose()

    in_thread(run())


@pytest.mark.feature("mfa-amr-acr", "mfa-totp", "id-tokens")
def test_oauth4webapi_validates_amr_and_acr_of_a_two_factor_sign_in(
    node_executable: str, server: RunningServer
) -> None:
    public = server.new_client(
        "interop-mfa",
        public=True,
        grants=["authorization_code"],
        scope=SCOPE,
        redirect_uris=[REDIRECT_URI],
        name="oauth4webapi interop",
    )
    user = server.new_user("interop-mfa")
    add_totp(server, user.id, TOTP_SECRET)
    run = subprocess.run(
        [node_executable, str(PACKAGE / "mfa_claims.mjs")],
        env={
            **os.environ,
            "ISSUER": server.url,
            "REDIRECT_URI": REDIRECT_URI,
            "CLIENT_ID": public.client_id,
            "USER_NAME": user.username,
            "USER_PASSWORD": user.password,
            "TOTP_SECRET": TOTP_SECRET,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr + "\n" + server.log()[-4000:]
    seen = json.loads(run.stdout)
    # authorize -> /login 302, sign-in page 200, POST /login 303 to the second step, its
    # page 200, POST /login/verify/code 303, consent page 200, POST /consent 303.
    assert seen["steps"] == [302, 200, 303, 200, 303, 200, 303]
    claims = seen["claims"]  # as oauth4webapi validated them (signature, nonce, max_age)
    assert claims["sub"] == user.id
    assert claims["amr"] == ["pwd", "otp", "mfa"]
    assert claims["acr"] == "2"
