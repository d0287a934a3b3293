"""Dynamic client registration (RFC 7591) and client configuration (RFC 7592), on both backends."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from sqlalchemy import func, select

from server import manage, models
from server.config import Settings
from server.deps import AppState
from server.models import Client
from tests.conftest import Events, csrf_of, make_settings, sign_in

pytestmark = pytest.mark.feature("client-registration")

WEB = {
    "client_name": "Orders",
    "redirect_uris": ["https://orders.example.com/cb"],
    "grant_types": ["authorization_code", "refresh_token", "client_credentials"],
    "scope": "openid profile",
}


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, rate_limit_registration_ip="1000/minute")


async def initial_token(state: AppState, ttl: int = 3600) -> str:
    async with state.db.sessions() as db:
        issued = await manage.create_registration_token(db, ttl=ttl)
        await db.commit()
    return issued.token


async def register(
    http: httpx.AsyncClient, body: Any, token: str | None, **kw: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes | str):
        headers["Content-Type"] = kw.pop("content_type", "application/json")
        return await http.post("/oauth2/register", content=body, headers=headers)
    return await http.post("/oauth2/register", json=body, headers=headers)


async def client_count(state: AppState) -> int:
    async with state.db.sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(Client)) or 0)


def named(events: Events, name: str) -> list[dict[str, Any]]:
    return [fields for event, fields in events if event == name]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def client_credentials(http: httpx.AsyncClient, client_id: str, secret: str) -> int:
    response = await http.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    return response.status_code


async def test_a_client_registers_with_an_initial_access_token_and_gets_tokens(
    client: httpx.AsyncClient, state: AppState, events: Events
) -> None:
    token = await initial_token(state)
    response = await register(client, WEB, token)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["client_name"] == "Orders"
    assert body["redirect_uris"] == WEB["redirect_uris"]
    assert body["grant_types"] == WEB["grant_types"]
    assert body["response_types"] == ["code"]
    assert body["token_endpoint_auth_method"] == "client_secret_basic"
    assert body["scope"] == "openid profile"
    assert body["client_secret_expires_at"] == 0
    assert isinstance(body["client_id_issued_at"], int)
    assert body["registration_client_uri"].endswith("/oauth2/register/" + body["client_id"])
    assert body["registration_access_token"]
    # The secret works at once, and only its hash and the token's hash are stored.
    assert await client_credentials(client, body["client_id"], body["client_secret"]) == 200
    async with state.db.sessions() as db:
        row = await db.get(Client, body["client_id"])
    assert row is not None and row.origin == "registration"
    assert not row.is_admin and not row.is_first_party and not row.is_resource_server
    assert body["client_secret"] not in json.dumps([row.secret_hash, row.registration_token_hash])
    # One initial access token registers any number of clients until it expires.
    assert (await register(client, WEB, token)).status_code == 201
    registered = named(events, "client.registered")
    assert [e["auth_method"] for e in registered] == ["client_secret_basic"] * 2
    assert body["client_secret"] not in json.dumps(events)


async def test_a_public_native_client_gets_no_secret(
    client: httpx.AsyncClient, state: AppState
) -> None:
    native = {
        "redirect_uris": ["http://127.0.0.1:49152/cb", "com.example.app:/cb"],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
    }
    response = await register(client, native, await initial_token(state))
    assert response.status_code == 201, response.text
    body = response.json()
    assert "client_secret" not in body and "client_secret_expires_at" not in body
    assert body["token_endpoint_auth_method"] == "none"


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_without_a_valid_initial_access_token_nothing_is_registered(
    client: httpx.AsyncClient, state: AppState, header: str | None
) -> None:
    await initial_token(state)
    before = await client_count(state)
    headers = {"Authorization": header} if header else {}
    response = await client.post("/oauth2/register", json=WEB, headers=headers)
    # RFC 7591 §3 and RFC 6750 §3: a bearer challenge; an error code only for a bad token.
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) == (header == "Bearer nope")
    assert await client_count(state) == before


async def test_an_expired_initial_access_token_is_refused(
    client: httpx.AsyncClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = await initial_token(state, ttl=60)
    start = models.now()
    monkeypatch.setattr(models, "clock", lambda: start + 61)
    assert (await register(client, WEB, token)).status_code == 401


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({**WEB, "redirect_uris": ["http://orders.example.com/cb"]}, "invalid_redirect_uri"),
        ({**WEB, "redirect_uris": ["https://orders.example.com/cb#x"]}, "invalid_redirect_uri"),
        ({**WEB, "redirect_uris": ["https://*.example.com/cb"]}, "invalid_redirect_uri"),
        ({**WEB, "redirect_uris": []}, "invalid_redirect_uri"),
        ({**WEB, "grant_types": ["password"]}, "invalid_client_metadata"),
        ({**WEB, "scope": "openid admin"}, "invalid_client_metadata"),
        ({**WEB, "response_types": ["token"]}, "invalid_client_metadata"),
        ({**WEB, "token_endpoint_auth_method": "private_key_jwt"}, "invalid_client_metadata"),
        ({**WEB, "jwks": {"keys": []}}, "invalid_client_metadata"),
        ({**WEB, "client_name": 5}, "invalid_client_metadata"),
        ({**WEB, "client_name": "\x00"}, "invalid_client_metadata"),
        ({**WEB, "redirect_uris": ["https://a.example/\ud800"]}, "invalid_redirect_uri"),
        ([WEB], "invalid_client_metadata"),
        ("not json", "invalid_client_metadata"),
        ('{"a": ' * 2000, "invalid_client_metadata"),
        ("null", "invalid_client_metadata"),
    ],
)
async def test_bad_metadata_is_a_400_and_registers_nothing(
    client: httpx.AsyncClient, state: AppState, body: Any, error: str, events: Events
) -> None:
    token = await initial_token(state)
    before = await client_count(state)
    if isinstance(body, dict) and any("\ud800" in u for u in body.get("redirect_uris", [])):
        body = json.dumps(body)  # a lone surrogate, escaped as JSON allows
    response = await register(client, body, token)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert "Traceback" not in response.text
    assert await client_count(state) == before
    assert named(events, "client.registration_refused")[-1]["error"] == error


async def test_the_body_must_be_json_and_small(client: httpx.AsyncClient, state: AppState) -> None:
    token = await initial_token(state)
    form = await register(client, "a=b", token, content_type="application/x-www-form-urlencoded")
    assert form.status_code == 400 and form.json()["error"] == "invalid_client_metadata"
    huge = json.dumps({**WEB, "client_uri": "x" * 20_000})
    assert (await register(client, huge, token)).status_code == 413


async def test_unknown_metadata_is_ignored(client: httpx.AsyncClient, state: AppState) -> None:
    response = await register(
        client, {**WEB, "x-custom": [1, 2], "logo_uri": 7}, await initial_token(state)
    )
    assert response.status_code == 201
    assert "x-custom" not in response.json() and "logo_uri" not in response.json()


@pytest.mark.parametrize("mode", ["open", "off"])
async def test_open_and_off(database_url: str, keys_dir: Path, mode: str, shared_apps: Any) -> None:
    app = await shared_apps.get(make_settings(database_url, keys_dir, client_registration=mode))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await register(http, WEB, None)
        discovery = (await http.get("/.well-known/openid-configuration")).json()
        configure = await http.get("/oauth2/register/x", headers=bearer("y"))
    if mode == "open":
        assert response.status_code == 201
        assert discovery["registration_endpoint"].endswith("/oauth2/register")
        assert configure.status_code == 401
    else:
        assert response.status_code == 404 and configure.status_code == 404
        assert "registration_endpoint" not in discovery


async def test_registration_is_rate_limited_per_address(
    database_url: str, keys_dir: Path, shared_apps: Any, events: Events
) -> None:
    app = await shared_apps.get(
        make_settings(
            database_url,
            keys_dir,
            client_registration="open",
            rate_limit_registration_ip="2/minute",
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        statuses = [(await register(http, WEB, None)).status_code for _ in range(3)]
        bad = await register(http, {"grant_types": ["password"]}, None)
    # Refused attempts count too: a flood of garbage is a flood.
    assert statuses == [201, 201, 429] and bad.status_code == 429
    assert "retry-after" in bad.headers
    assert named(events, "rate_limit.exceeded")[-1]["endpoint"] == "registration"


# -- RFC 7592 ---------------------------------------------------------------------------


async def registered(http: httpx.AsyncClient, state: AppState, **extra: Any) -> dict[str, Any]:
    response = await register(http, {**WEB, **extra}, await initial_token(state))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def path(body: dict[str, Any]) -> str:
    return "/oauth2/register/" + body["client_id"]


@pytest.mark.feature("client-registration-management")
async def test_read_update_and_delete_with_the_registration_access_token(
    client: httpx.AsyncClient, state: AppState, events: Events
) -> None:
    body = await registered(client, state)
    token = body["registration_access_token"]
    read = await client.get(path(body), headers=bearer(token))
    assert read.status_code == 200 and read.headers["cache-control"] == "no-store"
    shown = read.json()
    assert shown["client_id"] == body["client_id"]
    assert shown["redirect_uris"] == WEB["redirect_uris"]
    assert shown["registration_client_uri"] == body["registration_client_uri"]
    assert "client_secret" not in shown and "registration_access_token" not in shown

    # RFC 7592 §2.2: an update replaces the metadata, and rotates the token.
    new_uris = ["https://orders.example.com/cb2"]
    update = {"client_id": body["client_id"], **WEB, "redirect_uris": new_uris}
    updated = await client.put(path(body), json=update, headers=bearer(token))
    assert updated.status_code == 200, updated.text
    assert updated.json()["redirect_uris"] == new_uris
    rotated = updated.json()["registration_access_token"]
    assert rotated != token
    assert (await client.get(path(body), headers=bearer(token))).status_code == 401
    assert (await client.get(path(body), headers=bearer(rotated))).json()["redirect_uris"] == (
        new_uris
    )
    assert named(events, "client.updated")[-1]["via"] == "registration"

    secret = body["client_secret"]
    assert await client_credentials(client, body["client_id"], secret) == 200
    deleted = await client.delete(path(body), headers=bearer(rotated))
    assert deleted.status_code == 204 and deleted.content == b""
    # Gone at once: no token, and its registration access token is a 401 (RFC 7592 §2.3).
    assert await client_credentials(client, body["client_id"], secret) == 401
    assert (await client.get(path(body), headers=bearer(rotated))).status_code == 401
    assert (await client.delete(path(body), headers=bearer(rotated))).status_code == 401
    assert named(events, "client.deleted")[-1]["client_id"] == body["client_id"]


@pytest.mark.feature("client-registration-management")
async def test_a_token_manages_only_its_own_client(
    client: httpx.AsyncClient, state: AppState
) -> None:
    first = await registered(client, state)
    second = await registered(client, state)
    other = bearer(second["registration_access_token"])
    assert (await client.get(path(first), headers=other)).status_code == 401
    assert (await client.delete(path(first), headers=other)).status_code == 401
    assert (await client.get(path(first), headers={})).status_code == 401
    # An operator's client has no registration access token at all.
    async with state.db.sessions() as db:
        await manage.create_client(db, client_id="operator-app")
        await db.commit()
    refused = await client.get("/oauth2/register/operator-app", headers=other)
    assert refused.status_code == 401
    odd = await client.get("/oauth2/register/" + "x" * 300, headers=other)
    assert odd.status_code == 401


@pytest.mark.feature("client-registration-management")
@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"client_id": None}, "invalid_request"),
        ({"client_id": "someone-else"}, "invalid_request"),
        ({"registration_access_token": "x"}, "invalid_request"),
        ({"client_secret": "wrong"}, "invalid_request"),
        ({"token_endpoint_auth_method": "none"}, "invalid_client_metadata"),
        ({"redirect_uris": ["http://evil.example/cb"]}, "invalid_redirect_uri"),
        ({"scope": "admin"}, "invalid_client_metadata"),
    ],
)
async def test_a_bad_update_changes_nothing(
    client: httpx.AsyncClient, state: AppState, change: dict[str, Any], error: str
) -> None:
    body = await registered(client, state)
    token = body["registration_access_token"]
    update = {"client_id": body["client_id"], **WEB, **change}
    update = {k: v for k, v in update.items() if v is not None}
    response = await client.put(path(body), json=update, headers=bearer(token))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    # Nothing changed, the token included.
    read = await client.get(path(body), headers=bearer(token))
    assert read.status_code == 200 and read.json()["redirect_uris"] == WEB["redirect_uris"]
    bad_json = await client.put(
        path(body), content=b"[", headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400


@pytest.mark.feature("client-registration-management")
def test_cli_prints_an_initial_access_token(cli: Any) -> None:
    assert cli("migrate").code == 0
    out = cli("clients", "registration-token", "--ttl", "120", "--json")
    assert out.code == 0, out
    issued = out.json()
    assert len(issued["token"]) >= 43 and issued["expires_at"] > models.now()
    text = cli("clients", "registration-token")
    assert text.code == 0 and "initial access token:" in text.out
    # SPEC: one hour by default.
    before = models.now()
    default = cli("clients", "registration-token", "--json").json()
    assert before + 3600 <= default["expires_at"] <= models.now() + 3600
    assert cli("clients", "registration-token", "--ttl", "5").code != 0


async def test_a_registered_public_client_signs_people_in_and_its_consent_says_so(
    client: httpx.AsyncClient,
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: Any,
) -> None:
    """The whole browser flow for a client that registered itself (public, PKCE): people are
    asked to consent, and told that nobody checked the name it gave."""
    body = await registered(
        client,
        state,
        client_name="Totally Official Bank",
        grant_types=["authorization_code"],
        token_endpoint_auth_method="none",
    )
    user = await make_user("reggie")
    await sign_in(browser, user)
    verifier = "v" * 64
    challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )
    params = {
        "response_type": "code",
        "client_id": body["client_id"],
        "redirect_uri": WEB["redirect_uris"][0],
        "scope": "openid profile",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page = await browser.get("/oauth2/authorize", params=params)
    assert page.status_code == 200, page.text
    assert "Totally Official Bank" in page.text
    assert "registered itself: its name has not been checked" in page.text
    allowed = await browser.post(
        "/consent", data={**params, "csrf_token": csrf_of(page), "decision": "allow"}
    )
    assert allowed.status_code in (302, 303), allowed.text
    code = dict(parse_qsl(urlsplit(allowed.headers["location"]).query))["code"]
    token = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": WEB["redirect_uris"][0],
            "client_id": body["client_id"],
            "code_verifier": verifier,
        },
    )
    assert token.status_code == 200, token.text
    assert "id_token" in token.json() and "refresh_token" not in token.json()


async def test_dpop_bound_access_tokens_is_registered_echoed_and_stored(
    client: httpx.AsyncClient, state: AppState
) -> None:
    token = await initial_token(state)
    plain = await register(client, WEB, token)
    assert plain.status_code == 201, plain.text
    assert plain.json()["dpop_bound_access_tokens"] is False
    response = await register(client, {**WEB, "dpop_bound_access_tokens": True}, token)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["dpop_bound_access_tokens"] is True
    read = await client.get(path(body), headers=bearer(body["registration_access_token"]))
    assert read.status_code == 200, read.text
    assert read.json()["dpop_bound_access_tokens"] is True
    async with state.db.sessions() as db:
        row = await db.get(Client, body["client_id"])
        assert row is not None and row.dpop_bound is True
    refused = await register(client, {**WEB, "dpop_bound_access_tokens": "yes"}, token)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_client_metadata"


async def test_require_pushed_authorization_requests_is_registered_echoed_and_stored(
    client: httpx.AsyncClient, state: AppState
) -> None:
    flag = "require_pushed_authorization_requests"
    token = await initial_token(state)
    plain = await register(client, WEB, token)
    assert plain.status_code == 201, plain.text
    assert plain.json()[flag] is False
    response = await register(client, {**WEB, flag: True}, token)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body[flag] is True and body["dpop_bound_access_tokens"] is False
    read = await client.get(path(body), headers=bearer(body["registration_access_token"]))
    assert read.status_code == 200, read.text
    assert read.json()[flag] is True
    async with state.db.sessions() as db:
        row = await db.get(Client, body["client_id"])
        assert row is not None and row.require_par is True and row.dpop_bound is False
    for bad in ("yes", 1, "true", [True]):
        refused = await register(client, {**WEB, flag: bad}, token)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"] == "invalid_client_metadata"
        assert flag in refused.json()["error_description"]


@pytest.mark.feature("client-registration-management")
async def test_an_update_sets_and_clears_require_pushed_authorization_requests(
    client: httpx.AsyncClient, state: AppState
) -> None:
    """RFC 7592 §2.2: the update replaces the metadata, the flag included; a bad value is
    refused and changes nothing."""
    flag = "require_pushed_authorization_requests"
    body = await registered(client, state)
    token = body["registration_access_token"]
    base = {"client_id": body["client_id"], **WEB}
    bad = await client.put(path(body), json={**base, flag: "yes"}, headers=bearer(token))
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"] == "invalid_client_metadata"
    assert (await client.get(path(body), headers=bearer(token))).json()[flag] is False
    updated = await client.put(path(body), json={**base, flag: True}, headers=bearer(token))
    assert updated.status_code == 200, updated.text
    assert updated.json()[flag] is True
    token = updated.json()["registration_access_token"]
    assert (await client.get(path(body), headers=bearer(token))).json()[flag] is True
    async with state.db.sessions() as db:
        row = await db.get(Client, body["client_id"])
        assert row is not None and row.require_par is True
    # Left out of the next update: back to its default, as every replaced value is.
    cleared = await client.put(path(body), json=base, headers=bearer(token))
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()[flag] is False
    async with state.db.sessions() as db:
        row = await db.get(Client, body["client_id"])
        assert row is not None and row.require_par is False
