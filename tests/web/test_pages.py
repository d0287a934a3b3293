"""The hosted pages over HTTP: each browser-security rule tried for real."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from server.config import Settings
from server.deps import AppState
from server.main import create_app
from server.models import BrowserSession, RefreshFamily
from tests.conftest import MakeClient, MakeUser, UserCreds, csrf_of, password_grant, sign_in

pytestmark = pytest.mark.feature("hosted-pages")


def set_cookies(response: httpx.Response) -> dict[str, dict[str, Any]]:
    """Every Set-Cookie of the response: name → attributes (lower-case keys)."""
    cookies: dict[str, dict[str, Any]] = {}
    for header in response.headers.get_list("set-cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            attrs = {k: v for k, v in morsel.items() if v}
            cookies[name] = {"value": morsel.value, **attrs}
    return cookies


# -- headers and cookies ------------------------------------------------------------------


@pytest.mark.one_backend
@pytest.mark.feature("browser-security-headers")
@pytest.mark.parametrize("path", ["/login", "/register", "/account", "/logout", "/nope"])
async def test_security_headers_on_every_page(browser: httpx.AsyncClient, path: str) -> None:
    response = await browser.get(path)
    csp = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp
    assert "default-src 'none'" in csp
    # Scripts only from our own files (static/passkeys.js): no inline script, no eval.
    assert "script-src 'self';" in csp
    assert "unsafe" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.feature("browser-security-headers")
async def test_pages_are_not_cached_and_load_only_our_stylesheet(
    browser: httpx.AsyncClient,
) -> None:
    page = await browser.get("/login")
    assert page.headers["cache-control"] == "no-store"
    assert "<script" not in page.text and "style=" not in page.text
    css = await browser.get("/static/style.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")


@pytest.mark.feature("csrf")
async def test_cookies_on_http_are_httponly_and_lax(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    page = await browser.get("/login")
    csrf_cookie = set_cookies(page)["csrf"]
    assert csrf_cookie["httponly"] is True and csrf_cookie["samesite"] == "lax"
    assert csrf_cookie["path"] == "/"
    signed = await sign_in(browser, await make_user())
    session = set_cookies(signed)["session"]
    assert session["httponly"] is True and session["samesite"] == "lax"
    assert "secure" not in session  # http issuer (development)


@pytest.mark.feature("csrf")
async def test_cookies_on_https_use_the_host_prefix_and_secure(
    settings: Settings, make_user: MakeUser
) -> None:
    app = create_app(settings.model_copy(update={"issuer": "https://auth.example"}))
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        from server import manage

        async with state.db.sessions() as db:
            await manage.create_user(
                db, state.passwords, username="hana", password="correct horse battery"
            )
            await db.commit()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://auth.example") as http:
            signed = await sign_in(http, UserCreds("", "hana", "correct horse battery"))
    cookies = set_cookies(signed)
    for name in ("__Host-session", "__Host-csrf"):
        assert cookies[name]["secure"] is True
        assert cookies[name]["path"] == "/"
        assert "domain" not in cookies[name]  # __Host- forbids Domain
        assert cookies[name]["samesite"] == "lax" and cookies[name]["httponly"] is True


# -- CSRF ---------------------------------------------------------------------------------


@pytest.mark.one_backend
@pytest.mark.feature("csrf")
@pytest.mark.parametrize(
    "path", ["/login", "/register", "/logout", "/consent", "/account/sessions/x/revoke"]
)
@pytest.mark.parametrize("token", [None, "forged", "from-another-browser", "é", "ümlaut-ß"])
async def test_every_form_refuses_a_post_without_its_csrf_token(
    browser: httpx.AsyncClient, app: Any, make_user: MakeUser, path: str, token: str | None
) -> None:
    user = await make_user()
    await sign_in(browser, user)
    if token == "from-another-browser":
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1:8000"
        ) as other:
            token = csrf_of(await other.get("/login"))  # valid, but for another cookie
    data = {"username": user.username, "password": user.password, "decision": "allow"}
    if token is not None:
        data["csrf_token"] = token
    response = await browser.post(path, data=data)
    assert response.status_code == 403
    assert "Form expired" in response.text
    assert "set-cookie" not in response.headers or "session=" not in response.headers["set-cookie"]


@pytest.mark.feature("csrf")
async def test_a_cross_site_post_without_the_csrf_cookie_is_refused(
    app: Any, make_user: MakeUser
) -> None:
    # A form on evil.example posts straight to /login: no cookie (SameSite) and no token.
    user = await make_user()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        response = await http.post(
            "/login", data={"username": user.username, "password": user.password}
        )
    assert response.status_code == 403


# -- sign in ------------------------------------------------------------------------------


async def test_sign_in_starts_a_new_session_every_time(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState
) -> None:
    user = await make_user()
    first = set_cookies(await sign_in(browser, user))["session"]["value"]
    second = set_cookies(await sign_in(browser, user))["session"]["value"]
    assert first != second
    async with state.db.sessions() as db:
        rows = list(await db.scalars(select(BrowserSession).order_by(BrowserSession.created_at)))
    assert len(rows) == 2
    assert sum(row.ended_at is None for row in rows) == 1, "the fixated/old one is ended"
    # The old cookie value no longer signs anyone in.
    browser.cookies.set("session", first)
    assert (await browser.get("/account")).status_code == 303


async def test_a_planted_session_cookie_is_replaced_on_sign_in(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    browser.cookies.set("session", "attacker-chosen-value")
    signed = await sign_in(browser, await make_user())
    assert set_cookies(signed)["session"]["value"] != "attacker-chosen-value"


@pytest.mark.parametrize("case", ["unknown-user", "wrong-password", "disabled"])
async def test_one_generic_message_for_every_failed_sign_in(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState, case: str
) -> None:
    from server import manage

    user = await make_user()
    username, password = user.username, user.password
    if case == "unknown-user":
        username = "nobody"
    elif case == "wrong-password":
        password = "not the password"
    else:
        async with state.db.sessions() as db:
            await manage.disable_user(db, user.username)
            await db.commit()
    page = await browser.get("/login")
    response = await browser.post(
        "/login",
        data={"csrf_token": csrf_of(page), "username": username, "password": password},
    )
    assert response.status_code == 200
    assert "Incorrect username or password." in response.text
    assert "session" not in set_cookies(response)
    assert f'value="{username}"' in response.text  # the username is kept, never the password
    assert password not in response.text


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example",
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "https:evil.example",
        "//user@evil.example",
        "https://127.0.0.1:8000@evil.example/",
        "javascript:alert(1)",
        "evil.example",
        " /account",
    ],
)
async def test_sign_in_never_redirects_off_site(
    browser: httpx.AsyncClient, make_user: MakeUser, target: str
) -> None:
    signed = await sign_in(browser, await make_user(), target)
    assert signed.headers["location"] == "/account"


async def test_sign_in_redirects_to_a_local_path(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    signed = await sign_in(browser, await make_user(), "/oauth2/authorize?client_id=x")
    assert signed.headers["location"] == "/oauth2/authorize?client_id=x"


# -- sign up ------------------------------------------------------------------------------


async def test_register_creates_the_account_and_signs_in(
    browser: httpx.AsyncClient, state: AppState
) -> None:
    page = await browser.get("/register")
    response = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(page),
            "username": "Zoë",
            "email": "zoe@example.com",
            "name": "Zoë Z",
            "password": "a fine long password",
            "password_confirm": "a fine long password",
        },
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/account"
    account = await browser.get("/account")
    assert account.status_code == 200 and "Zoë" in account.text


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"password_confirm": "something else entirely"}, "do not match"),
        ({"password": "short", "password_confirm": "short"}, "at least 8"),
        ({"username": "bad name!"}, "Username must be"),
        ({"username": "ALICE"}, "That username is taken."),
        ({"username": ""}, "Choose a username."),
        ({"email": "not-an-email"}, "not a valid email"),
    ],
)
async def test_register_refuses_bad_input_and_keeps_what_was_typed(
    browser: httpx.AsyncClient, make_user: MakeUser, fields: dict[str, str], message: str
) -> None:
    await make_user("alice")
    page = await browser.get("/register")
    data = {
        "csrf_token": csrf_of(page),
        "username": "newbie",
        "email": "newbie@example.com",
        "password": "a fine long password",
        "password_confirm": "a fine long password",
        **fields,
    }
    response = await browser.post("/register", data=data)
    assert response.status_code == 400
    assert message in response.text
    assert "a fine long password" not in response.text


async def test_registration_can_be_switched_off(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"registration_enabled": False}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            assert (await http.get("/register")).status_code == 404
            page = await http.get("/login")
            assert "/register" not in page.text
            posted = await http.post("/register", data={"username": "x"})
            assert posted.status_code == 404


# -- sessions page and sign out -------------------------------------------------------------


@pytest.mark.feature("account-page")
async def test_account_lists_sessions_and_signs_one_out(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    creds = await make_client("mobile", name="Mobile App")
    user = await make_user()
    tokens = (await password_grant(client, creds, user)).json()
    await sign_in(browser, user)

    page = await browser.get("/account")

    assert page.status_code == 200
    assert "Mobile App" in page.text
    action = re.search(r'action="(/account/sessions/[0-9a-f]+/revoke)"', page.text)
    assert action is not None
    response = await browser.post(action.group(1), data={"csrf_token": csrf_of(page)})
    assert response.status_code == 303
    assert response.headers["location"] == "/account?notice=revoked"
    refused = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        headers=creds.basic,
    )
    assert refused.json()["error"] == "invalid_grant"
    after = await browser.get("/account?notice=revoked")
    assert "That session has been signed out." in after.text
    assert "Mobile App" not in after.text


@pytest.mark.feature("account-page")
async def test_a_person_cannot_sign_out_someone_elses_session(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    creds = await make_client()
    victim = await make_user("victim")
    await password_grant(client, creds, victim)
    async with state.db.sessions() as db:
        family = (await db.scalars(select(RefreshFamily))).one()
    await sign_in(browser, await make_user("mallory"))
    page = await browser.get("/login")  # mallory has no session forms; same CSRF cookie
    response = await browser.post(
        f"/account/sessions/{family.id}/revoke", data={"csrf_token": csrf_of(page)}
    )
    assert response.status_code == 404
    async with state.db.sessions() as db:
        assert (await db.get(RefreshFamily, family.id)).revoked_at is None  # type: ignore[union-attr]


@pytest.mark.feature("account-page")
async def test_account_needs_a_signed_in_person(browser: httpx.AsyncClient) -> None:
    response = await browser.get("/account")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/account"


@pytest.mark.feature("end-session")
async def test_sign_out_ends_the_session_and_returns_to_a_registered_uri_only(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await make_client(
        "web",
        grants=["authorization_code"],
        redirect_uris=["https://app.example/cb"],
        post_logout_redirect_uris=["https://app.example/bye"],
        name="Web App",
    )
    await sign_in(browser, await make_user())
    params = {
        "client_id": "web",
        "post_logout_redirect_uri": "https://app.example/bye",
        "state": "s1",
    }
    confirm = await browser.get("/logout", params=params)
    assert confirm.status_code == 200
    assert "Web App" in confirm.text
    done = await browser.post("/logout", data={**params, "csrf_token": csrf_of(confirm)})
    assert done.status_code == 303
    assert done.headers["location"] == "https://app.example/bye?state=s1"
    # Every cookie of ours goes, a second step half done (``mfa``) included.
    assert {"session", "csrf", "mfa"} <= set(set_cookies(done))
    assert set_cookies(done)["mfa"]["max-age"] == "0"
    assert (await browser.get("/account")).status_code == 303  # signed out
    async with state.db.sessions() as db:
        sessions = list(await db.scalars(select(BrowserSession)))
    assert [s.ended_at is not None for s in sessions] == [True]


@pytest.mark.feature("end-session")
@pytest.mark.parametrize(
    "uri", ["https://evil.example/", "https://app.example/bye/x", "https://app.example/cb"]
)
async def test_sign_out_refuses_an_unregistered_return_uri(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, uri: str
) -> None:
    await make_client(
        "web",
        grants=["authorization_code"],
        redirect_uris=["https://app.example/cb"],
        post_logout_redirect_uris=["https://app.example/bye"],
    )
    await sign_in(browser, await make_user())
    params = {"client_id": "web", "post_logout_redirect_uri": uri}
    confirm = await browser.get("/logout", params=params)
    done = await browser.post("/logout", data={**params, "csrf_token": csrf_of(confirm)})
    assert done.status_code == 303
    assert done.headers["location"] == "/login?notice=signed_out"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "path",
    [
        "/login",
        "/register",
        "/logout",
        "/consent",
        "/account/sessions/x/revoke",
        "/oauth2/authorize",
    ],
)
@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"username=a", "application/json", 400),
        (b"username=a%00b", "application/x-www-form-urlencoded", 400),
        (b"username=%ff", "application/x-www-form-urlencoded", 400),
        (b"a=1&a=2", "application/x-www-form-urlencoded", 400),
        (b"x=" + b"a" * 20_000, "application/x-www-form-urlencoded", 413),
    ],
    ids=["json", "nul", "bad-utf8", "duplicate", "oversized"],
)
async def test_malformed_posts_get_an_error_page_never_a_500(
    browser: httpx.AsyncClient, path: str, content: bytes, content_type: str, status: int
) -> None:
    await browser.get("/login")  # a CSRF cookie, as a real browser would have
    response = await browser.post(path, content=content, headers={"Content-Type": content_type})
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")


async def test_sign_in_rehashes_a_password_hashed_with_old_parameters(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState
) -> None:
    from argon2 import PasswordHasher

    from server.models import User

    user = await make_user()
    old = PasswordHasher(time_cost=3, memory_cost=512, parallelism=1).hash(user.password)
    async with state.db.sessions() as db:
        row = (await db.scalars(select(User))).one()
        row.password_hash = old
        await db.commit()
    await sign_in(browser, user)
    async with state.db.sessions() as db:
        assert (await db.scalars(select(User))).one().password_hash != old


async def test_posts_without_a_session_go_to_the_sign_in_page(
    browser: httpx.AsyncClient,
) -> None:
    page = await browser.get("/login")
    token = csrf_of(page)
    out = await browser.post("/logout", data={"csrf_token": token})
    assert (out.status_code, out.headers["location"]) == (303, "/login?notice=signed_out")
    token = csrf_of(await browser.get("/login"))  # sign-out cleared the CSRF cookie too
    revoke = await browser.post("/account/sessions/x/revoke", data={"csrf_token": token})
    assert (revoke.status_code, revoke.headers["location"]) == (303, "/login?next=/account")


@pytest.mark.feature("authorization-code-pkce")
async def test_a_long_authorization_request_survives_the_sign_in(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    """The authorization endpoint takes a query of up to 4096 characters: the sign-in page's
    ``next`` must carry all of it back, not fall back to /account (it did at 2048)."""
    await make_client(
        "web",
        grants=["authorization_code"],
        redirect_uris=["https://app.example/cb"],
        first_party=True,
    )
    user = await make_user()
    query = {
        "client_id": "web",
        "response_type": "code",
        "redirect_uri": "https://app.example/cb",
        "state": "s" * 3500,
        "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        "code_challenge_method": "S256",
    }
    to_login = await browser.get("/oauth2/authorize", params=query)
    assert to_login.status_code == 302
    next_url = parse_qs(urlsplit(to_login.headers["location"]).query)["next"][0]
    assert len(next_url) > 3500
    signed = await sign_in(browser, user, next_url)
    assert signed.headers["location"] == next_url
    back = await browser.get(next_url)
    assert back.headers["location"].startswith("https://app.example/cb?code=")
