"""Pushed authorization requests (RFC 9126) and codes bound to a DPoP key (RFC 9449 §10).

The client pushes its request to /oauth2/par (authenticated as at the token endpoint), gets a
``request_uri``, and sends the browser to /oauth2/authorize with it; the flow then goes on as
an ordinary one (``test_authorize.py``), on the pushed parameters only.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from server import manage
from server.config import Settings
from server.deps import AppState
from server.models import AuthorizationCode, PushedRequest, now
from server.oauth.par import PUSHED_REQUEST_TTL, URN_PREFIX
from tests.conftest import (
    MakeClient,
    MakeUser,
    SharedApps,
    UserCreds,
    csrf_of,
    make_settings,
    reset_app,
    sign_in,
)
from tests.oauth.test_authorize import (
    CALLBACK,
    ISSUER,
    _hidden_fields,
    authorize_params,
    claims_of,
    exchange,
    pkce,
    query_of,
    spa,
)
from tests.oauth.test_client_assertion import EC, RSA, claims_for, public_jwks, sign
from tests.oauth.test_dpop_tokens import KEY, OTHER_KEY, make_proof, payload

pytestmark = pytest.mark.feature("par")

PAR = "/oauth2/par"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


async def push(http: httpx.AsyncClient, data: dict[str, str], **kw: Any) -> httpx.Response:
    return await http.post(PAR, data=data, **kw)


async def pushed_uri(http: httpx.AsyncClient, challenge: str, **extra: str) -> str:
    response = await push(http, authorize_params(challenge, **extra))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["expires_in"] == PUSHED_REQUEST_TTL == 60
    assert re.fullmatch(re.escape(URN_PREFIX) + r"[A-Za-z0-9_-]{43}", body["request_uri"])
    assert response.headers["cache-control"] == "no-store"
    request_uri: str = body["request_uri"]
    return request_uri


async def open_uri(
    browser: httpx.AsyncClient, request_uri: str, client_id: str = "spa", **extra: str
) -> httpx.Response:
    params = {"client_id": client_id, "request_uri": request_uri, **extra}
    return await browser.get("/oauth2/authorize", params=params)


async def allow(browser: httpx.AsyncClient, page: httpx.Response) -> httpx.Response:
    assert page.status_code == 200, page.text
    return await browser.post(
        "/consent",
        data={**dict(_hidden_fields(page.text)), "csrf_token": csrf_of(page), "decision": "allow"},
    )


async def public_client(make_client: MakeClient, client_id: str) -> None:
    """Another public client with the SPA's redirect URI and scope."""
    await make_client(
        client_id,
        public=True,
        grants=["authorization_code"],
        redirect_uris=[CALLBACK],
        scope="openid profile email",
    )


async def code_of(browser: httpx.AsyncClient, page: httpx.Response) -> str:
    """The code, through the consent page unless consent was given before."""
    if page.status_code == 302:
        return query_of(page)["code"]
    return query_of(await allow(browser, page))["code"]


async def rows(state: AppState) -> int:
    async with state.db.sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(PushedRequest)) or 0)


def refused_page(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert "location" not in response.headers
    assert "invalid_request_uri" in response.text


@pytest.fixture
async def alice(make_user: MakeUser) -> UserCreds:
    return await make_user()


async def test_a_pushed_request_runs_the_whole_flow_on_its_own_parameters(
    browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds, events: Any
) -> None:
    await spa(make_client)
    verifier, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge, nonce="pushed-nonce", state="pushed-st")
    # Not signed in: to the sign-in page, which comes back to the same pushed request.
    first = await open_uri(browser, request_uri)
    assert first.status_code == 302
    target = parse_qs(urlsplit(first.headers["location"]).query)["next"][0]
    assert parse_qs(urlsplit(target).query) == {
        "client_id": ["spa"],
        "request_uri": [request_uri],
    }
    await sign_in(browser, alice, target)
    # Parameters in the URL besides client_id and request_uri are not the request's (§4).
    page = await browser.get(target + "&" + urlencode({"scope": "admin", "state": "evil"}))
    assert "Photo App" in page.text
    response = await allow(browser, page)
    assert response.status_code == 303
    params = query_of(response)
    assert response.headers["location"].startswith(CALLBACK + "?")
    assert params["state"] == "pushed-st" and params["iss"] == ISSUER
    token = await exchange(browser, params["code"], verifier)
    assert token.status_code == 200, token.text
    assert claims_of(token.json()["id_token"])["nonce"] == "pushed-nonce"
    assert token.json()["scope"] == "openid profile email"
    names = [name for name, _ in events]
    assert "par.pushed" in names and "code.issued" in names


