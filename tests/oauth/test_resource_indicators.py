"""RFC 8707 resource indicators: ``resource`` sets the access token's ``aud``.

The server here serves two resource servers besides the default audience (the issuer): only
those may be asked for, a sign-in may get tokens for any resource it was granted and for no
other, and every endpoint that reads our tokens draws the line where the RFC does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt as pyjwt
import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from server import manage
from server.config import Settings
from server.deps import AppState
from server.forms import FormError, parse_form, repeated
from server.main import create_app
from server.models import AuthorizationCode, RefreshFamily
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    UserCreds,
    make_settings,
    password_grant,
    refresh_grant,
    sign_in,
    truncate,
)
from tests.oauth.test_authorize import (
    CALLBACK,
    _hidden_fields,
    authorize_params,
    claims_of,
    csrf_of,
    exchange,
    pkce,
    query_of,
    spa,
)

pytestmark = pytest.mark.feature("resource-indicators")
ISSUER = "http://127.0.0.1:8000"
API = "https://api.example.com"
ORDERS = "https://orders.example.com/v2"


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, resources=f"{API}, {ORDERS}")


async def post_form(
    http: httpx.AsyncClient,
    pairs: list[tuple[str, str]],
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A token request with repeated parameters (httpx's ``data`` takes a mapping only)."""
    form = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    return await http.post("/oauth2/token", content=urlencode(pairs), headers=form)


async def token_for(
    http: httpx.AsyncClient, creds: ClientCreds, user: UserCreds, *resources: str
) -> httpx.Response:
    data = [
        ("grant_type", "password"),
        ("username", user.username),
        ("password", user.password),
        *[("resource", r) for r in resources],
    ]
    return await post_form(http, data, creds.basic if creds.secret else None)


async def refresh_for(
    http: httpx.AsyncClient, creds: ClientCreds, refresh_token: str, *resources: str
) -> httpx.Response:
    data = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        *[("resource", r) for r in resources],
        *([] if creds.secret else [("client_id", creds.client_id)]),
    ]
    return await post_form(http, data, creds.basic if creds.secret else None)


def aud(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return claims_of(response.json()["access_token"])["aud"]


def refused(response: httpx.Response, error: str = "invalid_target") -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert "access_token" not in response.json()


async def families(state: AppState) -> list[RefreshFamily]:
    async with state.db.sessions() as db:
        return list(await db.scalars(select(RefreshFamily)))


# -- the token endpoint --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ((), ISSUER),
        ((API,), API),
        ((ORDERS,), ORDERS),
        ((ISSUER,), ISSUER),
        ((API, ORDERS), [API, ORDERS]),
        ((API, API), API),
        ((ORDERS, API, ISSUER), [ORDERS, API, ISSUER]),
    ],
    ids=["none", "api", "orders", "issuer", "two", "repeated", "three"],
)
async def test_the_resources_asked_for_are_the_audience(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    resources: tuple[str, ...],
    expected: Any,
) -> None:
    creds = await make_client()
    response = await token_for(client, creds, await make_user(), *resources)
    assert aud(response) == expected


@pytest.mark.parametrize(
    ("resource", "error"),
    [
        ("https://evil.example", "invalid_target"),
        ("https://api.example.com/", "invalid_target"),  # exact strings, as aud is compared
        ("HTTPS://API.EXAMPLE.COM", "invalid_target"),
        (API + "#part", "invalid_target"),
        ("api", "invalid_target"),
        (API + " " + ORDERS, "invalid_request"),  # one value with a space is no URI
    ],
    ids=["unknown", "trailing-slash", "case", "fragment", "relative", "space"],
)
async def test_any_other_resource_is_invalid_target_and_issues_nothing(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    resource: str,
    error: str,
) -> None:
    creds = await make_client()
    user = await make_user()
    refused(await token_for(client, creds, user, API, resource), error)
    assert await families(state) == []  # no sign-in was started
    cc = await make_client("svc", grants=["client_credentials"], scope="api", first_party=True)
    data = {"grant_type": "client_credentials", "resource": resource}
    refused(await client.post("/oauth2/token", data=data, headers=cc.basic), error)


