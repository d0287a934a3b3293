"""The account API's second factors (/api/v1/me/factors…): listing, removing (the last one
with the password, throttled), who may, what ends with a removal, hostile ids, audit.

Tokens are issued before the factor rows are put in: what is tested is the API, not the
sign-in that a factor changes."""

from __future__ import annotations

import asyncio

import httpx
import jwt
import pytest
from sqlalchemy import update

from server import manage
from server.deps import AppState
from server.models import RefreshFamily
from server.passwords import normalize_username
from tests.conftest import ClientCreds, Events, MakeClient, MakeUser, UserCreds, password_grant

from .factor_rows import (
    add_passkey,
    add_totp,
    ended_at,
    factor_rows,
    link_family,
    start_browser_session,
)

pytestmark = pytest.mark.feature("mfa-factor-management", "account-api")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def app_client(make_client: MakeClient) -> ClientCreds:
    return await make_client(
        "app",
        grants=["password", "refresh_token"],
        scope="profile account",
        first_party=True,
    )


async def token_of(
    client: httpx.AsyncClient,
    creds: ClientCreds,
    user: UserCreds,
    state: AppState,
    amr: str = "pwd otp mfa",
) -> str:
    """An access token of ``user``'s, from a sign-in by ``amr``: a password grant whose
    family is then marked as a browser sign-in with a one-time code would mark it (changing
    factors needs a sign-in that used one: ``test_a_password_only_sign_in_cannot_change``)."""
    response = await password_grant(client, creds, user)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    sid = jwt.decode(token, options={"verify_signature": False})["sid"]
    async with state.db.sessions() as db:
        await db.execute(update(RefreshFamily).where(RefreshFamily.id == sid).values(amr=amr))
        await db.commit()
    return token


async def remove(
    client: httpx.AsyncClient, token: str, factor_id: str, password: str | None = None
) -> httpx.Response:
    body = None if password is None else {"current_password": password}
    return await client.post(
        f"/api/v1/me/factors/{factor_id}/remove", json=body, headers=bearer(token)
    )


