"""The admin API's second factors (/admin/v1/users/{id}/factors): list and reset, who may,
what ends with a reset, unknown and hostile ids, audit."""

from __future__ import annotations

import httpx
import pytest

from server.deps import AppState
from tests.conftest import ClientCreds, Events, MakeClient, MakeUser, password_grant

from .factor_rows import (
    add_passkey,
    add_totp,
    ended_at,
    factor_rows,
    link_family,
    start_browser_session,
)

pytestmark = pytest.mark.feature("mfa-factor-management", "admin-api")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def admin(client: httpx.AsyncClient, make_client: MakeClient) -> dict[str, str]:
    ops = await make_client("ops", admin=True, grants=["client_credentials"], scope="")
    issued = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "admin"},
        headers=ops.basic,
    )
    assert issued.status_code == 200, issued.text
    return bearer(issued.json()["access_token"])


@pytest.fixture
async def app_client(make_client: MakeClient) -> ClientCreds:
    return await make_client(
        "app",
        grants=["password", "refresh_token", "client_credentials"],
        scope="profile account",
        first_party=True,
    )


async def test_an_admin_lists_a_persons_factors(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    make_user: MakeUser,
    state: AppState,
    events: Events,
) -> None:
    user = await make_user()
    other = await make_user("bob")
    empty = await client.get(f"/admin/v1/users/{user.id}/factors", headers=admin)
    assert empty.status_code == 200
    assert empty.json() == {"factors": [], "recovery_codes": 0}
    await add_totp(state, user.id, codes=10, used=1)
    key = await add_passkey(state, user.id, "Key", synced=True, backed_up=False)
    await add_passkey(state, other.id, "Bob's")
    listed = await client.get(f"/admin/v1/users/{user.id}/factors", headers=admin)
    assert listed.status_code == 200
    assert listed.headers["Cache-Control"] == "no-store"
    body = listed.json()
    assert [(f["id"], f["kind"], f["name"]) for f in body["factors"]] == [
        ("totp", "totp", "Authenticator app"),
        (key, "passkey", "Key"),
    ]
    assert (body["factors"][1]["synced"], body["factors"][1]["backed_up"]) == (True, False)
    assert body["recovery_codes"] == 9
    assert ("admin.factors_listed", {"actor_client_id": "ops", "user_id": user.id}) in events


async def test_an_admin_resets_every_factor_and_signs_the_person_out_of_their_browsers(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    events: Events,
) -> None:
    user = await make_user()
    other = await make_user("bob")
    issued = await password_grant(client, app_client, user)
    token = issued.json()["access_token"]
    direct = (await password_grant(client, app_client, user)).json()["access_token"]
    sessions = (await client.get("/api/v1/me/sessions", headers=bearer(token))).json()
    family = next(s["id"] for s in sessions["sessions"] if s["current"])
    browsers = [await start_browser_session(state, user.id) for _ in range(2)]
    await link_family(state, family, browsers[0])  # a sign-in made through a browser
    bobs_browser = await start_browser_session(state, other.id)
    await add_totp(state, user.id, codes=10)
    await add_passkey(state, user.id)
    await add_passkey(state, user.id, "Second")
    await add_passkey(state, other.id)

    reset = await client.delete(f"/admin/v1/users/{user.id}/factors", headers=admin)
    assert reset.status_code == 204, reset.text
    assert await factor_rows(state, user.id) == (0, 0, 0)
    assert await factor_rows(state, other.id) == (0, 1, 0)
    for session_id in browsers:
        assert await ended_at(state, session_id) is not None
    assert await ended_at(state, bobs_browser) is None
    # The sign-in made through a browser ends with it; one made with the password alone
    # (no factor was involved) goes on.
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 401
    assert (await client.get("/api/v1/me", headers=bearer(direct))).status_code == 200
    assert (
        "factor.reset",
        {
            "actor_client_id": "ops",
            "via": "admin_api",
            "user_id": user.id,
            "factors_removed": 3,
            "sessions_ended": 2,
        },
    ) in events
    listed = await client.get(f"/admin/v1/users/{user.id}/factors", headers=admin)
    assert listed.json() == {"factors": [], "recovery_codes": 0}
    # Nothing left to reset: still a 204 (the outcome the caller asked for holds).
    again = await client.delete(f"/admin/v1/users/{user.id}/factors", headers=admin)
    assert again.status_code == 204


async def test_an_unknown_user_is_not_found(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for request in (
        client.get("/admin/v1/users/" + "0" * 32 + "/factors", headers=admin),
        client.delete("/admin/v1/users/" + "0" * 32 + "/factors", headers=admin),
        client.get("/admin/v1/users/" + "x" * 64 + "/factors", headers=admin),
    ):
        response = await request
        assert (response.status_code, response.json()["error_code"]) == (404, "not_found")


async def test_only_an_admin_token_may_list_or_reset(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
) -> None:
    user = await make_user()
    await add_passkey(state, user.id)
    person = (await password_grant(client, app_client, user)).json()["access_token"]
    plain = await client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers=app_client.basic
    )
    app_token = plain.json()["access_token"]
    url = f"/admin/v1/users/{user.id}/factors"
    for headers in (bearer(person), bearer(app_token)):
        for method in ("GET", "DELETE"):
            refused = await client.request(method, url, headers=headers)
            assert refused.status_code == 403, (method, refused.text)
            assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    for method in ("GET", "DELETE"):
        assert (await client.request(method, url)).status_code == 401
    assert await factor_rows(state, user.id) == (0, 1, 0)


@pytest.mark.one_backend  # refused by the schema before any query
@pytest.mark.parametrize(
    "user_id", ["x" * 65, "x" * 5000, "a%00b", "caf%C3%A9", "%F0%9F%94%91", "a%20b"]
)
async def test_hostile_user_ids_are_refused_not_a_server_error(
    client: httpx.AsyncClient, admin: dict[str, str], user_id: str
) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"/admin/v1/users/{user_id}/factors", headers=admin)
        # As every path id of the JSON APIs (boundary.PATH_ID): refused before any lookup.
        assert response.status_code == 422, (method, response.text)
        assert response.json()["error_code"] == "validation_error"
