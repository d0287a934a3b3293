"""How long a browser sign-in (the hosted pages' session cookie) lives, and what ends it.

- A password change, disabling the account or an admin ending the person's sessions ends
  every browser session (the one that changed its own password through the API excepted)
  and spends their unredeemed codes.
- Signing in again refreshes the session without ending what other clients were granted;
  only an explicit sign-out ends those.
- Sign-out spends the session's unredeemed codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from server import manage
from server.deps import AppState
from server.models import AuthorizationCode, BrowserSession, RefreshFamily
from server.observability import AUDIT_LISTENERS
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    UserCreds,
    csrf_of,
    sign_in,
)
from tests.oauth.test_authorize import CALLBACK, authorize_params, exchange, pkce, query_of


@asynccontextmanager
async def new_browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Another browser: its own cookie jar on the same server."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


async def first_party_spa(make_client: MakeClient, client_id: str = "spa") -> ClientCreds:
    """A public first-party app (no consent page); ``account`` so that its tokens may call
    the account API whichever scope that asks for."""
    return await make_client(
        client_id,
        public=True,
        first_party=True,
        grants=["authorization_code", "refresh_token"],
        scope="openid profile email api account",
        redirect_uris=[CALLBACK],
    )


async def code_for(browser: httpx.AsyncClient, challenge: str, **extra: str) -> str:
    """A code from the signed-in ``browser`` without asking the person anything."""
    params = authorize_params(challenge, scope="openid api account", prompt="none", **extra)
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 302, response.text
    query = query_of(response)
    assert "code" in query, query
    return query["code"]


async def tokens_through(browser: httpx.AsyncClient, client_id: str = "spa") -> dict[str, Any]:
    """Tokens for ``client_id`` through the browser's session (the code flow)."""
    verifier, challenge = pkce()
    code = await code_for(browser, challenge, client_id=client_id)
    response = await exchange(browser, code, verifier, client_id=client_id)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def refresh(http: httpx.AsyncClient, refresh_token: str, client_id: str = "spa") -> int:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    return (await http.post("/oauth2/token", data=data)).status_code


async def assert_signed_out(browser: httpx.AsyncClient) -> None:
    """The browser's session no longer works anywhere: the account page, silent sign-in."""
    account = await browser.get("/account")
    assert (account.status_code, account.headers.get("location")) == (303, "/login?next=/account")
    _, challenge = pkce()
    silent = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, prompt="none")
    )
    assert query_of(silent)["error"] == "login_required"


async def browser_sessions(state: AppState) -> list[BrowserSession]:
    async with state.db.sessions() as db:
        return list(await db.scalars(select(BrowserSession).order_by(BrowserSession.created_at)))


# -- credential and account changes (session-lifetime) ---------------------------------------


@pytest.mark.feature("session-lifetime")
async def test_a_password_change_through_the_api_ends_every_other_browser_session(
    app: FastAPI,
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    await first_party_spa(make_client)
    user = await make_user()
    await sign_in(browser, user)
    mine = await tokens_through(browser)  # the app changing the password, via this browser
    async with new_browser(app) as other:
        await sign_in(other, user)
        verifier, challenge = pkce()
        pending = await code_for(other, challenge)  # issued, not yet exchanged

        changed = await client.post(
            "/api/v1/me/password",
            json={"current_password": user.password, "new_password": "a brand new passphrase"},
            headers={"Authorization": f"Bearer {mine['access_token']}"},
        )
        assert changed.status_code == 204, changed.text

        await assert_signed_out(other)
        late = await exchange(other, pending, verifier)
        assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    # The browser (and the sign-in) that made the change stay.
    assert (await browser.get("/account")).status_code == 200
    assert await refresh(client, mine["refresh_token"]) == 200
    assert sorted(s.ended_at is None for s in await browser_sessions(state)) == [False, True]


async def _admin(client: httpx.AsyncClient, make_client: MakeClient) -> dict[str, str]:
    ops = await make_client("ops", admin=True, grants=["client_credentials"], scope="")
    issued = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": "admin"},
        headers=ops.basic,
    )
    assert issued.status_code == 200, issued.text
    return {"Authorization": f"Bearer {issued.json()['access_token']}"}


