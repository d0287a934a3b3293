"""The password grant (RFC 6749 §4.3) and the RFC 9068 access tokens it issues."""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select

from server.deps import AppState
from server.models import Client, RefreshFamily, RefreshToken, User, sha256_hex
from tests.conftest import MakeClient, MakeUser, UserCreds, password_grant

pytestmark = pytest.mark.feature("grant-password")


def decode(state: AppState, token: str) -> tuple[dict[str, object], dict[str, object]]:
    header = jwt.get_unverified_header(token)
    key = state.keys.keyset().public[header["kid"]]
    claims = jwt.decode(
        token,
        key=jwt.PyJWK(key.as_dict()).key,
        algorithms=["RS256"],
        audience=state.settings.audience,
        issuer=state.settings.issuer,
    )
    return header, claims


@pytest.mark.feature("access-token-jwt", "refresh-rotation", "sqlite-backend", "postgres-backend")
async def test_issues_rfc9068_access_token_and_refresh_token(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    before = int(time.time())
    response = await password_grant(client, creds, user, scope="profile api")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 900
    assert body["scope"] == "profile api"
    assert len(body["refresh_token"]) >= 43  # 256 bits, base64url
    header, claims = decode(state, body["access_token"])
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"
    assert header["kid"] == state.keys.keyset().kid
    assert claims["sub"] == user.id
    assert claims["client_id"] == "app"
    assert claims["scope"] == "profile api"
    assert claims["iss"] == "http://127.0.0.1:8000"
    assert claims["aud"] == "http://127.0.0.1:8000"
    assert before <= claims["iat"] <= before + 5  # type: ignore[operator]
    assert claims["exp"] == claims["iat"] + 900  # type: ignore[operator]
    assert claims["auth_time"] == claims["iat"]
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    async with state.db.sessions() as db:
        family = (await db.scalars(select(RefreshFamily))).one()
        stored = (await db.scalars(select(RefreshToken))).one()
    assert claims["sid"] == family.id
    assert family.scope == "profile api"
    assert family.expires_at == claims["iat"] + 30 * 86400  # type: ignore[operator]
    # Only the hash is stored.
    assert stored.token_hash == sha256_hex(body["refresh_token"])
    assert body["refresh_token"] not in json.dumps(stored.__dict__, default=str)


async def test_default_scope_is_everything_the_client_may_ask(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="profile email")
    response = await password_grant(client, creds, await make_user())
    assert response.json()["scope"] == "profile email"


async def test_no_refresh_token_without_refresh_grant(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(grants=["password"])
    response = await password_grant(client, creds, await make_user())
    assert response.status_code == 200
    assert "refresh_token" not in response.json()
    _, claims = decode(state, response.json()["access_token"])
    assert "auth_time" in claims
    # Still a sign-in of its own (so signing out or disabling the user ends the token),
    # living only as long as its access token.
    async with state.db.sessions() as db:
        family = await db.get(RefreshFamily, claims["sid"])
        assert family is not None
        assert family.expires_at - family.created_at == state.settings.access_token_ttl
        assert await db.scalar(select(func.count()).select_from(RefreshToken)) == 0


@pytest.mark.feature("client-auth-none")
async def test_public_client_without_secret(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await make_client("mobile", public=True)
    user = await make_user()
    response = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "password",
            "client_id": "mobile",
            "username": user.username,
            "password": user.password,
        },
    )
    assert response.status_code == 200, response.text
    assert "refresh_token" in response.json()


@pytest.mark.feature("password-uniform-error")
async def test_wrong_password_unknown_user_and_disabled_user_look_the_same(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    await make_user("bob", "another good password")
    async with state.db.sessions() as db:
        bob = (await db.scalars(select(User).where(User.username == "bob"))).one()
        bob.disabled = True
        await db.commit()
    attempts = [
        UserCreds(user.id, user.username, "wrong password"),
        UserCreds("x", "nobody", "whatever password"),
        UserCreds("x", "bob", "another good password"),
    ]
    responses = [await password_grant(client, creds, attempt) for attempt in attempts]
    for response in responses:
        assert response.status_code == 400
        assert response.json() == {
            "error": "invalid_grant",
            "error_description": "Invalid username or password.",
        }
        assert response.headers["cache-control"] == "no-store"
    assert len({r.content for r in responses}) == 1


async def test_username_matches_case_and_width_insensitively(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user("Alice")
    for variant in ("alice", "ALICE", "ＡＬＩＣＥ"):
        response = await password_grant(client, creds, UserCreds(user.id, variant, user.password))
        assert response.status_code == 200, variant


async def test_overlong_password_is_refused_without_error(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    long = UserCreds(user.id, user.username, "x" * 5000)
    response = await password_grant(client, creds, long)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.feature("password-hashing")
async def test_sign_in_rehashes_when_parameters_change(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    # A hash made with weaker (older) parameters than the configured ones.
    weak = PasswordHasher(memory_cost=512, time_cost=1, parallelism=1).hash(user.password)
    async with state.db.sessions() as db:
        stored = await db.get(User, user.id)
        assert stored is not None
        stored.password_hash = weak
        await db.commit()
    response = await password_grant(client, creds, user)
    assert response.status_code == 200
    async with state.db.sessions() as db:
        stored = await db.get(User, user.id)
        assert stored is not None
        assert stored.password_hash != weak
        assert "m=1024,t=1,p=1" in stored.password_hash


@pytest.mark.feature("refresh-scope-narrowing")
async def test_scope_outside_client_registration_is_invalid_scope(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="profile")
    response = await password_grant(client, creds, await make_user(), scope="profile admin")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


async def test_admin_scope_only_for_admin_clients(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client(scope="profile")
    # Even if the column were edited by hand, a non-admin client never gets "admin".
    async with state.db.sessions() as db:
        row = await db.get(Client, "app")
        assert row is not None
        row.scope = "profile admin"
        await db.commit()
    response = await password_grant(client, creds, await make_user(), scope="admin")
    assert response.json()["error"] == "invalid_scope"


async def test_missing_username_or_password_is_invalid_request(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    for data in ({"username": "alice"}, {"password": "secret value"}):
        response = await client.post(
            "/oauth2/token", data={"grant_type": "password", **data}, headers=creds.basic
        )
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"


async def test_client_not_allowed_the_grant_is_unauthorized_client(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client(grants=["client_credentials"])
    response = await password_grant(client, creds, await make_user())
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    async with state.db.sessions() as db:
        assert await db.scalar(select(func.count()).select_from(RefreshFamily)) == 0