async def test_the_factors_and_unused_recovery_codes_are_listed(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    other = await make_user("bob")
    token = await token_of(client, app_client, user, state)
    empty = await client.get("/api/v1/me/factors", headers=bearer(token))
    assert empty.status_code == 200
    assert empty.json() == {"factors": [], "recovery_codes": 0}
    assert empty.headers["Cache-Control"] == "no-store"

    await add_totp(state, user.id, codes=10, used=3)
    phone = await add_passkey(
        state, user.id, "Phone", created_at=400, synced=True, backed_up=True, last_used_at=450
    )
    key = await add_passkey(state, user.id, "Security key", created_at=500)
    await add_passkey(state, other.id, "Bob's")
    listed = await client.get("/api/v1/me/factors", headers=bearer(token))
    assert listed.status_code == 200
    assert listed.json() == {
        "factors": [
            {
                "id": "totp",
                "kind": "totp",
                "name": "Authenticator app",
                "created_at": 150,
                "last_used_at": None,
                "synced": None,
                "backed_up": None,
            },
            {
                "id": phone,
                "kind": "passkey",
                "name": "Phone",
                "created_at": 400,
                "last_used_at": 450,
                "synced": True,
                "backed_up": True,
            },
            {
                "id": key,
                "kind": "passkey",
                "name": "Security key",
                "created_at": 500,
                "last_used_at": None,
                "synced": False,
                "backed_up": False,
            },
        ],
        "recovery_codes": 7,
    }


async def test_a_passkey_is_removed_and_the_persons_browsers_are_signed_out(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    events: Events,
) -> None:
    user = await make_user()
    other = await make_user("bob")
    token = await token_of(client, app_client, user, state)
    phone = await add_passkey(state, user.id, "Phone")
    key = await add_passkey(state, user.id, "Key")
    browsers = [await start_browser_session(state, user.id) for _ in range(2)]
    bobs = await start_browser_session(state, other.id)

    removed = await remove(client, token, phone)
    assert removed.status_code == 204, removed.text
    listed = (await client.get("/api/v1/me/factors", headers=bearer(token))).json()
    assert [f["id"] for f in listed["factors"]] == [key]
    for session_id in browsers:
        assert await ended_at(state, session_id) is not None
    assert await ended_at(state, bobs) is None  # another person's browser is not theirs
    # The caller made the change: its own sign-in goes on.
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
    assert (
        "factor.removed",
        {
            "user_id": user.id,
            "kind": "passkey",
            "factor": phone,
            "sessions_ended": 2,
            "via": "api",
        },
    ) in events


async def test_the_app_goes_with_its_recovery_codes(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    await add_totp(state, user.id, codes=10)
    await add_passkey(state, user.id)
    assert (await remove(client, token, "totp")).status_code == 204
    assert await factor_rows(state, user.id) == (0, 1, 0)
    again = await remove(client, token, "totp")
    assert (again.status_code, again.json()["error_code"]) == (404, "not_found")


async def test_another_persons_factor_or_an_unknown_one_is_not_found(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    other = await make_user("bob")
    token = await token_of(client, app_client, user, state)
    await add_passkey(state, user.id)
    await add_passkey(state, user.id, "Second")
    bobs = await add_passkey(state, other.id)
    await add_totp(state, other.id)
    for factor_id in (bobs, "totp", "0" * 32, "x" * 64):
        refused = await remove(client, token, factor_id, "correct horse battery")
        assert refused.status_code == 404, (factor_id, refused.text)
        assert refused.json()["error_code"] == "not_found"
    assert await factor_rows(state, other.id) == (1, 1, 0)
    assert await factor_rows(state, user.id) == (0, 2, 0)


async def test_the_last_factor_needs_the_current_password(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    events: Events,
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    key = await add_passkey(state, user.id)
    browser = await start_browser_session(state, user.id)
    url = f"/api/v1/me/factors/{key}/remove"
    for sent in (
        client.post(url, headers=bearer(token)),
        client.post(url, json={}, headers=bearer(token)),
        client.post(url, json={"current_password": "not it"}, headers=bearer(token)),
    ):
        refused = await sent
        assert refused.status_code == 400, refused.text
        assert refused.json()["error_code"] == "wrong_password"
    assert await factor_rows(state, user.id) == (0, 1, 0)
    assert await ended_at(state, browser) is None  # nothing changed, nobody signed out
    refusals = [fields for event, fields in events if event == "factor.remove_refused"]
    assert refusals == [{"user_id": user.id, "factor": key, "via": "api"}] * 3
    assert (await remove(client, token, key, user.password)).status_code == 204
    assert await factor_rows(state, user.id) == (0, 0, 0)
    assert await ended_at(state, browser) is not None


@pytest.mark.one_backend
async def test_a_password_is_not_checked_when_it_is_not_needed(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    first = await add_passkey(state, user.id)
    await add_passkey(state, user.id, "Second")
    # Not the last one: a wrong password sent along is no refusal (and no guessing oracle).
    assert (await remove(client, token, first, "anything")).status_code == 204


@pytest.mark.one_backend
async def test_the_password_check_is_throttled_like_the_password_change(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    key = await add_passkey(state, user.id)
    limiter = state.limiter
    account = normalize_username(user.username)
    # Failed passwords from many addresses: the account's own tier stops the guessing.
    for i in range(1000):
        if await limiter.throttled(account, "203.0.113.250"):
            break
        await limiter.failed(account, f"198.51.100.{i % 250}")
    assert await limiter.throttled(account, "203.0.113.250")
    refused = await remove(client, token, key, user.password)
    assert (refused.status_code, refused.json()["error_code"]) == (400, "wrong_password")
    assert await factor_rows(state, user.id) == (0, 1, 0)


async def test_the_browser_the_callers_sign_in_came_through_stays(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    other_token = await token_of(client, app_client, user, state)
    sessions = (await client.get("/api/v1/me/sessions", headers=bearer(token))).json()
    own = next(s["id"] for s in sessions["sessions"] if s["current"])
    other = next(s["id"] for s in sessions["sessions"] if not s["current"])
    mine = await start_browser_session(state, user.id)
    elsewhere = await start_browser_session(state, user.id)
    await link_family(state, own, mine)
    await link_family(state, other, elsewhere)
    key = await add_passkey(state, user.id)
    await add_passkey(state, user.id, "Second")

    assert (await remove(client, token, key)).status_code == 204
    # As the password change does: the sign-in making the request and its browser go on…
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
    # …every other browser ends, with the sign-ins made through it.
    assert await ended_at(state, mine) is None
    assert await ended_at(state, elsewhere) is not None
    gone = await client.get("/api/v1/me", headers=bearer(other_token))
    assert gone.status_code == 401


async def test_two_removals_at_once_cannot_remove_the_last_factor_without_the_password(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    # Two sign-ins (two apps, say), so that neither request waits on the other's token.
    one, two = [await token_of(client, app_client, user, state) for _ in range(2)]
    first = await add_passkey(state, user.id)
    second = await add_passkey(state, user.id, "Second")
    answers = await asyncio.gather(remove(client, one, first), remove(client, two, second))
    assert sorted(a.status_code for a in answers) == [204, 400]
    assert await factor_rows(state, user.id) == (0, 1, 0)


@pytest.mark.one_backend
async def test_listing_needs_the_account_scope_and_removing_a_first_party_app(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    user = await make_user()
    plain = await make_client("plain", grants=["password"], scope="profile", first_party=True)
    third_token = await token_of(client, app_client, user, state)
    plain_token = await token_of(client, plain, user, state)
    key = await add_passkey(state, user.id)
    await add_passkey(state, user.id, "Second")
    # The operator no longer treats the app as its own: its account scope still lists the
    # factors, but removing one weakens the account, which only a first-party app may do.
    async with state.db.sessions() as db:
        await manage.update_client(db, "app", {"first_party": False})
        await db.commit()

    assert (await client.get("/api/v1/me/factors", headers=bearer(third_token))).status_code == 200
    refused = await remove(client, third_token, key)
    assert refused.status_code == 403
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    assert "first-party" in refused.json()["detail"]
    for request in (
        client.get("/api/v1/me/factors", headers=bearer(plain_token)),
        client.post(f"/api/v1/me/factors/{key}/remove", headers=bearer(plain_token)),
    ):
        assert (await request).status_code == 403
    for request in (
        client.get("/api/v1/me/factors"),
        client.post(f"/api/v1/me/factors/{key}/remove"),
    ):
        assert (await request).status_code == 401
    assert await factor_rows(state, user.id) == (0, 2, 0)


@pytest.mark.one_backend  # refused by the schema before any query
@pytest.mark.parametrize(
    "factor_id",
    [
        "x" * 65,  # longer than any id
        "x" * 5000,
        "a%00b",  # NUL
        "caf%C3%A9",  # non-ASCII
        "%F0%9F%94%91",
        "a%20b",
        "..",
    ],
)
async def test_hostile_factor_ids_are_refused_not_a_server_error(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    factor_id: str,
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    await add_passkey(state, user.id)
    response = await client.post(
        f"/api/v1/me/factors/{factor_id}/remove",
        json={"current_password": user.password},
        headers=bearer(token),
    )
    # As every path id of the JSON APIs (boundary.PATH_ID): refused by the schema, before
    # any lookup; ``..`` is resolved by the client into another path, unknown here.
    assert response.status_code in (404, 422), response.text
    if response.status_code == 422:
        assert response.json()["error_code"] == "validation_error"
    assert await factor_rows(state, user.id) == (0, 1, 0)


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "body",
    [
        {"current_password": 123},
        {"current_password": ""},
        {"current_password": "a\x00b"},
        {"current_password": "x" * 4097},
        {"current_password": "ok", "extra": 1},
        ["current_password"],
    ],
)
async def test_bad_bodies_are_a_422(
    client: httpx.AsyncClient,
    app_client: ClientCreds,
    make_user: MakeUser,
    state: AppState,
    body: object,
) -> None:
    user = await make_user()
    token = await token_of(client, app_client, user, state)
    key = await add_passkey(state, user.id)
    response = await client.post(
        f"/api/v1/me/factors/{key}/remove", json=body, headers=bearer(token)
    )
    assert response.status_code == 422, response.text
    assert response.json()["error_code"] == "validation_error"
    assert await factor_rows(state, user.id) == (0, 1, 0)


@pytest.mark.one_backend
async def test_a_password_only_sign_in_cannot_change_the_factors_of_a_person_who_has_one(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    """A token from a sign-in by a password alone (the password grant, where the policy lets
    it through) must not remove a factor: 401 as RFC 9470 §3 has it, naming the levels a new
    sign-in must reach."""
    user = await make_user()
    key = await add_passkey(state, user.id)
    token = await token_of(client, app_client, user, state, amr="pwd")
    response = await remove(client, token, key, user.password)
    assert response.status_code == 401
    assert response.json()["error_code"] == "insufficient_user_authentication"
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge
    assert 'acr_values="2 phr phrh"' in challenge
    assert await factor_rows(state, user.id) == (0, 1, 0)
    # Listing stays open to it.
    assert (await client.get("/api/v1/me/factors", headers=bearer(token))).status_code == 200


@pytest.mark.one_backend
async def test_a_password_only_sign_in_cannot_change_the_password_of_a_person_with_a_factor(
    client: httpx.AsyncClient, app_client: ClientCreds, make_user: MakeUser, state: AppState
) -> None:
    """The sibling of factor changes: under ``optional`` the password grant lets a person whose
    one factor is a passkey through with the password alone; that token must not change the
    password (and sign every other sign-in out). One from a sign-in that used the factor may."""
    user = await make_user()
    await add_passkey(state, user.id)
    body = {"current_password": user.password, "new_password": "a brand new passphrase"}
    weak = await token_of(client, app_client, user, state, amr="pwd")
    refused = await client.post("/api/v1/me/password", json=body, headers=bearer(weak))
    assert refused.status_code == 401
    assert refused.json()["error_code"] == "insufficient_user_authentication"
    strong = await token_of(client, app_client, user, state, amr="swk mfa")
    changed = await client.post("/api/v1/me/password", json=body, headers=bearer(strong))
    assert changed.status_code == 204
