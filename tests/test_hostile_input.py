"""Hostile and malformed input at every endpoint: always a clear 4xx, never a 500 or a trace.

One table of attacks (each case sets up what it needs, sends one hostile request and names the
exact status and error it must get), then a property test that throws random form bodies at the
three OAuth POST endpoints (SPEC "Errors": never a stack trace, never a 500 for bad input).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from server import manage
from server.config import Settings
from server.deps import AppState
from server.main import create_app
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    csrf_of,
    make_settings,
    password_grant,
    refresh_grant,
    sign_in,
    truncate,
)
from tests.seeds import run_seeded

pytestmark = pytest.mark.feature("hostile-input-table")

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CALLBACK = "https://app.example/cb"
ISSUER = "http://127.0.0.1:8000"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
STACK_TRACE = re.compile(r"Traceback|File \"[^\"]+\", line \d+|\bline \d+, in \w+")
SQLI = "' OR '1'='1' --"


@dataclass
class Env:
    """What a case may use: both HTTP clients on one app, and the factories."""

    client: httpx.AsyncClient
    browser: httpx.AsyncClient
    make_client: MakeClient
    make_user: MakeUser
    state: AppState


Check = Callable[[Env, httpx.Response], Awaitable[None]]
Run = Callable[[Env], Awaitable[tuple[httpx.Response, Check | None]]]


@dataclass(frozen=True)
class Case:
    id: str
    run: Run
    status: int
    # OAuth JSON `error` for /oauth2/* (None: a JSON 200 such as `{"active": false}`);
    # "html" for pages and the authorize error page; "redirect" when `location` is checked.
    error: str | None
    location: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


# -- helpers ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, b64(hashlib.sha256(verifier.encode()).digest())


async def confidential(env: Env) -> ClientCreds:
    return await env.make_client("app")


async def post_raw(
    http: httpx.AsyncClient, path: str, body: bytes | str, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return await http.post(path, content=content, headers={**FORM, **(headers or {})})


async def tokens_for(env: Env, creds: ClientCreds, **extra: str) -> dict[str, Any]:
    response = await password_grant(env.client, creds, await env.make_user(), **extra)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def done(
    response: httpx.Response, check: Check | None = None
) -> tuple[httpx.Response, Check | None]:
    return response, check


def raw_case(
    path: str, body: bytes | str, headers: dict[str, str] | None = None, auth: bool = True
) -> Run:
    """A request with a body exactly as given, authenticated as a confidential client."""

    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        merged = {**(creds.basic if auth else {}), **(headers or {})}
        return done(await post_raw(env.client, path, body, merged))

    return run


def content_type_case(path: str, body: str, content_type: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        response = await env.client.post(
            path, content=body.encode(), headers={**creds.basic, "Content-Type": content_type}
        )
        return done(response)

    return run


def mixed_auth_case(path: str, body: str) -> Run:
    """Basic header and client_secret in the body: two methods in one request (RFC 6749 §2.3)."""

    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        extra = f"&client_id=app&client_secret={creds.secret}"
        return done(await post_raw(env.client, path, body + extra, creds.basic))

    return run


def header_auth_case(path: str, body: str, authorization: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        await confidential(env)
        return done(await post_raw(env.client, path, body, {"Authorization": authorization}))

    return run


def many_fields(count: int) -> str:
    return "grant_type=client_credentials&" + "&".join(f"f{i}=" for i in range(count))


# -- refresh tokens and codes -------------------------------------------------------------


async def refresh_replay(env: Env) -> tuple[httpx.Response, Check | None]:
    creds = await confidential(env)
    first = await tokens_for(env, creds)
    second = await refresh_grant(env.client, creds, first["refresh_token"])
    assert second.status_code == 200, second.text
    newest = second.json()["refresh_token"]

    async def family_revoked(env: Env, _: httpx.Response) -> None:
        # RFC 9700 §4.14.2: reuse of a rotated token revokes the whole family.
        after = await refresh_grant(env.client, creds, newest)
        assert (after.status_code, after.json()["error"]) == (400, "invalid_grant")

    return done(await refresh_grant(env.client, creds, first["refresh_token"]), family_revoked)


async def refresh_cross_client(env: Env) -> tuple[httpx.Response, Check | None]:
    owner = await confidential(env)
    tokens = await tokens_for(env, owner)
    thief = await env.make_client("thief")

    async def owner_keeps_it(env: Env, _: httpx.Response) -> None:
        kept = await refresh_grant(env.client, owner, tokens["refresh_token"])
        assert kept.status_code == 200, kept.text

    return done(await refresh_grant(env.client, thief, tokens["refresh_token"]), owner_keeps_it)


async def refresh_widening(env: Env) -> tuple[httpx.Response, Check | None]:
    creds = await confidential(env)
    tokens = await tokens_for(env, creds, scope="profile")
    return done(
        await refresh_grant(env.client, creds, tokens["refresh_token"], scope="profile api")
    )


async def refresh_sqli(env: Env) -> tuple[httpx.Response, Check | None]:
    creds = await confidential(env)
    return done(await refresh_grant(env.client, creds, SQLI))


async def spa(env: Env) -> ClientCreds:
    return await env.make_client(
        "spa",
        public=True,
        grants=["authorization_code", "refresh_token"],
        scope="openid profile email",
        redirect_uris=[CALLBACK],
        name="Photo App",
        first_party=True,
    )


def authorize_params(challenge: str, **change: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": "spa",
        "redirect_uri": CALLBACK,
        "scope": "openid profile",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **change,
    }
    return {k: v for k, v in params.items() if v is not None}


async def signed_in_spa(env: Env) -> None:
    await spa(env)
    await sign_in(env.browser, await env.make_user())


def authorize_case(**change: str | None) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        await signed_in_spa(env)
        _, challenge = pkce()
        params = authorize_params(challenge, **change)
        return done(await env.browser.get("/oauth2/authorize", params=params))

    return run


def authorize_raw_case(query: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        await signed_in_spa(env)
        return done(await env.browser.get("/oauth2/authorize?" + query))

    return run


async def code_reuse(env: Env) -> tuple[httpx.Response, Check | None]:
    await signed_in_spa(env)
    verifier, challenge = pkce()
    redirect = await env.browser.get("/oauth2/authorize", params=authorize_params(challenge))
    assert redirect.status_code == 302, redirect.text
    code = parse_qs(urlsplit(redirect.headers["location"]).query)["code"][0]
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CALLBACK,
        "client_id": "spa",
        "code_verifier": verifier,
    }
    first = await env.browser.post("/oauth2/token", data=data)
    assert first.status_code == 200, first.text
    return done(await env.browser.post("/oauth2/token", data=data))


async def pkce_plain(env: Env) -> tuple[httpx.Response, Check | None]:
    await signed_in_spa(env)
    params = authorize_params("x" * 43, code_challenge_method="plain")

    async def error_at_client(_: Env, response: httpx.Response) -> None:
        query = parse_qs(urlsplit(response.headers["location"]).query)
        assert query["error"] == ["invalid_request"]
        assert query["state"] == ["st-1"]
        assert query["iss"] == [ISSUER]
        assert "code" not in query

    return done(await env.browser.get("/oauth2/authorize", params=params), error_at_client)


# -- introspection ------------------------------------------------------------------------


def hostile_jwt(mutate: Callable[[dict[str, Any]], dict[str, Any]], sign: bool = True) -> Run:
    """Our own access token with a hostile header; the signature is kept (or dropped)."""

    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        token = (await tokens_for(env, creds))["access_token"]
        head, payload, signature = token.split(".")
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        forged = ".".join(
            [b64(json.dumps(mutate(header)).encode()), payload, signature if sign else ""]
        )

        async def exactly_inactive(_: Env, response: httpx.Response) -> None:
            assert response.json() == {"active": False}

        response = await env.client.post(
            "/oauth2/introspect", data={"token": forged}, headers=creds.basic
        )
        return done(response, exactly_inactive)

    return run


async def introspect_public(env: Env) -> tuple[httpx.Response, Check | None]:
    await env.make_client("pub", public=True)
    return done(await post_raw(env.client, "/oauth2/introspect", "token=t&client_id=pub"))


async def revoke_sqli(env: Env) -> tuple[httpx.Response, Check | None]:
    creds = await confidential(env)
    return done(await env.client.post("/oauth2/revoke", data={"token": SQLI}, headers=creds.basic))


# -- pages --------------------------------------------------------------------------------


def login_with(username: str, expect_literal: str, never: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        await env.make_user()
        page = await env.browser.get("/login")
        response = await env.browser.post(
            "/login",
            data={"csrf_token": csrf_of(page), "username": username, "password": "nope"},
        )

        async def shown_escaped(_: Env, response: httpx.Response) -> None:
            assert "Incorrect username or password." in response.text
            assert f'value="{expect_literal}"' in response.text
            assert never not in response.text

        return done(response, shown_escaped)

    return run


def open_redirect(target: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        return done(await sign_in(env.browser, await env.make_user(), target))

    return run


def no_csrf(path: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        user = await env.make_user()
        await sign_in(env.browser, user)
        data = {"username": user.username, "password": user.password, "decision": "allow"}

        async def no_new_session(_: Env, response: httpx.Response) -> None:
            assert "session=" not in response.headers.get("set-cookie", "")

        return done(await env.browser.post(path, data=data), no_new_session)

    return run


def page_raw(path: str, body: bytes, content_type: str = FORM["Content-Type"]) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        await env.browser.get("/login")  # the CSRF cookie a real browser would hold
        response = await env.browser.post(
            path, content=body, headers={"Content-Type": content_type}
        )
        return done(response)

    return run


def request_id(value: bytes) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        response = await env.client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "scope": "bad\x00"},
            headers={
                **{k.encode(): v.encode() for k, v in creds.basic.items()},
                b"X-Request-ID": value,
            },
        )

        async def replaced(_: Env, response: httpx.Response) -> None:
            assert HEX32.match(response.headers["x-request-id"]), response.headers

        return done(response, replaced)

    return run


def unsupported_grant(value: str) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        response = await env.client.post(
            "/oauth2/token", data={"grant_type": value}, headers=creds.basic
        )

        async def not_echoed(_: Env, response: httpx.Response) -> None:
            assert value not in response.text
            assert "<script" not in response.text

        return done(response, not_echoed)

    return run


def password_as(username: str, password: str = SQLI) -> Run:
    async def run(env: Env) -> tuple[httpx.Response, Check | None]:
        creds = await confidential(env)
        await env.make_user()
        data = {"grant_type": "password", "username": username, "password": password}
        return done(await env.client.post("/oauth2/token", data=data, headers=creds.basic))

    return run


# -- the table ----------------------------------------------------------------------------

T, R, I = "/oauth2/token", "/oauth2/revoke", "/oauth2/introspect"  # noqa: E741
P, PUSH = "/oauth2/par", "response_type=code&scope=api"
CC = "grant_type=client_credentials"
SQLI_Q = quote(SQLI)

CASES: list[Case] = [
    # token endpoint: refresh tokens and codes
    Case("token-refresh-replay-revokes-family", refresh_replay, 400, "invalid_grant"),
    Case("token-refresh-of-another-client", refresh_cross_client, 400, "invalid_grant"),
    Case("token-refresh-widens-scope", refresh_widening, 400, "invalid_scope"),
    Case("token-refresh-sql-injection", refresh_sqli, 400, "invalid_grant"),
    Case("token-code-reuse", code_reuse, 400, "invalid_grant"),
    # token endpoint: parameters
    Case(
        "token-duplicate-grant-type",
        raw_case(T, CC + "&grant_type=password"),
        400,
        "invalid_request",
    ),
    Case("token-duplicate-scope", raw_case(T, CC + "&scope=api&scope=api"), 400, "invalid_request"),
    # A repeated name with a quote in it once made Authlib refuse the description: a 500.
    Case(
        "token-duplicate-quoted-name",
        raw_case(T, "%27=client_credentials&%27=client_credentials"),
        400,
        "invalid_request",
    ),
    Case(
        "revoke-duplicate-markup-name", raw_case(R, "%3Cb%3E=1&%3Cb%3E=2"), 400, "invalid_request"
    ),
    Case("token-missing-grant-type", raw_case(T, "scope=api"), 400, "invalid_request"),
    Case("token-empty-body", raw_case(T, ""), 400, "invalid_request"),
    Case(
        "token-unsupported-grant-type",
        unsupported_grant("<script>x-grant-4242</script>"),
        400,
        "unsupported_grant_type",
    ),
    # token endpoint: client authentication
    Case("token-basic-plus-secret-in-body", mixed_auth_case(T, CC), 400, "invalid_request"),
    Case(
        "token-basic-not-base64",
        header_auth_case(T, CC, "Basic !!!not-base64!!!"),
        401,
        "invalid_client",
    ),
    Case("token-basic-empty", header_auth_case(T, CC, "Basic "), 401, "invalid_client"),
    Case(
        "token-basic-nul-in-secret",
        header_auth_case(T, CC, "Basic " + base64.b64encode(b"app:\x00").decode()),
        401,
        "invalid_client",
    ),
    Case(
        "token-client-id-sql-injection",
        raw_case(T, f"{CC}&client_id={SQLI_Q}&client_secret=x", auth=False),
        401,
        "invalid_client",
    ),
    Case(
        "token-basic-client-id-sql-injection",
        header_auth_case(T, CC, "Basic " + base64.b64encode(f"{SQLI_Q}:x".encode()).decode()),
        401,
        "invalid_client",
    ),
    # token endpoint: the body itself
    Case("token-oversized-body", raw_case(T, CC + "&pad=" + "a" * 20_000), 413, "invalid_request"),
    # 10,000 fields cannot fit in the 16 KiB limit: refused as oversized before parsing.
    Case("token-10000-fields", raw_case(T, many_fields(10_000)), 413, "invalid_request"),
    Case(
        "token-2000-fields-within-the-limit",
        raw_case(T, many_fields(2_000)),
        400,
        "invalid_request",
    ),
    Case("token-nul-in-value", raw_case(T, CC + "&scope=api%00admin"), 400, "invalid_request"),
    Case(
        "token-raw-nul-byte",
        raw_case(T, b"grant_type=client\x00_credentials"),
        400,
        "invalid_request",
    ),
    Case("token-nul-in-name", raw_case(T, CC + "&sc%00ope=api"), 400, "invalid_request"),
    Case(
        "token-invalid-utf8-raw",
        raw_case(T, CC.encode() + b"&scope=\xff\xfe"),
        400,
        "invalid_request",
    ),
    Case("token-invalid-utf8-escaped", raw_case(T, CC + "&scope=%ff%fe"), 400, "invalid_request"),
    Case("token-lone-surrogate", raw_case(T, CC + "&scope=%ED%A0%80"), 400, "invalid_request"),
    Case("token-overlong-utf8-slash", raw_case(T, CC + "&scope=%C0%AF"), 400, "invalid_request"),
    Case(
        "token-json-body",
        content_type_case(T, '{"grant_type": "client_credentials"}', "application/json"),
        400,
        "invalid_request",
    ),
    Case(
        "token-charset-latin-1",
        content_type_case(T, CC, "application/x-www-form-urlencoded; charset=latin-1"),
        400,
        "invalid_request",
    ),
    Case(
        "token-multipart",
        content_type_case(T, CC, "multipart/form-data; boundary=x"),
        400,
        "invalid_request",
    ),
    # token endpoint: injection strings are just wrong credentials
    Case("token-username-sql-injection", password_as(SQLI), 400, "invalid_grant"),
    Case(
        "token-username-union-select",
        password_as("x' UNION SELECT password_hash FROM users--"),
        400,
        "invalid_grant",
    ),
    Case("token-username-template", password_as("{{7*7}}${7*7}"), 400, "invalid_grant"),
    Case("token-username-10000-chars", password_as("a" * 10_000), 400, "invalid_grant"),
    Case("token-username-rtl-override", password_as("\u202ealice"), 400, "invalid_grant"),
    # revocation
    Case("revoke-duplicate-token", raw_case(R, "token=a&token=b"), 400, "invalid_request"),
    Case(
        "revoke-unknown-hint",
        raw_case(R, "token=t&token_type_hint=id_token"),
        400,
        "unsupported_token_type",
    ),
    Case("revoke-basic-plus-secret-in-body", mixed_auth_case(R, "token=t"), 400, "invalid_request"),
    Case(
        "revoke-basic-not-base64",
        header_auth_case(R, "token=t", "Basic %%%"),
        401,
        "invalid_client",
    ),
    Case("revoke-nul-in-token", raw_case(R, "token=a%00b"), 400, "invalid_request"),
    Case("revoke-invalid-utf8", raw_case(R, b"token=\xc3\x28"), 400, "invalid_request"),
    Case("revoke-oversized-body", raw_case(R, "token=" + "a" * 20_000), 413, "invalid_request"),
    Case(
        "revoke-json-body",
        content_type_case(R, '{"token": "t"}', "application/json"),
        400,
        "invalid_request",
    ),
    # pushed authorization requests (RFC 9126): refused as JSON, never a redirect
    Case("par-duplicate-parameter", raw_case(P, PUSH + "&scope=api"), 400, "invalid_request"),
    Case("par-nul-in-value", raw_case(P, PUSH + "%00admin"), 400, "invalid_request"),
    Case("par-invalid-utf8", raw_case(P, PUSH.encode() + b"\xc3\x28"), 400, "invalid_request"),
    Case("par-oversized-body", raw_case(P, PUSH + "&pad=" + "a" * 20_000), 413, "invalid_request"),
    Case("par-basic-not-base64", header_auth_case(P, PUSH, "Basic %%%"), 401, "invalid_client"),
    Case("par-basic-plus-secret-in-body", mixed_auth_case(P, PUSH), 400, "invalid_request"),
    Case(
        "par-client-id-sql-injection",
        raw_case(P, f"{PUSH}&client_id={SQLI_Q}", auth=False),
        401,
        "invalid_client",
    ),
    # A client without the authorization_code grant (nor redirect URIs) pushes nothing.
    Case("par-client-without-the-code-grant", raw_case(P, PUSH), 400, "invalid_request"),
    # RFC 7009 §2.2: an unknown token is 200, an injection string is just unknown.
    Case("revoke-sql-injection-token", revoke_sqli, 200, None),
    # introspection
    Case("introspect-duplicate-token", raw_case(I, "token=a&token=b"), 400, "invalid_request"),
    Case(
        "introspect-unknown-hint",
        raw_case(I, "token=t&token_type_hint=code"),
        400,
        "unsupported_token_type",
    ),
    Case("introspect-public-client", introspect_public, 401, "invalid_client"),
    Case(
        "introspect-basic-plus-secret-in-body",
        mixed_auth_case(I, "token=t"),
        400,
        "invalid_request",
    ),
    Case("introspect-nul-in-token", raw_case(I, "token=a%00b"), 400, "invalid_request"),
    Case("introspect-lone-surrogate", raw_case(I, "token=%ED%A0%80"), 400, "invalid_request"),
    Case(
        "introspect-charset-latin-1",
        content_type_case(I, "token=t", "application/x-www-form-urlencoded; charset=latin-1"),
        400,
        "invalid_request",
    ),
    Case(
        "introspect-jwt-alg-none",
        hostile_jwt(lambda h: {**h, "alg": "none"}, sign=False),
        200,
        None,
    ),
    Case("introspect-jwt-alg-hs256", hostile_jwt(lambda h: {**h, "alg": "HS256"}), 200, None),
    Case(
        "introspect-jwt-jku",
        hostile_jwt(lambda h: {**h, "jku": "https://evil.example/k"}),
        200,
        None,
    ),
    Case(
        "introspect-jwt-kid-path-traversal",
        hostile_jwt(lambda h: {**h, "kid": "../../../../etc/passwd"}),
        200,
        None,
    ),
    Case("introspect-jwt-kid-sql-injection", hostile_jwt(lambda h: {**h, "kid": SQLI}), 200, None),
    Case("introspect-jwt-crit", hostile_jwt(lambda h: {**h, "crit": ["exp"]}), 200, None),
    # authorize: before the redirect URI is trusted, an error page and never a Location
    Case(
        "authorize-unregistered-redirect-uri",
        authorize_case(redirect_uri="https://evil.example/cb"),
        400,
        "html",
    ),
    Case(
        "authorize-javascript-redirect-uri",
        authorize_case(redirect_uri="javascript:alert(1)"),
        400,
        "html",
    ),
    Case("authorize-unknown-client", authorize_case(client_id=SQLI), 400, "html"),
    Case(
        "authorize-duplicate-client-id",
        authorize_raw_case(
            f"response_type=code&client_id=spa&client_id=spa&redirect_uri={CALLBACK}"
        ),
        400,
        "html",
    ),
    Case(
        "authorize-nul-in-client-id",
        authorize_raw_case(f"response_type=code&client_id=spa%00&redirect_uri={CALLBACK}"),
        400,
        "html",
    ),
    Case(
        "authorize-query-too-long",
        authorize_raw_case(f"response_type=code&client_id=spa&state={'s' * 5000}"),
        400,
        "html",
    ),
    # authorize: after it is trusted, the error goes back to the client (RFC 6749 §4.1.2.1)
    Case("authorize-pkce-plain", pkce_plain, 302, "redirect", location=CALLBACK + "?"),
    # pages
    Case("login-template-injection", login_with("{{7*7}}", "{{7*7}}", 'value="49"'), 200, "html"),
    Case(
        "login-script-injection",
        login_with(
            "<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;", "<script>alert(1)"
        ),
        200,
        "html",
    ),
    Case(
        "login-next-absolute-url",
        open_redirect("https://evil.example/"),
        303,
        "redirect",
        location="/account",
    ),
    Case(
        "login-next-scheme-relative",
        open_redirect("//evil.example"),
        303,
        "redirect",
        location="/account",
    ),
    Case(
        "login-next-backslash",
        open_redirect("/\\evil.example"),
        303,
        "redirect",
        location="/account",
    ),
    Case(
        "login-next-userinfo",
        open_redirect("https://127.0.0.1:8000@evil.example/"),
        303,
        "redirect",
        location="/account",
    ),
    Case(
        "login-next-javascript",
        open_redirect("javascript:alert(1)"),
        303,
        "redirect",
        location="/account",
    ),
    Case(
        "login-next-crlf",
        open_redirect("/\r\nSet-Cookie: x=1"),
        303,
        "redirect",
        location="/account",
    ),
    Case("login-without-csrf", no_csrf("/login"), 403, "html"),
    Case("register-without-csrf", no_csrf("/register"), 403, "html"),
    Case("logout-without-csrf", no_csrf("/logout"), 403, "html"),
    Case("consent-without-csrf", no_csrf("/consent"), 403, "html"),
    Case("login-nul-byte", page_raw("/login", b"username=a%00b"), 400, "html"),
    Case("login-invalid-utf8", page_raw("/login", b"username=%ff"), 400, "html"),
    Case("login-oversized-body", page_raw("/login", b"x=" + b"a" * 20_000), 413, "html"),
    Case(
        "login-json-body", page_raw("/login", b'{"username": "a"}', "application/json"), 400, "html"
    ),
    # request ids
    Case("request-id-control-characters", request_id(b"abc\x01\x7fdef"), 400, "invalid_request"),
    Case("request-id-too-long", request_id(b"a" * 4096), 400, "invalid_request"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_input_gets_a_clear_answer(
    client: httpx.AsyncClient,
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    state: AppState,
    case: Case,
) -> None:
    env = Env(client, browser, make_client, make_user, state)
    response, check = await case.run(env)

    assert response.status_code == case.status, response.text[:500]
    assert not STACK_TRACE.search(response.text), response.text[:2000]
    content_type = response.headers.get("content-type", "")
    if case.error == "html":
        assert content_type.startswith("text/html"), content_type
        assert "location" not in response.headers
    elif case.error == "redirect":
        assert case.location is not None
        if case.location.endswith("?"):
            assert response.headers["location"].startswith(case.location)
        else:
            assert response.headers["location"] == case.location
    else:
        assert content_type.startswith("application/json"), content_type
        body = response.json()
        assert body.get("error") == case.error, body
        if case.error is not None:
            assert isinstance(body.get("error_description"), str)
            assert response.headers["cache-control"] == "no-store"
            if case.status == 401:
                assert "www-authenticate" in response.headers
    if check is not None:
        await check(env, response)


# -- random bodies ------------------------------------------------------------------------

REAL_NAMES = [
    "grant_type",
    "client_id",
    "client_secret",
    "username",
    "password",
    "scope",
    "refresh_token",
    "token",
    "token_type_hint",
    "code",
    "redirect_uri",
    "code_verifier",
]
HOSTILE_VALUES = [
    "client_credentials",
    "password",
    "refresh_token",
    "authorization_code",
    "access_token",
    "\x00",
    "%00",
    "%ff%fe",
    "%ED%A0%80",
    "%C0%AF",
    "%",
    "%%",
    "%zz",
    "+",
    "=",
    "&",
    SQLI,
    "{{7*7}}",
    "a" * 20_000,
    "a" * 8_000,
    "eyJhbGciOiJub25lIn0.e30.",
]
CONTENT_TYPES = [
    "application/x-www-form-urlencoded",
    "application/x-www-form-urlencoded; charset=UTF-8",
    "application/x-www-form-urlencoded; charset=latin-1",
    "application/x-www-form-urlencoded; charset=",
    "application/json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "",
]

encoded_text = st.one_of(
    st.text(max_size=40).map(lambda s: quote(s, safe="")),
    st.text(max_size=40).map(lambda s: s.replace("&", "").replace("=", "")),
)
keys = st.one_of(st.sampled_from(REAL_NAMES), encoded_text)
values = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    encoded_text,
    st.integers(0, 30_000).map(lambda n: "x" * n),
)
form_bodies = st.lists(st.tuples(keys, values), max_size=12).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")
)
bodies = st.one_of(form_bodies, st.binary(max_size=2_000))
content_types = st.one_of(
    st.sampled_from(CONTENT_TYPES), st.from_regex(r"[ -~]{0,40}", fullmatch=True)
)
auths = st.sampled_from(["none", "good", "wrong", "garbage"])


async def _client_secret(settings: Settings, application: FastAPI) -> str:
    """A fresh database with one confidential client; returns its secret."""
    await truncate(settings.database_url)
    state: AppState = application.state.auth
    async with state.db.sessions() as db:
        created = await manage.create_client(db, client_id="app", scope="profile api")
        await db.commit()
    assert created.secret is not None
    return created.secret


async def _send(
    application: FastAPI, path: str, body: bytes, content_type: str, auth: str, secret: str
) -> httpx.Response:
    headers: dict[str, str] = {"Content-Type": content_type} if content_type else {}
    if auth != "none":
        raw = {"good": f"app:{secret}", "wrong": "app:wrong", "garbage": "\x00:\x00"}[auth]
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
    # An unhandled exception becomes the 500 a real server would send, so it fails the assertion.
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        return await http.post(path, content=body, headers=headers)


#: Rate limits far above what the examples send: the limiter still reads every hostile body
#: (its keys come from it), but never answers 429 in place of the endpoint.
UNLIMITED = {
    name: "1000000/minute"
    for name in ("rate_limit_token_ip", "rate_limit_token_client", "rate_limit_token_account")
}


def test_random_bodies_never_break_the_oauth_endpoints(
    sqlite_url: str, keys_dir: Path, request: pytest.FixtureRequest
) -> None:
    # SQLite only, to keep the suite fast: the input rules run before any database work. One
    # app for every example, its lifespan entered once on a private event loop.
    settings = make_settings(sqlite_url, keys_dir, **UNLIMITED)
    loop = asyncio.new_event_loop()
    application = create_app(settings)
    lifespan = application.router.lifespan_context(application)
    loop.run_until_complete(lifespan.__aenter__())
    try:
        secret = loop.run_until_complete(_client_secret(settings, application))

        @hsettings(
            max_examples=150,
            deadline=None,
            database=None,  # only the seed decides what runs
            print_blob=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            path=st.sampled_from([T, R, I]),
            body=bodies,
            content_type=content_types,
            auth=auths,
        )
        def check(path: str, body: bytes, content_type: str, auth: str) -> None:
            response = loop.run_until_complete(
                _send(application, path, body, content_type, auth, secret)
            )
            assert response.status_code < 500, (response.status_code, response.text[:500])
            assert response.status_code != 429, "a rate limit answered, not the endpoint"
            assert not STACK_TRACE.search(response.text)
            assert response.headers["content-type"].startswith("application/json")
            payload = response.json()
            if response.status_code != 200:
                assert isinstance(payload.get("error"), str), payload
            else:
                assert "error" not in payload

        run_seeded(request, check)  # a random seed unless AUTH_TEST_SEED names one
    finally:
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()
