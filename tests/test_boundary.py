"""Text the database would refuse (NUL, lone surrogates, longer than its column) is refused at
the boundary with the endpoint's own 4xx, on SQLite and PostgreSQL alike; admin cursors are
signed, so one this server did not make is the 400 ``invalid_cursor``."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import select

from server import manage
from server.boundary import text_problem
from server.deps import AppState
from server.models import AuthorizationCode
from tests.api.test_account import bearer
from tests.api.test_admin import client_token
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    csrf_of,
    password_grant,
    sign_in,
)
from tests.oauth.test_authorize import CALLBACK, authorize_params, pkce, spa

pytestmark = pytest.mark.feature("boundary-text")

NUL = "a\x00b"
SURROGATE = "a\ud800b"


def raw_json(body: dict[str, Any]) -> bytes:
    """JSON with a lone surrogate escaped as ``\\ud800``, as a hostile client would send."""
    return json.dumps(body).encode()


def test_text_problem_names_the_rule_never_the_value() -> None:
    assert text_problem("plain text, café ☕", 20) is None
    assert text_problem(NUL) == "must not contain NUL characters"
    assert text_problem(SURROGATE) == "must be valid UTF-8 text (no lone surrogates)"
    assert text_problem("x" * 6, 5) == "must be at most 5 characters"
    assert text_problem("x" * 5, 5) is None


# -- the authorization endpoint -------------------------------------------------------------


@pytest.mark.feature("authorization-code-pkce")
@pytest.mark.parametrize(
    ("name", "value"),
    [("nonce", "n" * 256), ("code_challenge", "c" * 128 + "\n")],
    ids=["nonce-256", "challenge-128-newline"],
)
async def test_a_value_longer_than_its_column_is_invalid_request_to_the_client(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    name: str,
    value: str,
) -> None:
    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, **{name: value})
    )
    assert response.status_code == 302, response.text[:300]
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["error"] == ["invalid_request"]
    assert query["state"] == ["st-123"]
    async with state.db.sessions() as db:
        assert list(await db.scalars(select(AuthorizationCode))) == []


@pytest.mark.feature("authorization-code-pkce")
async def test_a_nonce_of_255_characters_is_stored(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, nonce="n" * 255)
    )
    assert response.status_code == 302
    assert "code" in parse_qs(urlsplit(response.headers["location"]).query)
    async with state.db.sessions() as db:
        (code,) = list(await db.scalars(select(AuthorizationCode)))
    assert code.nonce == "n" * 255


# -- the JSON APIs ------------------------------------------------------------------------

NEW_USER = {"username": "zoe", "password": "correct horse battery", "email": "z@example.com"}


def assert_validation_error(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, response.text[:300]
    body = response.json()
    assert body["error_code"] == "validation_error"
    assert [err["loc"][-1] for err in body["detail"]] == [field]
    assert "\\u0000" not in response.text and "\\ud800" not in response.text


@pytest.mark.feature("account-api")
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", ["username", "password", "email", "name"])
async def test_sign_up_refuses_text_the_database_cannot_store(
    client: httpx.AsyncClient, field: str, bad: str
) -> None:
    body = {**NEW_USER, field: bad}
    response = await client.post(
        "/api/v1/users", content=raw_json(body), headers={"Content-Type": "application/json"}
    )
    assert_validation_error(response, field)


@pytest.mark.feature("account-api")
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", ["name", "email"])
async def test_a_profile_change_refuses_text_the_database_cannot_store(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    field: str,
    bad: str,
) -> None:
    creds = await make_client(
        "app", grants=["password", "refresh_token"], scope="account", first_party=True
    )
    issued = await password_grant(client, creds, await make_user())
    headers = {**bearer(issued.json()["access_token"]), "Content-Type": "application/json"}
    response = await client.patch("/api/v1/me", content=raw_json({field: bad}), headers=headers)
    assert_validation_error(response, field)
    unchanged = await client.get("/api/v1/me", headers=headers)
    assert unchanged.json()[field] is None


@pytest.mark.feature("account-api")
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
async def test_a_password_change_refuses_text_that_cannot_be_hashed(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, bad: str
) -> None:
    creds = await make_client(
        "app", grants=["password", "refresh_token"], scope="account", first_party=True
    )
    user = await make_user()
    issued = await password_grant(client, creds, user)
    headers = {**bearer(issued.json()["access_token"]), "Content-Type": "application/json"}
    body = {"current_password": bad, "new_password": "another good passphrase"}
    response = await client.post("/api/v1/me/password", content=raw_json(body), headers=headers)
    assert_validation_error(response, "current_password")


@pytest.fixture
async def admin(client: httpx.AsyncClient, make_client: MakeClient) -> dict[str, str]:
    ops: ClientCreds = await make_client("ops", admin=True, grants=["client_credentials"], scope="")
    issued = await client_token(client, ops, scope="admin")
    assert issued.status_code == 200, issued.text
    return bearer(issued.json()["access_token"])


@pytest.mark.feature("admin-api")
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/admin/v1/users", {**NEW_USER, "name": "{bad}"}, "name"),
        ("/admin/v1/users", {**NEW_USER, "username": "{bad}"}, "username"),
        ("/admin/v1/clients", {"client_id": "c1", "name": "{bad}"}, "name"),
        ("/admin/v1/clients", {"client_id": "{bad}"}, "client_id"),
        ("/admin/v1/clients", {"client_id": "c1", "redirect_uris": ["{bad}"]}, "redirect_uris"),
    ],
    ids=["user-name", "user-username", "client-name", "client-id", "redirect-uri"],
)
async def test_admin_bodies_refuse_text_the_database_cannot_store(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    path: str,
    body: dict[str, Any],
    field: str | int,
    bad: str,
) -> None:
    filled = json.loads(json.dumps(body).replace("{bad}", json.dumps(bad)[1:-1]))
    response = await client.post(
        path, content=raw_json(filled), headers={**admin, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text[:300]
    assert response.json()["error_code"] == "validation_error"
    assert field in response.json()["detail"][0]["loc"]  # the field, or an item of it


@pytest.mark.feature("admin-api")
@pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("PATCH", "/admin/v1/clients/ops", {"name": "{bad}"}, "name"),
        (
            "PATCH",
            "/admin/v1/clients/ops",
            {"post_logout_redirect_uris": ["{bad}"]},
            "post_logout_redirect_uris",
        ),
        ("PATCH", "/admin/v1/clients/ops", {"scope": "{bad}"}, "scope"),
        ("POST", "/admin/v1/users/{user}/password", {"password": "{bad}"}, "password"),
        ("POST", "/api/v1/users", {**NEW_USER, "email": "{bad}@example.com"}, "email"),
    ],
    ids=["client-name", "post-logout-uri", "scope", "password-reset", "email-in-address"],
)
async def test_other_bodies_refuse_text_the_database_cannot_store(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    make_user: MakeUser,
    method: str,
    path: str,
    body: dict[str, Any],
    field: str | int,
    bad: str,
) -> None:
    user = await make_user()
    filled = json.loads(json.dumps(body).replace("{bad}", json.dumps(bad)[1:-1]))
    response = await client.request(
        method,
        path.replace("{user}", user.id),
        content=raw_json(filled),
        headers={**admin, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text[:300]
    assert response.json()["error_code"] == "validation_error"
    assert field in response.json()["detail"][0]["loc"]  # the field, or an item of it


@pytest.mark.feature("admin-api")
async def test_an_admin_search_with_nul_is_refused_not_matching_everyone(
    client: httpx.AsyncClient, admin: dict[str, str], make_user: MakeUser
) -> None:
    await make_user("alice")
    await make_user("bob")
    response = await client.get("/admin/v1/users", params={"search": "\x00"}, headers=admin)
    assert_validation_error(response, "search")
    none = await client.get("/admin/v1/users", params={"search": "nobody"}, headers=admin)
    assert none.json()["items"] == []


@pytest.mark.feature("admin-api")
async def test_a_path_id_with_nul_is_refused(
    client: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    response = await client.get("/admin/v1/users/a%00b", headers=admin)
    assert_validation_error(response, "user_id")


def _unsigned(kind: str, key: str) -> str:
    """A cursor in the old, unsigned format (base64url JSON), as anyone can forge one."""
    raw = json.dumps([kind, key]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.feature("admin-api")
@pytest.mark.parametrize(
    "cursor",
    [
        _unsigned("users", "a"),
        _unsigned("users", "a\x00"),
        _unsigned("users", "a\ud800"),
        "FOREIGN",
        "ALTERED",
        "garbage.",
        ".",
        "a\x00.b",
        "x.é",
        "\r.\xe9_\x1fN\xc8\xd7]",
    ],
    ids=["unsigned", "unsigned-nul", "unsigned-surrogate", "foreign", "altered", "empty-mac",
         "dot", "nul", "non-ascii-mac", "schemathesis-found"],
)  # fmt: skip
async def test_a_cursor_this_server_did_not_sign_is_invalid_cursor(
    client: httpx.AsyncClient, admin: dict[str, str], cursor: str
) -> None:
    from server.api.admin import _cursor

    foreign = _cursor("another server's secret key, long enough", "users", "a")
    cursor = {"FOREIGN": foreign, "ALTERED": foreign[:-1]}.get(cursor, cursor)
    response = await client.get("/admin/v1/users", params={"cursor": cursor}, headers=admin)
    if "\x00" in cursor:
        assert_validation_error(response, "cursor")
        return
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error_code"] == "invalid_cursor"


@pytest.mark.feature("admin-api")
async def test_a_signed_cursor_continues_and_an_altered_one_does_not(
    client: httpx.AsyncClient, admin: dict[str, str], make_user: MakeUser
) -> None:
    for name in ("ann", "ben", "cat"):
        await make_user(name)
    first = await client.get("/admin/v1/users", params={"limit": 1}, headers=admin)
    cursor = first.json()["next_cursor"]
    _, mac = cursor.split(".")
    rest = await client.get("/admin/v1/users", params={"cursor": cursor}, headers=admin)
    assert [u["username"] for u in rest.json()["items"]] == ["ben", "cat"]
    forged = _unsigned("users", "ben") + "." + mac  # another key under the same MAC
    refused = await client.get("/admin/v1/users", params={"cursor": forged}, headers=admin)
    assert refused.status_code == 400
    assert refused.json()["error_code"] == "invalid_cursor"


# -- the pages ----------------------------------------------------------------------------


@pytest.mark.feature("hosted-pages")
async def test_pages_look_nothing_up_with_text_the_database_refuses(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    # A client id with NUL, reached through %-escapes the query parser decodes.
    login = await browser.get(
        "/login", params={"next": "/oauth2/authorize?client_id=a%00b&response_type=code"}
    )
    assert login.status_code == 200
    logout = await browser.get("/logout", params={"client_id": "a\x00b"})
    assert logout.status_code == 200
    await sign_in(browser, await make_user())
    form = await browser.get("/login")  # any page with the signed-in browser's CSRF token
    revoke = await browser.post(
        "/account/sessions/a%00b/revoke", data={"csrf_token": csrf_of(form)}
    )
    assert revoke.status_code == 404
    assert revoke.headers["content-type"].startswith("text/html")


@pytest.mark.feature("account-api")
async def test_a_username_longer_than_its_column_once_normalised_is_invalid_user(
    client: httpx.AsyncClient,
) -> None:
    # "ß" is one letter that case folding turns into two ("ss"): 150 of them fit `username`
    # (and the username profile) but make a 300-character `username_key`, which PostgreSQL's
    # varchar(150) refuses.
    body = {"username": "ß" * 150, "password": "correct horse battery"}
    response = await client.post("/api/v1/users", json=body)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error_code"] == "invalid_user"
    fits = await client.post("/api/v1/users", json={**body, "username": "ß" * 75})
    assert fits.status_code == 201, fits.text  # 150 characters once normalised


@pytest.mark.feature("boundary-text", "account-api", "admin-api")
async def test_the_boundary_check_hides_no_pattern_from_the_schema(
    client: httpx.AsyncClient,
) -> None:
    # Schema tools (schemathesis, client generators) read these patterns: a field whose text
    # check hid its pattern made schemathesis send emails the server then refused (ST202).
    schema = (await client.get("/openapi.json")).json()
    bodies = schema["components"]["schemas"]
    for model in ("NewUser", "ProfileChange"):
        (email,) = [
            s for s in bodies[model]["properties"]["email"]["anyOf"] if s != {"type": "null"}
        ]
        assert email["pattern"] == manage.EMAIL_RE.pattern, model
    assert bodies["NewClient"]["properties"]["client_id"]["pattern"] == manage.CLIENT_ID_RE.pattern
    (path,) = schema["paths"]["/admin/v1/clients/{client_id}"]["get"]["parameters"]
    assert path["schema"]["pattern"] == manage.CLIENT_ID_RE.pattern