@pytest.mark.feature("session-lifetime")
@pytest.mark.parametrize(
    "change",
    [
        "admin-reset-password",
        "admin-end-sessions",
        "admin-disable-then-enable",
        "cli-set-password",
        "cli-disable-then-enable",
    ],
)
async def test_account_changes_end_the_browser_sessions_and_their_codes(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    change: str,
) -> None:
    await first_party_spa(make_client)
    admin = await _admin(client, make_client)
    user = await make_user()
    await sign_in(browser, user)
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)

    if change.startswith("admin-"):
        base = f"/admin/v1/users/{user.id}"
        calls = {
            "admin-reset-password": [("POST", "/password", {"password": "an admin's new one"})],
            "admin-end-sessions": [("DELETE", "/sessions", None)],
            "admin-disable-then-enable": [("POST", "/disable", None), ("POST", "/enable", None)],
        }[change]
        for method, path, body in calls:
            response = await client.request(method, base + path, json=body, headers=admin)
            assert response.status_code in (200, 204), response.text
    else:
        # What `users set-password` and `users disable` run (the CLI has no enable: the
        # admin API's enable runs manage.enable).
        async with state.db.sessions() as db:
            if change == "cli-set-password":
                await manage.set_password(db, state.passwords, user.username, "a CLI new one!")
            else:
                await manage.disable_user(db, user.username)
                await db.commit()
                await manage.enable(db, await manage.get_user(db, user.username))
            await db.commit()

    await assert_signed_out(browser)
    late = await exchange(browser, pending, verifier)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    assert [s.ended_at is not None for s in await browser_sessions(state)] == [True]


# -- sign-out spends the session's codes (session-lifetime) ------------------------------------


@pytest.mark.feature("session-lifetime", "end-session")
async def test_a_code_issued_before_sign_out_cannot_be_exchanged_after_it(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    await first_party_spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)
    exchanged = await tokens_through(browser)  # a code redeemed before: its sign-in ends too

    confirm = await browser.get("/logout")
    signed_out = await browser.post("/logout", data={"csrf_token": csrf_of(confirm)})
    assert signed_out.status_code == 303

    seen: list[str] = []
    AUDIT_LISTENERS.append(lambda event, fields: seen.append(event))
    try:
        late = await exchange(browser, pending, verifier)
    finally:
        AUDIT_LISTENERS.pop()
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    assert "code.reuse_detected" not in seen  # spent by the sign-out, not replayed
    assert await refresh(browser, exchanged["refresh_token"]) == 400
    async with state.db.sessions() as db:
        live = await db.scalars(select(RefreshFamily).where(RefreshFamily.revoked_at.is_(None)))
        assert list(live) == []
        unspent = await db.scalars(
            select(AuthorizationCode).where(AuthorizationCode.used_at.is_(None))
        )
        assert list(unspent) == []


# -- signing in again (reauthentication) -----------------------------------------------------


async def _sign_in_through_authorize(
    browser: httpx.AsyncClient, user: UserCreds, challenge: str, **extra: str
) -> str:
    """The authorization request sends the browser to sign in; it comes back with a code."""
    params = authorize_params(challenge, scope="openid api", client_id="other", **extra)
    asked = await browser.get("/oauth2/authorize", params=params)
    assert asked.status_code == 302 and asked.headers["location"].startswith("/login?next=")
    next_url = parse_qs(urlsplit(asked.headers["location"]).query)["next"][0]
    back = await sign_in(browser, user, next_url)
    assert back.headers["location"] == next_url
    issued = await browser.get(next_url)
    assert issued.status_code == 302, issued.text
    return query_of(issued)["code"]


