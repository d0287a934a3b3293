"""Per-client resources (issue 19, scope 4): a client limited to some of ``AUTH_RESOURCES``.

``Client.resources`` (space-separated; ``None``: all of them) is set here on the row itself: the
CLI and admin API flags that set it are another change. A resource outside the client's list is
``invalid_target`` (RFC 8707 §2) wherever a resource is accepted, with the description a limited
client gets for any resource it may not have (it learns nothing of the others the server
serves); the default audience stays its own. Narrowing the list later narrows grants already
made, as removing a resource from ``AUTH_RESOURCES`` does.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from markupsafe import escape
from sqlalchemy import select, update

from server.config import Settings
from server.deps import AppState
from server.models import AuthorizationCode, Client, RefreshFamily
from server.oauth.resources import NOT_THE_CLIENTS
from tests.conftest import MakeClient, MakeUser, make_settings, sign_in
from tests.oauth.test_authorize import (
    CALLBACK,
    _hidden_fields,
    authorize_params,
    csrf_of,
    exchange,
    pkce,
    query_of,
    spa,
)
from tests.oauth.test_resource_indicators import (
    API,
    ISSUER,
    ORDERS,
    aud,
    code_for,
    families,
    post_form,
    refresh_for,
    refused,
    token_for,
)

pytestmark = pytest.mark.feature("client-resources")
#: Served, but no client below is limited to it; its value must be escaped on the consent page.
ODD = "https://odd.example/?q=<script>alert(1)</script>&x=\"'"


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, resources=[API, ORDERS, ODD])


async def limit(state: AppState, client_id: str, resources: str | None) -> None:
    """What ``clients update --resource`` will do: the row, and the cached client dropped."""
    async with state.db.sessions() as db:
        await db.execute(
            update(Client).where(Client.client_id == client_id).values(resources=resources)
        )
        await db.commit()
    state.clients.invalidate(client_id)


async def family_alive(state: AppState, family_id: str) -> bool:
    async with state.db.sessions() as db:
        family = await db.get(RefreshFamily, family_id)
        assert family is not None
        return family.revoked_at is None


# -- the grants of the token endpoint --------------------------------------------------------


async def test_a_limited_client_gets_its_resources_and_the_default_audience_only(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    await limit(state, "app", API)
    user = await make_user()
    assert aud(await token_for(client, creds, user)) == ISSUER
    assert aud(await token_for(client, creds, user, API)) == API
    assert aud(await token_for(client, creds, user, API, ISSUER)) == [API, ISSUER]
    before = len(await families(state))
    # Served, but not to this client; and one the server does not serve at all: the same
    # answer, so the client cannot tell which other resources exist.
    for outside in ((ORDERS,), (API, ORDERS), ("https://evil.example",)):
        response = await token_for(client, creds, user, *outside)
        refused(response)
        assert response.json()["error_description"] == NOT_THE_CLIENTS
    response = await token_for(client, creds, user, API + "#f")
    refused(response)
    assert "fragment" in response.json()["error_description"]
    assert len(await families(state)) == before  # no sign-in started by a refusal


async def test_client_credentials_keeps_to_the_clients_list(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient
) -> None:
    creds = await make_client("svc", grants=["client_credentials"], scope="api")
    await limit(state, "svc", ORDERS)
    for resources, expected in (([], ISSUER), ([ORDERS], ORDERS), ([ISSUER], ISSUER)):
        data = [("grant_type", "client_credentials"), *[("resource", r) for r in resources]]
        assert aud(await post_form(client, data, creds.basic)) == expected
    for outside in ([API], [ORDERS, API], ["https://evil.example"]):
        data = [("grant_type", "client_credentials"), *[("resource", r) for r in outside]]
        response = await post_form(client, data, creds.basic)
        refused(response)
        assert response.json()["error_description"] == NOT_THE_CLIENTS


async def test_an_empty_list_leaves_only_the_default_audience_and_no_list_means_all(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    await limit(state, "app", "")
    assert aud(await token_for(client, creds, user)) == ISSUER
    assert aud(await token_for(client, creds, user, ISSUER)) == ISSUER
    refused(await token_for(client, creds, user, API))
    await limit(state, "app", None)
    assert aud(await token_for(client, creds, user, API, ORDERS)) == [API, ORDERS]


async def test_a_listed_resource_the_server_no_longer_serves_stays_refused(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    """The client's list is within ``AUTH_RESOURCES``: naming a retired resource on the row
    (or a typo) grants nothing."""
    retired = "https://retired.example.com"
    creds = await make_client()
    await limit(state, "app", f"{retired} {API}")
    user = await make_user()
    response = await token_for(client, creds, user, retired)
    refused(response)
    assert response.json()["error_description"] == NOT_THE_CLIENTS
    assert aud(await token_for(client, creds, user, API)) == API


async def test_a_narrowed_list_narrows_the_refreshes_of_earlier_sign_ins(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    first = await token_for(client, creds, await make_user(), API, ORDERS)
    assert aud(first) == [API, ORDERS]
    (family,) = await families(state)
    refresh_token = first.json()["refresh_token"]

    await limit(state, "app", API)  # the operator withdraws ORDERS from this client
    response = await refresh_for(client, creds, refresh_token, ORDERS)
    refused(response)
    refused(await refresh_for(client, creds, refresh_token, API, ORDERS))
    # Refused before rotation: the token is not spent and the sign-in lives on.
    assert await family_alive(state, family.id)
    # Without resource: what is left of the grant, not the refusal of all of it.
    narrowed = await refresh_for(client, creds, refresh_token)
    assert aud(narrowed) == API
    (family,) = await families(state)
    assert family.resources == f"{API} {ORDERS}"  # the grant as made; the list decides now

    # Nothing of the grant left: invalid_target, still without spending the token; nor is the
    # default audience given instead, since this sign-in was never granted it.
    await limit(state, "app", "")
    second = narrowed.json()["refresh_token"]
    response = await refresh_for(client, creds, second)
    refused(response)
    assert "no longer served" in response.json()["error_description"]
    refused(await refresh_for(client, creds, second, ISSUER))
    assert await family_alive(state, family.id)

    # The operator gives ORDERS back: the whole grant again, from the same token.
    await limit(state, "app", None)
    assert aud(await refresh_for(client, creds, second)) == [API, ORDERS]


async def test_a_sign_in_for_the_default_audience_outlives_any_narrowing(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    first = await token_for(client, creds, await make_user())
    await limit(state, "app", "")
    again = await refresh_for(client, creds, first.json()["refresh_token"])
    assert aud(again) == ISSUER
    refused(await refresh_for(client, creds, again.json()["refresh_token"], API))


# -- the authorization code flow -------------------------------------------------------------


async def test_authorize_refuses_a_resource_outside_the_clients_list_to_the_client(
    browser: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await limit(state, "spa", API)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    for outside in ((ORDERS,), (API, ORDERS), ("https://evil.example",)):
        params = [*authorize_params(challenge).items(), *[("resource", r) for r in outside]]
        response = await browser.get("/oauth2/authorize", params=params)
        assert response.status_code == 302, response.text
        assert response.headers["location"].startswith(CALLBACK + "?")
        answer = query_of(response)
        assert (answer["error"], answer["state"], answer["iss"]) == (
            "invalid_target",
            "st-123",
            ISSUER,
        )
        assert answer["error_description"] == NOT_THE_CLIENTS
        assert "code" not in answer
    # Nor can the consent form be posted with a resource the authorize page never showed.
    page = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    assert page.status_code == 200
    posted = [
        *_hidden_fields(page.text),
        ("resource", ORDERS),
        ("csrf_token", csrf_of(page)),
        ("decision", "allow"),
    ]
    response = await browser.post(
        "/consent",
        content=urlencode(posted),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 303
    assert query_of(response)["error"] == "invalid_target"
    async with state.db.sessions() as db:
        assert list(await db.scalars(select(AuthorizationCode))) == []


async def test_a_code_exchange_after_narrowing_gets_only_what_is_left(
    browser: httpx.AsyncClient, state: AppState, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await limit(state, "spa", f"{API} {ORDERS}")
    await sign_in(browser, await make_user())
    verifier, challenge = pkce()
    code = await code_for(browser, challenge, API, ORDERS)
    await limit(state, "spa", API)
    # Refused before the code is spent; without resource, what the client may still have.
    refused(await exchange(browser, code, verifier, resource=ORDERS))
    response = await exchange(browser, code, verifier)
    assert aud(response) == API


# -- the consent page ------------------------------------------------------------------------


async def test_the_consent_page_names_each_resource_asked_for_escaped(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    params = [*authorize_params(challenge).items(), ("resource", API), ("resource", ODD)]
    page = await browser.get("/oauth2/authorize", params=params)
    assert page.status_code == 200, page.text
    assert "Photo App can use this access at these services:" in page.text
    assert f'<code class="resource">{API}</code>' in page.text
    assert f'<code class="resource">{escape(ODD)}</code>' in page.text
    assert "<script>" not in page.text
    # The page lists the resources once, and the form carries them on.
    assert page.text.count('class="resource"') == 2
    assert [v for k, v in _hidden_fields(page.text) if k == "resource"] == [API, ODD]

    _, challenge = pkce()
    plain = await browser.get("/oauth2/authorize", params=authorize_params(challenge))
    assert plain.status_code == 200
    assert "services" not in plain.text
    assert 'class="resource"' not in plain.text
