"""POST /oauth2/revoke (RFC 7009), checked through introspection and the token endpoint."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from server import manage
from server.deps import AppState
from server.models import RefreshFamily, RevokedAccessToken
from tests.conftest import ClientCreds, MakeClient, MakeUser, password_grant, refresh_grant

pytestmark = pytest.mark.feature("revocation")
NO_STORE = "no-store"


async def revoke(
    http: httpx.AsyncClient, creds: ClientCreds, token: str, **extra: str
) -> httpx.Response:
    return await http.post("/oauth2/revoke", data={"token": token, **extra}, headers=creds.basic)


async def introspect(http: httpx.AsyncClient, creds: ClientCreds, token: str) -> dict[str, Any]:
    response = await http.post("/oauth2/introspect", data={"token": token}, headers=creds.basic)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


async def sign_in(
    http: httpx.AsyncClient, creds: ClientCreds, make_user: MakeUser, username: str = "alice"
) -> dict[str, Any]:
    response = await password_grant(http, creds, await make_user(username))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.feature("introspection")
async def test_revoking_a_refresh_token_kills_its_family_and_its_access_tokens(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    first = await sign_in(client, creds, make_user)
    second = (await refresh_grant(client, creds, first["refresh_token"])).json()
    assert (await introspect(client, creds, first["access_token"]))["active"] is True
    assert (await introspect(client, creds, second["access_token"]))["active"] is True

    response = await revoke(client, creds, second["refresh_token"])

    assert response.status_code == 200
    assert response.json() == {}
    assert NO_STORE in response.headers["cache-control"]
    # Every access token of the sign-in, before and after the rotation, is now inactive.
    for token in (first["access_token"], second["access_token"], second["refresh_token"]):
        assert await introspect(client, creds, token) == {"active": False}
    refused = await refresh_grant(client, creds, second["refresh_token"])
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
    async with state.db.sessions() as db:
        family = (await db.scalars(select(RefreshFamily))).one()
    assert (family.revoked_reason, family.revoked_at is not None) == ("revoked", True)


@pytest.mark.feature("introspection")
async def test_revoking_an_access_token_deny_lists_its_jti_and_leaves_the_family_alone(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    tokens = await sign_in(client, creds, make_user)

    response = await revoke(client, creds, tokens["access_token"], token_type_hint="access_token")

    assert (response.status_code, response.json()) == (200, {})
    assert await introspect(client, creds, tokens["access_token"]) == {"active": False}
    async with state.db.sessions() as db:
        row = (await db.scalars(select(RevokedAccessToken))).one()
    claims = jwt_claims(tokens["access_token"])
    assert (row.jti, row.client_id, row.expires_at) == (claims["jti"], "app", claims["exp"])
    # RFC 7009 §2.1 lets revoking an access token leave the refresh token alive; we do.
    refreshed = await refresh_grant(client, creds, tokens["refresh_token"])
    assert refreshed.status_code == 200
    assert (await introspect(client, creds, refreshed.json()["access_token"]))["active"] is True


async def test_the_hint_is_only_a_hint(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    tokens = await sign_in(client, creds, make_user)
    # Wrong hints on both tokens: each is still found and revoked (RFC 7009 §2.1).
    assert (
        await revoke(client, creds, tokens["access_token"], token_type_hint="refresh_token")
    ).status_code == 200
    assert (
        await revoke(client, creds, tokens["refresh_token"], token_type_hint="access_token")
    ).status_code == 200
    assert await introspect(client, creds, tokens["access_token"]) == {"active": False}
    refused = await refresh_grant(client, creds, tokens["refresh_token"])
    assert refused.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "token",
    [
        "unknown-opaque-token",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.e30.",
        "x" * 10_000,
    ],
    ids=["unknown", "three-dots-garbage", "alg-none", "huge"],
)
async def test_unknown_tokens_answer_200(
    client: httpx.AsyncClient, make_client: MakeClient, token: str
) -> None:
    # RFC 7009 §2.2: "invalid tokens do not cause an error response".
    creds = await make_client()
    response = await revoke(client, creds, token)
    assert (response.status_code, response.json()) == (200, {})


async def test_revoking_twice_and_concurrently_is_idempotent(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    tokens = await sign_in(client, creds, make_user)
    results = await asyncio.gather(
        *(revoke(client, creds, tokens["access_token"]) for _ in range(8)),
        *(revoke(client, creds, tokens["refresh_token"]) for _ in range(8)),
    )
    assert [r.status_code for r in results] == [200] * 16
    again = await revoke(client, creds, tokens["refresh_token"])
    assert (again.status_code, again.json()) == (200, {})
    async with state.db.sessions() as db:
        assert await db.scalar(select(func.count()).select_from(RevokedAccessToken)) == 1


async def test_a_token_of_another_client_is_refused_and_its_owner_keeps_it(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    owner = await make_client("owner")
    other = await make_client("other")
    tokens = await sign_in(client, owner, make_user)

    for token in (tokens["access_token"], tokens["refresh_token"]):
        response = await revoke(client, other, token)
        # RFC 7009 §2.1 (refused, client informed); RFC 6749 §5.2: issued to another client.
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
        assert NO_STORE in response.headers["cache-control"]

    assert (await introspect(client, owner, tokens["access_token"]))["active"] is True
    assert (await refresh_grant(client, owner, tokens["refresh_token"])).status_code == 200


async def test_a_public_client_revokes_with_its_client_id(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await make_client("spa", public=True)
    await make_user()
    response = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "password",
            "client_id": "spa",
            "username": "alice",
            "password": "correct horse battery",
        },
    )
    assert response.status_code == 200, response.text
    tokens = response.json()

    revoked = await client.post(
        "/oauth2/revoke", data={"client_id": "spa", "token": tokens["refresh_token"]}
    )

    assert (revoked.status_code, revoked.json()) == (200, {})
    refused = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "spa",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refused.json()["error"] == "invalid_grant"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("body", "auth", "status", "error"),
    [
        ("", True, 400, "invalid_request"),
        ("token=", True, 400, "invalid_request"),
        ("token=t&token_type_hint=id_token", True, 400, "unsupported_token_type"),
        ("token=t", False, 401, "invalid_client"),
        ("token=t&client_id=app&client_secret=wrong", False, 401, "invalid_client"),
        ("token=t&token=u", True, 400, "invalid_request"),
    ],
    ids=["no-token", "empty-token", "unknown-hint", "no-client", "bad-secret", "duplicate"],
)
async def test_bad_requests(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    body: str,
    auth: bool,
    status: int,
    error: str,
) -> None:
    creds = await make_client()
    response = await client.post(
        "/oauth2/revoke",
        content=body.encode(),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **(creds.basic if auth else {}),
        },
    )
    assert response.status_code == status
    assert response.json()["error"] == error
    assert NO_STORE in response.headers["cache-control"]
    if status == 401:
        assert "www-authenticate" in response.headers


async def test_revocation_is_an_audit_event_without_the_token(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creds = await make_client()
    tokens = await sign_in(client, creds, make_user)
    await revoke(client, creds, tokens["refresh_token"])
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    revoked = [e for e in events if e["event"] == "token.revoked"]
    assert len(revoked) == 1
    assert (revoked[0]["token_type"], revoked[0]["client_id"]) == ("refresh_token", "app")
    assert revoked[0]["family_id"]
    assert tokens["refresh_token"] not in out


@pytest.mark.feature("introspection", "token-cleanup")
async def test_prune_on_a_fast_clock_keeps_the_revocation_of_a_live_token(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await make_client()
    tokens = await sign_in(client, creds, make_user)
    access = tokens["access_token"]
    assert (await revoke(client, creds, access)).status_code == 200
    assert await introspect(client, creds, access) == {"active": False}
    expires_at = jwt_claims(access)["exp"]
    # The pruning host's clock runs 10 minutes ahead of the server's: to it, the token
    # expired 63 s ago, while to the server it still has 537 s to live.
    fast = expires_at - 537 + 600

    async with state.db.sessions() as db:
        await manage.prune_tokens(db, access_token_ttl=state.settings.access_token_ttl, now=fast)
        await db.commit()

    async with state.db.sessions() as db:
        jtis = list(await db.scalars(select(RevokedAccessToken.jti)))
    assert jtis == [jwt_claims(access)["jti"]]
    assert await introspect(client, creds, access) == {"active": False}
