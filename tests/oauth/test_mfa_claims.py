"""What a sign-in proved, told to the client (``amr``, RFC 8176; ``acr``, OpenID Connect Core
§2), asked for by it (``acr_values``, §3.1.2.1), and the password grant under a second factor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from server import manage
from server.config import Settings
from server.deps import AppState
from server.main import create_app
from server.models import RefreshFamily, TotpFactor, now
from server.oauth.grants import BAD_CREDENTIALS, SECOND_FACTOR_NEEDED
from server.secretbox import seal
from server.web.browser import cookie_name, start_session
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    UserCreds,
    password_grant,
    refresh_grant,
    sign_in,
)
from tests.oauth.test_authorize import (
    CALLBACK,
    ISSUER,
    authorize_params,
    claims_of,
    exchange,
    get_code,
    pkce,
    query_of,
    spa,
)
from tests.oauth.test_par import code_of, open_uri, pushed_uri

pytestmark = pytest.mark.feature("mfa-amr-acr")

MULTI = "pwd otp mfa"


# -- helpers ------------------------------------------------------------------------------


async def session_for(
    state: AppState, browser: httpx.AsyncClient, user_id: str, amr: str, *, age: int = 0
) -> None:
    """Sign ``browser`` in as ``user_id`` with a session whose sign-in proved ``amr``."""
    settings = state.settings
    async with state.db.sessions() as db:
        user = await manage.get_user_by_id(db, user_id)
        session, value = await start_session(db, settings, user, None, amr=amr)
        session.auth_time -= age
        await db.commit()
    browser.cookies.set(cookie_name(settings, "session"), value)


async def add_totp(state: AppState, user_id: str, *, confirmed: bool = True) -> None:
    settings = state.settings
    async with state.db.sessions() as db:
        db.add(
            TotpFactor(
                user_id=user_id,
                secret_sealed=seal(
                    settings.secret_key, "JBSWY3DPEHPK3PXP", context="totp:" + user_id
                ),
                confirmed_at=now() if confirmed else None,
            )
        )
        await db.commit()


async def tokens_via_code(
    browser: httpx.AsyncClient, *, consent: bool = True, **extra: str
) -> dict[str, Any]:
    verifier, challenge = pkce()
    code = await get_code(browser, challenge, consent=consent, **extra)
    response = await exchange(browser, code, verifier)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def userinfo(http: httpx.AsyncClient, access_token: str) -> dict[str, Any]:
    response = await http.get("/userinfo", headers={"Authorization": "Bearer " + access_token})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def refresh(http: httpx.AsyncClient, refresh_token: str) -> dict[str, Any]:
    response = await http.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": "spa"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def next_of(response: httpx.Response) -> str:
    return parse_qs(urlsplit(response.headers["location"]).query)["next"][0]


@asynccontextmanager
async def app_with(settings: Settings, **overrides: Any) -> AsyncIterator[FastAPI]:
    """An app of this test's own on the same database, with other settings."""
    application = create_app(settings.model_copy(update=overrides))
    async with application.router.lifespan_context(application):
        yield application