async def test_a_request_uri_gives_one_answer_to_one_browser(
    app: FastAPI, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    _, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge)
    consent = await open_uri(browser, request_uri)
    assert consent.status_code == 200
    # The same browser may come back to it (another tab, the consent page): the second tab's
    # page is shown, but only one of the two can end the request.
    second_tab = await open_uri(browser, request_uri)
    assert second_tab.status_code == 200
    # Another browser cannot open a request the first one holds.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as other:
        await sign_in(other, alice)
        refused_page(await open_uri(other, request_uri))
    first = await allow(browser, consent)
    assert first.status_code == 303 and "code" in query_of(first)
    second = await allow(browser, second_tab)
    refused_page(second)
    # And after its answer, nobody can open it again.
    refused_page(await open_uri(browser, request_uri))


async def test_the_other_tab_that_loses_keeps_no_code(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    _, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge)
    tabs = [await open_uri(browser, request_uri) for _ in range(2)]
    assert (await allow(browser, tabs[0])).status_code == 303
    refused_page(await allow(browser, tabs[1]))
    async with state.db.sessions() as db:
        codes = await db.scalar(select(func.count()).select_from(AuthorizationCode))
    assert codes == 1


async def test_an_error_answer_ends_the_pushed_request_too(
    browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    _, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge)
    page = await open_uri(browser, request_uri)
    denied = await browser.post(
        "/consent",
        data={**dict(_hidden_fields(page.text)), "csrf_token": csrf_of(page), "decision": "deny"},
    )
    assert query_of(denied)["error"] == "access_denied"
    refused_page(await open_uri(browser, request_uri))


async def test_an_expired_unknown_or_foreign_request_uri_is_refused(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await public_client(make_client, "other")
    await sign_in(browser, alice)
    _, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge)
    # Another client's request_uri: refused, and left alone for its own client.
    refused_page(await open_uri(browser, request_uri, client_id="other"))
    assert (await open_uri(browser, request_uri)).status_code == 200
    unknown = URN_PREFIX + "A" * 43
    refused_page(await open_uri(browser, unknown))
    for malformed in ("urn:other:thing", URN_PREFIX + "x", URN_PREFIX + "A" * 43 + "\n"):
        refused_page(await open_uri(browser, malformed))
    refused_page(await browser.get("/oauth2/authorize", params={"request_uri": request_uri}))
    # Past its 60 s before anyone opened it.
    late = await pushed_uri(browser, challenge)
    async with state.db.sessions() as db:
        await db.execute(update(PushedRequest).values(expires_at=now() - 1))
        await db.commit()
    refused_page(await open_uri(browser, late))


async def test_pushing_needs_client_authentication(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient
) -> None:
    web = await make_client(
        "web",
        grants=["authorization_code"],
        redirect_uris=[CALLBACK],
        scope="openid profile email",
    )
    _, challenge = pkce()
    data = authorize_params(challenge, client_id="web")
    for headers, extra in (
        ({}, {}),  # no secret
        ({}, {"client_secret": "wrong"}),
        (httpx.BasicAuth("web", "wrong"), {}),
        ({}, {"client_id": "nobody"}),
    ):
        auth = headers if isinstance(headers, httpx.BasicAuth) else None
        response = await push(browser, {**data, **extra}, auth=auth)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_client"
        assert "www-authenticate" in response.headers
    assert await rows(state) == 0
    ok = await push(browser, data, auth=httpx.BasicAuth("web", web.secret or ""))
    assert ok.status_code == 201, ok.text
    # A confidential client: PKCE stays optional for it (RFC 9700), as without PAR.
    plain = {k: v for k, v in data.items() if not k.startswith("code_challenge")}
    ok = await push(browser, plain, auth=httpx.BasicAuth("web", web.secret or ""))
    assert ok.status_code == 201, ok.text
    assert await rows(state) == 2


