"""The admin API (/admin/v1): every operation's success, who may call it, bad input, audit."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from server import manage, models
from server.bearer import DPOP_ALGS_PARAM
from server.db import create_engine
from server.deps import AppState
from server.keycrypt import parse_encryption_key
from server.keys import KeyStore
from server.keys_db import DatabaseKeyStore
from server.main import create_app
from server.models import Client
from server.tokens import decode_access_token
from tests.conftest import (
    ClientCreds,
    Events,
    MakeClient,
    MakeUser,
    UserCreds,
    make_settings,
    password_grant,
    refresh_grant,
)

pytestmark = pytest.mark.feature("admin-api")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def client_token(http: httpx.AsyncClient, creds: ClientCreds, **data: str) -> httpx.Response:
    return await http.post(
        "/oauth2/token", data={"grant_type": "client_credentials", **data}, headers=creds.basic
    )


@pytest.fixture
async def ops(make_client: MakeClient) -> ClientCreds:
    return await make_client("ops", admin=True, grants=["client_credentials"], scope="")


@pytest.fixture
async def admin(client: httpx.AsyncClient, ops: ClientCreds) -> dict[str, str]:
    issued = await client_token(client, ops, scope="admin")
    assert issued.status_code == 200, issued.text
    assert issued.json()["scope"] == "admin"
    return bearer(issued.json()["access_token"])


@pytest.fixture
async def app_client(make_client: MakeClient) -> ClientCreds:
    # First-party with the account scope: some tests watch a sign-in live or die through
    # /api/v1/me.
    return await make_client(
        "app",
        grants=["password", "refresh_token", "client_credentials"],
        scope="profile email api account",
        first_party=True,
    )


# -- who may call it -----------------------------------------------------------------------

#: Every operation, with a body that would succeed, so only authorisation can refuse it.
OPERATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/admin/v1/clients", {"client_id": "new-one"}),
    ("GET", "/admin/v1/clients", None),
    ("GET", "/admin/v1/clients/app", None),
    ("PATCH", "/admin/v1/clients/app", {"name": "App"}),
    ("POST", "/admin/v1/clients/app/secret", None),
    ("DELETE", "/admin/v1/clients/app", None),
    ("POST", "/admin/v1/users", {"username": "newbie", "password": "correct horse battery"}),
    ("GET", "/admin/v1/users", None),
    ("GET", "/admin/v1/users/{user}", None),
    ("POST", "/admin/v1/users/{user}/disable", None),
    ("POST", "/admin/v1/users/{user}/enable", None),
    ("POST", "/admin/v1/users/{user}/password", {"password": "another fine passphrase"}),
    ("GET", "/admin/v1/users/{user}/sessions", None),
    ("DELETE", "/admin/v1/users/{user}/sessions", None),
    ("DELETE", "/admin/v1/users/{user}/sessions/{session}", None),
    ("GET", "/admin/v1/keys", None),
    ("POST", "/admin/v1/keys/rotate", {"force": True}),
    ("POST", "/admin/v1/keys/prune", None),
]
OPERATION_IDS = [f"{method} {path}" for method, path, _ in OPERATIONS]


async def call(
    http: httpx.AsyncClient,
    operation: tuple[str, str, dict[str, Any] | None],
    headers: dict[str, str],
    user_id: str = "nobody",
    session_id: str = "0123",
) -> httpx.Response:
    method, path, body = operation
    path = path.replace("{user}", user_id).replace("{session}", session_id)
    return await http.request(method, path, json=body, headers=headers)


def expired_copy(state: AppState, token: str) -> str:
    """The same token, signed by our current key, but expired a minute ago (RFC 9068 §4)."""
    settings = state.settings
    keyset = state.keys.keyset()
    claims = decode_access_token(
        keyset, token, issuer=settings.issuer, audience=settings.audience, now=int(time.time())
    )
    assert claims is not None
    stamp = int(time.time())
    return keyset.sign({**claims, "iat": stamp - 3600, "exp": stamp - 60}, "at+jwt")


@pytest.mark.one_backend
@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_every_operation_needs_a_live_admin_client_token(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    app_client: ClientCreds,
    ops: ClientCreds,
    state: AppState,
    events: Events,
    operation: tuple[str, str, dict[str, Any] | None],
) -> None:
    user = await make_user()
    person = (await password_grant(client, app_client, user)).json()["access_token"]
    plain = (await client_token(client, app_client)).json()["access_token"]
    admin_token = (await client_token(client, ops, scope="admin")).json()["access_token"]
    expired = expired_copy(state, admin_token)
    gone = await make_user("gone")
    disabled = (await password_grant(client, app_client, gone)).json()["access_token"]
    async with state.db.sessions() as db:
        await manage.disable_user(db, "gone")
        await db.commit()
    # An admin client may also ask for less than admin: that token is not enough.
    narrow = await make_client("ops2", admin=True, grants=["client_credentials"], scope="api")
    unscoped = (await client_token(client, narrow, scope="api")).json()["access_token"]

    missing = await call(client, operation, {}, user.id)
    assert missing.status_code == 401
    # RFC 6750 §3.1 and RFC 9449 §7.1: no error code, one challenge per scheme accepted.
    assert missing.headers.get_list("www-authenticate") == [
        'Bearer realm="api"',
        f'DPoP realm="api", algs="{DPOP_ALGS_PARAM}"',
    ]
    assert missing.json()["error_code"] == "missing_token"
    assert missing.headers["cache-control"] == "no-store"

    for token in ("not.a.token", expired, disabled):
        invalid = await call(client, operation, bearer(token), user.id)
        assert invalid.status_code == 401
        assert 'error="invalid_token"' in invalid.headers["www-authenticate"]
        assert invalid.json()["error_code"] == "invalid_token"

    for token in (person, plain, unscoped):
        refused = await call(client, operation, bearer(token), user.id)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error_code"] == "insufficient_scope"
        challenge = refused.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge and 'scope="admin"' in challenge
    denials = [fields for event, fields in events if event == "api.access_denied"]
    assert [d["reason"] for d in denials] == ["user_token", "scope_missing", "scope_missing"]
    assert [d["client_id"] for d in denials] == ["app", "app", "ops2"]
    # Nothing changed: the client and the user are still there, as they were.
    assert (await password_grant(client, app_client, user)).status_code == 200


@pytest.mark.one_backend
@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
async def test_every_operation_is_audited_naming_the_acting_client(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    events: Events,
    operation: tuple[str, str, dict[str, Any] | None],
    tmp_path: Path,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rotating and pruning keys act on a copy of the shared keys directory.
    shutil.copytree(state.settings.keys_dir, tmp_path / "keys")
    monkeypatch.setattr(state, "keys", KeyStore(tmp_path / "keys"))
    user = await make_user()
    await password_grant(client, app_client, user)
    sessions = await client.get(f"/admin/v1/users/{user.id}/sessions", headers=admin)
    session_id = sessions.json()["sessions"][0]["id"]
    events.clear()
    response = await call(client, operation, admin, user.id, session_id)
    assert response.status_code in (200, 201, 204), response.text
    acted = [(event, fields) for event, fields in events if fields.get("actor_client_id")]
    assert acted, events
    assert all(fields["actor_client_id"] == "ops" for _, fields in acted)


async def test_a_non_admin_client_cannot_get_the_admin_scope(
    client: httpx.AsyncClient, app_client: ClientCreds
) -> None:
    refused = await client_token(client, app_client, scope="admin")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_scope"
    # Asking for everything it may have leaves admin out.
    issued = await client_token(client, app_client)
    assert "admin" not in issued.json()["scope"].split()


async def test_an_expired_admin_token_is_refused(
    client: httpx.AsyncClient, ops: ClientCreds, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's clock (models.clock) is frozen, then moved: no waiting for exp.
    issued_at = int(time.time())
    monkeypatch.setattr(models, "clock", lambda: issued_at)
    issued = (await client_token(client, ops, scope="admin")).json()
    token, lifetime = issued["access_token"], int(issued["expires_in"])
    monkeypatch.setattr(models, "clock", lambda: issued_at + lifetime - 1)
    assert (await client.get("/admin/v1/clients", headers=bearer(token))).status_code == 200
    monkeypatch.setattr(models, "clock", lambda: issued_at + lifetime)  # now == exp: expired
    expired = await client.get("/admin/v1/clients", headers=bearer(token))
    assert expired.status_code == 401
    assert expired.json()["error_code"] == "invalid_token"


async def test_a_deleted_or_demoted_admin_client_is_refused_at_once(
    client: httpx.AsyncClient, admin: dict[str, str], state: AppState, events: Events
) -> None:
    assert (await client.get("/admin/v1/clients", headers=admin)).status_code == 200
    # Demoted in the database (no API does this): the token still says admin, the client no.
    async with state.db.sessions() as db:
        await db.execute(update(Client).where(Client.client_id == "ops").values(is_admin=False))
        await db.commit()
    demoted = await client.get("/admin/v1/clients", headers=admin)
    assert demoted.status_code == 403
    assert events[-1][1]["reason"] == "scope_withdrawn"
    async with state.db.sessions() as db:
        await manage.delete_client(db, "ops")
        await db.commit()
    deleted = await client.get("/admin/v1/clients", headers=admin)
    assert deleted.status_code == 401
    assert deleted.json()["error_code"] == "invalid_token"


async def test_a_disabled_persons_token_is_refused_everywhere(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
) -> None:
    user = await make_user("frank")
    tokens = (await password_grant(client, app_client, user)).json()
    disabled = await client.post(f"/admin/v1/users/{user.id}/disable", headers=admin)
    assert disabled.status_code == 200
    assert disabled.json()["disabled"] is True
    for path in ("/admin/v1/clients", "/api/v1/me"):
        refused = await client.get(path, headers=bearer(tokens["access_token"]))
        assert refused.status_code == 401
        assert refused.json()["error_code"] == "invalid_token"
    assert (await refresh_grant(client, app_client, tokens["refresh_token"])).status_code == 400
    assert (await password_grant(client, app_client, user)).status_code == 400
    enabled = await client.post(f"/admin/v1/users/{user.id}/enable", headers=admin)
    assert enabled.status_code == 200 and enabled.json()["disabled"] is False
    assert (await password_grant(client, app_client, user)).status_code == 200
    # The sign-in that disabling ended stays ended.
    assert (await refresh_grant(client, app_client, tokens["refresh_token"])).status_code == 400


# -- clients -------------------------------------------------------------------------------


async def test_a_client_is_created_with_its_secret_shown_once(
    client: httpx.AsyncClient, admin: dict[str, str], events: Events
) -> None:
    created = await client.post(
        "/admin/v1/clients",
        json={"client_id": "billing", "name": "Billing", "grant_types": ["client_credentials"]},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    assert created.headers["cache-control"] == "no-store"
    body = created.json()
    secret = body.pop("client_secret")
    assert len(secret) >= 43
    assert body == {
        "client_id": "billing",
        "name": "Billing",
        "public": False,
        "admin": False,
        "resource_server": False,
        "first_party": False,
        "grant_types": ["client_credentials"],
        "scope": "",
        "redirect_uris": [],
        "post_logout_redirect_uris": [],
        "refresh_retry_window": None,
        "token_endpoint_auth_method": "client_secret_basic",
        "jwks": None,
        "jwks_uri": None,
        "resources": None,
        "origin": None,
        "dpop_bound_access_tokens": False,
        "require_pushed_authorization_requests": False,
        "created_at": body["created_at"],
    }
    assert abs(body["created_at"] - time.time()) < 60
    billing = ClientCreds("billing", secret)
    assert (await client_token(client, billing)).status_code == 200
    shown = await client.get("/admin/v1/clients/billing", headers=admin)
    assert shown.status_code == 200
    assert "client_secret" not in shown.json()
    assert secret not in shown.text
    assert (
        "client.created",
        {
            "client_id": "billing",
            "public": False,
            "admin": False,
            "resource_server": False,
            "auth_method": "client_secret_basic",
            "dpop_bound": False,
            "require_par": False,
            "actor_client_id": "ops",
            "via": "admin_api",
        },
    ) in events
    assert ("admin.client_viewed", {"actor_client_id": "ops", "client_id": "billing"}) in events
    assert all(secret not in repr(fields) for _, fields in events)


async def test_a_public_client_and_an_admin_client(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    spa = await client.post(
        "/admin/v1/clients",
        json={
            "client_id": "spa",
            "public": True,
            "grant_types": ["authorization_code", "refresh_token"],
            "scope": "openid profile",
            "redirect_uris": ["https://app.example.com/cb", "http://127.0.0.1:8400/cb"],
        },
        headers=admin,
    )
    assert spa.status_code == 201, spa.text
    assert spa.json()["client_secret"] is None and spa.json()["public"] is True
    assert spa.json()["redirect_uris"] == ["https://app.example.com/cb", "http://127.0.0.1:8400/cb"]
    robot = await client.post(
        "/admin/v1/clients", json={"client_id": "robot", "admin": True}, headers=admin
    )
    assert robot.status_code == 201
    assert "admin" in robot.json()["scope"].split()
    creds = ClientCreds("robot", robot.json()["client_secret"])
    token = (await client_token(client, creds, scope="admin")).json()["access_token"]
    assert (await client.get("/admin/v1/users", headers=bearer(token))).status_code == 200


async def test_clients_are_listed_a_page_at_a_time(
    client: httpx.AsyncClient, admin: dict[str, str], make_client: MakeClient
) -> None:
    for name in ("c-b", "c-a", "c-e", "c-d", "c-c"):
        await make_client(name)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = await client.get("/admin/v1/clients", params=params, headers=admin)
        assert page.status_code == 200, page.text
        items = page.json()["items"]
        assert len(items) <= 2
        seen += [item["client_id"] for item in items]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ["c-a", "c-b", "c-c", "c-d", "c-e", "ops"]
    assert pages == 3
    everything = await client.get("/admin/v1/clients", headers=admin)
    assert [i["client_id"] for i in everything.json()["items"]] == seen
    assert everything.json()["next_cursor"] is None


@pytest.mark.feature("refresh-retries")
async def test_a_clients_refresh_retry_window_is_set_changed_and_bounded(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    body = {"client_id": "mobile", "refresh_retry_window": 30}
    created = await client.post("/admin/v1/clients", json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert created.json()["refresh_retry_window"] == 30
    cleared = await client.patch(
        "/admin/v1/clients/mobile", json={"refresh_retry_window": None}, headers=admin
    )
    assert cleared.json()["refresh_retry_window"] is None
    for bad in (-1, 301, "30", True):
        refused = await client.patch(
            "/admin/v1/clients/mobile", json={"refresh_retry_window": bad}, headers=admin
        )
        assert refused.status_code in (400, 422), (bad, refused.text)
    shown = await client.get("/admin/v1/clients/mobile", headers=admin)
    assert shown.json()["refresh_retry_window"] is None


async def test_a_client_is_updated_and_what_it_lost_stops_working(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    events: Events,
) -> None:
    user = await make_user()
    tokens = (await password_grant(client, app_client, user)).json()
    assert tokens["scope"] == "profile email api account"
    changed = await client.patch(
        "/admin/v1/clients/app",
        json={
            "scope": "profile",
            "grant_types": ["password", "refresh_token"],
            "redirect_uris": ["https://app.example.com/callback"],
            "name": "The App",
        },
        headers=admin,
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["scope"] == "profile"
    assert body["grant_types"] == ["password", "refresh_token"]
    assert body["redirect_uris"] == ["https://app.example.com/callback"]
    assert body["name"] == "The App" and body["first_party"] is True  # unchanged
    # The earlier sign-in refreshes to what the client still has (RFC 6749 §6 narrowing).
    refreshed = await refresh_grant(client, app_client, tokens["refresh_token"])
    assert refreshed.status_code == 200 and refreshed.json()["scope"] == "profile"
    gone = await client_token(client, app_client)
    assert gone.status_code == 400 and gone.json()["error"] == "unauthorized_client"
    # Only what was sent changes.
    renamed = await client.patch("/admin/v1/clients/app", json={"name": "App"}, headers=admin)
    assert renamed.json()["scope"] == "profile" and renamed.json()["name"] == "App"
    assert (
        "client.updated",
        {
            "client_id": "app",
            "fields": ["grant_types", "name", "redirect_uris", "scope"],
            "actor_client_id": "ops",
            "via": "admin_api",
        },
    ) in events


async def test_a_secret_is_rotated_and_the_old_one_stops_working(
    client: httpx.AsyncClient, admin: dict[str, str], app_client: ClientCreds, events: Events
) -> None:
    rotated = await client.post("/admin/v1/clients/app/secret", headers=admin)
    assert rotated.status_code == 200
    assert rotated.headers["cache-control"] == "no-store"
    new = rotated.json()["client_secret"]
    assert rotated.json()["client_id"] == "app" and new != app_client.secret
    assert (await client_token(client, app_client)).status_code == 401
    assert (await client_token(client, ClientCreds("app", new))).status_code == 200
    assert (
        "client.secret_rotated",
        {"client_id": "app", "actor_client_id": "ops", "via": "admin_api"},
    ) in events


async def test_a_deleted_client_takes_its_tokens_with_it(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    events: Events,
) -> None:
    user = await make_user()
    tokens = (await password_grant(client, app_client, user)).json()
    deleted = await client.delete("/admin/v1/clients/app", headers=admin)
    assert deleted.status_code == 204
    assert (
        await client.get("/api/v1/me", headers=bearer(tokens["access_token"]))
    ).status_code == 401
    assert (await client.get("/admin/v1/clients/app", headers=admin)).status_code == 404
    again = await client.delete("/admin/v1/clients/app", headers=admin)
    assert again.status_code == 404 and again.json()["error_code"] == "not_found"
    assert (
        "client.deleted",
        {"client_id": "app", "actor_client_id": "ops", "via": "admin_api"},
    ) in events
    itself = await client.delete("/admin/v1/clients/ops", headers=admin)
    assert itself.status_code == 409 and itself.json()["error_code"] == "cannot_delete_self"
    assert (await client.get("/admin/v1/clients/ops", headers=admin)).status_code == 200


async def test_a_public_clients_secret_cannot_be_rotated(
    client: httpx.AsyncClient, admin: dict[str, str], make_client: MakeClient
) -> None:
    await make_client("native", public=True)
    refused = await client.post("/admin/v1/clients/native/secret", headers=admin)
    assert refused.status_code == 409 and refused.json()["error_code"] == "public_client"
    missing = await client.post("/admin/v1/clients/nope/secret", headers=admin)
    assert missing.status_code == 404


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"client_id": "app"}, 409, "client_exists"),
        ({"client_id": "has space"}, 422, "validation_error"),
        ({"client_id": "x" * 101}, 422, "validation_error"),
        ({"client_id": "new", "secret": "mine"}, 422, "validation_error"),
        ({"client_id": "new", "grant_types": ["implicit"]}, 422, "validation_error"),
        ({"client_id": "new", "scope": "a  b"}, 422, "validation_error"),
        ({"client_id": "new", "scope": "api\n"}, 422, "validation_error"),
        ({"client_id": "new", "scope": 'a"b'}, 422, "validation_error"),
        ({"client_id": "new", "redirect_uris": ["x" * 2001]}, 422, "validation_error"),
        ({"client_id": "new", "redirect_uris": "https://one.example"}, 422, "validation_error"),
        # Booleans are JSON booleans: pydantic's lax mode would read 1 and "true" as True.
        ({"client_id": "new", "public": 1}, 422, "validation_error"),
        ({"client_id": "new", "admin": "true"}, 422, "validation_error"),
        ({"client_id": "new", "resource_server": 1}, 422, "validation_error"),
        ({"client_id": "new", "first_party": "yes"}, 422, "validation_error"),
        (
            {"client_id": "new", "public": True, "grant_types": ["client_credentials"]},
            400,
            "invalid_client_metadata",
        ),
        (
            {"client_id": "new", "public": True, "resource_server": True},
            400,
            "invalid_client_metadata",
        ),
        (
            {"client_id": "new", "grant_types": ["authorization_code"]},
            400,
            "invalid_client_metadata",
        ),
        ({"client_id": "new", "scope": "api admin"}, 400, "invalid_client_metadata"),
        ({"client_id": "new", "redirect_uris": ["/relative"]}, 400, "invalid_redirect_uri"),
        (
            {"client_id": "new", "redirect_uris": ["https://a.example/cb#frag"]},
            400,
            "invalid_redirect_uri",
        ),
        (
            {"client_id": "new", "redirect_uris": ["https://*.example.com/cb"]},
            400,
            "invalid_redirect_uri",
        ),
        (
            {"client_id": "new", "post_logout_redirect_uris": ["javascript:alert(1)"]},
            400,
            "invalid_redirect_uri",
        ),
    ],
    ids=[
        "duplicate",
        "space-in-id",
        "long-id",
        "unknown-field",
        "unknown-grant",
        "double-space",
        "trailing-newline",
        "quote-in-scope",
        "long-uri",
        "uris-not-a-list",
        "public-as-1",
        "admin-as-string",
        "resource-server-as-1",
        "first-party-as-string",
        "public-client-credentials",
        "public-resource-server",
        "code-without-redirect",
        "admin-scope-non-admin",
        "relative-uri",
        "fragment",
        "wildcard",
        "javascript-logout-uri",
    ],
)
async def test_bad_clients_are_refused_with_their_code(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    response = await client.post("/admin/v1/clients", json=body, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    listed = await client.get("/admin/v1/clients", headers=admin)
    assert [c["client_id"] for c in listed.json()["items"]] == ["app", "ops"]  # nothing added


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"client_id": "other"}, 422, "validation_error"),
        ({"admin": True}, 422, "validation_error"),
        ({"name": ""}, 422, "validation_error"),
        ({"grant_types": None}, 422, "validation_error"),
        ({"first_party": 0}, 422, "validation_error"),
        ({"grant_types": ["authorization_code"]}, 400, "invalid_client_metadata"),
        ({"scope": "admin"}, 400, "invalid_client_metadata"),
        ({"redirect_uris": ["not a uri"]}, 400, "invalid_redirect_uri"),
    ],
    ids=[
        "rename-id",
        "promote",
        "empty-name",
        "null-list",
        "first-party-as-0",
        "code-without-redirect",
        "admin-scope",
        "bad-uri",
    ],
)
async def test_bad_changes_are_refused_and_change_nothing(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    before = (await client.get("/admin/v1/clients/app", headers=admin)).json()
    response = await client.patch("/admin/v1/clients/app", json=body, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    assert (await client.get("/admin/v1/clients/app", headers=admin)).json() == before


async def test_production_registers_https_redirect_uris_only(
    database_url: str, tmp_path: Path
) -> None:
    KeyStore(tmp_path).ensure()
    settings = make_settings(
        database_url,
        tmp_path,
        env="production",
        issuer="https://id.example.com",
        secret_key="q7Zr2LxW9mPb4TnV8cKd1HyF6sJg3RaE0uMwXo5BkQ_e-NhC",
        argon2_memory_cost=19_456,
        argon2_time_cost=2,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            await db.execute(Client.__table__.delete())
            created = await manage.create_client(
                db, client_id="prod-ops", admin=True, grants=["client_credentials"]
            )
            await db.commit()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="https://id.example.com"
        ) as http:
            creds = ClientCreds("prod-ops", created.secret)
            token = (await client_token(http, creds, scope="admin")).json()["access_token"]
            headers = bearer(token)
            for uri in (
                "http://app.example.com/cb",
                "http://127.0.0.1:8400/cb",
                "com.example.app:/cb",
                "https:///no-host",
            ):
                refused = await http.post(
                    "/admin/v1/clients",
                    json={
                        "client_id": "web",
                        "grant_types": ["authorization_code"],
                        "redirect_uris": [uri],
                    },
                    headers=headers,
                )
                assert refused.status_code == 400, uri
                assert refused.json()["error_code"] == "invalid_redirect_uri"
            ok = await http.post(
                "/admin/v1/clients",
                json={
                    "client_id": "web",
                    "grant_types": ["authorization_code"],
                    "redirect_uris": ["https://app.example.com/cb"],
                },
                headers=headers,
            )
            assert ok.status_code == 201, ok.text
            patched = await http.patch(
                "/admin/v1/clients/web",
                json={"post_logout_redirect_uris": ["http://app.example.com/bye"]},
                headers=headers,
            )
            assert patched.status_code == 400
            # No schema in production unless asked.
            assert (await http.get("/openapi.json")).status_code == 404
        async with state.db.sessions() as db:
            await db.execute(Client.__table__.delete())
            await db.commit()


# -- users ---------------------------------------------------------------------------------


async def test_a_user_is_created_shown_and_can_sign_in(
    client: httpx.AsyncClient, admin: dict[str, str], app_client: ClientCreds, events: Events
) -> None:
    created = await client.post(
        "/admin/v1/users",
        json={"username": "Gina", "password": "correct horse battery", "email": "g@example.com"},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["username"] == "Gina" and body["disabled"] is False
    assert '"password"' not in created.text and "correct horse" not in created.text
    shown = await client.get(f"/admin/v1/users/{body['id']}", headers=admin)
    assert shown.json() == body
    user = UserCreds(body["id"], "gina", "correct horse battery")
    assert (await password_grant(client, app_client, user)).status_code == 200
    assert (
        "user.created",
        {"user_id": body["id"], "actor_client_id": "ops", "via": "admin_api"},
    ) in events
    missing = await client.get("/admin/v1/users/0000", headers=admin)
    assert missing.status_code == 404 and missing.json()["error_code"] == "not_found"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"username": "ALICE", "password": "correct horse battery"}, 409, "username_taken"),
        ({"username": "newbie", "password": "password"}, 400, "weak_password"),
        ({"username": "Long-Newbie", "password": "long-newbie"}, 400, "weak_password"),
        ({"username": "no spaces", "password": "correct horse battery"}, 400, "invalid_user"),
        (
            {"username": "newbie", "password": "correct horse battery", "email": "@"},
            422,
            "validation_error",
        ),
        (
            {"username": "newbie", "password": "correct horse battery", "disabled": True},
            422,
            "validation_error",
        ),
        ({"username": "n" * 151, "password": "correct horse battery"}, 422, "validation_error"),
    ],
    ids=[
        "duplicate",
        "common",
        "is-the-username",
        "bad-username",
        "bad-email",
        "unknown-field",
        "long-username",
    ],
)
async def test_bad_users_are_refused_with_their_code(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    make_user: MakeUser,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    await make_user("alice")
    response = await client.post("/admin/v1/users", json=body, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["error_code"] == code
    assert "correct horse battery" not in response.text
    listed = (await client.get("/admin/v1/users", headers=admin)).json()["items"]
    assert [u["username"] for u in listed] == ["alice"]


async def test_users_are_listed_searched_and_filtered_a_page_at_a_time(
    client: httpx.AsyncClient, admin: dict[str, str], make_user: MakeUser, events: Events
) -> None:
    for name, email in [
        ("carol", "carol@example.org"),
        ("Bob", "bob@Work.example"),
        ("alice", None),
        ("dave_x", "d@example.org"),
        ("erin", "erin@work.example"),
    ]:
        await make_user(name, email=email)
    names: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/admin/v1/users", params=params, headers=admin)).json()
        names += [u["username"] for u in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == ["alice", "Bob", "carol", "dave_x", "erin"]

    async def search(**params: Any) -> list[str]:
        response = await client.get("/admin/v1/users", params=params, headers=admin)
        assert response.status_code == 200, response.text
        return [u["username"] for u in response.json()["items"]]

    assert await search(search="BO") == ["Bob"]  # usernames compare as sign-in does
    assert await search(search="WORK.example") == ["Bob", "erin"]  # emails, any case
    assert await search(search="_") == ["dave_x"]  # wildcards are literal
    assert await search(search="%") == []
    assert await search(search="example", limit=1) == ["Bob"]
    # Search and pagination together.
    first = (
        await client.get("/admin/v1/users", params={"search": "example", "limit": 2}, headers=admin)
    ).json()
    rest = await search(search="example", cursor=first["next_cursor"])
    assert [u["username"] for u in first["items"]] + rest == ["Bob", "carol", "dave_x", "erin"]

    bob = next(
        u
        for u in (await client.get("/admin/v1/users", headers=admin)).json()["items"]
        if u["username"] == "Bob"
    )
    await client.post(f"/admin/v1/users/{bob['id']}/disable", headers=admin)
    assert await search(disabled="true") == ["Bob"]
    assert await search(disabled="false") == ["alice", "carol", "dave_x", "erin"]
    listed = [fields for event, fields in events if event == "admin.users_listed"]
    assert listed and all(f["actor_client_id"] == "ops" for f in listed)
    assert all("example" not in repr(f) for f in listed)  # the search text is not logged


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "garbage!"},
        {"cursor": "WyJjbGllbnRzIiwiYXBwIl0"},  # a clients cursor, at users
        {"cursor": "bnVsbA"},  # "null"
        {"cursor": "WyJ1c2VycyIsMV0"},  # ["users", 1]
    ],
    ids=["not-base64-json", "other-listing", "null", "not-a-string-key"],
)
async def test_a_cursor_not_made_for_the_listing_is_a_400(
    client: httpx.AsyncClient, admin: dict[str, str], params: dict[str, str]
) -> None:
    response = await client.get("/admin/v1/users", params=params, headers=admin)
    assert response.status_code == 400
    assert response.json()["error_code"] == "invalid_cursor"


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": "ten"},
        {"search": ""},
        {"search": "s" * 151},
        {"disabled": "perhaps"},
        {"cursor": "c" * 513},
    ],
    ids=[
        "zero",
        "too-many",
        "not-a-number",
        "empty-search",
        "long-search",
        "not-a-bool",
        "long-cursor",
    ],
)
async def test_bad_listing_parameters_are_a_422(
    client: httpx.AsyncClient, admin: dict[str, str], params: dict[str, Any]
) -> None:
    response = await client.get("/admin/v1/users", params=params, headers=admin)
    assert response.status_code == 422
    assert response.json()["error_code"] == "validation_error"


async def test_a_password_reset_ends_every_sign_in(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    events: Events,
) -> None:
    user = await make_user("jon")
    tokens = (await password_grant(client, app_client, user)).json()
    weak = await client.post(
        f"/admin/v1/users/{user.id}/password", json={"password": "password"}, headers=admin
    )
    assert weak.status_code == 400 and weak.json()["error_code"] == "weak_password"
    assert (
        await client.get("/api/v1/me", headers=bearer(tokens["access_token"]))
    ).status_code == 200
    reset = await client.post(
        f"/admin/v1/users/{user.id}/password",
        json={"password": "a brand new passphrase"},
        headers=admin,
    )
    assert reset.status_code == 204
    assert (
        await client.get("/api/v1/me", headers=bearer(tokens["access_token"]))
    ).status_code == 401
    assert (await refresh_grant(client, app_client, tokens["refresh_token"])).status_code == 400
    assert (await password_grant(client, app_client, user)).status_code == 400
    new = UserCreds(user.id, "jon", "a brand new passphrase")
    assert (await password_grant(client, app_client, new)).status_code == 200
    assert (
        "user.password_changed",
        {
            "user_id": user.id,
            "families_revoked": 1,
            "actor_client_id": "ops",
            "via": "admin_api",
        },
    ) in events
    assert all("brand new" not in repr(fields) for _, fields in events)
    missing = await client.post(
        "/admin/v1/users/nobody/password",
        json={"password": "a brand new passphrase"},
        headers=admin,
    )
    assert missing.status_code == 404
    extra = await client.post(
        f"/admin/v1/users/{user.id}/password",
        json={"password": "a brand new passphrase", "notify": True},
        headers=admin,
    )
    assert extra.status_code == 422


async def test_sessions_are_listed_and_revoked_one_or_all(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    app_client: ClientCreds,
    make_user: MakeUser,
    events: Events,
) -> None:
    kim = await make_user("kim")
    lee = await make_user("lee")
    first = (await password_grant(client, app_client, kim)).json()
    second = (await password_grant(client, app_client, kim)).json()
    third = (await password_grant(client, app_client, kim)).json()
    lees = (await password_grant(client, app_client, lee)).json()
    listed = await client.get(f"/admin/v1/users/{kim.id}/sessions", headers=admin)
    assert listed.status_code == 200
    sessions = listed.json()["sessions"]
    assert len(sessions) == 3
    assert {s["client_id"] for s in sessions} == {"app"}
    assert all("current" not in s for s in sessions)
    lee_session = (await client.get(f"/admin/v1/users/{lee.id}/sessions", headers=admin)).json()
    # A session of another user, named under kim: 404, and lee's sign-in goes on.
    crossed = await client.delete(
        f"/admin/v1/users/{kim.id}/sessions/{lee_session['sessions'][0]['id']}", headers=admin
    )
    assert crossed.status_code == 404
    assert (await client.get("/api/v1/me", headers=bearer(lees["access_token"]))).status_code == 200

    one = sessions[1]["id"]
    ended = await client.delete(f"/admin/v1/users/{kim.id}/sessions/{one}", headers=admin)
    assert ended.status_code == 204
    statuses = [
        (await client.get("/api/v1/me", headers=bearer(t["access_token"]))).status_code
        for t in (first, second, third)
    ]
    assert sorted(statuses) == [200, 200, 401]
    assert (
        "session.revoked",
        {
            "actor_client_id": "ops",
            "via": "admin_api",
            "user_id": kim.id,
            "family_id": one,
        },
    ) in events
    again = await client.delete(f"/admin/v1/users/{kim.id}/sessions/{one}", headers=admin)
    assert again.status_code == 404

    everything = await client.delete(f"/admin/v1/users/{kim.id}/sessions", headers=admin)
    assert everything.status_code == 200 and everything.json() == {"revoked": 2}
    for t in (first, second, third):
        assert (
            await client.get("/api/v1/me", headers=bearer(t["access_token"]))
        ).status_code == 401
    assert (await client.get(f"/admin/v1/users/{kim.id}/sessions", headers=admin)).json() == {
        "sessions": []
    }
    # kim may sign in again: ending sessions is not disabling.
    assert (await password_grant(client, app_client, kim)).status_code == 200
    assert (await client.get("/admin/v1/users/nobody/sessions", headers=admin)).status_code == 404
    assert (
        await client.delete("/admin/v1/users/nobody/sessions", headers=admin)
    ).status_code == 404


# -- keys ----------------------------------------------------------------------------------


ENCRYPTION_KEY = secrets.token_urlsafe(32)


@contextlib.asynccontextmanager
async def key_ops(
    database_url: str, tmp_path: Path, key_store: str
) -> AsyncIterator[tuple[AppState, httpx.AsyncClient]]:
    """An app with keys of its own (a keys directory, or the database store: rotating must
    not touch the shared ones), and a client holding an admin token for it."""
    keys = tmp_path / "keys"
    if key_store == "files":
        KeyStore(keys).ensure()
    settings = make_settings(
        database_url, keys, key_store=key_store, key_encryption_key=ENCRYPTION_KEY
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            await db.execute(Client.__table__.delete())
            created = await manage.create_client(
                db, client_id="key-ops", admin=True, grants=["client_credentials"]
            )
            await db.commit()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                creds = ClientCreds("key-ops", created.secret)
                token = (await client_token(http, creds, scope="admin")).json()["access_token"]
                http.headers.update(bearer(token))
                yield state, http
        finally:
            async with state.db.sessions() as db:
                await db.execute(Client.__table__.delete())
                await db.execute(models.SigningKey.__table__.delete())  # the database store's
                await db.commit()


@pytest.fixture(params=["files", "database"])
async def own_keys(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    async with key_ops(database_url, tmp_path, request.param) as (_, http):
        yield http


async def test_keys_are_listed_rotated_and_pruned(own_keys: httpx.AsyncClient) -> None:
    http = own_keys
    listed = await http.get("/admin/v1/keys")
    assert listed.status_code == 200
    before = {k["state"]: k["kid"] for k in listed.json()["keys"]}
    assert set(before) == {"current", "next"}
    assert "BEGIN" not in listed.text and '"d"' not in listed.text  # no private material
    # The next key was published a moment ago: too soon for verifiers' cached JWKS.
    early = await http.post("/admin/v1/keys/rotate")
    assert early.status_code == 409 and early.json()["error_code"] == "rotation_too_soon"
    rotated = await http.post("/admin/v1/keys/rotate", json={"force": True})
    assert rotated.status_code == 200, rotated.text
    states = {k["kid"]: k["state"] for k in rotated.json()["keys"]}
    assert states[before["current"]] == "retired" and states[before["next"]] == "current"
    # This process signs with the new key at once, and the JWKS publishes all three.
    jwks = (await http.get("/.well-known/jwks.json")).json()
    assert {k["kid"] for k in jwks["keys"]} == set(states)
    pruned = await http.post("/admin/v1/keys/prune")
    assert pruned.status_code == 200
    assert pruned.json()["removed"] == []  # its tokens may still be live
    assert pruned.json()["kept"][0].startswith(before["current"])
    assert pruned.json()["orphans"] == []
    for lax in ("maybe", "true", 1, 0):  # only a JSON boolean; 1 is not true (schemathesis)
        refused = await http.post("/admin/v1/keys/rotate", json={"force": lax})
        assert refused.status_code == 422, lax


@pytest.mark.feature("key-store-database", "key-reload-health")
async def test_a_committed_rotation_whose_reload_fails_is_not_a_500(
    database_url: str, tmp_path: Path
) -> None:
    async with key_ops(database_url, tmp_path, "database") as (state, http):
        async with state.db.sessions() as db:
            # A damaged row (a state no release writes) that the next reload will refuse.
            await db.execute(
                update(models.SigningKey)
                .values(state="Retired")
                .where(models.SigningKey.state == "next")
            )
            await db.commit()
        rotated = await http.post("/admin/v1/keys/rotate", json={"force": True})
        # Committed: the answer says so (a 500 would invite a second rotation), and
        # readiness reports the reload that failed.
        assert rotated.status_code == 200, rotated.text
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and "state 'Retired'" in ready.json()["detail"]


@pytest.mark.feature("key-store-database")
async def test_a_rotation_under_another_encryption_key_is_409(
    database_url: str, tmp_path: Path
) -> None:
    async with key_ops(database_url, tmp_path, "database") as (state, http):
        # Another operator moved the keys to a new encryption key this replica lacks.
        engine = create_engine(state.settings)
        try:
            other = DatabaseKeyStore(engine, parse_encryption_key(secrets.token_urlsafe(32)))
            await other.rewrap(parse_encryption_key(ENCRYPTION_KEY))
        finally:
            await engine.dispose()
        refused = await http.post("/admin/v1/keys/rotate", json={"force": True})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error_code"] == "key_store_conflict"
    assert "rewrap" in refused.json()["detail"]


async def test_simultaneous_creates_of_one_id_give_one_201_and_409s(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    async def create(kind: str) -> int:
        body = (
            {"client_id": "twin"}
            if kind == "clients"
            else {"username": "twin", "password": "correct horse battery"}
        )
        response = await client.post(f"/admin/v1/{kind}", json=body, headers=admin)
        return response.status_code

    for kind in ("clients", "users"):
        statuses = await asyncio.gather(*(create(kind) for _ in range(6)))
        assert sorted(statuses) == [201, 409, 409, 409, 409, 409], (kind, statuses)


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe{}", b'{"client_id": "x"', b"[]", b"null"],
    ids=["not-utf8", "truncated", "array", "null"],
)
async def test_a_body_that_is_not_a_json_object_is_a_422(
    client: httpx.AsyncClient, admin: dict[str, str], body: bytes
) -> None:
    response = await client.post(
        "/admin/v1/clients",
        content=body,
        headers={**admin, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error_code"] == "validation_error"


def test_the_uri_and_change_rules_hold_for_the_cli_too() -> None:
    """What the API's schema stops before ``manage`` sees it, ``manage`` still refuses (the CLI
    has no schema)."""
    with pytest.raises(manage.RedirectUriError, match="at most 2000"):
        manage.check_redirect_uri("https://a.example/" + "x" * 2000)
    assert manage.check_redirect_uri("http://127.0.0.1:8400/cb") == "http://127.0.0.1:8400/cb"
    with pytest.raises(manage.RedirectUriError, match="https"):
        manage.check_redirect_uri("http://127.0.0.1:8400/cb", https_only=True)


async def test_only_the_registration_may_be_changed(state: AppState, ops: ClientCreds) -> None:
    async with state.db.sessions() as db:
        with pytest.raises(manage.ManageError, match="cannot change 'admin'"):
            await manage.update_client(db, "ops", {"admin": False})


@pytest.mark.parametrize(
    "check",
    [
        lambda: manage.check_redirect_uri("https://app.example.com/cb\n"),
        lambda: manage.check_redirect_uri("com.example.app:/cb\n"),
    ],
    ids=["https", "private-scheme"],
)
def test_a_trailing_newline_is_not_an_exact_string(check: Any) -> None:
    # Python's ``$`` also matches before a final newline: every rule is a full match.
    with pytest.raises(manage.RedirectUriError):
        check()


async def test_names_with_a_trailing_newline_are_refused(
    client: httpx.AsyncClient, admin: dict[str, str], make_user: MakeUser, state: AppState
) -> None:
    await make_user("alice")
    # Not a second, look-alike "alice".
    body = {"username": "alice\n", "password": "correct horse battery"}
    response = await client.post("/admin/v1/users", json=body, headers=admin)
    assert response.status_code == 400 and response.json()["error_code"] == "invalid_user"
    registered = await client.post("/api/v1/users", json=body)
    assert registered.status_code == 400
    async with state.db.sessions() as db:
        with pytest.raises(manage.ManageError):
            await manage.create_client(db, client_id="app\n")
        with pytest.raises(manage.ManageError):
            await manage.create_user(
                db,
                state.passwords,
                username="bob",
                password="correct horse battery",
                email="bob@example.com\n",
            )
