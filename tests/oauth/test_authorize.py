"""The authorization code flow with PKCE (RFC 6749 §4.1, RFC 7636, RFC 9207, OIDC Core §3.1)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import update

from server.deps import AppState
from server.models import AuthorizationCode, RefreshFamily
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    UserCreds,
    csrf_of,
    password_grant,
    sign_in,
)

pytestmark = pytest.mark.feature("authorization-code-pkce")
ISSUER = "http://127.0.0.1:8000"
CALLBACK = "https://app.example/cb"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def query_of(response: httpx.Response) -> dict[str, str]:
    location = response.headers["location"]
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def claims_of(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def header_of(jwt: str) -> dict[str, Any]:
    head = jwt.split(".")[0]
    header: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return header


async def spa(make_client: MakeClient, **extra: Any) -> ClientCreds:
    """A public single-page app: PKCE, no secret."""
    extra.setdefault("scope", "openid profile email api")
    return await make_client(
        "spa",
        public=True,
        grants=["authorization_code", "refresh_token"],
        redirect_uris=[CALLBACK],
        name="Photo App",
        **extra,
    )


def authorize_params(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": "spa",
        "redirect_uri": CALLBACK,
        "scope": "openid profile email",
        "state": "st-123",
        "nonce": "n-456",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


async def get_code(
    browser: httpx.AsyncClient, challenge: str, *, consent: bool = True, **extra: str
) -> str:
    """Signed-in browser → authorize (→ consent) → the code in the redirect."""
    response = await browser.get("/oauth2/authorize", params=authorize_params(challenge, **extra))
    if consent:
        assert response.status_code == 200, response.text
        assert "Photo App" in response.text
        response = await browser.post(
            "/consent",
            data={
                **dict(_hidden_fields(response.text)),
                "csrf_token": csrf_of(response),
                "decision": "allow",
            },
        )
        assert response.status_code == 303
    else:
        assert response.status_code == 302, response.text
    params = query_of(response)
    assert response.headers["location"].startswith(CALLBACK + "?")
    assert params["state"] == extra.get("state", "st-123")
    assert params["iss"] == ISSUER  # RFC 9207
    return params["code"]


def _hidden_fields(html: str) -> list[tuple[str, str]]:
    import html as html_lib
    import re

    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html)
    return [(k, html_lib.unescape(v)) for k, v in fields if k != "csrf_token"]


async def exchange(
    http: httpx.AsyncClient, code: str, verifier: str | None, **extra: str
) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "client_id": "spa",
        **({"code_verifier": verifier} if verifier else {}),
        **extra,
    }
    return await http.post("/oauth2/token", data=data)


@pytest.mark.feature("id-tokens", "userinfo", "hosted-pages")
async def test_the_whole_flow(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
) -> None:
    await spa(make_client)
    user = await make_user(email="alice@example.com", name="Alice Liddell")
    verifier, challenge = pkce()

    # Not signed in: the sign-in page, which comes back to the request.
    first = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    assert first.status_code == 302
    login_url = first.headers["location"]
    assert login_url.startswith("/login?next=%2Foauth2%2Fauthorize%3F")
    next_url = parse_qs(urlsplit(login_url).query)["next"][0]
    login_page = await browser.get(login_url)
    assert "Photo App" in login_page.text  # "to continue to Photo App"
    signed = await sign_in(browser, user, next_url)
    assert signed.headers["location"] == next_url

    code = await get_code(browser, challenge)
    response = await exchange(browser, code, verifier)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    tokens = response.json()
    assert set(tokens) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "refresh_token",
        "id_token",
    }
    access = claims_of(tokens["access_token"])
    assert (access["sub"], access["client_id"], access["scope"]) == (
        user.id,
        "spa",
        "openid profile email",
    )
    id_token = claims_of(tokens["id_token"])
    assert header_of(tokens["id_token"])["typ"] == "JWT"
    assert header_of(tokens["id_token"])["alg"] == "RS256"
    assert id_token["iss"] == ISSUER
    assert id_token["aud"] == "spa"
    assert id_token["sub"] == user.id
    assert id_token["nonce"] == "n-456"
    assert id_token["auth_time"] <= id_token["iat"]
    digest = hashlib.sha256(tokens["access_token"].encode()).digest()[:16]
    assert id_token["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert id_token["sid"] == access["sid"]
    # The ID token verifies against the JWKS like any token of ours.
    import jwt as pyjwt

    jwks = (await browser.get("/.well-known/jwks.json")).json()
    key = pyjwt.PyJWK(
        next(k for k in jwks["keys"] if k["kid"] == header_of(tokens["id_token"])["kid"])
    )
    pyjwt.decode(tokens["id_token"], key.key, algorithms=["RS256"], audience="spa", issuer=ISSUER)

    info = await browser.get(
        "/userinfo", headers={"Authorization": "Bearer " + tokens["access_token"]}
    )
    assert info.status_code == 200
    assert info.json() == {
        "sub": user.id,
        "preferred_username": "alice",
        "name": "Alice Liddell",
        "email": "alice@example.com",
        "email_verified": False,
        "amr": ["pwd"],
        "acr": "1",
    }
    # The refresh token works (and rotates) like any other.
    refreshed = await browser.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "spa",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refreshed.status_code == 200, refreshed.text
    # OIDC Core §12.2: a refresh with openid scope returns a new ID token, without a nonce.
    renewed = claims_of(refreshed.json()["id_token"])
    assert (renewed["aud"], renewed["sub"], renewed["sid"]) == ("spa", user.id, access["sid"])
    assert "nonce" not in renewed
    async with state.db.sessions() as db:
        family = await db.get(RefreshFamily, access["sid"])
        assert family is not None and family.browser_session_id is not None


async def test_consent_is_remembered_per_client_and_scope(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    await get_code(browser, challenge)
    # Same scope again: straight to the client.
    await get_code(browser, challenge, consent=False)
    # A narrower scope is covered too.
    await get_code(browser, challenge, consent=False, scope="openid")
    # A wider one asks again; prompt=consent always asks.
    await get_code(browser, challenge, scope="openid profile email api")
    await get_code(browser, challenge, consent=True, prompt="consent")


@pytest.mark.feature("account-api-scope")
async def test_the_account_scope_needs_its_own_consent_naming_what_it_allows(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client, scope="openid profile email account")
    await sign_in(browser, await make_user(email="alice@example.com"))
    verifier, challenge = pkce()
    # Consent to sign-in only: that token cannot reach the account API.
    code = await get_code(browser, challenge, scope="openid")
    token = (await exchange(browser, code, verifier)).json()["access_token"]
    refused = await browser.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403
    assert 'scope="account"' in refused.headers["www-authenticate"]
    # Asking for account asks again, and the page says what it allows.
    page = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, scope="openid account")
    )
    assert page.status_code == 200, page.text
    assert "Read and change your profile and email address, and end your sign-ins" in page.text
    code = await get_code(browser, challenge, scope="openid account")
    granted = (await exchange(browser, code, verifier)).json()["access_token"]
    me = await browser.get("/api/v1/me", headers={"Authorization": f"Bearer {granted}"})
    assert me.status_code == 200 and me.json()["email"] == "alice@example.com"
    # Consented to, it is still not the password: that is for first-party apps.
    change = {"current_password": "correct horse battery", "new_password": "a new passphrase!"}
    password = await browser.post(
        "/api/v1/me/password", json=change, headers={"Authorization": f"Bearer {granted}"}
    )
    assert password.status_code == 403


async def test_a_first_party_client_skips_consent(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    await get_code(browser, challenge, consent=False)


async def test_deny_sends_access_denied(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    page = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    response = await browser.post(
        "/consent",
        data={**dict(_hidden_fields(page.text)), "csrf_token": csrf_of(page), "decision": "deny"},
    )
    assert response.status_code == 303
    assert query_of(response) == {
        "error": "access_denied",
        "error_description": "The request was denied.",
        "state": "st-123",
        "iss": ISSUER,
    }


async def test_prompt_none_and_prompt_login(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    silent = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, prompt="none")
    )
    assert silent.status_code == 302
    assert query_of(silent)["error"] == "login_required"
    assert (query_of(silent)["state"], query_of(silent)["iss"]) == ("st-123", ISSUER)

    user = await make_user()
    await sign_in(browser, user)
    no_consent = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, prompt="none")
    )
    assert query_of(no_consent)["error"] == "consent_required"

    again = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, prompt="login")
    )
    assert again.status_code == 302
    assert again.headers["location"].startswith("/login?next=")
    next_url = parse_qs(urlsplit(again.headers["location"]).query)["next"][0]
    assert "prompt" not in parse_qs(urlsplit(next_url).query), "no loop back to the login page"

    mixed = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, prompt="none login")
    )
    assert query_of(mixed)["error"] == "invalid_request"


async def test_a_code_is_single_use_and_reuse_revokes_what_it_issued(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    code = await get_code(browser, challenge)
    first = await exchange(browser, code, verifier)
    assert first.status_code == 200
    tokens = first.json()

    replay = await exchange(browser, code, verifier)

    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    refresh = await browser.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "spa",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refresh.json()["error"] == "invalid_grant", "the first exchange's family must be dead"
    async with state.db.sessions() as db:
        family = await db.get(RefreshFamily, claims_of(tokens["access_token"])["sid"])
        assert family is not None and family.revoked_reason == "code_reuse"


async def test_an_expired_code_is_refused(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    code = await get_code(browser, challenge)
    async with state.db.sessions() as db:
        row = await db.execute(update(AuthorizationCode).values(expires_at=1))
        assert row.rowcount == 1  # type: ignore[attr-defined]
        await db.commit()
    response = await exchange(browser, code, verifier)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize(
    ("verifier", "extra", "error"),
    [
        (None, {}, "invalid_request"),  # public client without a verifier
        ("wrong-" + "v" * 50, {}, "invalid_grant"),
        ("short", {}, "invalid_request"),
        ("RIGHT", {"redirect_uri": "https://app.example/other"}, "invalid_grant"),
        ("RIGHT", {"client_id": "other-spa"}, "invalid_grant"),
    ],
    ids=["no-verifier", "wrong-verifier", "malformed-verifier", "other-redirect", "other-client"],
)
async def test_token_exchange_errors(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    verifier: str | None,
    extra: dict[str, str],
    error: str,
) -> None:
    await spa(make_client)
    await make_client(
        "other-spa", public=True, grants=["authorization_code"], redirect_uris=[CALLBACK]
    )
    await sign_in(browser, await make_user())
    right, challenge = pkce()
    code = await get_code(browser, challenge)
    response = await exchange(browser, code, right if verifier == "RIGHT" else verifier, **extra)
    assert (response.status_code, response.json()["error"]) == (400, error)
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"scope": "openid admin"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": None}, "unsupported_response_type"),
    ],
    ids=["no-pkce", "plain", "no-method", "bad-challenge", "scope", "implicit", "no-type"],
)
async def test_errors_after_the_redirect_uri_is_validated_go_to_the_client(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    change: dict[str, str | None],
    error: str,
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    params = {k: v for k, v in {**authorize_params(challenge), **change}.items() if v is not None}
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 302, response.text
    assert response.headers["location"].startswith(CALLBACK + "?")
    result = query_of(response)
    assert (result["error"], result["state"], result["iss"]) == (error, "st-123", ISSUER)
    assert "code" not in result


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "change",
    [
        {"redirect_uri": "https://evil.example/cb"},
        {"redirect_uri": CALLBACK + "/extra"},
        {"redirect_uri": CALLBACK + "?x=1"},
        {"redirect_uri": "https://app.example/CB"},
        {"redirect_uri": "https://app.example@evil.example/cb"},
        {"client_id": "nobody"},
        {"client_id": None},
    ],
    ids=[
        "other-host",
        "longer-path",
        "extra-query",
        "case",
        "userinfo",
        "unknown-client",
        "no-client",
    ],
)
async def test_errors_before_the_redirect_uri_is_validated_stay_on_the_error_page(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    change: dict[str, str | None],
) -> None:
    # RFC 6749 §4.1.2.1: never redirect to an unverified URI (no open redirector).
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    params = {k: v for k, v in {**authorize_params(challenge), **change}.items() if v is not None}
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert "evil.example" not in response.headers.get("location", "")


async def test_a_repeated_parameter_is_refused_on_the_error_page(
    browser: httpx.AsyncClient, make_client: MakeClient
) -> None:
    await spa(make_client)
    response = await browser.get(
        "/oauth2/authorize?response_type=code&client_id=spa&client_id=spa&redirect_uri=" + CALLBACK
    )
    assert response.status_code == 400
    assert "more than once" in response.text


async def test_a_confidential_client_authenticates_and_pkce_is_optional(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    web = await make_client(
        "web",
        grants=["authorization_code"],
        scope="openid",
        redirect_uris=[CALLBACK],
        first_party=True,
    )
    await sign_in(browser, await make_user())
    response = await browser.get(
        "/oauth2/authorize",
        params={"response_type": "code", "client_id": "web", "state": "s"},  # one URI: default
    )
    assert response.status_code == 302
    code = query_of(response)["code"]
    no_secret = await browser.post(
        "/oauth2/token", data={"grant_type": "authorization_code", "code": code, "client_id": "web"}
    )
    assert (no_secret.status_code, no_secret.json()["error"]) == (401, "invalid_client")
    ok = await browser.post(
        "/oauth2/token", data={"grant_type": "authorization_code", "code": code}, headers=web.basic
    )
    assert ok.status_code == 200, ok.text
    assert "refresh_token" not in ok.json()  # not allowed the refresh_token grant
    assert "id_token" in ok.json()


@pytest.mark.feature("id-tokens")
async def test_the_password_grant_issues_an_id_token_for_openid(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="openid profile")
    user: UserCreds = await make_user()
    with_openid = (await password_grant(client, creds, user, scope="openid profile")).json()
    claims = claims_of(with_openid["id_token"])
    assert (claims["aud"], claims["sub"], claims["iss"]) == ("app", user.id, ISSUER)
    assert "nonce" not in claims
    assert "id_token" not in (await password_grant(client, creds, user, scope="profile")).json()


@pytest.mark.feature("end-session")
async def test_signing_out_ends_the_sign_ins_this_browser_created(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
) -> None:
    await spa(make_client, post_logout_redirect_uris=["https://app.example/bye"])
    password_app = await make_client("mobile")
    user = await make_user()
    await sign_in(browser, user)
    verifier, challenge = pkce()
    tokens = (await exchange(browser, await get_code(browser, challenge), verifier)).json()
    elsewhere = (await password_grant(client, password_app, user)).json()

    # RP-initiated logout with the ID token as the hint (it names the client).
    params = {
        "id_token_hint": tokens["id_token"],
        "post_logout_redirect_uri": "https://app.example/bye",
        "state": "bye-1",
    }
    confirm = await browser.get("/logout", params=params)
    assert "Photo App" in confirm.text
    done = await browser.post("/logout", data={**params, "csrf_token": csrf_of(confirm)})

    assert done.headers["location"] == "https://app.example/bye?state=bye-1"
    refused = await browser.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": "spa",
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refused.json()["error"] == "invalid_grant"
    # A sign-in made elsewhere (the password grant of another app) is not this browser's.
    still = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": elsewhere["refresh_token"]},
        headers=password_app.basic,
    )
    assert still.status_code == 200


@pytest.mark.feature("end-session")
async def test_logout_without_a_session_or_with_a_foreign_hint(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client, post_logout_redirect_uris=["https://app.example/bye"])
    # Not signed in: nothing to confirm; a registered URI is followed at once.
    gone = await browser.get(
        "/logout",
        params={"client_id": "spa", "post_logout_redirect_uri": "https://app.example/bye"},
    )
    assert (gone.status_code, gone.headers["location"]) == (303, "https://app.example/bye")
    plain = await browser.get("/logout")
    assert plain.status_code == 200 and "not signed in" in plain.text
    # A hint for one client and a client_id of another: no redirect at all.
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    id_token = (await exchange(browser, await get_code(browser, challenge), verifier)).json()[
        "id_token"
    ]
    await make_client("other", public=True, post_logout_redirect_uris=["https://other.example/"])
    params = {
        "id_token_hint": id_token,
        "client_id": "other",
        "post_logout_redirect_uri": "https://other.example/",
    }
    confirm = await browser.get("/logout", params=params)
    done = await browser.post("/logout", data={**params, "csrf_token": csrf_of(confirm)})
    assert done.headers["location"] == "/login?notice=signed_out"
    # A tampered hint is ignored the same way.
    bad = await browser.get("/logout", params={"id_token_hint": id_token[:-4] + "AAAA"})
    assert bad.status_code == 200


async def test_simultaneous_exchanges_of_one_code_issue_at_most_once(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    import asyncio

    await spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    code = await get_code(browser, challenge)
    results = await asyncio.gather(*(exchange(browser, code, verifier) for _ in range(6)))
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) <= 1
    assert all(r.json().get("error") == "invalid_grant" for r in results if r.status_code != 200)
    async with state.db.sessions() as db:
        from sqlalchemy import select

        live = [f for f in await db.scalars(select(RefreshFamily)) if f.revoked_at is None]
    # Either exactly one winner whose family then died of the replays, or none at all:
    # no family may survive alongside a replayed code.
    assert live == []


async def test_the_endpoint_accepts_post_and_refuses_malformed_requests(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client, first_party=True)
    user = await make_user()
    await sign_in(browser, user)
    verifier, challenge = pkce()
    # OpenID Connect Core §3.1.2.1: POST with a form body works like GET.
    posted = await browser.post("/oauth2/authorize", data=authorize_params(challenge))
    assert posted.status_code == 303
    code = query_of(posted)["code"]
    too_long = await browser.get("/oauth2/authorize", params={"state": "x" * 5000})
    assert too_long.status_code == 400
    bad_utf8 = await browser.get("/oauth2/authorize?client_id=%ff")
    assert bad_utf8.status_code == 400
    page = await browser.get("/login")
    undecided = await browser.post(
        "/consent", data={**authorize_params(challenge), "csrf_token": csrf_of(page)}
    )
    assert undecided.status_code == 400
    # The person is disabled between the code and its exchange: no tokens.
    from server import manage

    async with state.db.sessions() as db:
        await manage.disable_user(db, user.username)
        await db.commit()
    response = await exchange(browser, code, verifier)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_grant")


async def test_max_age_asks_for_a_fresh_sign_in(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    from server.models import BrowserSession

    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    fresh = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, max_age="600")
    )
    assert fresh.status_code == 302 and "code=" in fresh.headers["location"]
    async with state.db.sessions() as db:
        await db.execute(update(BrowserSession).values(auth_time=BrowserSession.auth_time - 601))
        await db.commit()
    stale = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, max_age="600")
    )
    assert stale.headers["location"].startswith("/login?next=")
    next_url = parse_qs(urlsplit(stale.headers["location"]).query)["next"][0]
    assert "max_age" not in next_url
    bad = await browser.get("/oauth2/authorize", params=authorize_params(challenge, max_age="-1"))
    assert query_of(bad)["error"] == "invalid_request"
