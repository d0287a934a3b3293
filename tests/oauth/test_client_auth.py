"""Client authentication at the token endpoint (RFC 6749 §2.3) and client_credentials (§4.4)."""

from __future__ import annotations

import base64

import httpx
import jwt
import pytest

from server.deps import AppState
from tests.conftest import MakeClient, MakeUser

CC = {"grant_type": "client_credentials"}


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def assert_invalid_client(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic ")
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.feature("grant-client-credentials", "client-auth-basic", "access-token-jwt")
async def test_client_credentials_with_basic(
    client: httpx.AsyncClient, state: AppState, make_client: MakeClient
) -> None:
    creds = await make_client("svc", scope="api reports")
    response = await client.post("/oauth2/token", data={**CC, "scope": "api"}, headers=creds.basic)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body
    assert body["scope"] == "api"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "svc"
    assert claims["client_id"] == "svc"
    assert "auth_time" not in claims
    assert "sid" not in claims


@pytest.mark.feature("grant-client-credentials", "client-auth-post")
async def test_client_credentials_with_post(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc")
    response = await client.post(
        "/oauth2/token",
        data={**CC, "client_id": "svc", "client_secret": creds.secret or ""},
    )
    assert response.status_code == 200, response.text


@pytest.mark.feature("grant-client-credentials", "client-auth-none")
async def test_public_client_cannot_use_client_credentials(
    client: httpx.AsyncClient, make_client: MakeClient, state: AppState
) -> None:
    await make_client("pub", public=True, grants=["password"])
    from sqlalchemy import update

    from server.models import Client

    async with state.db.sessions() as db:  # even if someone allowed it by hand
        await db.execute(update(Client).values(grant_types="password client_credentials"))
        await db.commit()
    # Changed behind the CLI's and admin API's back: the cache sees it after its TTL
    # (tests/test_clients.py); this test is about what happens once it does.
    state.clients.invalidate()
    response = await client.post("/oauth2/token", data={**CC, "client_id": "pub"})
    assert_invalid_client(response)


@pytest.mark.feature("grant-client-credentials")
async def test_client_credentials_scope_checks(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc", scope="api")
    wide = await client.post(
        "/oauth2/token", data={**CC, "scope": "api admin"}, headers=creds.basic
    )
    assert wide.status_code == 400
    assert wide.json()["error"] == "invalid_scope"
    admin = await make_client("ops", admin=True, scope="api")
    ok = await client.post("/oauth2/token", data={**CC, "scope": "admin"}, headers=admin.basic)
    assert ok.status_code == 200
    assert ok.json()["scope"] == "admin"


@pytest.mark.feature("grant-client-credentials")
async def test_client_without_the_grant_is_unauthorized_client(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("web", grants=["password"])
    response = await client.post("/oauth2/token", data=CC, headers=creds.basic)
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


@pytest.mark.one_backend
@pytest.mark.feature("client-auth-basic", "client-auth-post", "client-secrets")
@pytest.mark.parametrize(
    "how",
    [
        "wrong-basic",
        "wrong-post",
        "unknown-basic",
        "unknown-post",
        "none-for-confidential",
        "no-auth",
        "malformed-basic",
        "basic-not-utf8",
        "basic-no-colon",
        "bearer-only",
    ],
)
async def test_failed_client_authentication_is_401(
    client: httpx.AsyncClient, make_client: MakeClient, how: str
) -> None:
    creds = await make_client("svc")
    data: dict[str, str] = dict(CC)
    headers: dict[str, str] = {}
    if how == "wrong-basic":
        headers = basic("svc", "wrong")
    elif how == "wrong-post":
        data |= {"client_id": "svc", "client_secret": "wrong"}
    elif how == "unknown-basic":
        headers = basic("nobody", "whatever")
    elif how == "unknown-post":
        data |= {"client_id": "nobody", "client_secret": "whatever"}
    elif how == "none-for-confidential":
        data |= {"client_id": "svc"}
    elif how == "malformed-basic":
        headers = {"Authorization": "Basic !!!not-base64!!!"}
    elif how == "basic-not-utf8":
        headers = {"Authorization": "Basic " + base64.b64encode(b"svc:\xff\xfe").decode()}
    elif how == "basic-no-colon":
        headers = {"Authorization": "Basic " + base64.b64encode(b"svc").decode()}
    elif how == "bearer-only":
        headers = {"Authorization": "Bearer " + (creds.secret or "")}
    response = await client.post("/oauth2/token", data=data, headers=headers)
    assert_invalid_client(response)


@pytest.mark.feature("client-auth-basic", "revocation", "introspection")
@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/oauth2/token", CC),
        ("/oauth2/revoke", {"token": "x"}),
        ("/oauth2/introspect", {"token": "x"}),
    ],
    ids=["token", "revoke", "introspect"],
)
async def test_an_unknown_client_and_a_wrong_secret_get_the_same_answer(
    client: httpx.AsyncClient, make_client: MakeClient, path: str, data: dict[str, str]
) -> None:
    # RFC 6749 §5.2 invalid_client; the description must not tell which of the two it was,
    # or client ids could be enumerated.
    await make_client("svc")
    attempts = [
        ({}, basic("svc", "wrong")),
        ({}, basic("nobody", "whatever")),
        ({"client_id": "svc", "client_secret": "wrong"}, {}),
        ({"client_id": "nobody", "client_secret": "whatever"}, {}),
        ({"client_id": "svc"}, {}),  # a confidential client without its secret
        ({"client_id": "nobody"}, {}),  # an unknown "public" client
    ]
    answers = set()
    for extra, headers in attempts:
        response = await client.post(path, data={**data, **extra}, headers=headers)
        assert_invalid_client(response)
        answers.add((response.text, response.headers["www-authenticate"]))
    assert len(answers) == 1, answers
    assert "nobody" not in answers.pop()[0]


@pytest.mark.feature("client-auth-basic")
async def test_basic_credentials_are_form_urlencoded(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding."""
    creds = await make_client("svc.a~b")
    headers = basic("svc.a%7Eb", creds.secret or "")
    response = await client.post("/oauth2/token", data=CC, headers=headers)
    assert response.status_code == 200, response.text


@pytest.mark.feature("client-auth-basic", "client-auth-post")
async def test_two_authentication_methods_at_once_is_invalid_request(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc")
    response = await client.post(
        "/oauth2/token",
        data={**CC, "client_id": "svc", "client_secret": creds.secret or ""},
        headers=creds.basic,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.feature("client-auth-basic")
async def test_client_id_in_body_must_match_basic(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc")
    await make_client("other")
    response = await client.post(
        "/oauth2/token", data={**CC, "client_id": "other"}, headers=creds.basic
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


@pytest.mark.feature("client-auth-none")
async def test_public_client_sending_a_secret_is_refused(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await make_client("pub", public=True)
    user = await make_user()
    response = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "password",
            "client_id": "pub",
            "client_secret": "guess",
            "username": user.username,
            "password": user.password,
        },
    )
    assert_invalid_client(response)
