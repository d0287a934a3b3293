"""Unexpected exceptions: one 500 in the format of the endpoint asked, with the security headers
and the request id, and one redacted JSON log line; nothing re-raised into the ASGI server.

Also the authorization-endpoint inputs that used to raise (Authlib refuses to build an error
whose description quotes ``"``, ``\\`` or non-ASCII text, RFC 6749 §4.1.2.1; ``int("²")``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse
from starlette.types import Message

from server.deps import AppState
from server.main import create_app
from tests.conftest import MakeClient, MakeUser, make_settings, sign_in, truncate
from tests.oauth.test_authorize import CALLBACK, authorize_params, pkce, spa

# The backend rule (CLAUDE.md): nothing here depends on the database.
pytestmark = [pytest.mark.feature("error-shape-500"), pytest.mark.one_backend]

SECURITY_HEADERS = (
    "content-security-policy",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
)


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of the captured output, each of which must be one JSON object."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            parsed = json.loads(line)  # a raw traceback line fails here
            assert isinstance(parsed, dict)
            lines.append(parsed)
    return lines


def boom_routes(app: FastAPI) -> None:
    """Routes that raise, one under each family of paths (the format is chosen by path)."""

    async def boom() -> None:
        raise RuntimeError("internals: client_secret=hunter2")

    for path in ("/account/boom", "/oauth2/boom", "/userinfo/boom", "/api/v1/boom"):
        app.add_api_route(path, boom, methods=["GET"])


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/account/boom", "page"),
        ("/oauth2/boom", "oauth"),
        ("/userinfo/boom", "oauth"),
        ("/api/v1/boom", "api"),
    ],
)
async def test_an_unexpected_exception_is_a_500_in_the_endpoints_format(
    app: FastAPI,
    client: httpx.AsyncClient,
    capsys: pytest.CaptureFixture[str],
    path: str,
    kind: str,
) -> None:
    boom_routes(app)
    capsys.readouterr()
    # The default transport re-raises whatever the app raises: this request must not.
    response = await client.get(path, headers={"X-Request-ID": "req-500"})

    assert response.status_code == 500
    for name in SECURITY_HEADERS:
        assert name in response.headers, name
    assert response.headers["x-request-id"] == "req-500"
    assert response.headers["cache-control"] == "no-store"
    assert "hunter2" not in response.text and "internals" not in response.text
    if kind == "page":
        assert response.headers["content-type"].startswith("text/html")
        assert "Traceback" not in response.text
    elif kind == "oauth":
        # RFC 6749 §5.2 / §4.1.2.1: server_error.
        assert response.json() == {
            "error": "server_error",
            "error_description": "The server met an unexpected error.",
        }
    else:
        assert response.json() == {
            "detail": "Internal server error.",
            "error_code": "internal_error",
        }
    lines = json_lines(capsys.readouterr().out)
    failed = [line for line in lines if line["event"] == "request.failed"]
    assert len(failed) == 1, lines
    assert failed[0]["error"] == "RuntimeError"
    assert failed[0]["request_id"] == "req-500"
    assert "client_secret=[redacted]" in str(failed[0]["exception"])
    assert "hunter2" not in json.dumps(lines)


async def test_an_exception_after_the_response_started_is_logged_not_reraised(
    app: FastAPI, capsys: pytest.CaptureFixture[str]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("half way")

    async def stream() -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_api_route("/api/v1/stream", stream, methods=["GET"])
    sent: list[Message] = []

    received: list[bool] = []

    async def receive() -> Message:
        if not received:
            received.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/v1/stream",
        "raw_path": b"/api/v1/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    capsys.readouterr()
    await app(scope, receive, send)  # raises nothing into the ASGI server
    # The status line had gone out: no second response, and the body is left incomplete, so
    # the server drops the connection and the client sees a cut-off answer, not a whole one.
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"first" and sent[1]["more_body"] is True
    failed = [
        line for line in json_lines(capsys.readouterr().out) if line["event"] == "request.failed"
    ]
    assert len(failed) == 1
    assert failed[0]["response_started"] is True


async def test_a_database_error_that_is_not_an_outage_is_a_500_in_the_endpoints_format(
    state: AppState,
    browser: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy.exc import DBAPIError

    def broken(*_: object, **__: object) -> object:
        raise DBAPIError("SELECT nonsense", None, Exception("syntax error"))

    monkeypatch.setattr(state.db, "session", broken)
    page = await browser.get("/account")
    assert page.status_code == 500
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert "x-request-id" in page.headers
    assert "syntax" not in page.text


# -- the instances at the authorization endpoint -----------------------------------------

HOSTILE_TEXT = ['"><script>x</script>', "a\\b", "caf\u00e9", "\u2028", "\U0001f600"]


@pytest.mark.feature("authorization-code-pkce")
@pytest.mark.parametrize("text", HOSTILE_TEXT)
async def test_a_redirect_uri_with_quotes_or_non_ascii_is_the_error_page(
    browser: httpx.AsyncClient, make_client: MakeClient, text: str
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize",
        params=authorize_params(challenge, redirect_uri=CALLBACK + text),
    )
    # RFC 6749 §4.1.2.1: an unregistered redirect URI is never redirected to.
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "invalid_request" in response.text
    assert "location" not in response.headers


@pytest.mark.feature("authorization-code-pkce")
@pytest.mark.parametrize("text", HOSTILE_TEXT)
async def test_a_response_type_with_quotes_or_non_ascii_is_unsupported_response_type(
    browser: httpx.AsyncClient, make_client: MakeClient, text: str
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, response_type="code" + text)
    )
    # RFC 6749 §4.1.2.1: the redirect URI is registered, so the error goes to the client.
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["error"] == ["unsupported_response_type"]
    assert query["state"] == ["st-123"]

    unknown = await browser.get(
        "/oauth2/authorize",
        params=authorize_params(challenge, client_id="nobody", response_type="code" + text),
    )
    assert unknown.status_code == 400
    assert "unsupported_response_type" in unknown.text


@pytest.mark.feature("authorization-code-pkce")
@pytest.mark.parametrize("max_age", ["\u00b2", "\u2460", "\u0663", "1\u00b9"])
async def test_max_age_in_non_ascii_digits_is_invalid_request(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser, max_age: str
) -> None:
    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, max_age=max_age)
    )
    assert response.status_code == 302
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == ["invalid_request"]


@pytest.mark.feature("authorization-code-pkce")
async def test_max_age_zero_asks_for_a_new_sign_in_at_once(
    browser: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    await spa(make_client, first_party=True)
    await sign_in(browser, await make_user())
    _, challenge = pkce()
    # OpenID Connect Core §3.1.2.1: max_age=0 is prompt=login, even within the same second.
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, max_age="0")
    )
    assert response.status_code == 302
    assert response.headers["location"].startswith("/login?")
    # prompt=none cannot be satisfied by a fresh sign-in: login_required to the client.
    quiet = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, max_age="0", prompt="none")
    )
    assert parse_qs(urlsplit(quiet.headers["location"]).query)["error"] == ["login_required"]


# -- no request value repeated on the issuer's pages (content spoofing) -------------------

SPOOF = "https://evil.example/Your-account-is-locked-call-0800-123-456"


@pytest.mark.feature("authorization-code-pkce")
async def test_the_authorize_error_page_does_not_repeat_the_redirect_uri(
    browser: httpx.AsyncClient, make_client: MakeClient
) -> None:
    await spa(make_client)
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, redirect_uri=SPOOF)
    )
    assert response.status_code == 400
    assert "invalid_request" in response.text  # the code stays, for the developers
    assert "call-0800" not in response.text and "evil.example" not in response.text


@pytest.mark.feature("hosted-pages")
async def test_the_sign_up_page_does_not_repeat_a_refused_email_outside_its_input(
    browser: httpx.AsyncClient,
) -> None:
    page = await browser.get("/register")
    from tests.conftest import csrf_of

    response = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(page),
            "username": "mallory",
            "email": "Call-0800-123-456-to-unlock",
            "password": "correct horse battery",
            "password_confirm": "correct horse battery",
        },
    )
    assert response.status_code == 400
    assert "That is not a valid email address." in response.text
    # Only the form's own input may hold it (value="…"), never the message list.
    assert response.text.count("Call-0800-123-456-to-unlock") == 1
    assert 'value="Call-0800-123-456-to-unlock"' in response.text


@pytest.mark.feature("hostile-input-table")
async def test_a_content_length_in_non_ascii_digits_is_a_400(app: FastAPI) -> None:
    # "²" is latin-1 0xB2: str.isdigit() accepts it, int() does not. h11 refuses it before
    # the app, but other servers need not; the form reader must refuse it itself.
    sent: list[Message] = []
    body = [b"grant_type=client_credentials"]

    async def receive() -> Message:
        return {"type": "http.request", "body": body.pop() if body else b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/oauth2/token",
        "raw_path": b"/oauth2/token",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/x-www-form-urlencoded"),
            (b"content-length", b"\xb2"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"] == "invalid_request"


@pytest.mark.feature("cors")
async def test_a_500_to_an_allowed_origin_is_readable_by_it(
    database_url: str, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = "https://app.example.com"
    await truncate(database_url)
    app = create_app(make_settings(database_url, keys_dir, cors_origins=origin))
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth

        def broken() -> None:
            raise RuntimeError("no keys")

        monkeypatch.setattr(state.keys, "keyset", broken)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/.well-known/jwks.json", headers={"Origin": origin})
    assert response.status_code == 500
    # The app can read the error (a CORS-less 500 is an opaque network error to it).
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["cache-control"] == "no-store"
    assert "x-request-id" in response.headers
