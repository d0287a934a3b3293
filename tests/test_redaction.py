"""No password, secret, token, cookie or Authorization header ever reaches a log line (SPEC,
Operations).

Every endpoint is driven with recognisable canaries (and with the real secrets the server hands
out), then the captured stdout and stderr are searched for each of them. The redaction processor
(``server.observability.redact``) is also tried directly, pattern by pattern, with the harmless
look-alikes it must leave alone; and the two exception paths are forced: the app's own 500
handler (structlog) and uvicorn's "Exception in ASGI application" (the standard library).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server import observability
from server.config import Settings
from server.deps import AppState
from server.main import create_app
from server.observability import (
    REDACTED,
    configure_logging,
    log,
    redact,
    redact_record,
    redact_text,
)
from tests.acceptance.conftest import free_port
from tests.conftest import (
    MakeClient,
    MakeUser,
    UserCreds,
    csrf_of,
    make_settings,
    password_grant,
    refresh_grant,
    sign_in,
)
from tests.oauth.test_authorize import exchange, get_code, pkce, spa

# The backend rule (CLAUDE.md): nothing here depends on the database.
pytestmark = [pytest.mark.feature("log-redaction"), pytest.mark.one_backend]

BYE = "https://app.example/bye"
#: The form of an RSA private key as PEM, without being one (no real key material here).
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ"


def canary(kind: str) -> str:
    return f"{kind}-canary-{secrets.token_hex(8)}"


def fake_jwt(marker: str) -> str:
    """JWT-shaped (``eyJ…``.``…``.``…``) with ``marker`` in the signature segment."""
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b'{"sub":"x"}').rstrip(b"=").decode()
    return f"{header}.{payload}.{marker}"


def basic(client_id: str, secret: str) -> str:
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def jwt_parts(token: str) -> list[str]:
    """A JWT and its signature: a half-redacted token must not pass unnoticed."""
    return [token, token.rsplit(".", 1)[-1]]


class Logs:
    """stdout + stderr captured so far (and the standard library's records, which pytest takes
    from the root logger), and the JSON lines among them."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture | None = None
    ) -> None:
        out, err = capsys.readouterr()
        self.text = "\n".join([out, err, caplog.text if caplog is not None else ""])
        self.lines: list[dict[str, Any]] = [
            json.loads(line) for line in out.splitlines() if line.startswith("{")
        ]

    def events(self) -> set[str]:
        return {str(line.get("event")) for line in self.lines}

    def assert_clean(self, secrets_: Iterable[str]) -> None:
        wanted = [s for s in secrets_ if s]
        assert wanted, "nothing to look for"
        leaked = [s for s in wanted if s in self.text]
        assert not leaked, f"secrets in the logs: {leaked}\n{self.text}"


def bad_request_id() -> tuple[str, dict[str, str]]:
    """An ``X-Request-ID`` that is not well-formed (a space), so it must be replaced, unlogged."""
    value = canary("rid")
    return value, {"X-Request-ID": f"Bearer {value}"}


# -- the processor, pattern by pattern ---------------------------------------------------------


