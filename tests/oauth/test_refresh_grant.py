"""The refresh grant: rotation, reuse detection, races, lifetimes and scope (RFC 6749 §6)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from server import manage
from server.deps import AppState
from server.models import RefreshFamily, RefreshToken, sha256_hex
from tests.conftest import ClientCreds, MakeClient, MakeUser, password_grant, refresh_grant

pytestmark = pytest.mark.feature("grant-refresh")


async def sign_in(
    http: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, **kwargs: Any
) -> tuple[ClientCreds, dict[str, Any]]:
    creds = await make_client(**kwargs)
    response = await password_grant(http, creds, await make_user())
    assert response.status_code == 200, response.text
    return creds, response.json()


async def family_of(state: AppState, refresh_token: str) -> RefreshFamily:
    async with state.db.sessions() as db:
        token = (
            await db.scalars(
                select(RefreshToken).where(RefreshToken.token_hash == sha256_hex(refresh_token))
            )
        ).one()
        family = await db.get(RefreshFamily, token.family_id)
        assert family is not None
        return family


@pytest.mark.feature("refresh-rotation")
async def test_every_refresh_rotates(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    second = await refresh_grant(client, creds, first["refresh_token"])
    assert second.status_code == 200, second.text
    assert second.headers["cache-control"] == "no-store"
    body = second.json()
    assert body["refresh_token"] != first["refresh_token"]
    assert body["access_token"] != first["access_token"]
    third = await refresh_grant(client, creds, body["refresh_token"])
    assert third.status_code == 200
    async with state.db.sessions() as db:
        tokens = list(await db.scalars(select(RefreshToken).order_by(RefreshToken.created_at)))
        families = list(await db.scalars(select(RefreshFamily)))
    assert len(families) == 1
    assert len(tokens) == 3
    assert sum(t.rotated_at is None for t in tokens) == 1


@pytest.mark.feature("refresh-reuse-detection")
async def test_reusing_a_rotated_token_revokes_the_whole_family(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    second = (await refresh_grant(client, creds, first["refresh_token"])).json()
    replay = await refresh_grant(client, creds, first["refresh_token"])
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    family = await family_of(state, first["refresh_token"])
    assert family.revoked_at is not None
    assert family.revoked_reason == "reuse"
    # The legitimate holder's newest token died with the family.
    latest = await refresh_grant(client, creds, second["refresh_token"])
    assert latest.status_code == 400
    assert latest.json()["error"] == "invalid_grant"


@pytest.mark.feature("refresh-reuse-detection")
async def test_other_sign_ins_survive_a_reuse(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    one = (await password_grant(client, creds, user)).json()
    two = (await password_grant(client, creds, user)).json()
    await refresh_grant(client, creds, one["refresh_token"])
    await refresh_grant(client, creds, one["refresh_token"])  # reuse kills family one
    assert (await refresh_grant(client, creds, two["refresh_token"])).status_code == 200


@pytest.mark.feature("refresh-concurrency")
async def test_twenty_simultaneous_refreshes_have_exactly_one_winner(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    responses = await asyncio.gather(
        *(refresh_grant(client, creds, first["refresh_token"]) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * 19, [r.text for r in responses]
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
    family = await family_of(state, first["refresh_token"])
    assert family.revoked_at is not None
    async with state.db.sessions() as db:
        tokens = list(await db.scalars(select(RefreshToken)))
    # The original and the one the winner got; never two live tokens from one parent.
    assert len(tokens) == 2
    winner = next(r for r in responses if r.status_code == 200).json()
    assert (await refresh_grant(client, creds, winner["refresh_token"])).status_code == 400


@pytest.mark.feature("refresh-ttl-cap")
async def test_new_token_never_outlives_the_family_cap(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    family = await family_of(state, first["refresh_token"])
    cap = int(time.time()) + 120
    async with state.db.sessions() as db:
        await db.execute(
            update(RefreshFamily).where(RefreshFamily.id == family.id).values(expires_at=cap)
        )
        await db.commit()
    second = (await refresh_grant(client, creds, first["refresh_token"])).json()
    async with state.db.sessions() as db:
        token = (
            await db.scalars(
                select(RefreshToken).where(
                    RefreshToken.token_hash == sha256_hex(second["refresh_token"])
                )
            )
        ).one()
    assert token.expires_at == cap


@pytest.mark.feature("refresh-ttl-cap")
async def test_token_lifetime_is_the_refresh_ttl(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    await sign_in(client, make_client, make_user)
    async with state.db.sessions() as db:
        token = (await db.scalars(select(RefreshToken))).one()
    assert token.expires_at - token.created_at == 7 * 86400


@pytest.mark.feature("refresh-ttl-cap")
@pytest.mark.parametrize("expired", ["token", "family"])
async def test_expired_token_or_family_is_invalid_grant(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    expired: str,
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    past = int(time.time()) - 1
    async with state.db.sessions() as db:
        model = RefreshToken if expired == "token" else RefreshFamily
        await db.execute(update(model).values(expires_at=past))
        await db.commit()
    response = await refresh_grant(client, creds, first["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.feature("refresh-scope-narrowing")
async def test_refresh_may_narrow_scope_but_not_widen(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="profile email api")
    first = (await password_grant(client, creds, await make_user(), scope="profile api")).json()
    narrowed = await refresh_grant(client, creds, first["refresh_token"], scope="api")
    assert narrowed.status_code == 200
    assert narrowed.json()["scope"] == "api"
    # Omitted scope means the scope originally granted (RFC 6749 §6), not the narrowed one.
    again = await refresh_grant(client, creds, narrowed.json()["refresh_token"])
    assert again.json()["scope"] == "profile api"
    widened = await refresh_grant(client, creds, again.json()["refresh_token"], scope="email")
    assert widened.status_code == 400
    assert widened.json()["error"] == "invalid_scope"
    # A refused widening does not consume the token.
    ok = await refresh_grant(client, creds, again.json()["refresh_token"])
    assert ok.status_code == 200


async def test_unknown_token_is_invalid_grant(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    response = await refresh_grant(client, creds, "not-a-token")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


async def test_token_of_another_client_is_refused_and_left_alone(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    owner, first = await sign_in(client, make_client, make_user)
    thief = await make_client("other")
    stolen = await refresh_grant(client, thief, first["refresh_token"])
    assert stolen.status_code == 400
    assert stolen.json()["error"] == "invalid_grant"
    assert (await refresh_grant(client, owner, first["refresh_token"])).status_code == 200


@pytest.mark.parametrize("action", ["disable", "set_password"])
async def test_disabling_user_or_changing_password_kills_the_family(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    action: str,
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    async with state.db.sessions() as db:
        if action == "disable":
            await manage.disable_user(db, "alice")
        else:
            await manage.set_password(db, state.passwords, "alice", "a brand new passphrase")
        await db.commit()
    response = await refresh_grant(client, creds, first["refresh_token"])
    assert response.json()["error"] == "invalid_grant"
    family = await family_of(state, first["refresh_token"])
    expected = "user_disabled" if action == "disable" else "password_changed"
    assert family.revoked_reason == expected


async def test_disabled_user_cannot_refresh_even_with_live_family(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    from server.models import User

    creds, first = await sign_in(client, make_client, make_user)
    async with state.db.sessions() as db:
        await db.execute(update(User).values(disabled=True))
        await db.commit()
    response = await refresh_grant(client, creds, first["refresh_token"])
    assert response.json()["error"] == "invalid_grant"


async def test_client_without_refresh_grant_cannot_refresh(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds, first = await sign_in(client, make_client, make_user)
    from server.models import Client

    async with state.db.sessions() as db:
        await db.execute(update(Client).values(grant_types="password"))
        await db.commit()
    # Changed behind the CLI's and admin API's back: the cache sees it after its TTL
    # (tests/test_clients.py); this test is about what happens once it does.
    state.clients.invalidate()
    response = await refresh_grant(client, creds, first["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


async def test_missing_refresh_token_is_invalid_request(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    response = await client.post(
        "/oauth2/token", data={"grant_type": "refresh_token"}, headers=creds.basic
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_revoked_family_concurrently_blocks_rotation(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """The family dies between lookup and claim: the claim fails and nothing is issued."""
    from server.oauth.grants import RefreshTokenGrant

    creds, first = await sign_in(client, make_client, make_user)
    original = RefreshTokenGrant.validate_token_request

    def validate_then_revoke(self: RefreshTokenGrant) -> None:
        original(self)
        self.request.db.execute(update(RefreshFamily).values(revoked_at=1, revoked_reason="test"))

    RefreshTokenGrant.validate_token_request = validate_then_revoke  # type: ignore[method-assign]
    try:
        response = await refresh_grant(client, creds, first["refresh_token"])
    finally:
        RefreshTokenGrant.validate_token_request = original  # type: ignore[method-assign]
    assert response.json()["error"] == "invalid_grant"
    async with state.db.sessions() as db:
        assert len(list(await db.scalars(select(RefreshToken)))) == 1
