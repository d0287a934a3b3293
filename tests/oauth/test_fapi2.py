"""``AUTH_FAPI2``: the FAPI 2.0 Security Profile at once, and what it refuses.

The flow a FAPI 2.0 client runs: a ``private_key_jwt`` client pushes its request (PKCE, the
redirect URI, a DPoP proof) to /oauth2/par, the browser signs in and consents, and the client
redeems the code with a new assertion and a proof of the same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, KeySet, RSAKey

from server import manage
from server.config import InsecureSettingsError, Settings
from server.deps import AppState
from server.main import create_app
from tests.conftest import SharedApps, UserCreds, csrf_of, make_settings, reset_app, sign_in
from tests.oauth.test_authorize import CALLBACK, ISSUER, _hidden_fields, pkce, query_of
from tests.oauth.test_client_assertion import EC, claims_for, public_jwks, sign
from tests.oauth.test_dpop_tokens import payload
from tests.test_check import run as run_check
from tests.test_dpop import serialize

pytestmark = pytest.mark.feature("fapi2")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DPOP_KEY = ECKey.generate_key("P-256")
RSA_DPOP_KEY = RSAKey.generate_key(2048)


def proof(
    path: str, key: Key = DPOP_KEY, alg: str = "ES256", method: str = "POST", **claims: str
) -> str:
    body = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": ISSUER + path,
        "iat": int(time.time()),
        **claims,
    }
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    return serialize(header, json.dumps(body).encode(), key)


def assertion(aud: str = ISSUER, alg: str = "ES256", client_id: str = "bank") -> dict[str, str]:
    token = sign(claims_for(client_id, aud), EC, alg, kid=EC.kid)
    return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": token}


@dataclass
class Fapi:
    app: FastAPI
    user: UserCreds
    secret: str  # of the client_secret_basic client "legacy"

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=ISSUER)


@pytest.fixture
async def fapi(settings: Settings, shared_apps: SharedApps) -> Fapi:
    app = await shared_apps.get(
        make_settings(
            settings.database_url, settings.keys_dir, fapi2=True, client_registration="open"
        )
    )
    await reset_app(app)
    state: AppState = app.state.auth
    common: dict[str, Any] = {"redirect_uris": [CALLBACK], "scope": "openid profile api"}
    async with state.db.sessions() as db:
        await manage.create_client(
            db,
            client_id="bank",
            auth_method="private_key_jwt",
            jwks=public_jwks(EC),
            grants=["authorization_code", "refresh_token", "client_credentials", "password"],
            settings=state.settings,
            name="Bank App",
            **common,
        )
        legacy = await manage.create_client(
            db, client_id="legacy", grants=["authorization_code", "client_credentials"], **common
        )
        await manage.create_client(
            db, client_id="spa", public=True, grants=["authorization_code"], **common
        )
        user = await manage.create_user(
            db, state.passwords, username="alice", password="correct horse battery"
        )
        await db.commit()
    return Fapi(app, UserCreds(user.id, "alice", "correct horse battery"), legacy.secret or "")


def request_params(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": "bank",
        "redirect_uri": CALLBACK,
        "scope": "openid profile",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


async def test_the_fapi2_flow_runs_end_to_end(fapi: Fapi) -> None:
    async with fapi.http() as http:
        verifier, challenge = pkce()
        pushed = await http.post(
            "/oauth2/par",
            data={**request_params(challenge), **assertion()},
            headers={"DPoP": proof("/oauth2/par")},
        )
        assert pushed.status_code == 201, pushed.text
        await sign_in(http, fapi.user)
        page = await http.get(
            "/oauth2/authorize",
            params={"client_id": "bank", "request_uri": pushed.json()["request_uri"]},
        )
        assert "Bank App" in page.text
        answer = await http.post(
            "/consent",
            data={
                **dict(_hidden_fields(page.text)),
                "csrf_token": csrf_of(page),
                "decision": "allow",
            },
        )
        code = query_of(answer)["code"]
        token = await http.post(
            "/oauth2/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": CALLBACK,
                "code_verifier": verifier,
                **assertion(),
            },
            headers={"DPoP": proof("/oauth2/token")},
        )
        assert token.status_code == 200, token.text
        body = token.json()
        assert body["token_type"] == "DPoP"
        assert payload(body["access_token"])["cnf"] == {"jkt": DPOP_KEY.thumbprint()}
        # FAPI 2.0 §5.4.1: PS256 with the same RSA keys, published as PS256 keys.
        jwks = KeySet.import_key_set((await http.get("/.well-known/jwks.json")).json())
        assert {key.alg for key in jwks.keys} == {"PS256"}
        for name in ("access_token", "id_token"):
            decoded = jwt.decode(body[name], jwks, algorithms=["PS256"])
            assert decoded.header["alg"] == "PS256" and decoded.claims["iss"] == ISSUER
        with pytest.raises(JoseError):
            jwt.decode(body["access_token"], jwks, algorithms=["RS256"])
        ath = base64.urlsafe_b64encode(hashlib.sha256(body["access_token"].encode()).digest())
        me = await http.get(
            "/userinfo",
            headers={
                "Authorization": "DPoP " + body["access_token"],
                "DPoP": proof("/userinfo", method="GET", ath=ath.rstrip(b"=").decode()),
            },
        )
        assert me.status_code == 200 and me.json()["sub"] == fapi.user.id
        # client_credentials too, sender-constrained.
        service = await http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "scope": "api", **assertion()},
            headers={"DPoP": proof("/oauth2/token")},
        )
        assert service.status_code == 200 and service.json()["token_type"] == "DPoP"


async def test_what_fapi2_refuses(fapi: Fapi) -> None:
    async with fapi.http() as http:
        _, challenge = pkce()
        await sign_in(http, fapi.user)
        # A plain authorization request, even a well-formed one: back to the client.
        plain = await http.get("/oauth2/authorize", params=request_params(challenge))
        assert query_of(plain)["error"] == "invalid_request"

        async def push(data: dict[str, str], **kw: Any) -> httpx.Response:
            return await http.post("/oauth2/par", data=data, **kw)

        no_redirect = {k: v for k, v in request_params(challenge).items() if k != "redirect_uri"}
        response = await push({**no_redirect, **assertion()})
        assert response.status_code == 400 and "redirect_uri" in response.text
        no_pkce = {
            k: v for k, v in request_params(challenge).items() if not k.startswith("code_chal")
        }
        response = await push({**no_pkce, **assertion()})
        assert response.status_code == 400 and "PKCE" in response.text
        # private_key_jwt only, its assertion for the issuer only, PS256/ES256/EdDSA only.
        legacy = await push(
            request_params(challenge, client_id="legacy"),
            auth=httpx.BasicAuth("legacy", fapi.secret),
        )
        assert legacy.status_code == 401 and legacy.json()["error"] == "invalid_client"
        public = await push(request_params(challenge, client_id="spa"))
        assert public.status_code == 401
        for bad in (
            assertion(aud=ISSUER + "/oauth2/par"),
            assertion(aud=ISSUER + "/oauth2/token"),
        ):
            assert (await push({**request_params(challenge), **bad})).status_code == 401
        # The token endpoint: a proof on every request, from an allowed algorithm.
        cc = {"grant_type": "client_credentials", "scope": "api"}
        unbound = await http.post("/oauth2/token", data={**cc, **assertion()})
        assert unbound.status_code == 400 and unbound.json()["error"] == "invalid_dpop_proof"
        rs256 = await http.post(
            "/oauth2/token",
            data={**cc, **assertion()},
            headers={"DPoP": proof("/oauth2/token", RSA_DPOP_KEY, "RS256")},
        )
        assert rs256.status_code == 400 and rs256.json()["error"] == "invalid_dpop_proof"
        legacy_token = await http.post(
            "/oauth2/token",
            data=cc,
            auth=httpx.BasicAuth("legacy", fapi.secret),
            headers={"DPoP": proof("/oauth2/token")},
        )
        assert legacy_token.status_code == 401
        password = await http.post(
            "/oauth2/token",
            data={
                "grant_type": "password",
                "username": "alice",
                "password": "correct horse battery",
                **assertion(),
            },
            headers={"DPoP": proof("/oauth2/token")},
        )
        assert password.status_code == 400
        assert password.json()["error"] == "unauthorized_client"
        # Registration: private_key_jwt clients only.
        registered = await http.post(
            "/oauth2/register",
            json={"redirect_uris": [CALLBACK], "token_endpoint_auth_method": "client_secret_basic"},
        )
        assert registered.status_code == 400
        assert registered.json()["error"] == "invalid_client_metadata"


async def test_discovery_says_what_fapi2_allows(fapi: Fapi) -> None:
    async with fapi.http() as http:
        document = (await http.get("/.well-known/openid-configuration")).json()
    assert document["require_pushed_authorization_requests"] is True
    assert document["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert document["introspection_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert document["token_endpoint_auth_signing_alg_values_supported"] == [
        "PS256",
        "ES256",
        "EdDSA",
    ]
    assert document["dpop_signing_alg_values_supported"] == ["PS256", "ES256", "EdDSA"]
    assert "password" not in document["grant_types_supported"]
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["authorization_response_iss_parameter_supported"] is True
    assert document["id_token_signing_alg_values_supported"] == ["PS256"]


async def test_check_expects_ps256_from_a_fapi2_server(fapi: Fapi) -> None:
    async with fapi.http() as http:
        outcome = await run_check(http, ISSUER)
    # Without credentials: what check can see of a FAPI 2.0 server passes, PS256 keys too.
    assert outcome.failures == 0, outcome.lines
    assert {"discovery", "jwks-hygiene", "dpop-discovery"} <= outcome.named("PASS")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"authorization_code_ttl": 61}, "AUTH_AUTHORIZATION_CODE_TTL"),
        ({"env": "production", "issuer": "http://auth.example"}, "AUTH_ISSUER"),
        ({"env": "production"}, "AUTH_RATE_LIMIT_STORAGE"),
    ],
)
def test_fapi2_refuses_to_start_when_a_setting_contradicts_it(
    tmp_path: Any, overrides: dict[str, Any], named: str
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", fapi2=True, **overrides
    )
    with pytest.raises(InsecureSettingsError) as refused:
        settings.check_profile()
    assert named in str(refused.value) and "AUTH_FAPI2" in str(refused.value)
    if overrides.get("env") != "production":
        with pytest.raises(InsecureSettingsError):
            create_app(settings)
    # Without AUTH_FAPI2 the same settings have nothing to contradict.
    assert settings.model_copy(update={"fapi2": False}).profile_problems() == []


def test_fapi2_starts_with_its_defaults(tmp_path: Any) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db", fapi2=True
    )
    assert settings.profile_problems() == []
    create_app(settings)  # built, not started: nothing refused
