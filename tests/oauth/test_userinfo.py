"""/userinfo (OpenID Connect Core §5.3) with bearer tokens (RFC 6750)."""

from __future__ import annotations

import httpx
import pytest

from server import manage
from server.deps import AppState
from tests.conftest import MakeClient, MakeUser, password_grant

pytestmark = pytest.mark.feature("userinfo")


async def token_for(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, scope: str
) -> str:
    creds = await make_client(scope="openid profile email api")
    user = await make_user(email="alice@example.com")
    response = await password_grant(client, creds, user, scope=scope)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(
    ("scope", "claims"),
    [
        # amr and acr: the password grant's sign-in (tests/oauth/test_mfa_claims.py).
        ("openid", {"sub", "amr", "acr"}),
        ("openid profile", {"sub", "preferred_username", "amr", "acr"}),
        ("openid email", {"sub", "email", "email_verified", "amr", "acr"}),
    ],
)
async def test_claims_follow_the_scopes(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    method: str,
    scope: str,
    claims: set[str],
) -> None:
    token = await token_for(client, make_client, make_user, scope)
    response = await client.request(
        method, "/userinfo", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert set(response.json()) == claims
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("header", "status", "error"),
    [
        (None, 401, None),
        ("Basic YTpi", 401, None),
        ("Bearer", 401, None),
        ("Bearer garbage", 401, "invalid_token"),
        ("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", 401, "invalid_token"),
    ],
    ids=["none", "basic", "empty-bearer", "garbage", "alg-none"],
)
async def test_missing_or_bad_tokens(
    client: httpx.AsyncClient, header: str | None, status: int, error: str | None
) -> None:
    response = await client.get("/userinfo", headers={"Authorization": header} if header else {})
    assert response.status_code == status
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    if error is None:
        assert "error=" not in challenge  # RFC 6750 §3.1: no error code without a token
    else:
        assert f'error="{error}"' in challenge
        assert response.json()["error"] == error


async def test_a_token_without_openid_is_insufficient_scope(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    # OpenID Connect Core §5.3: userinfo is for openid tokens; profile and email alone do not
    # open it (nor would any other scope), and the challenge names the scope needed.
    token = await token_for(client, make_client, make_user, "profile email api")
    response = await client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert 'scope="openid"' in response.headers["www-authenticate"]
    assert "alice@example.com" not in response.text


async def test_a_client_token_or_a_dead_sign_in_is_refused(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    svc = await make_client("svc", grants=["client_credentials"], scope="openid")
    machine = (
        await client.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers=svc.basic
        )
    ).json()["access_token"]
    response = await client.get("/userinfo", headers={"Authorization": f"Bearer {machine}"})
    assert response.status_code == 401  # no person behind a client_credentials token

    token = await token_for(client, make_client, make_user, "openid")
    async with state.db.sessions() as db:
        await manage.disable_user(db, "alice")
        await db.commit()
    response = await client.get("/userinfo", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