async def test_pushed_parameters_are_checked_there_and_then(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    good = authorize_params(challenge)
    cases: list[tuple[dict[str, str], str]] = [
        ({"redirect_uri": "https://evil.example/cb"}, "invalid_request"),
        ({"scope": "openid admin"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"prompt": "none login"}, "invalid_request"),
        ({"max_age": "soon"}, "invalid_request"),
        ({"dpop_jkt": "not-a-thumbprint"}, "invalid_request"),
        ({"nonce": "n" * 300}, "invalid_request"),
        ({"resource": "https://unknown.example/"}, "invalid_target"),
        ({"request_uri": URN_PREFIX + "A" * 43}, "invalid_request"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
    ]
    for change, error in cases:
        response = await push(browser, {**good, **change})
        assert response.status_code == 400, (change, response.text)
        assert response.json()["error"] == error, (change, response.text)
        assert "location" not in response.headers  # never a redirect: the client called
    no_pkce = {k: v for k, v in good.items() if not k.startswith("code_challenge")}
    response = await push(browser, no_pkce)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    malformed = await browser.post(
        PAR,
        content=b"client_id=spa&client_id=spa",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert malformed.status_code == 400 and malformed.json()["error"] == "invalid_request"
    assert await rows(state) == 0


async def test_a_private_key_jwt_client_pushes_with_an_assertion(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await make_client(
        "pk",
        auth_method="private_key_jwt",
        jwks=public_jwks(RSA, EC),
        grants=["authorization_code"],
        redirect_uris=[CALLBACK],
        scope="openid profile email",
        settings=state.settings,
    )
    _, challenge = pkce()
    data = authorize_params(challenge, client_id="pk")

    def assertion(aud: str) -> dict[str, str]:
        token = sign(claims_for("pk", aud), EC, "ES256", kid=EC.kid)
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": token}

    for aud in (ISSUER, ISSUER + PAR):
        response = await push(browser, {**data, **assertion(aud)})
        assert response.status_code == 201, response.text
    # The assertion is not part of the pushed request.
    async with state.db.sessions() as db:
        stored = [json.loads(p) for p in await db.scalars(select(PushedRequest.params))]
    assert all("client_assertion" not in p and p["client_id"] == "pk" for p in stored)
    replayed = {**data, **assertion(ISSUER)}
    assert (await push(browser, replayed)).status_code == 201
    assert (await push(browser, replayed)).status_code == 401  # jti once
    wrong_aud = await push(browser, {**data, **assertion("https://elsewhere.example")})
    assert wrong_aud.status_code == 401


async def test_plain_requests_are_refused_when_par_is_required(
    state: AppState,
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    alice: UserCreds,
    shared_apps: SharedApps,
) -> None:
    await spa(make_client, require_par=True)
    await public_client(make_client, "free")
    await sign_in(browser, alice)
    _, challenge = pkce()
    plain = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    assert plain.status_code == 302
    error = query_of(plain)
    assert error["error"] == "invalid_request" and error["iss"] == ISSUER
    assert error["state"] == "st-123" and "/oauth2/par" in error["error_description"]
    # Another client is not held to it; and pushing works for the one that is.
    free = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, client_id="free")
    )
    assert free.status_code == 200
    assert (await open_uri(browser, await pushed_uri(browser, challenge))).status_code == 200
    assert (await browser.get("/.well-known/openid-configuration")).json()[
        "require_pushed_authorization_requests"
    ] is False


async def test_auth_require_par_refuses_every_plain_request(
    settings: Settings, shared_apps: SharedApps, alice_app: tuple[FastAPI, UserCreds]
) -> None:
    app, user = alice_app
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as browser:
        await sign_in(browser, user)
        _, challenge = pkce()
        plain = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
        assert query_of(plain)["error"] == "invalid_request"
        # An unknown redirect URI is never redirected to, PAR or not.
        bad = authorize_params(challenge, redirect_uri="https://evil.example/")
        page = await browser.get("/oauth2/authorize", params=bad)
        assert page.status_code == 400 and "location" not in page.headers
        assert (await open_uri(browser, await pushed_uri(browser, challenge))).status_code == 200
        document = (await browser.get("/.well-known/oauth-authorization-server")).json()
    assert document["require_pushed_authorization_requests"] is True
    assert document["pushed_authorization_request_endpoint"] == ISSUER + PAR


@pytest.fixture
async def alice_app(settings: Settings, shared_apps: SharedApps) -> tuple[FastAPI, UserCreds]:
    """An app with ``AUTH_REQUIRE_PAR``, with the SPA and alice."""
    required = make_settings(settings.database_url, settings.keys_dir, require_par=True)
    app = await shared_apps.get(required)
    await reset_app(app)
    state: AppState = app.state.auth
    async with state.db.sessions() as db:
        await manage.create_client(
            db,
            client_id="spa",
            public=True,
            grants=["authorization_code", "refresh_token"],
            redirect_uris=[CALLBACK],
            scope="openid profile email",
            name="Photo App",
        )
        user = await manage.create_user(
            db, state.passwords, username="alice", password="correct horse battery"
        )
        await db.commit()
    return app, UserCreds(user.id, "alice", "correct horse battery")


async def test_a_pushed_prompt_login_asks_once_and_the_url_cannot_add_to_it(
    browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    verifier, challenge = pkce()
    request_uri = await pushed_uri(browser, challenge, prompt="login consent", max_age="0")
    first = await open_uri(browser, request_uri)
    assert first.status_code == 302 and first.headers["location"].startswith("/login?")
    target = parse_qs(urlsplit(first.headers["location"]).query)["next"][0]
    assert parse_qs(urlsplit(target).query)["prompt"] == ["consent"]
    await sign_in(browser, alice, target)
    page = await browser.get(target)
    assert page.status_code == 200  # prompt=consent still holds
    response = await allow(browser, page)
    assert (await exchange(browser, query_of(response)["code"], verifier)).status_code == 200
    # A URL prompt that is not within the pushed one is ignored (it cannot add prompt=none).
    other = await pushed_uri(browser, challenge, prompt="consent")
    page = await open_uri(browser, other, prompt="none")
    assert page.status_code == 200 and "Photo App" in page.text


async def test_expired_pushed_requests_are_pruned(
    state: AppState, browser: httpx.AsyncClient, make_client: MakeClient
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    await pushed_uri(browser, challenge)
    await pushed_uri(browser, challenge)
    async with state.db.sessions() as db:
        await db.execute(update(PushedRequest).values(expires_at=now() - 3600))
        await db.commit()
    await pushed_uri(browser, challenge)  # this one is live
    assert await rows(state) == 3
    async with state.db.sessions() as db:
        pruned = await manage.prune_tokens(db, access_token_ttl=900)
        await db.commit()
    assert pruned.pushed_requests == 2 and await rows(state) == 1


# -- codes bound to a DPoP key (RFC 9449 §10) ------------------------------------------------


@pytest.mark.feature("dpop-code-binding")
async def test_dpop_jkt_at_authorize_binds_the_code(
    settings: Settings, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    verifier, challenge = pkce()
    params = authorize_params(challenge, dpop_jkt=KEY.thumbprint())
    page = await browser.get("/oauth2/authorize", params=params)
    code = query_of(await allow(browser, page))["code"]
    # No proof: invalid_dpop_proof; another key's: invalid_grant; neither spends the code.
    missing = await exchange(browser, code, verifier)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_dpop_proof"
    other = await exchange_with(browser, code, verifier, make_proof(settings, key=OTHER_KEY))
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"
    good = await exchange_with(browser, code, verifier, make_proof(settings, key=KEY))
    assert good.status_code == 200, good.text
    assert good.json()["token_type"] == "DPoP"
    assert payload(good.json()["access_token"])["cnf"] == {"jkt": KEY.thumbprint()}
    # A code without dpop_jkt may still be exchanged with a proof (binding the tokens) or not.
    page = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    code = query_of(page)["code"]
    assert (await exchange(browser, code, verifier)).json()["token_type"] == "Bearer"


@pytest.mark.feature("dpop-code-binding")
async def test_a_proof_sent_to_par_binds_the_code(
    settings: Settings, browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    verifier, challenge = pkce()
    proof = make_proof(settings, key=KEY, path=PAR)
    response = await push(browser, authorize_params(challenge), headers={"DPoP": proof})
    assert response.status_code == 201, response.text
    page = await open_uri(browser, response.json()["request_uri"])
    code = query_of(await allow(browser, page))["code"]
    other = await exchange_with(browser, code, verifier, make_proof(settings, key=OTHER_KEY))
    assert other.json()["error"] == "invalid_grant"
    good = await exchange_with(browser, code, verifier, make_proof(settings, key=KEY))
    assert good.status_code == 200 and good.json()["token_type"] == "DPoP"
    # dpop_jkt and a proof of another key: refused at the push.
    mixed = await push(
        browser,
        authorize_params(challenge, dpop_jkt=OTHER_KEY.thumbprint()),
        headers={"DPoP": make_proof(settings, key=KEY, path=PAR)},
    )
    assert mixed.status_code == 400 and mixed.json()["error"] == "invalid_dpop_proof"
    # A proof made for the token endpoint, or replayed, is refused at the push.
    for bad in (make_proof(settings, key=KEY), proof):
        refused = await push(browser, authorize_params(challenge), headers={"DPoP": bad})
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_dpop_proof"
    # dpop_jkt alone in the push binds the code as well.
    bound = await push(browser, authorize_params(challenge, dpop_jkt=OTHER_KEY.thumbprint()))
    page = await open_uri(browser, bound.json()["request_uri"])
    code = await code_of(browser, page)
    assert (await exchange(browser, code, verifier)).json()["error"] == "invalid_dpop_proof"


async def exchange_with(
    http: httpx.AsyncClient, code: str, verifier: str, proof: str
) -> httpx.Response:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "client_id": "spa",
        "code_verifier": verifier,
    }
    return await http.post("/oauth2/token", data=data, headers={"DPoP": proof})


@pytest.mark.feature("dpop-code-binding")
async def test_a_malformed_dpop_jkt_goes_back_to_the_client(
    browser: httpx.AsyncClient, make_client: MakeClient, alice: UserCreds
) -> None:
    await spa(make_client)
    await sign_in(browser, alice)
    _, challenge = pkce()
    for bad in ("short", "A" * 44, "A" * 42 + "=", "é" * 43):
        page = await browser.get(
            "/oauth2/authorize", params=authorize_params(challenge, dpop_jkt=bad)
        )
        assert page.status_code == 302, page.text
        assert query_of(page)["error"] == "invalid_request"


async def test_pushes_are_limited_per_address_and_per_client(
    settings: Settings, shared_apps: SharedApps
) -> None:
    limited = make_settings(
        settings.database_url,
        settings.keys_dir,
        rate_limit_token_client="2/minute",
        rate_limit_token_ip="3/minute",
    )
    app = await shared_apps.get(limited)
    await reset_app(app)
    state: AppState = app.state.auth
    async with state.db.sessions() as db:
        for client_id in ("spa", "spa2"):
            await manage.create_client(
                db,
                client_id=client_id,
                public=True,
                grants=["authorization_code"],
                redirect_uris=[CALLBACK],
                scope="openid profile email",
            )
        await db.commit()
    _, challenge = pkce()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        statuses = [(await push(http, authorize_params(challenge))).status_code for _ in range(3)]
        assert statuses == [201, 201, 429]  # the client's limit
        other = await push(http, authorize_params(challenge, client_id="spa2"))
        assert other.status_code == 429  # the address's limit (3 pushes)
        assert "retry-after" in other.headers and other.json()["error"] == "rate_limited"
    assert await rows(state) == 2