@pytest.mark.feature("reauthentication")
@pytest.mark.parametrize("how", ["prompt=login", "max_age", "sign-in-again"])
async def test_signing_in_again_keeps_what_other_clients_were_granted(
    app: FastAPI,
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    how: str,
) -> None:
    await first_party_spa(make_client)
    await first_party_spa(make_client, "other")
    user = await make_user()
    await sign_in(browser, user)
    granted = await tokens_through(browser)  # client "spa", through this browser
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)  # issued to "spa", not yet exchanged
    async with state.db.sessions() as db:
        await db.execute(update(BrowserSession).values(auth_time=BrowserSession.auth_time - 700))
        await db.commit()
    (before,) = await browser_sessions(state)
    old_cookie = browser.cookies["session"]

    _, other_challenge = pkce()
    if how == "prompt=login":
        await _sign_in_through_authorize(browser, user, other_challenge, prompt="login")
    elif how == "max_age":
        await _sign_in_through_authorize(browser, user, other_challenge, max_age="600")
    else:
        await sign_in(browser, user)

    # A fresh session: new cookie value, new row, new auth_time; the old row is ended.
    old, new = sorted(await browser_sessions(state), key=lambda s: s.id != before.id)
    assert old.id == before.id and old.ended_at is not None
    assert new.id != old.id and new.ended_at is None
    assert new.auth_time >= before.auth_time + 700
    assert browser.cookies["session"] != old_cookie
    async with new_browser(app) as stale:
        stale.cookies.set("session", old_cookie)
        assert (await stale.get("/account")).status_code == 303  # the old value is worthless

    # Client "spa" keeps its sign-in and its pending code.
    assert await refresh(browser, granted["refresh_token"]) == 200
    late = await exchange(browser, pending, verifier)
    assert late.status_code == 200, late.text
    async with state.db.sessions() as db:
        families = list(await db.scalars(select(RefreshFamily)))
    assert {f.browser_session_id for f in families} == {new.id}
    assert all(f.revoked_at is None for f in families)


@pytest.mark.feature("reauthentication")
async def test_signing_in_again_then_signing_out_ends_what_was_granted_before(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    await first_party_spa(make_client)
    user = await make_user()
    await sign_in(browser, user)
    granted = await tokens_through(browser)
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)
    await sign_in(browser, user)  # again: the old session's grants move to the new one

    confirm = await browser.get("/logout")
    assert (await browser.post("/logout", data={"csrf_token": csrf_of(confirm)})).is_redirect
    assert await refresh(browser, granted["refresh_token"]) == 400
    late = await exchange(browser, pending, verifier)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")


@pytest.mark.feature("reauthentication")
@pytest.mark.parametrize("how", ["sign-in", "register"])
async def test_another_person_signing_in_ends_the_session_not_the_first_persons_grants(
    app: FastAPI,
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    how: str,
) -> None:
    await first_party_spa(make_client)
    alice = await make_user("alice")
    await sign_in(browser, alice)
    granted = await tokens_through(browser)
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)  # alice's code, not yet exchanged
    alice_cookie = browser.cookies["session"]
    (alices,) = await browser_sessions(state)

    if how == "sign-in":
        await sign_in(browser, await make_user("bob"))
    else:
        page = await browser.get("/register")
        registered = await browser.post(
            "/register",
            data={
                "csrf_token": csrf_of(page),
                "username": "bob",
                "password": "a fine long password",
                "password_confirm": "a fine long password",
            },
        )
        assert registered.status_code == 303, registered.text

    account = await browser.get("/account")
    assert account.status_code == 200 and "bob" in account.text
    old, new = sorted(await browser_sessions(state), key=lambda s: s.id != alices.id)
    assert old.id == alices.id and old.ended_at is not None
    assert new.ended_at is None and new.user_id != alice.id
    # Alice's apps keep their sign-in; her pending code is spent with her browser session.
    assert await refresh(client, granted["refresh_token"]) == 200
    late = await exchange(browser, pending, verifier)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    async with new_browser(app) as stale:
        stale.cookies.set("session", alice_cookie)
        assert (await stale.get("/account")).status_code == 303


@pytest.mark.feature("session-lifetime", "end-session")
async def test_a_code_minted_while_signing_out_is_refused_after_it(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    await first_party_spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    pending = await code_for(browser, challenge)
    confirm = await browser.get("/logout")
    assert (await browser.post("/logout", data={"csrf_token": csrf_of(confirm)})).is_redirect
    # As if the authorization request had committed its code just after the sign-out spent
    # the session's codes (two requests of one browser, racing).
    async with state.db.sessions() as db:
        await db.execute(
            update(AuthorizationCode).values(
                used_at=None, expires_at=AuthorizationCode.created_at + 60
            )
        )
        await db.commit()
    late = await exchange(browser, pending, verifier)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    async with state.db.sessions() as db:
        assert list(await db.scalars(select(RefreshFamily))) == []