def test_secret_keys_are_redacted_at_any_depth() -> None:
    secret = canary("key")
    event: dict[str, Any] = {
        "event": "something.happened",
        "access_token": secret,
        "Refresh_Token": secret,
        "id_token": secret,
        "id_token_hint": secret,
        "client_secret": secret,
        "code": secret,
        "code_verifier": secret,
        "Authorization": f"Bearer {secret}",
        "cookie": f"session={secret}",
        "Set-Cookie": f"csrf={secret}; HttpOnly",
        "csrf_token": secret,
        "session": secret,
        "__Host-session": secret,
        "new_password": secret,
        "db_passwd": secret,
        "request": {
            "headers": {"authorization": f"Basic {secret}", "x-request-id": "abc-1"},
            "form": [("grant_type", "password"), {"password": secret}],
            "nested": ({"deeper": [{"client_secret": secret}]},),
        },
        # Harmless look-alikes stay.
        "token_type": "Bearer",
        "token_type_hint": "refresh_token",
        "grant_type": "refresh_token",
        "session_id": "s-1",
        "client_id": "app",
        "revoked_access_tokens": 3,
        "families_revoked": 2,
        "audit": True,
        "refresh_token_rotated": False,
        "password_changed_at": None,
    }
    result = redact(None, "info", dict(event))

    assert secret not in json.dumps(result)
    for key in ("access_token", "code", "Authorization", "cookie", "Set-Cookie", "session"):
        assert result[key] == REDACTED
    assert result["request"]["headers"] == {"authorization": REDACTED, "x-request-id": "abc-1"}
    assert result["request"]["form"] == [("grant_type", "password"), {"password": REDACTED}]
    assert result["request"]["nested"] == ({"deeper": [{"client_secret": REDACTED}]},)
    for key in ("event", "token_type", "token_type_hint", "grant_type", "session_id", "client_id"):
        assert result[key] == event[key]
    # Numbers, booleans and None cannot be credentials: counts and flags are kept as they are.
    assert result["revoked_access_tokens"] == 3
    assert result["families_revoked"] == 2
    assert result["audit"] is True
    assert result["refresh_token_rotated"] is False
    assert result["password_changed_at"] is None


SECRET = "S3cr3t-canary-Xy9"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        # JWT-shaped strings, anywhere in a message.
        (f"token {fake_jwt(SECRET)} was refused", ["token ", " was refused"]),
        (f"hint={fake_jwt(SECRET)}", []),
        (f"JWE eyJhbGciOiJSU0EifQ.{SECRET}.iv.ct.tag", ["JWE "]),
        # Authorization headers, any scheme, any spelling.
        (f"Authorization: Basic {basic('app', SECRET)}", ["Authorization: "]),
        (f"authorization: Bearer {SECRET}", ["authorization: "]),
        (f"Proxy-Authorization: Digest username={SECRET}", ["Proxy-Authorization: "]),
        (f"{{'authorization': 'Bearer {SECRET}', 'host': 'x'}}", ["'host': 'x'"]),
        (f"[(b'authorization', b'Basic {basic('a', SECRET)}')]", ["b'authorization'"]),
        (f"sent Bearer {SECRET} to /userinfo", ["sent Bearer ", " to /userinfo"]),
        (f"basic {basic('app', SECRET)}", []),
        # Cookies, in headers and by name.
        (f"Cookie: session={SECRET}; csrf={SECRET}", ["Cookie: "]),
        (f"Set-Cookie: __Host-session={SECRET}; Path=/; Secure", ["Set-Cookie: "]),
        (f"got __Host-session={SECRET}; __Host-csrf={SECRET}", ["got "]),
        (f"session={SECRET}&next=/account", ["&next=/account"]),
        # Form bodies and query strings.
        (
            f"grant_type=password&username=alice&password={SECRET}&scope=api",
            ["grant_type=password&username=alice&", "&scope=api"],
        ),
        (f"client_id=app&client_secret={SECRET}", ["client_id=app&"]),
        (f"grant_type=refresh_token&refresh_token={SECRET}", ["grant_type=refresh_token&"]),
        (f"code={SECRET}&code_verifier={SECRET}&redirect_uri=x", ["&redirect_uri=x"]),
        (f"token={SECRET}&token_type_hint=access_token", ["&token_type_hint=access_token"]),
        (f"/logout?id_token_hint={SECRET}&state=s1", ["/logout?", "&state=s1"]),
        (f"csrf_token={SECRET}&password_confirm={SECRET}", []),
        # JSON and Python reprs inside a message, and ``name: value``.
        (f'body {{"password": "{SECRET}", "username": "alice"}}', ['"username": "alice"']),
        (f"form {{'client_secret': '{SECRET}'}}", ["form {'client_secret': "]),
        (f"password: {SECRET}", ["password: "]),
        # PEM private keys, whole or cut off.
        (
            f"key -----BEGIN PRIVATE KEY-----\n{PEM_BODY}{SECRET}\n-----END PRIVATE KEY----- ok",
            ["-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY----- ok"],
        ),
        (
            f"-----BEGIN RSA PRIVATE KEY-----\\n{PEM_BODY}{SECRET}\\n-----END RSA PRIVATE KEY-----",
            [],
        ),
        (f"-----BEGIN ENCRYPTED PRIVATE KEY-----\n{PEM_BODY}\n{SECRET}", []),
        # A password in a database URL.
        (f"connect postgresql+asyncpg://app:{SECRET}@db:5432/auth", ["@db:5432/auth"]),
    ],
)
def test_secret_shapes_are_redacted_in_strings(text: str, kept: list[str]) -> None:
    result = redact_text(text)
    # The secret, and its Basic (base64) forms used above.
    hidden = [SECRET, basic("app", SECRET), basic("a", SECRET)]
    assert not [s for s in hidden if s in result]
    assert REDACTED in result
    for part in kept:
        assert part in result, result
    # Idempotent: a line redacted twice is the same line.
    assert redact_text(result) == result
    # The processor scans every string value, nested or not, not only ``event``.
    processed = json.dumps(redact(None, "info", {"event": text, "error": [{"detail": (text,)}]}))
    assert not [s for s in hidden if s in processed]