@asynccontextmanager
async def browser_of(application: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


async def pwd_client(make_client: MakeClient) -> ClientCreds:
    return await make_client(
        "native", grants=["password", "refresh_token"], scope="openid profile", first_party=True
    )


# -- ID tokens, refresh, /userinfo ----------------------------------------------------------


@pytest.mark.feature("id-tokens", "userinfo")
async def test_a_password_sign_in_is_amr_pwd_and_acr_1_everywhere(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    user = await make_user()
    first = await browser.get("/oauth2/authorize", params=authorize_params(pkce()[1]))
    await sign_in(browser, user, next_of(first))
    tokens = await tokens_via_code(browser)
    id_token = claims_of(tokens["id_token"])
    assert (id_token["amr"], id_token["acr"]) == (["pwd"], "1")
    assert "amr" not in claims_of(tokens["access_token"])  # the ID token's, not the API's
    info = await userinfo(browser, tokens["access_token"])
    assert (info["amr"], info["acr"]) == (["pwd"], "1")


@pytest.mark.feature("id-tokens", "userinfo", "grant-refresh")
async def test_a_multi_factor_session_is_told_in_the_id_token_its_refreshes_and_userinfo(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await session_for(state, browser, user.id, MULTI)
    tokens = await tokens_via_code(browser)
    id_token = claims_of(tokens["id_token"])
    assert (id_token["amr"], id_token["acr"]) == (["pwd", "otp", "mfa"], "2")
    again = await refresh(browser, tokens["refresh_token"])
    refreshed = claims_of(again["id_token"])
    assert (refreshed["amr"], refreshed["acr"]) == (["pwd", "otp", "mfa"], "2")
    assert refreshed["auth_time"] == id_token["auth_time"]
    info = await userinfo(browser, again["access_token"])
    assert (info["amr"], info["acr"]) == (["pwd", "otp", "mfa"], "2")


@pytest.mark.one_backend
async def test_a_browser_session_from_before_methods_were_kept_signs_in_as_a_password(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    """A live browser session without ``amr`` (older than 0011, or made by a 0010 replica
    during a rolling upgrade) was a password sign-in: its codes say so."""
    await spa(make_client)
    user = await make_user()
    await session_for(state, browser, user.id, "")
    id_token = claims_of((await tokens_via_code(browser))["id_token"])
    assert (id_token["amr"], id_token["acr"]) == (["pwd"], "1")


@pytest.mark.feature("id-tokens", "userinfo", "grant-password")
async def test_a_sign_in_from_before_methods_were_kept_gets_no_amr_or_acr(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await pwd_client(make_client)
    user = await make_user()
    response = await password_grant(client, creds, user, scope="openid")
    assert response.status_code == 200, response.text
    first = response.json()
    assert (claims_of(first["id_token"])["amr"], claims_of(first["id_token"])["acr"]) == (
        ["pwd"],
        "1",
    )
    async with state.db.sessions() as db:  # as migration 0011 left a family from before it
        await db.execute(update(RefreshFamily).values(amr=""))
        await db.commit()
    again = await refresh_grant(client, creds, first["refresh_token"])
    assert again.status_code == 200, again.text
    id_token = claims_of(again.json()["id_token"])
    assert "amr" not in id_token and "acr" not in id_token
    info = await userinfo(client, again.json()["access_token"])
    assert "amr" not in info and "acr" not in info


@pytest.mark.one_backend
@pytest.mark.feature("discovery")
async def test_discovery_lists_the_acr_values_and_the_claims(client: httpx.AsyncClient) -> None:
    document = (await client.get("/.well-known/openid-configuration")).json()
    assert document["acr_values_supported"] == ["1", "2", "phr", "phrh"]
    assert {"amr", "acr"} <= set(document["claims_supported"])


# -- acr_values and the step-up -------------------------------------------------------------


@pytest.mark.feature("mfa-step-up")
async def test_acr_values_beyond_the_session_send_a_person_with_a_factor_to_the_step_up(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, "pwd")
    params = authorize_params(pkce()[1], acr_values="2 urn:example:unknown")
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith("/login/step-up?next=")
    assert parse_qs(urlsplit(location).query)["acr"] == ["2"]  # the level to reach
    target = next_of(response)
    assert parse_qs(urlsplit(target).query) == {k: [v] for k, v in params.items()}
    # The step-up asks for the second factor of this session (the pending sign-in cookie).
    step = await browser.get(location)
    assert step.status_code == 303
    assert step.headers["location"].startswith("/login/verify?")
    # Once the session is stronger (what the second step does), the same request gets a code
    # that says so, and is not sent round again.
    await session_for(state, browser, user.id, MULTI)
    verifier, challenge = pkce()
    params["code_challenge"] = challenge
    page = await browser.get("/oauth2/authorize", params=params)
    code = await code_of(browser, page)
    tokens = (await exchange(browser, code, verifier)).json()
    assert claims_of(tokens["id_token"])["acr"] == "2"


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_acr_values_with_prompt_none_is_login_required_at_the_client(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, "pwd")
    params = authorize_params(pkce()[1], acr_values="2", prompt="none")
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 302
    assert response.headers["location"].startswith(CALLBACK + "?")
    answer = query_of(response)
    assert answer["error"] == "login_required"
    assert (answer["state"], answer["iss"]) == ("st-123", ISSUER)
    assert "code" not in answer


@pytest.mark.feature("mfa-step-up")
@pytest.mark.parametrize(
    ("amr", "totp", "acr_values", "acr"),
    [
        ("pwd", False, "2", "1"),  # nothing could reach 2: the code says 1 (no loop)
        ("pwd", False, "phr 2", "1"),
        (MULTI, True, "phrh", "2"),  # a one-time code app cannot make a passkey: no loop
        (MULTI, True, "2", "2"),  # met already
        ("pwd", True, "1", "1"),  # met already
        ("pwd", True, "urn:example:gold", "1"),  # unknown values are ignored
        ("pwd", True, " ", "1"),
    ],
)
@pytest.mark.one_backend
async def test_acr_values_that_nothing_more_can_meet_get_a_code_saying_what_was_reached(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    amr: str,
    totp: bool,
    acr_values: str,
    acr: str,
) -> None:
    await spa(make_client)
    user = await make_user()
    if totp:
        await add_totp(state, user.id)
    await session_for(state, browser, user.id, amr)
    tokens = await tokens_via_code(browser, acr_values=acr_values)
    assert claims_of(tokens["id_token"])["acr"] == acr


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_an_unconfirmed_app_is_not_a_factor_to_step_up_with(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id, confirmed=False)
    await session_for(state, browser, user.id, "pwd")
    tokens = await tokens_via_code(browser, acr_values="2")
    assert claims_of(tokens["id_token"])["acr"] == "1"


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up", "par")
async def test_a_pushed_request_comes_back_from_the_step_up_by_its_request_uri(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, "pwd")
    verifier, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge, acr_values="2")
    response = await open_uri(browser, request_uri)
    assert response.status_code == 302
    assert response.headers["location"].startswith("/login/step-up?")
    target = next_of(response)
    assert parse_qs(urlsplit(target).query) == {"client_id": ["spa"], "request_uri": [request_uri]}
    # The pushed request was not spent by the detour.
    await session_for(state, browser, user.id, MULTI)
    code = await code_of(browser, await browser.get(target))
    tokens = (await exchange(browser, code, verifier)).json()
    assert claims_of(tokens["id_token"])["acr"] == "2"


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_the_step_up_comes_before_consent(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    """OpenID Connect Core §3.1.2.3 then §3.1.2.4: who it is, then what they allow."""
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, "pwd")
    page = await browser.get(
        "/oauth2/authorize", params=authorize_params(pkce()[1], acr_values="2", prompt="consent")
    )
    assert page.status_code == 302
    assert page.headers["location"].startswith("/login/step-up?")
    assert "prompt=consent" in next_of(page)  # consent is still asked for afterwards


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_max_age_still_asks_for_the_whole_sign_in_with_its_second_step(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, MULTI, age=600)
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(pkce()[1], max_age="300", acr_values="2")
    )
    assert response.status_code == 302
    assert response.headers["location"].startswith("/login?")
    target = next_of(response)
    assert "max_age" not in parse_qs(urlsplit(target).query)
    signed = await sign_in(browser, user, target)
    # The password is not the whole sign-in of a person with a one-time code app.
    assert signed.headers["location"].startswith("/login/verify?")


@pytest.mark.one_backend
@pytest.mark.feature("mfa-policy", "mfa-step-up")
async def test_auth_mfa_required_sends_one_factor_sessions_to_the_step_up(
    settings: Settings, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    with_app = await make_user("alice")
    without = await make_user("bob")
    await add_totp(state, with_app.id)
    async with app_with(settings, mfa="required") as application:
        own: AppState = application.state.auth
        for user, then in ((with_app, "/login/verify?"), (without, "/account/security?")):
            async with browser_of(application) as browser:
                await session_for(own, browser, user.id, "pwd")
                params = authorize_params(pkce()[1])
                response = await browser.get("/oauth2/authorize", params=params)
                assert response.status_code == 302, response.text
                assert response.headers["location"].startswith("/login/step-up?")
                # A second factor for who has one, enrolment for who has none.
                step = await browser.get(response.headers["location"])
                assert step.headers["location"].startswith(then), step.headers["location"]
                none = await browser.get("/oauth2/authorize", params={**params, "prompt": "none"})
                error = "login_required" if user is with_app else "interaction_required"
                assert query_of(none)["error"] == error
                # A multi-factor session goes through.
                await session_for(own, browser, user.id, MULTI)
                verifier, challenge = pkce()
                page = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
                code = await code_of(browser, page)
                tokens = (await exchange(browser, code, verifier)).json()
                assert claims_of(tokens["id_token"])["acr"] == "2"


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
@pytest.mark.parametrize(
    "acr_values",
    ["2" * 3000, "\u00e9 2", "1 2 phr phrh " * 100, "2\t2", ""],
)
async def test_hostile_acr_values_get_an_answer_never_a_500(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    acr_values: str,
) -> None:
    await spa(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    await session_for(state, browser, user.id, "pwd")
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(pkce()[1], acr_values=acr_values)
    )
    assert response.status_code in (200, 302, 400), response.text


# -- the password grant ---------------------------------------------------------------------


@pytest.mark.feature("mfa-policy", "grant-password")
async def test_the_password_grant_refuses_a_person_with_a_one_time_code_app(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    events: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    creds = await pwd_client(make_client)
    user = await make_user()
    await add_totp(state, user.id)
    failures: list[str] = []
    real_failed = state.limiter.failed

    async def failed(account: str, ip: str) -> None:
        failures.append(account)
        await real_failed(account, ip)

    monkeypatch.setattr(state.limiter, "failed", failed)
    response = await password_grant(client, creds, user, scope="openid")
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": SECOND_FACTOR_NEEDED}
    assert failures == []  # a right password is no failed guess
    assert (
        "token.second_factor_needed",
        {"client_id": "native", "user_id": user.id, "policy": "optional"},
    ) in events
    async with state.db.sessions() as db:  # nothing was started
        assert await db.scalar(select(func.count()).select_from(RefreshFamily)) == 0
    # A wrong password gets the usual answer, and counts.
    wrong = UserCreds(user.id, user.username, "not the password")
    response = await password_grant(client, creds, wrong, scope="openid")
    assert response.json() == {"error": "invalid_grant", "error_description": BAD_CREDENTIALS}
    assert failures == ["alice"]


@pytest.mark.one_backend
@pytest.mark.feature("mfa-policy", "grant-password")
async def test_the_password_grant_under_required_and_off(
    settings: Settings, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    creds = await pwd_client(make_client)
    plain = await make_user("bob")
    with_app = await make_user("alice")
    await add_totp(state, with_app.id)
    async with app_with(settings, mfa="required") as application, browser_of(application) as http:
        for user in (plain, with_app):
            response = await password_grant(http, creds, user)
            assert response.status_code == 400
            assert response.json()["error_description"] == SECOND_FACTOR_NEEDED
    async with app_with(settings, mfa="off") as application, browser_of(application) as http:
        for user in (plain, with_app):
            response = await password_grant(http, creds, user, scope="openid")
            assert response.status_code == 200, response.text
            assert claims_of(response.json()["id_token"])["amr"] == ["pwd"]
