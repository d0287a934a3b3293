"""DPoP (RFC 9449) where tokens are issued and used: the token endpoint binds access tokens
(``cnf.jkt``, ``token_type`` DPoP) and public clients' refresh tokens, introspection shows the
binding, and /userinfo (``bearer.py``, shared with the JSON APIs) wants the proof with the token.

The proofs are built with joserfc as a client would (``tests/test_dpop.py``'s helpers); the
checker itself is tested there, refusal by refusal.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc.jwk import ECKey, Key
from sqlalchemy import func, select, update

from server import manage
from server.bearer import Realm
from server.config import Settings
from server.deps import AppState
from server.models import Client, RefreshFamily, RefreshToken
from server.names import DPOP_ALGS
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    SharedApps,
    password_grant,
    refresh_grant,
    reset_app,
)
from tests.test_dpop import serialize

pytestmark = pytest.mark.feature("dpop-tokens")

KEY = ECKey.generate_key("P-256")
OTHER_KEY = ECKey.generate_key("P-256")
TOKEN_PATH = "/oauth2/token"


def make_proof(
    settings: Settings,
    *,
    key: Key = KEY,
    method: str = "POST",
    path: str = TOKEN_PATH,
    access_token: str | None = None,
    **claims: Any,
) -> str:
    """A proof for one request, signed with ``key`` (ES256), now."""
    body: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": settings.issuer + path,
        "iat": int(time.time()),
    }
    if access_token is not None:
        digest = hashlib.sha256(access_token.encode()).digest()
        body["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    body.update(claims)
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return serialize(header, json.dumps(body).encode(), key)


def payload(jwt: str) -> dict[str, Any]:
    """The claims of a JWT we issued (the signature is the server's business, tested elsewhere)."""
    part = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


async def client_credentials(
    http: httpx.AsyncClient, creds: ClientCreds, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(
        TOKEN_PATH,
        data={"grant_type": "client_credentials", "scope": "api"},
        headers={**creds.basic, **(headers or {})},
    )


async def public_password_grant(
    http: httpx.AsyncClient, client_id: str, username: str, password: str, proof: str | None
) -> httpx.Response:
    data = {
        "grant_type": "password",
        "client_id": client_id,
        "username": username,
        "password": password,
        "scope": "openid profile",
    }
    return await http.post(TOKEN_PATH, data=data, headers={"DPoP": proof} if proof else {})


async def public_refresh(
    http: httpx.AsyncClient, client_id: str, refresh_token: str, proof: str | None
) -> httpx.Response:
    data = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": refresh_token}
    return await http.post(TOKEN_PATH, data=data, headers={"DPoP": proof} if proof else {})


async def make_spa(make_client: MakeClient) -> None:
    """A public client (``none``): its refresh tokens are the ones RFC 9449 §5 binds."""
    await make_client(
        "spa", public=True, grants=["password", "refresh_token"], scope="openid profile"
    )


async def count_rows(state: AppState) -> tuple[int, int]:
    async with state.db.sessions() as db:
        families = await db.scalar(select(func.count()).select_from(RefreshFamily))
        tokens = await db.scalar(select(func.count()).select_from(RefreshToken))
    return int(families or 0), int(tokens or 0)


# -- the token endpoint ----------------------------------------------------------------------


async def test_client_credentials_with_a_proof_gets_a_bound_token(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"])
    response = await client_credentials(client, creds, {"DPoP": make_proof(settings)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    assert payload(body["access_token"])["cnf"] == {"jkt": KEY.thumbprint()}
    # Without a proof, the same client gets an ordinary bearer token.
    plain = (await client_credentials(client, creds)).json()
    assert plain["token_type"] == "Bearer"
    assert "cnf" not in payload(plain["access_token"])


async def test_password_grant_with_a_proof_gets_a_bound_token(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    response = await client.post(
        TOKEN_PATH,
        data={"grant_type": "password", "username": user.username, "password": user.password},
        headers={**creds.basic, "DPoP": make_proof(settings, key=OTHER_KEY)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    assert payload(body["access_token"])["cnf"] == {"jkt": OTHER_KEY.thumbprint()}


@pytest.mark.parametrize(
    "proof",
    [
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param("wrong-htm", id="htm"),
        pytest.param("wrong-htu", id="htu-from-host-header"),
        pytest.param("stale", id="old-iat"),
    ],
)
async def test_a_bad_proof_is_invalid_dpop_proof_and_nothing_is_issued(
    client: httpx.AsyncClient,
    settings: Settings,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    proof: str,
) -> None:
    creds = await make_client()
    user = await make_user()
    value = {
        "not-a-jwt": "not-a-jwt",
        "wrong-htm": make_proof(settings, method="GET"),
        # The URI the test client addressed (its Host header), not the issuer's.
        "wrong-htu": make_proof(settings, htu="http://testserver" + TOKEN_PATH),
        "stale": make_proof(settings, iat=int(time.time()) - 3600),
    }[proof]
    response = await client.post(
        TOKEN_PATH,
        data={"grant_type": "password", "username": user.username, "password": user.password},
        headers={**creds.basic, "DPoP": value},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_dpop_proof"
    assert "access_token" not in response.json()
    assert response.headers["cache-control"] == "no-store"
    assert await count_rows(state) == (0, 0)


async def test_two_dpop_headers_are_refused(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"])
    response = await client.post(
        TOKEN_PATH,
        data={"grant_type": "client_credentials"},
        headers=[
            *creds.basic.items(),
            ("DPoP", make_proof(settings)),
            ("DPoP", make_proof(settings)),
        ],
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_dpop_proof"


async def test_a_replayed_proof_is_refused_at_the_token_endpoint(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"])
    proof = make_proof(settings)
    assert (await client_credentials(client, creds, {"DPoP": proof})).status_code == 200
    again = await client_credentials(client, creds, {"DPoP": proof})
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_dpop_proof"


async def test_a_dpop_bound_client_gets_nothing_without_a_proof(
    client: httpx.AsyncClient,
    settings: Settings,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
) -> None:
    creds = await make_client()
    user = await make_user()
    async with state.db.sessions() as db:
        await db.execute(update(Client).where(Client.client_id == "app").values(dpop_bound=True))
        await db.commit()
    state.clients.invalidate()
    refused = await password_grant(client, creds, user)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "invalid_dpop_proof"
    assert "DPoP-bound" in refused.json()["error_description"]
    assert await count_rows(state) == (0, 0)
    with_proof = await client.post(
        TOKEN_PATH,
        data={"grant_type": "password", "username": user.username, "password": user.password},
        headers={**creds.basic, "DPoP": make_proof(settings)},
    )
    assert with_proof.status_code == 200, with_proof.text
    assert with_proof.json()["token_type"] == "DPoP"
    # Its refresh token is not bound (a confidential client), but refreshing still needs a
    # proof: every token this client gets is bound.
    refresh = with_proof.json()["refresh_token"]
    assert (await refresh_grant(client, creds, refresh)).json()["error"] == "invalid_dpop_proof"
    rotated = await client.post(
        TOKEN_PATH,
        data={"grant_type": "refresh_token", "refresh_token": refresh},
        headers={**creds.basic, "DPoP": make_proof(settings, key=OTHER_KEY)},
    )
    assert rotated.status_code == 200, rotated.text
    assert payload(rotated.json()["access_token"])["cnf"] == {"jkt": OTHER_KEY.thumbprint()}


# -- refresh tokens (RFC 9449 §5) ------------------------------------------------------------


async def test_a_public_clients_refresh_token_is_bound_to_the_key(
    client: httpx.AsyncClient,
    settings: Settings,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
) -> None:
    await make_client(
        "spa", public=True, grants=["password", "refresh_token"], scope="openid profile"
    )
    user = await make_user()
    first = await public_password_grant(
        client, "spa", user.username, user.password, make_proof(settings)
    )
    assert first.status_code == 200, first.text
    refresh = first.json()["refresh_token"]
    async with state.db.sessions() as db:
        family = (await db.scalars(select(RefreshFamily))).one()
    assert family.dpop_jkt == KEY.thumbprint()

    # Another key, or no proof at all: invalid_grant, and nothing changes.
    for proof in (make_proof(settings, key=OTHER_KEY), None):
        refused = await public_refresh(client, "spa", refresh, proof)
        assert refused.status_code == 400, refused.text
        assert refused.json() == {
            "error": "invalid_grant",
            "error_description": "The refresh token is bound to another key.",
        }
    async with state.db.sessions() as db:
        family = (await db.scalars(select(RefreshFamily))).one()
        tokens = list(await db.scalars(select(RefreshToken)))
    assert family.revoked_at is None
    assert [t.rotated_at for t in tokens] == [None]

    # The right key still works: the family is alive, and stays bound.
    second = await public_refresh(client, "spa", refresh, make_proof(settings))
    assert second.status_code == 200, second.text
    assert second.json()["token_type"] == "DPoP"
    assert payload(second.json()["access_token"])["cnf"] == {"jkt": KEY.thumbprint()}
    stolen = await public_refresh(
        client, "spa", second.json()["refresh_token"], make_proof(settings, key=OTHER_KEY)
    )
    assert stolen.json()["error"] == "invalid_grant"


async def test_a_bound_rotated_token_with_another_key_ends_nothing(
    client: httpx.AsyncClient,
    settings: Settings,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
) -> None:
    """Reuse of a rotated token revokes its family, but not when the presenter lacks the key:
    the token is worthless to a thief, who must not be able to end the sign-in with it."""
    await make_client(
        "spa", public=True, grants=["password", "refresh_token"], scope="openid profile"
    )
    user = await make_user()
    first = await public_password_grant(
        client, "spa", user.username, user.password, make_proof(settings)
    )
    old = first.json()["refresh_token"]
    second = await public_refresh(client, "spa", old, make_proof(settings))
    assert second.status_code == 200
    replay = await public_refresh(client, "spa", old, make_proof(settings, key=OTHER_KEY))
    assert replay.json()["error_description"] == "The refresh token is bound to another key."
    async with state.db.sessions() as db:
        assert (await db.scalars(select(RefreshFamily))).one().revoked_at is None
    third = await public_refresh(
        client, "spa", second.json()["refresh_token"], make_proof(settings)
    )
    assert third.status_code == 200, third.text


async def test_a_public_client_without_a_proof_gets_an_unbound_family(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    await make_client(
        "spa", public=True, grants=["password", "refresh_token"], scope="openid profile"
    )
    user = await make_user()
    first = await public_password_grant(client, "spa", user.username, user.password, None)
    assert first.json()["token_type"] == "Bearer"
    async with state.db.sessions() as db:
        assert (await db.scalars(select(RefreshFamily))).one().dpop_jkt is None
    second = await public_refresh(client, "spa", first.json()["refresh_token"], None)
    assert second.status_code == 200, second.text


async def test_a_confidential_clients_refresh_token_is_not_bound(
    client: httpx.AsyncClient,
    settings: Settings,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
) -> None:
    creds = await make_client()
    user = await make_user()
    first = await client.post(
        TOKEN_PATH,
        data={"grant_type": "password", "username": user.username, "password": user.password},
        headers={**creds.basic, "DPoP": make_proof(settings)},
    )
    assert first.json()["token_type"] == "DPoP"
    async with state.db.sessions() as db:
        assert (await db.scalars(select(RefreshFamily))).one().dpop_jkt is None
    # It authenticates when it refreshes: no proof needed, and a plain token comes back.
    second = await refresh_grant(client, creds, first.json()["refresh_token"])
    assert second.status_code == 200, second.text
    assert second.json()["token_type"] == "Bearer"


# -- introspection (RFC 9449 §6.2) ------------------------------------------------------------


async def test_introspection_shows_the_binding(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient
) -> None:
    svc = await make_client("svc", grants=["client_credentials"])
    rs = await make_client("rs", grants=["client_credentials"], resource_server=True)
    bound = (await client_credentials(client, svc, {"DPoP": make_proof(settings)})).json()
    plain = (await client_credentials(client, svc)).json()
    seen = await client.post(
        "/oauth2/introspect", data={"token": bound["access_token"]}, headers=rs.basic
    )
    assert seen.status_code == 200, seen.text
    assert seen.json()["active"] is True
    assert seen.json()["token_type"] == "DPoP"
    assert seen.json()["cnf"] == {"jkt": KEY.thumbprint()}
    unbound = await client.post(
        "/oauth2/introspect", data={"token": plain["access_token"]}, headers=rs.basic
    )
    assert unbound.json()["token_type"] == "Bearer"
    assert "cnf" not in unbound.json()


# -- /userinfo (bearer.py, RFC 9449 §7) ------------------------------------------------------


async def bound_user_token(
    http: httpx.AsyncClient, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> str:
    creds = await make_client(scope="openid profile")
    user = await make_user()
    response = await http.post(
        TOKEN_PATH,
        data={
            "grant_type": "password",
            "username": user.username,
            "password": user.password,
            "scope": "openid profile",
        },
        headers={**creds.basic, "DPoP": make_proof(settings)},
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def test_userinfo_accepts_a_bound_token_with_its_proof(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    token = await bound_user_token(client, settings, make_client, make_user)
    proof = make_proof(settings, method="GET", path="/userinfo", access_token=token)
    response = await client.get(
        "/userinfo", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert response.status_code == 200, response.text
    assert response.json()["preferred_username"] == "alice"

    # The same proof again: a replay.
    replayed = await client.get(
        "/userinfo", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert replayed.status_code == 401
    assert replayed.json()["error"] == "invalid_dpop_proof"
    challenge = replayed.headers["www-authenticate"]
    assert challenge.startswith("DPoP ")
    assert 'error="invalid_dpop_proof"' in challenge
    assert f'algs="{" ".join(DPOP_ALGS)}"' in challenge


@pytest.mark.parametrize(
    "case", ["as-bearer", "no-proof", "wrong-ath", "other-key", "wrong-method", "wrong-path"]
)
async def test_userinfo_refuses_a_bound_token_without_its_proof(
    client: httpx.AsyncClient,
    settings: Settings,
    make_client: MakeClient,
    make_user: MakeUser,
    case: str,
) -> None:
    token = await bound_user_token(client, settings, make_client, make_user)
    good = {"method": "GET", "path": "/userinfo", "access_token": token}
    headers = {
        "as-bearer": {
            "Authorization": f"Bearer {token}",
            "DPoP": make_proof(settings, **good),  # type: ignore[arg-type]
        },
        "no-proof": {"Authorization": f"DPoP {token}"},
        "wrong-ath": {
            "Authorization": f"DPoP {token}",
            "DPoP": make_proof(settings, method="GET", path="/userinfo", access_token="other"),
        },
        "other-key": {
            "Authorization": f"DPoP {token}",
            "DPoP": make_proof(settings, key=OTHER_KEY, **good),  # type: ignore[arg-type]
        },
        "wrong-method": {
            "Authorization": f"DPoP {token}",
            "DPoP": make_proof(settings, method="POST", path="/userinfo", access_token=token),
        },
        "wrong-path": {
            "Authorization": f"DPoP {token}",
            "DPoP": make_proof(settings, method="GET", path="/api/v1/me", access_token=token),
        },
    }[case]
    response = await client.get("/userinfo", headers=headers)
    assert response.status_code == 401, response.text
    expected = {
        "as-bearer": "invalid_token",
        "no-proof": "invalid_token",
        "other-key": "invalid_token",
        "wrong-ath": "invalid_dpop_proof",
        "wrong-method": "invalid_dpop_proof",
        "wrong-path": "invalid_dpop_proof",
    }[case]
    assert response.json()["error"] == expected
    # Every refusal names the scheme this token needs (RFC 9449 §7.1), with its algorithms.
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("DPoP ") and 'algs="' in challenge


async def test_an_unbound_token_sent_as_dpop_is_refused(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="openid profile")
    user = await make_user()
    token = (await password_grant(client, creds, user, scope="openid")).json()["access_token"]
    proof = make_proof(settings, method="GET", path="/userinfo", access_token=token)
    response = await client.get(
        "/userinfo", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    # Challenged in the scheme this token needs.
    assert response.headers["www-authenticate"].startswith("Bearer ")
    # As Bearer it is what it always was.
    ok = await client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200, ok.text


async def test_a_request_without_credentials_is_challenged_with_both_schemes(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/userinfo")
    assert response.status_code == 401
    challenges = response.headers.get_list("www-authenticate")
    assert challenges == [
        'Bearer realm="userinfo"',
        f'DPoP realm="userinfo", algs="{" ".join(DPOP_ALGS)}"',
    ]


async def test_the_account_api_takes_dpop_too(
    client: httpx.AsyncClient, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    """/api/v1 goes through the same module: a bound token works with its proof only."""
    creds = await make_client(scope="account", first_party=True)
    user = await make_user()
    response = await client.post(
        TOKEN_PATH,
        data={
            "grant_type": "password",
            "username": user.username,
            "password": user.password,
            "scope": "account",
        },
        headers={**creds.basic, "DPoP": make_proof(settings)},
    )
    token = response.json()["access_token"]
    proof = make_proof(settings, method="GET", path="/api/v1/me", access_token=token)
    me = await client.get("/api/v1/me", headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert me.status_code == 200, me.text
    as_bearer = await client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert as_bearer.status_code == 401
    assert as_bearer.json()["error_code"] == "invalid_token"


# -- nonces (RFC 9449 §8) ----------------------------------------------------------------------


async def test_nonce_required_then_accepted(settings: Settings, shared_apps: SharedApps) -> None:
    nonce_settings = settings.model_copy(update={"dpop_require_nonce": True})
    app: FastAPI = await shared_apps.get(nonce_settings)
    await reset_app(app)
    state: AppState = app.state.auth
    async with state.db.sessions() as db:
        created = await manage.create_client(
            db, client_id="svc", grants=["client_credentials"], scope="api"
        )
        await db.commit()
    creds = ClientCreds("svc", created.secret)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        first = await client_credentials(http, creds, {"DPoP": make_proof(nonce_settings)})
        assert first.status_code == 400, first.text
        assert first.json()["error"] == "use_dpop_nonce"
        nonce = first.headers["dpop-nonce"]
        second = await client_credentials(
            http, creds, {"DPoP": make_proof(nonce_settings, nonce=nonce)}
        )
        assert second.status_code == 200, second.text
        assert second.json()["token_type"] == "DPoP"
        assert second.headers["dpop-nonce"]  # the next one to use (§8.2)
        wrong = await client_credentials(
            http, creds, {"DPoP": make_proof(nonce_settings, nonce="made-up")}
        )
        assert wrong.json()["error"] == "use_dpop_nonce"


async def test_a_resource_asks_for_the_nonce_too(
    settings: Settings, shared_apps: SharedApps
) -> None:
    """RFC 9449 §9: /admin/v1 (bearer.py) answers 401 use_dpop_nonce with the nonce."""
    nonce_settings = settings.model_copy(update={"dpop_require_nonce": True})
    app: FastAPI = await shared_apps.get(nonce_settings)
    await reset_app(app)
    state: AppState = app.state.auth
    async with state.db.sessions() as db:
        created = await manage.create_client(
            db, client_id="ops", admin=True, grants=["client_credentials"]
        )
        await db.commit()
    creds = ClientCreds("ops", created.secret)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        nonce = app.state.oauth.dpop.current_nonce()
        issued = await http.post(
            TOKEN_PATH,
            data={"grant_type": "client_credentials", "scope": "admin"},
            headers={**creds.basic, "DPoP": make_proof(nonce_settings, nonce=nonce)},
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
        good = {"method": "GET", "path": "/admin/v1/keys", "access_token": token}
        without = await http.get(
            "/admin/v1/keys",
            headers={"Authorization": f"DPoP {token}", "DPoP": make_proof(nonce_settings, **good)},
        )
        assert without.status_code == 401, without.text
        assert without.json()["error_code"] == "use_dpop_nonce"
        assert 'error="use_dpop_nonce"' in without.headers["www-authenticate"]
        fresh = without.headers["dpop-nonce"]
        proof = make_proof(nonce_settings, nonce=fresh, **good)
        listed = await http.get(
            "/admin/v1/keys", headers={"Authorization": f"DPoP {token}", "DPoP": proof}
        )
        assert listed.status_code == 200, listed.text


async def test_discovery_names_the_proof_algorithms(client: httpx.AsyncClient) -> None:
    document = (await client.get("/.well-known/openid-configuration")).json()
    assert document["dpop_signing_alg_values_supported"] == list(DPOP_ALGS)
    assert "none" not in document["dpop_signing_alg_values_supported"]


def test_bearer_only_realms_challenge_with_bearer_alone() -> None:
    """Registration's tokens (RFC 7591 §3) are only ever bearer tokens: no DPoP challenge."""
    realm = Realm("registration", "oauth", invalid="The access token is not valid.")
    assert realm.missing_token().response().headers.getlist("www-authenticate") == [
        'Bearer realm="registration"'
    ]
    dpop = Realm("userinfo", "oauth", invalid="The access token is not valid.", dpop=True)
    assert len(dpop.missing_token().response().headers.getlist("www-authenticate")) == 2