@pytest.mark.parametrize(
    "text",
    [
        "token.issued",
        "refresh.reuse_detected",
        "grant_type=password",
        "grant_type=authorization_code&redirect_uri=https://app.example/cb",
        "token_type=Bearer",
        "token_type_hint=refresh_token",
        "session_id=5f3a&user_id=u-1&client_id=app",
        "Basic authentication failed: the bearer token expired",
        "the session cookie was missing",
        "Authorization header missing",
        "Supported grant types: authorization_code, password, refresh_token.",
        "WWW-Authenticate: Bearer realm=userinfo",
        "2026-01-02T03:04:05Z request took 12ms",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----",
        "keys.reloaded kid=2026-01-01-abc",
        "",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact_text(text) == text
    assert redact(None, "info", {"event": text})["event"] == text


def test_numbers_booleans_and_objects() -> None:
    secret = canary("obj")

    class Opaque:
        def __repr__(self) -> str:
            return f"Opaque(password={secret})"

    class Structured:
        def __structlog__(self) -> dict[str, str]:
            return {"client_secret": secret, "client_id": "app"}

    result = redact(
        None,
        "info",
        {
            "event": "x",
            "n": 7,
            "ratio": 0.5,
            "ok": True,
            "none": None,
            "raw": f"Bearer {secret}".encode(),
            "exc": ValueError(f"refresh_token={secret}"),
            "opaque": Opaque(),
            "structured": Structured(),
            "deep": [
                [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            f"password={secret}"
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            ],
        },
    )
    assert (result["n"], result["ratio"], result["ok"], result["none"]) == (7, 0.5, True, None)
    assert result["structured"] == {"client_secret": REDACTED, "client_id": "app"}
    # A value runs to a separator; the closing parenthesis goes with it (better too much).
    assert result["opaque"] == f"Opaque(password={REDACTED}"
    assert secret not in json.dumps(result)


def test_exception_tracebacks_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    secret, token = canary("exc"), fake_jwt(canary("sig"))
    capsys.readouterr()
    try:
        raise RuntimeError(
            f"bad form password={secret}&client_secret={secret} "
            f"with Authorization: Bearer {token} and Cookie: session={secret}"
        )
    except RuntimeError:
        log.exception("request.failed", error="RuntimeError")
    logs = Logs(capsys)
    (line,) = [line for line in logs.lines if line["event"] == "request.failed"]
    assert "RuntimeError: bad form password=[redacted]" in line["exception"]
    assert "Traceback (most recent call last)" in line["exception"]
    logs.assert_clean([secret, *jwt_parts(token)])


def test_standard_library_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    """Records of uvicorn, SQLAlchemy or Authlib go through the record factory."""
    configure_logging("info")
    secret = canary("stdlib")
    logger = logging.getLogger("uvicorn.error")
    try:
        raise ValueError(f"client_secret={secret}")
    except ValueError:
        logger.exception("Exception in ASGI application for %s", f"Bearer {secret}")
    logger.warning("cookie header %r", {"cookie": f"session={secret}"})
    logger.warning("plain %d%%", 5)  # formatted once: the literal % survives
    assert secret not in caplog.text
    assert "client_secret=[redacted]" in caplog.text
    assert "Exception in ASGI application for Bearer [redacted]" in caplog.text
    assert "plain 5%" in caplog.text


def test_standard_library_edge_cases(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = canary("edge")
    configure_logging("info")
    logger = logging.getLogger("server.test")
    logger.warning("token=%s", secret, stack_info=True)
    assert "token=[redacted]" in caplog.text
    assert "Stack (most recent call last)" in caplog.text
    # A record already formatted elsewhere: its traceback text is redacted too.
    formatted = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), None)
    formatted.exc_text = f"ValueError: password={secret}"
    redact_record(formatted)
    assert formatted.exc_text == f"ValueError: password={REDACTED}"
    # A malformed call is left for logging to report (it never formats it).
    malformed = logging.LogRecord("x", logging.ERROR, __file__, 1, "%d", ("x",), None)
    redact_record(malformed)
    assert malformed.args == ("x",)
    # Should redaction itself fail, the record says so and carries nothing else.

    def broken(record: logging.LogRecord) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(observability, "redact_record", broken)
    logger.error("password=%s", secret, exc_info=ValueError(secret))
    assert "the record could not be redacted" in caplog.text
    assert secret not in caplog.text


async def test_debug_level_library_logs_carry_no_secret(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At debug level Authlib logs too (through the standard library)."""
    creds = await make_client(grants=["password", "client_credentials"])
    user = await make_user("heidi", canary("PW"))
    wrong_secret = canary("secretwrong")
    caplog.set_level(logging.DEBUG)
    configure_logging("debug")
    try:
        capsys.readouterr()
        assert (await password_grant(client, creds, user)).status_code == 200
        wrong = await client.post(
            "/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": creds.client_id,
                "client_secret": wrong_secret,
            },
        )
        assert wrong.status_code == 401
        logs = Logs(capsys, caplog)
    finally:
        configure_logging("info")
    assert any(record.name.startswith("authlib") for record in caplog.records)
    logs.assert_clean([user.password, creds.secret or "", wrong_secret])


# -- every endpoint, with canaries -----------------------------------------------------------


async def test_token_endpoint_grants_log_no_secret(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = await make_client(grants=["password", "refresh_token", "client_credentials"])
    user = await make_user("alice", canary("PW"))
    rid, bad_rid = bad_request_id()
    wrong_password, wrong_secret = canary("PWwrong"), canary("secretwrong")
    bogus_refresh, bogus_basic = canary("RTbogus"), canary("basicbogus")
    capsys.readouterr()

    issued = await password_grant(client, creds, user, scope="api")
    assert issued.status_code == 200, issued.text
    tokens = issued.json()
    refused = await password_grant(client, creds, UserCreds(user.id, user.username, wrong_password))
    assert refused.json()["error"] == "invalid_grant"
    refreshed = await refresh_grant(client, creds, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    assert (await refresh_grant(client, creds, bogus_refresh)).status_code == 400
    # Reuse of a rotated refresh token: the family is revoked and audited.
    assert (await refresh_grant(client, creds, tokens["refresh_token"])).status_code == 400
    service = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": creds.secret or "",
        },
        headers=bad_rid,
    )
    assert service.status_code == 200, service.text
    wrong = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": wrong_secret,
        },
    )
    assert wrong.json()["error"] == "invalid_client"
    unknown = await client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {basic('nobody', bogus_basic)}", **bad_rid},
    )
    assert unknown.status_code == 401
    junk = await client.post(
        "/oauth2/token",
        data={"grant_type": wrong_secret, "password": wrong_password},
        headers=bad_rid,
    )
    assert junk.json()["error"] == "unsupported_grant_type"

    logs = Logs(capsys, caplog)
    assert {"token.issued", "token.refused", "refresh.reuse_detected"} <= logs.events()
    assert all(line["request_id"] != f"Bearer {rid}" for line in logs.lines)
    logs.assert_clean(
        [
            user.password,
            wrong_password,
            creds.secret or "",
            creds.basic["Authorization"].split()[1],
            wrong_secret,
            bogus_refresh,
            bogus_basic,
            basic("nobody", bogus_basic),
            rid,
            tokens["refresh_token"],
            refreshed.json()["refresh_token"],
            *jwt_parts(tokens["access_token"]),
            *jwt_parts(refreshed.json()["access_token"]),
            *jwt_parts(service.json()["access_token"]),
        ]
    )


async def test_code_flow_consent_and_logout_log_no_secret(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await spa(make_client, post_logout_redirect_uris=[BYE])
    user = await make_user("carol", canary("PW"))
    verifier, challenge = pkce()
    wrong_verifier, bogus_code = canary("verifier") + "x" * 30, canary("code")
    capsys.readouterr()

    await sign_in(browser, user)
    code = await get_code(browser, challenge)
    wrong = await exchange(browser, code, wrong_verifier)
    assert wrong.json()["error"] == "invalid_grant"
    code = await get_code(browser, challenge, consent=False)
    tokens = (await exchange(browser, code, verifier)).json()
    assert "id_token" in tokens, tokens
    # The same code again: reuse is detected and audited; an unknown code is refused.
    assert (await exchange(browser, code, verifier)).status_code == 400
    assert (await exchange(browser, bogus_code, verifier)).status_code == 400

    hint = {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": BYE}
    confirm = await browser.get("/logout", params=hint)
    assert confirm.status_code == 200, confirm.text
    done = await browser.post("/logout", data={**hint, "csrf_token": csrf_of(confirm)})
    assert done.headers["location"] == BYE

    logs = Logs(capsys, caplog)
    assert {"signin.succeeded", "consent.granted", "code.issued", "token.issued"} <= logs.events()
    assert {"code.reuse_detected", "signout"} <= logs.events()
    logs.assert_clean(
        [
            user.password,
            verifier,
            wrong_verifier,
            code,
            bogus_code,
            tokens["refresh_token"],
            *jwt_parts(tokens["access_token"]),
            *jwt_parts(tokens["id_token"]),
            *[cookie.value for cookie in browser.cookies.jar if cookie.value],
        ]
    )


async def test_revocation_introspection_and_userinfo_log_no_secret(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = await make_client(scope="openid profile email api")
    user = await make_user("dave", canary("PW"), email="dave@example.com")
    tokens = (await password_grant(client, creds, user, scope="openid profile")).json()
    bogus_token, bogus_bearer, bogus_cookie = canary("AT"), canary("bearer"), canary("cookie")
    rid, bad_rid = bad_request_id()
    # A JWT is a well-formed request id ([A-Za-z0-9._:-]): kept and echoed, but not logged.
    jwt_rid = fake_jwt(canary("ridsig"))
    capsys.readouterr()

    introspected = await client.post(
        "/oauth2/introspect", data={"token": tokens["access_token"]}, headers=creds.basic
    )
    assert introspected.json()["active"] is True
    inactive = await client.post(
        "/oauth2/introspect",
        data={"token": bogus_token, "token_type_hint": "access_token"},
        headers=creds.basic,
    )
    assert inactive.json() == {"active": False}
    for method in ("GET", "POST"):
        info = await client.request(
            method,
            "/userinfo",
            headers={
                "Authorization": f"Bearer {tokens['access_token']}",
                "Cookie": f"session={bogus_cookie}",
                **bad_rid,
            },
        )
        assert info.status_code == 200, info.text
        refused = await client.request(
            method, "/userinfo", headers={"Authorization": f"Bearer {bogus_bearer}"}
        )
        assert refused.status_code == 401
    post_body = await client.post(
        "/userinfo", data={"access_token": bogus_bearer}, headers={"X-Request-ID": jwt_rid}
    )
    assert post_body.status_code == 401
    assert post_body.headers["x-request-id"] == jwt_rid
    logged = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": bogus_token},
        headers={**creds.basic, "X-Request-ID": jwt_rid},
    )
    assert logged.json()["error"] == "invalid_grant"
    for token in (bogus_token, tokens["refresh_token"], tokens["access_token"]):
        revoked = await client.post(
            "/oauth2/revoke",
            data={"token": token, "token_type_hint": "refresh_token"},
            headers={**creds.basic, **bad_rid},
        )
        assert revoked.status_code == 200, revoked.text
    stranger = await client.post(
        "/oauth2/revoke",
        data={"token": bogus_token, "client_id": "nobody", "client_secret": bogus_cookie},
    )
    assert stranger.status_code == 401

    logs = Logs(capsys, caplog)
    assert "token.revoked" in logs.events()
    logs.assert_clean(
        [
            user.password,
            creds.secret or "",
            bogus_token,
            bogus_bearer,
            bogus_cookie,
            rid,
            *jwt_parts(jwt_rid),
            tokens["refresh_token"],
            *jwt_parts(tokens["access_token"]),
        ]
    )
    assert any(line["request_id"] == REDACTED for line in logs.lines)


async def test_hosted_pages_log_no_secret(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    creds = await make_client("mobile", name="Mobile App")
    user = await make_user("erin", canary("PW"))
    tokens = (await password_grant(client, creds, user)).json()
    wrong_password, new_password, mismatch = canary("PWwrong"), canary("PWnew"), canary("PWx")
    planted_session, planted_csrf = canary("session"), canary("csrf")
    bogus_csrf, bogus_hint = canary("csrftoken"), fake_jwt(canary("hint"))
    rid, bad_rid = bad_request_id()
    capsys.readouterr()

    # A planted cookie: ignored, replaced on sign-in, never logged.
    browser.cookies.set("session", planted_session)
    page = await browser.get("/login", headers=bad_rid)
    failed = await browser.post(
        "/login",
        data={"csrf_token": csrf_of(page), "username": "erin", "password": wrong_password},
        headers=bad_rid,
    )
    assert failed.status_code < 500, failed.text
    forged = await browser.post(
        "/login", data={"csrf_token": bogus_csrf, "username": "erin", "password": user.password}
    )
    assert forged.status_code >= 400
    await sign_in(browser, user)
    account = await browser.get("/account", headers=bad_rid)
    assert account.status_code == 200
    family = re.search(r'action="(/account/sessions/[0-9a-f]+/revoke)"', account.text)
    assert family is not None
    revoked = await browser.post(family.group(1), data={"csrf_token": csrf_of(account)})
    assert revoked.status_code == 303
    confirm = await browser.get("/logout", params={"id_token_hint": bogus_hint})
    out = await browser.post(
        "/logout", data={"csrf_token": csrf_of(confirm), "id_token_hint": bogus_hint}
    )
    assert out.status_code == 303
    session_cookies = [c.value for c in browser.cookies.jar if c.value]

    # Sign up, with a mismatched confirmation first.
    browser.cookies.clear()
    form = await browser.get("/register")
    refused = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(form),
            "username": "frank",
            "password": new_password,
            "password_confirm": mismatch,
        },
    )
    assert refused.status_code == 400
    created = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(refused),
            "username": "frank",
            "email": "frank@example.com",
            "password": new_password,
            "password_confirm": new_password,
        },
    )
    assert created.status_code == 303, created.text
    session_cookies += [c.value for c in browser.cookies.jar if c.value]
    # A stranger's cookies on every page.
    stranger = {"Cookie": f"session={planted_session}; csrf={planted_csrf}", **bad_rid}
    for path in ("/account", "/login", "/register", "/logout"):
        assert (await client.get(path, headers=stranger)).status_code < 500

    logs = Logs(capsys, caplog)
    assert {"signin.failed", "signin.succeeded", "session.revoked", "signout"} <= logs.events()
    logs.assert_clean(
        [
            user.password,
            wrong_password,
            new_password,
            mismatch,
            planted_session,
            planted_csrf,
            bogus_csrf,
            rid,
            tokens["refresh_token"],
            *jwt_parts(tokens["access_token"]),
            *jwt_parts(bogus_hint),
            *session_cookies,
        ]
    )


# -- the exception paths ---------------------------------------------------------------------


def leaky_error(secret: str, token: str) -> RuntimeError:
    """An exception whose message carries every kind of secret, as a careless library might."""
    return RuntimeError(
        f"could not check password={secret} for client_secret={secret}; "
        f"Authorization: Basic {basic('app', secret)}; Bearer {token}; "
        f"Cookie: __Host-session={secret}; "
        f"key -----BEGIN PRIVATE KEY-----\n{PEM_BODY}{secret}\n-----END PRIVATE KEY-----"
    )


async def test_the_500_handler_logs_a_redacted_traceback(
    app: FastAPI,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creds = await make_client()
    user = await make_user("grace", canary("PW"))
    secret, token = canary("exc"), fake_jwt(canary("sig"))

    async def broken(*_: object) -> object:
        raise leaky_error(secret, token)

    monkeypatch.setattr(state.passwords, "verify_async", broken)
    capsys.readouterr()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await password_grant(http, creds, user)
    assert response.status_code == 500

    logs = Logs(capsys)
    (failed,) = [line for line in logs.lines if line["event"] == "request.failed"]
    assert failed["error"] == "RuntimeError"
    assert "Traceback (most recent call last)" in failed["exception"]
    assert "RuntimeError: could not check password=[redacted]" in failed["exception"]
    logs.assert_clean(
        [secret, basic("app", secret), user.password, creds.secret or "", *jwt_parts(token)]
    )


@pytest.fixture
def uvicorn_logging() -> Iterator[None]:
    """uvicorn's own logging configuration, as ``python -m server serve`` has it; undone after."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


def test_uvicorns_exception_log_is_redacted(
    sqlite_url: str,
    keys_dir: Path,
    uvicorn_logging: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under uvicorn, an unexpected exception is one redacted JSON line of ours: nothing is
    re-raised into uvicorn, which would print a multi-line traceback of its own."""
    settings: Settings = make_settings(sqlite_url, keys_dir)
    app = create_app(settings)
    secret, token = canary("uvicorn"), fake_jwt(canary("sig"))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_level="info", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):  # bounded wait for startup, no timing asserted
            if server.started:
                break
            time.sleep(0.02)
        assert server.started

        def broken() -> None:
            raise leaky_error(secret, token)

        monkeypatch.setattr(app.state.auth.keys, "keyset", broken)
        response = httpx.get(
            f"http://127.0.0.1:{config.port}/.well-known/jwks.json",
            headers={"Authorization": f"Bearer {token}", "Cookie": f"session={secret}"},
        )
        assert response.status_code == 500
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    logs = Logs(capsys)
    assert "Exception in ASGI application" not in logs.text
    assert "password=[redacted]" in logs.text
    (failed,) = [line for line in logs.lines if line.get("event") == "request.failed"]
    assert "password=[redacted]" in failed["exception"]
    # The traceback is inside that one JSON line, never on lines of its own.
    assert [line for line in logs.text.splitlines() if not line.startswith("{")] == [
        line for line in logs.text.splitlines() if not line.startswith("{") and "File " not in line
    ]
    logs.assert_clean([secret, basic("app", secret), *jwt_parts(token)])


def test_redaction_is_cheap_for_ordinary_lines() -> None:
    """Not a timing assertion: ordinary lines come back as the very same objects."""
    text = "token.issued"
    assert redact_text(text) is text
    event = {"event": text, "client_id": "app", "n": 1}
    assert redact(None, "info", event) == event
