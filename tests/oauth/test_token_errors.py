"""Malformed and hostile input at the token endpoint: always a clear RFC 6749 §5.2 error."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MakeClient

pytestmark = pytest.mark.feature("token-errors", "input-validation")

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error
    assert isinstance(body.get("error_description"), str)
    assert set(body) <= {"error", "error_description", "error_uri"}
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text


@pytest.mark.one_backend
@pytest.mark.feature("duplicate-parameters")
@pytest.mark.parametrize("param", ["grant_type", "scope", "client_id", "password", "unknown"])
async def test_repeated_parameter_is_invalid_request(
    client: httpx.AsyncClient, make_client: MakeClient, param: str
) -> None:
    creds = await make_client()
    body = f"grant_type=client_credentials&{param}=a&{param}=b"
    response = await client.post("/oauth2/token", content=body, headers={**FORM, **creds.basic})
    assert_oauth_error(response, "invalid_request")
    description = response.json()["error_description"]
    if param == "unknown":
        # A name we do not define is never repeated back to the client.
        assert (param not in description, description) == (
            True,
            "A parameter was sent more than once.",
        )
    else:
        assert description == f"Parameter '{param}' sent more than once."


async def test_missing_grant_type(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    response = await client.post("/oauth2/token", data={"scope": "api"}, headers=creds.basic)
    assert_oauth_error(response, "invalid_request")


async def test_empty_parameter_counts_as_missing(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    response = await client.post(
        "/oauth2/token", content="grant_type=&scope=", headers={**FORM, **creds.basic}
    )
    assert_oauth_error(response, "invalid_request")
    empty_user = await client.post(
        "/oauth2/token",
        content="grant_type=password&username=&password=x",
        headers={**FORM, **creds.basic},
    )
    assert_oauth_error(empty_user, "invalid_request")


async def test_unsupported_grant_type(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    for grant in ("implicit", "urn:ietf:params:oauth:grant-type:device_code", "x" * 200):
        response = await client.post(
            "/oauth2/token", data={"grant_type": grant}, headers=creds.basic
        )
        assert_oauth_error(response, "unsupported_grant_type")


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
        "application/x-www-form-urlencoded; charset=latin-1",
    ],
)
async def test_wrong_content_type(
    client: httpx.AsyncClient, make_client: MakeClient, content_type: str
) -> None:
    creds = await make_client()
    headers = {**creds.basic, "Content-Type": content_type} if content_type else creds.basic
    response = await client.post(
        "/oauth2/token", content=b"grant_type=client_credentials", headers=headers
    )
    assert_oauth_error(response, "invalid_request")


async def test_charset_utf8_is_accepted(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    response = await client.post(
        "/oauth2/token",
        content=b"grant_type=client_credentials",
        headers={**creds.basic, "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert response.status_code == 200


async def test_oversized_body_is_413(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    body = b"grant_type=client_credentials&pad=" + b"a" * 20_000
    response = await client.post("/oauth2/token", content=body, headers={**FORM, **creds.basic})
    assert_oauth_error(response, "invalid_request", 413)


async def test_oversized_streamed_body_without_length_is_413(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()

    async def chunks():  # type: ignore[no-untyped-def]
        yield b"grant_type=client_credentials&pad="
        for _ in range(40):
            yield b"a" * 1000

    response = await client.post("/oauth2/token", content=chunks(), headers={**FORM, **creds.basic})
    assert_oauth_error(response, "invalid_request", 413)


async def test_bogus_content_length(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    request = client.build_request(
        "POST",
        "/oauth2/token",
        content=b"grant_type=client_credentials",
        headers={**FORM, **creds.basic},
    )
    request.headers["Content-Length"] = "-5"
    response = await client.send(request)
    assert response.status_code in (400, 413)


async def test_too_many_fields(client: httpx.AsyncClient, make_client: MakeClient) -> None:
    creds = await make_client()
    body = "grant_type=client_credentials&" + "&".join(f"f{i}=1" for i in range(1000))
    response = await client.post("/oauth2/token", content=body, headers={**FORM, **creds.basic})
    assert_oauth_error(response, "invalid_request")


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "body",
    [
        b"grant_type=client_credentials&scope=\xff\xfe",
        b"grant_type=client_credentials&scope=%ff%fe",
        b"grant_type=client_credentials&scope=%ed%a0%80",  # a UTF-8-encoded lone surrogate
        b"grant_type=client_credentials&scope=api%00admin",
        b"grant_type=client_credentials&sc%00ope=api",
        b"grant_type=client\x00_credentials",
    ],
)
async def test_invalid_utf8_and_nul_bytes(
    client: httpx.AsyncClient, make_client: MakeClient, body: bytes
) -> None:
    creds = await make_client()
    response = await client.post("/oauth2/token", content=body, headers={**FORM, **creds.basic})
    assert_oauth_error(response, "invalid_request")


@pytest.mark.parametrize(
    "username",
    [
        "' OR '1'='1",
        "admin'--",
        "{{7*7}}",
        "${jndi:ldap://x}",
        "<script>alert(1)</script>",
        "a" * 10_000,
        "\u202eevil",
        "ａｄｍｉｎ",
    ],
)
async def test_injection_strings_are_just_wrong_credentials(
    client: httpx.AsyncClient, make_client: MakeClient, username: str
) -> None:
    creds = await make_client()
    response = await client.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": username, "password": "' OR 1=1 --"},
        headers=creds.basic,
    )
    assert_oauth_error(response, "invalid_grant")


async def test_get_is_not_allowed(client: httpx.AsyncClient) -> None:
    response = await client.get("/oauth2/token?grant_type=client_credentials")
    assert response.status_code == 405
    assert response.json()["error_code"] == "method_not_allowed"


async def test_query_string_credentials_are_ignored(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client("svc")
    response = await client.post(
        f"/oauth2/token?client_id=svc&client_secret={creds.secret}",
        data={"grant_type": "client_credentials"},
    )
    assert_oauth_error(response, "invalid_client", 401)
