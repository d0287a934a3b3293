"""The refusals a resource makes itself, after ``bearer.token_claims`` let the token through,
challenge in the scheme the token was sent with (RFC 9449 §7.1, RFC 6750 §3.1): a DPoP-bound
token without the scope needed gets ``WWW-Authenticate: DPoP algs="…",
error="insufficient_scope"``, a bearer token the ``Bearer`` challenge, each alone (a token was
sent: only a request without one is challenged with both schemes). The same for the 401 of a
bound token the database finds dead (revoked).

Proofs are built as in ``tests/oauth/test_dpop_tokens.py``.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import httpx
import pytest

from server import bearer
from server.bearer import Realm
from server.config import Settings
from server.deps import AppState
from server.models import WebAuthnCredential
from server.names import DPOP_ALGS
from tests.conftest import ClientCreds, MakeClient, MakeUser
from tests.oauth.test_dpop_tokens import KEY, TOKEN_PATH, make_proof, payload

pytestmark = pytest.mark.feature("dpop-tokens")

ALGS = " ".join(DPOP_ALGS)


@dataclass(frozen=True)
class Endpoint:
    """A protected resource, the scope it needs, and how a token without it is obtained."""

    path: str
    realm: str
    scope: str
    description: str


ADMIN = Endpoint("/admin/v1/keys", "api", "admin", "The token lacks the admin scope.")
ACCOUNT = Endpoint("/api/v1/me", "api", "account", "The token lacks the account scope.")
USERINFO = Endpoint("/userinfo", "userinfo", "openid", "The token lacks the openid scope.")


async def token_without_the_scope(
    http: httpx.AsyncClient,
    settings: Settings,
    make_client: MakeClient,
    make_user: MakeUser,
    endpoint: Endpoint,
    *,
    dpop: bool,
) -> str:
    """A live token (bound to ``KEY`` when ``dpop``) that lacks ``endpoint.scope``: a
    client_credentials token with ``api`` for the admin API, a person's ``profile`` token
    for the others."""
    headers: dict[str, str] = {"DPoP": make_proof(settings)} if dpop else {}
    if endpoint is ADMIN:
        creds = await make_client("svc", grants=["client_credentials"], scope="api")
        data = {"grant_type": "client_credentials", "scope": "api"}
    else:
        creds = await make_client(scope="openid profile account")
        user = await make_user()
        data = {
            "grant_type": "password",
            "username": user.username,
            "password": user.password,
            "scope": "profile",
        }
    response = await http.post(TOKEN_PATH, data=data, headers={**creds.basic, **headers})
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == ("DPoP" if dpop else "Bearer")
    token: str = response.json()["access_token"]
    assert endpoint.scope not in payload(token)["scope"].split()
    return token


async def call(
    http: httpx.AsyncClient, settings: Settings, endpoint: Endpoint, token: str, *, dpop: bool
) -> httpx.Response:
    if not dpop:
        return await http.get(endpoint.path, headers={"Authorization": f"Bearer {token}"})
    proof = make_proof(settings, method="GET", path=endpoint.path, access_token=token)
    return await http.get(endpoint.path, headers={"Authorization": f"DPoP {token}", "DPoP": proof})


def error_of(response: httpx.Response) -> str:
    body = response.json()
    return str(body.get("error_code", body.get("error")))


@pytest.mark.parametrize(
    "endpoint", [ADMIN, ACCOUNT, USERINFO], ids=["admin", "account", "userinfo"]
)
async def test_a_dpop_bound_token_without_the_scope_gets_the_dpop_challenge(
    client: httpx.AsyncClient,
    settings: Settings,
    make_client: MakeClient,
    make_user: MakeUser,
    endpoint: Endpoint,
) -> None:
    token = await token_without_the_scope(
        client, settings, make_client, make_user, endpoint, dpop=True
    )
    assert payload(token)["cnf"] == {"jkt": KEY.thumbprint()}
    response = await call(client, settings, endpoint, token, dpop=True)
    assert response.status_code == 403, response.text
    assert error_of(response) == "insufficient_scope"
    assert response.headers.get_list("www-authenticate") == [
        f'DPoP realm="{endpoint.realm}", algs="{ALGS}", error="insufficient_scope", '
        f'error_description="{endpoint.description}", scope="{endpoint.scope}"'
    ]
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "endpoint", [ADMIN, ACCOUNT, USERINFO], ids=["admin", "account", "userinfo"]
)
async def test_a_bearer_token_without_the_scope_gets_the_bearer_challenge(
    client: httpx.AsyncClient,
    settings: Settings,
    make_client: MakeClient,
    make_user: MakeUser,
    endpoint: Endpoint,
) -> None:
    token = await token_without_the_scope(
        client, settings, make_client, make_user, endpoint, dpop=False
    )
    response = await call(client, settings, endpoint, token, dpop=False)
    assert response.status_code == 403, response.text
    assert error_of(response) == "insufficient_scope"
    assert response.headers.get_list("www-authenticate") == [
        f'Bearer realm="{endpoint.realm}", error="insufficient_scope", '
        f'error_description="{endpoint.description}", scope="{endpoint.scope}"'
    ]


async def test_each_request_is_challenged_in_its_own_scheme(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    """One client, both kinds of token, in turn on one connection: a DPoP request's scheme
    never carries over to the bearer request after it, nor back."""
    creds = await make_client("svc", grants=["client_credentials"], scope="api")
    schemes = []
    for dpop in (True, False, True):
        headers = {"DPoP": make_proof(settings)} if dpop else {}
        issued = await client.post(
            TOKEN_PATH,
            data={"grant_type": "client_credentials", "scope": "api"},
            headers={**creds.basic, **headers},
        )
        response = await call(client, settings, ADMIN, issued.json()["access_token"], dpop=dpop)
        assert response.status_code == 403, response.text
        schemes.append(response.headers["www-authenticate"].split(" ", 1)[0])
    assert schemes == ["DPoP", "Bearer", "DPoP"]


async def test_a_revoked_dpop_bound_token_is_challenged_in_dpop(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    """The 401 the admin API makes itself (the database finds the token dead) names the
    scheme the token was sent with too; the same token as Bearer is refused in Bearer."""
    creds: ClientCreds = await make_client("ops", admin=True, grants=["client_credentials"])
    issued = await client.post(
        TOKEN_PATH,
        data={"grant_type": "client_credentials", "scope": "admin"},
        headers={**creds.basic, "DPoP": make_proof(settings)},
    )
    token = issued.json()["access_token"]
    assert (await call(client, settings, ADMIN, token, dpop=True)).status_code == 200
    revoked = await client.post("/oauth2/revoke", data={"token": token}, headers=creds.basic)
    assert revoked.status_code == 200, revoked.text
    response = await call(client, settings, ADMIN, token, dpop=True)
    assert response.status_code == 401, response.text
    assert error_of(response) == "invalid_token"
    assert response.headers.get_list("www-authenticate") == [
        f'DPoP realm="api", algs="{ALGS}", error="invalid_token", '
        'error_description="The access token is invalid, expired or revoked."'
    ]


def test_a_realm_without_dpop_challenges_in_bearer_whatever_the_request() -> None:
    """Registration's tokens are only ever bearer tokens: its challenges stay Bearer even in
    a request that sent DPoP; an explicit scheme still wins everywhere."""
    registration = Realm("registration", "oauth", invalid="The access token is not valid.")
    resource = Realm("userinfo", "oauth", invalid="The access token is not valid.", dpop=True)

    def in_a_dpop_request() -> list[str]:
        bearer._request_scheme.set(bearer.DPOP)
        refusals = [
            registration.insufficient_scope("no", "s"),
            registration.invalid_token(),
            resource.insufficient_scope("no", "s"),
            resource.invalid_token(),
            resource.insufficient_scope("no", "s", scheme=bearer.BEARER),
        ]
        return [r.response().headers["www-authenticate"].split(" ", 1)[0] for r in refusals]

    assert contextvars.copy_context().run(in_a_dpop_request) == [
        "Bearer",
        "Bearer",
        "DPoP",
        "DPoP",
        "Bearer",
    ]

    def outside_a_request() -> str:
        return resource.insufficient_scope("no").response().headers["www-authenticate"]

    # Where no token was read (a context of its own): Bearer, as before DPoP.
    assert contextvars.Context().run(outside_a_request).startswith("Bearer ")


@pytest.mark.feature("mfa-factor-management")
@pytest.mark.parametrize("dpop", [True, False], ids=["dpop", "bearer"])
async def test_insufficient_user_authentication_is_challenged_in_the_tokens_scheme(
    client: httpx.AsyncClient,
    settings: Settings,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    dpop: bool,
) -> None:
    """RFC 9470 §3's step-up challenge, in the API realm and the scheme the token came in
    (a DPoP-bound token: DPoP with its algs, RFC 9449 §7.1), as every other refusal of the
    realm: a DPoP client looks for a DPoP challenge."""
    creds = await make_client(scope="openid profile account", first_party=True)
    user = await make_user()
    async with state.db.sessions() as db:  # a factor, so a password-only token falls short
        db.add(WebAuthnCredential(user_id=user.id, credential_id="AAAA", public_key=b"k", name="K"))
        await db.commit()
    headers = {"DPoP": make_proof(settings)} if dpop else {}
    data = {"grant_type": "password", "username": user.username, "password": user.password}
    issued = await client.post(TOKEN_PATH, data=data, headers={**creds.basic, **headers})
    assert issued.status_code == 200, issued.text
    token = issued.json()["access_token"]
    path = "/api/v1/me/factors/totp/remove"
    if dpop:
        proof = make_proof(settings, method="POST", path=path, access_token=token)
        auth = {"Authorization": f"DPoP {token}", "DPoP": proof}
    else:
        auth = {"Authorization": f"Bearer {token}"}
    response = await client.post(path, headers=auth)
    assert response.status_code == 401, response.text
    assert error_of(response) == "insufficient_user_authentication"
    detail = "Sign in with a second factor to change your sign-in methods."
    scheme = f'DPoP realm="api", algs="{ALGS}"' if dpop else 'Bearer realm="api"'
    assert response.headers.get_list("www-authenticate") == [
        f'{scheme}, error="insufficient_user_authentication", '
        f'error_description="{detail}", acr_values="2 phr phrh"'
    ]