async def test_client_credentials_tokens_take_the_resource(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"], scope="api")
    for resources, expected in (([], ISSUER), ([ORDERS], ORDERS), ([API, ORDERS], [API, ORDERS])):
        data = [("grant_type", "client_credentials"), *[("resource", r) for r in resources]]
        response = await post_form(client, data, creds.basic)
        assert aud(response) == expected
        assert "refresh_token" not in response.json()


async def test_a_refresh_may_ask_for_any_resource_of_the_sign_in_and_no_other(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    first = await token_for(client, creds, await make_user(), API, ORDERS)
    assert aud(first) == [API, ORDERS]
    (family,) = await families(state)
    assert family.resources == f"{API} {ORDERS}"
    refresh_token = first.json()["refresh_token"]

    # Outside the grant: refused, and the refresh token is not spent.
    refused(await refresh_for(client, creds, refresh_token, ISSUER))
    refused(await refresh_for(client, creds, refresh_token, API, "https://evil.example"))
    # One token per resource server, from one sign-in.
    orders = await refresh_for(client, creds, refresh_token, ORDERS)
    assert aud(orders) == ORDERS
    api = await refresh_for(client, creds, orders.json()["refresh_token"], API)
    assert aud(api) == API
    # Without resource: the whole grant again, not just the last one asked for.
    whole = await refresh_for(client, creds, api.json()["refresh_token"])
    assert aud(whole) == [API, ORDERS]


async def test_a_sign_in_without_resources_refreshes_for_the_default_audience_only(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    first = await password_grant(client, creds, await make_user())
    refresh_token = first.json()["refresh_token"]
    refused(await refresh_for(client, creds, refresh_token, API))
    again = await refresh_for(client, creds, refresh_token, ISSUER)
    assert aud(again) == ISSUER
    assert aud(await refresh_grant(client, creds, again.json()["refresh_token"])) == ISSUER


async def test_a_resource_the_operator_removed_is_no_longer_granted(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    first = await token_for(client, creds, await make_user(), API)
    gone = "https://retired.example.com"
    # As if this sign-in was granted a resource that AUTH_RESOURCES no longer lists.
    async with state.db.sessions() as db:
        await db.execute(update(RefreshFamily).values(resources=f"{gone} {API}"))
        await db.commit()
    refused(await refresh_for(client, creds, first.json()["refresh_token"], gone))
    second = await refresh_for(client, creds, first.json()["refresh_token"])
    assert aud(second) == API
    async with state.db.sessions() as db:
        await db.execute(update(RefreshFamily).values(resources=gone))
        await db.commit()
    response = await refresh_for(client, creds, second.json()["refresh_token"])
    refused(response)
    assert "no longer served" in response.json()["error_description"]


# -- the authorization code flow -------------------------------------------------------------


async def code_for(browser: httpx.AsyncClient, challenge: str, *resources: str) -> str:
    """Signed-in browser → authorize with ``resources`` (→ consent) → the code."""
    params = [*authorize_params(challenge).items(), *[("resource", r) for r in resources]]
    page = await browser.get("/oauth2/authorize", params=params)
    if page.status_code == 302:  # consent given before
        return query_of(page)["code"]
    assert page.status_code == 200, page.text
    # The consent form carries each resource as its own field.
    fields = _hidden_fields(page.text)
    assert [v for k, v in fields if k == "resource"] == list(resources)
    posted = [*fields, ("csrf_token", csrf_of(page)), ("decision", "allow")]
    response = await browser.post(
        "/consent",
        content=urlencode(posted),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 303, response.text
    return query_of(response)["code"]


async def test_the_authorization_request_grants_resources_and_the_exchange_narrows(
    browser: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    user = await make_user()
    verifier, challenge = pkce()
    params = [*authorize_params(challenge).items(), ("resource", API), ("resource", ORDERS)]

    # Not signed in: both resources survive the trip through the sign-in page.
    first = await browser.get("/oauth2/authorize", params=params)
    assert first.status_code == 302
    next_url = parse_qs(urlsplit(first.headers["location"]).query)["next"][0]
    assert parse_qs(urlsplit(next_url).query)["resource"] == [API, ORDERS]
    await sign_in(browser, user, next_url)
    # ... and through the consent page's form.
    code = await code_for(browser, challenge, API, ORDERS)

    async with state.db.sessions() as db:
        (row,) = list(await db.scalars(select(AuthorizationCode)))
        assert row.resources == f"{API} {ORDERS}"
    # Outside the authorization request's resources: refused before the code is spent.
    refused(await exchange(browser, code, verifier, resource=ISSUER))
    response = await exchange(browser, code, verifier, resource=ORDERS)
    assert aud(response) == ORDERS
    (family,) = await families(state)
    assert family.resources == f"{API} {ORDERS}"  # the grant, wider than this one token
    refreshed = await refresh_for(
        browser, ClientCreds("spa", None), response.json()["refresh_token"], API
    )
    assert aud(refreshed) == API


async def test_an_exchange_without_resource_gets_the_whole_grant(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    code = await code_for(browser, challenge, API)
    assert aud(await exchange(browser, code, verifier)) == API
    # A code asked for without resource is for the default audience only.
    verifier, challenge = pkce()
    code = await code_for(browser, challenge)
    refused(await exchange(browser, code, verifier, resource=API))
    assert aud(await exchange(browser, code, verifier)) == ISSUER


async def test_an_unknown_resource_at_authorize_goes_back_to_the_client(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    params = [*authorize_params(challenge).items(), ("resource", "https://evil.example")]
    response = await browser.get("/oauth2/authorize", params=params)
    assert response.status_code == 302
    assert response.headers["location"].startswith(CALLBACK + "?")
    answer = query_of(response)
    assert (answer["error"], answer["state"], answer["iss"]) == ("invalid_target", "st-123", ISSUER)
    assert "code" not in answer


# -- who accepts which token -----------------------------------------------------------------


async def test_resource_servers_verify_offline_and_our_own_endpoints_want_their_audience(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client(scope="openid profile api account", first_party=True)
    user = await make_user()
    for_api = (await token_for(client, creds, user, API)).json()["access_token"]
    # The resource server checks aud against itself (RFC 9068 §4) with the published keys.
    jwks = (await client.get("/.well-known/jwks.json")).json()
    kid = pyjwt.get_unverified_header(for_api)["kid"]
    key = pyjwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid)).key
    claims = pyjwt.decode(for_api, key, algorithms=["RS256"], audience=API, issuer=ISSUER)
    assert claims["sub"] == user.id
    with pytest.raises(pyjwt.InvalidAudienceError):
        pyjwt.decode(for_api, key, algorithms=["RS256"], audience=ORDERS, issuer=ISSUER)
    # /userinfo and the account API are the default audience: a token for API is not theirs.
    bearer = {"Authorization": "Bearer " + for_api}
    assert (await client.get("/userinfo", headers=bearer)).status_code == 401
    assert (await client.get("/api/v1/me", headers=bearer)).status_code == 401
    # A token for both is theirs too.
    both = (await token_for(client, creds, user, API, ISSUER)).json()["access_token"]
    bearer = {"Authorization": "Bearer " + both}
    assert (await client.get("/userinfo", headers=bearer)).status_code == 200
    assert (await client.get("/api/v1/me", headers=bearer)).status_code == 200


async def test_introspection_and_revocation_know_tokens_for_every_resource(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    rs = await make_client("orders-rs", grants=[], scope="", resource_server=True)
    token = (await token_for(client, creds, await make_user(), ORDERS)).json()["access_token"]
    seen = await client.post("/oauth2/introspect", data={"token": token}, headers=rs.basic)
    assert seen.status_code == 200
    assert seen.json()["active"] is True and seen.json()["aud"] == ORDERS
    revoked = await client.post("/oauth2/revoke", data={"token": token}, headers=creds.basic)
    assert revoked.status_code == 200
    after = await client.post("/oauth2/introspect", data={"token": token}, headers=rs.basic)
    assert after.json() == {"active": False}


async def test_auth_default_audience_is_the_aud_without_resource_and_what_we_accept(
    database_url: str, keys_dir: Path
) -> None:
    """SPEC: AUTH_DEFAULT_AUDIENCE is the ``aud`` when no ``resource`` is asked for; then the
    issuer is just a URI, not an audience we serve."""
    default = "https://default.example.com"
    app = create_app(make_settings(database_url, keys_dir, default_audience=default))
    await truncate(database_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
    ):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            created = await manage.create_client(db, client_id="app", scope="openid profile")
            user = await manage.create_user(
                db, state.passwords, username="ann", password="correct horse battery"
            )
            await db.commit()
        creds = ClientCreds("app", created.secret)
        ann = UserCreds(user.id, "ann", "correct horse battery")
        token = await token_for(http, creds, ann)
        assert aud(token) == default
        assert aud(await token_for(http, creds, ann, default)) == default
        refused(await token_for(http, creds, ann, ISSUER))
        bearer = {"Authorization": "Bearer " + token.json()["access_token"]}
        assert (await http.get("/userinfo", headers=bearer)).status_code == 200


# -- configuration and form parsing ----------------------------------------------------------


def test_auth_resources_reads_a_list_and_refuses_what_is_not_an_absolute_uri(
    keys_dir: Path,
) -> None:
    made = make_settings("sqlite+aiosqlite://", keys_dir, resources=f" {API},{ORDERS}, {API}")
    assert made.resources == [API, ORDERS]
    assert made.audiences == frozenset([ISSUER, API, ORDERS])
    as_json = make_settings("sqlite+aiosqlite://", keys_dir, resources=json.dumps([ORDERS]))
    assert as_json.resources == [ORDERS]
    assert make_settings("sqlite+aiosqlite://", keys_dir).audiences == frozenset([ISSUER])
    urn = make_settings("sqlite+aiosqlite://", keys_dir, resources="urn:example:billing")
    assert urn.resources == ["urn:example:billing"]  # RFC 3986 §4.3: absolute, no host
    for bad in ("api.example.com", "/relative", API + "#f", "https://a.example/x y", "://x"):
        with pytest.raises(ValidationError, match="AUTH_RESOURCES"):
            make_settings("sqlite+aiosqlite://", keys_dir, resources=[bad])


def test_resource_is_the_one_parameter_that_may_repeat() -> None:
    form = parse_form(f"resource={API}&scope=a&resource={ORDERS}&resource=")
    assert form == {"resource": f"{API} {ORDERS}", "scope": "a"}
    assert repeated(form) == [("resource", API), ("resource", ORDERS), ("scope", "a")]
    with pytest.raises(FormError, match="'scope' sent more than once"):
        parse_form("scope=a&scope=b")
    with pytest.raises(FormError, match="absolute URI"):
        parse_form("resource=https%3A%2F%2Fa.example%20https%3A%2F%2Fb.example")
