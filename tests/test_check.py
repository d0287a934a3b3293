"""``python -m server check URL``: the self-test passes against the real app and can fail.

The positive runs use the real ASGI app on SQLite and PostgreSQL. The negative runs put one
fault between the checks and that app (``Tamper``), or replace the server with a transport
that refuses connections or answers nonsense, and assert exactly which checks fail.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from fastapi import FastAPI
from joserfc.jwk import ECKey
from sqlalchemy import func, select

from server import check, manage
from server.config import Settings
from server.deps import AppState
from server.models import PushedRequest, TotpFactor
from tests.conftest import MakeClient, MakeUser, SharedApps, reset_app

pytestmark = pytest.mark.feature("check-command")

ALL = [entry.name for entry in check.CHECKS]
NO_CREDENTIALS = {
    "health",
    "discovery",
    "registration-refuses-empty",
    "jwks-hygiene",
    "jwks-cache",
    "token-error-format",
    "invalid-client",
    "introspection-auth",
    "no-store-headers",
    "dpop-discovery",
    "par-refuses-unauthenticated",
}
CLIENT_ONLY = {
    "client-credentials",
    "access-token-claims",
    "dpop-bound-token",
    "dpop-proof-replay",
    "dpop-proof-wrong-htu",
    "introspection-active",
    "introspection-hostile-tokens",
    "revocation",
    "revoked-access-token-inactive",
}
PASSWORD = "correct horse battery"
Edit = Callable[[httpx.Request, httpx.Response, dict[str, Any] | None], httpx.Response]


@dataclass
class Outcome:
    failures: int
    lines: list[str]
    results: dict[str, tuple[str, str]]  # name -> (PASS/FAIL/SKIP, reason)

    def named(self, status: str) -> set[str]:
        return {name for name, (seen, _) in self.results.items() if seen == status}

    def reason(self, name: str) -> str:
        return self.results[name][1]


async def run(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    client_id: str | None = None,
    client_secret: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Outcome:
    out = io.StringIO()
    failures = await check.run_checks(
        http,
        base_url,
        client_id=client_id,
        client_secret=client_secret,
        username=username,
        password=password,
        out=out,
    )
    lines = out.getvalue().splitlines()
    results: dict[str, tuple[str, str]] = {}
    for line in lines[:-1]:
        status, _, rest = line.partition(" ")
        name, _, reason = rest.partition(": ")
        assert status in ("PASS", "FAIL", "SKIP"), line
        assert (status == "PASS") == (reason == ""), line
        results[name] = (status, reason)
    assert list(results) == ALL  # one line per check, in order
    counts = [len([r for r in results.values() if r[0] == s]) for s in ("PASS", "FAIL", "SKIP")]
    assert lines[-1] == "summary: {} passed, {} failed, {} skipped".format(*counts)
    assert failures == counts[1]
    return Outcome(failures, lines, results)


class Tamper(httpx.AsyncBaseTransport):
    """The real app behind one fault: ``edit`` may rewrite any response. It also records
    every token the server hands out, so tests can prove none is ever printed."""

    def __init__(self, app: FastAPI, edit: Edit | None = None) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.edit = edit
        self.tokens: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if isinstance(body, dict):
            for name in ("access_token", "refresh_token"):
                if isinstance(body.get(name), str):
                    self.tokens.add(body[name])
        response = httpx.Response(
            response.status_code, headers=response.headers, content=content, request=request
        )
        if self.edit is not None:
            response = self.edit(request, response, body if isinstance(body, dict) else None)
        return response


def replace_json(response: httpx.Response, body: dict[str, Any]) -> httpx.Response:
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return httpx.Response(response.status_code, headers=headers, json=body)


@dataclass
class Setup:
    settings: Settings
    client_id: str
    client_secret: str | None
    username: str
    password: str

    def http(self, transport: httpx.AsyncBaseTransport) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport, base_url=self.settings.issuer)

    async def run(self, transport: httpx.AsyncBaseTransport, *, user: bool = True) -> Outcome:
        async with self.http(transport) as http:
            return await run(
                http,
                self.settings.issuer,
                client_id=self.client_id,
                client_secret=self.client_secret,
                username=self.username if user else None,
                password=self.password if user else None,
            )


@pytest.fixture
async def setup(settings: Settings, make_client: MakeClient, make_user: MakeUser) -> Setup:
    grants = ["password", "refresh_token", "client_credentials"]
    creds = await make_client("check-app", grants=grants)
    user = await make_user("checker", PASSWORD)
    return Setup(settings, creds.client_id, creds.secret, user.username, user.password)


# -- against the real server -------------------------------------------------------------


async def test_every_check_passes_against_a_correct_server(app: FastAPI, setup: Setup) -> None:
    transport = Tamper(app)
    outcome = await setup.run(transport)
    assert outcome.failures == 0, outcome.lines
    assert outcome.named("PASS") == set(ALL), outcome.lines
    assert len(ALL) >= 20
    # Never a secret, a password or a token in the output (the run saw plenty of tokens).
    text = "\n".join(outcome.lines)
    assert len(transport.tokens) >= 8
    for value in [setup.client_secret, setup.password, *transport.tokens]:
        assert value and value not in text


@pytest.mark.feature("refresh-retries")
async def test_a_test_client_with_a_refresh_retry_window_passes_every_check(
    app: FastAPI, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    """Its retry gets the same successor (checked), and reuse is checked two rotations back."""
    grants = ["password", "refresh_token", "client_credentials"]
    creds = await make_client("check-app", grants=grants, refresh_retry_window=30)
    user = await make_user("checker", PASSWORD)
    setup = Setup(settings, creds.client_id, creds.secret, user.username, user.password)
    outcome = await setup.run(Tamper(app))
    assert outcome.failures == 0, outcome.lines
    assert outcome.named("PASS") == set(ALL), outcome.lines


async def test_without_credentials_the_other_checks_skip(app: FastAPI, settings: Settings) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=settings.issuer
    ) as http:
        outcome = await run(http, settings.issuer + "/")  # a trailing slash is tolerated
    assert outcome.failures == 0, outcome.lines
    assert outcome.named("PASS") == NO_CREDENTIALS
    assert outcome.named("SKIP") == set(ALL) - NO_CREDENTIALS
    assert outcome.reason("client-credentials") == (
        "no client given (--client-id, AUTH_CHECK_CLIENT_ID)"
    )
    # A check depending on a skipped one skips with the root reason.
    assert outcome.reason("refresh-rotation") == outcome.reason("password-grant")
    assert outcome.reason("access-token-claims") == (
        "needs client-credentials or password-grant, which were skipped"
    )


async def test_a_confidential_client_without_a_user(app: FastAPI, setup: Setup) -> None:
    outcome = await setup.run(Tamper(app), user=False)
    assert outcome.failures == 0, outcome.lines
    assert outcome.named("PASS") == NO_CREDENTIALS | CLIENT_ONLY
    assert outcome.reason("password-grant") == "no user given (--username, AUTH_CHECK_USERNAME)"
    assert outcome.reason("revoked-family-inactive") == outcome.reason("password-grant")


async def test_a_public_client_skips_what_needs_a_secret(
    app: FastAPI, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client("check-public", public=True)
    user = await make_user("checker", PASSWORD)
    setup = Setup(settings, creds.client_id, None, user.username, user.password)
    outcome = await setup.run(Tamper(app))
    assert outcome.failures == 0, outcome.lines
    needs_secret = {
        "client-credentials",
        "dpop-bound-token",
        "dpop-proof-replay",
        "dpop-proof-wrong-htu",
        "introspection-active",
        "introspection-hostile-tokens",
        "revoked-family-inactive",
        "revoked-access-token-inactive",
    }
    assert outcome.named("SKIP") == needs_secret
    assert outcome.reason("client-credentials") == (
        "needs a confidential client (--client-secret not given)"
    )
    # The public client still signs in, refreshes and revokes (client_id in the form).
    for name in ("password-grant", "refresh-reuse-detection", "refresh-token-revocation"):
        assert outcome.results[name][0] == "PASS"


async def test_grants_the_client_lacks_are_skipped(
    app: FastAPI, settings: Settings, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client("check-narrow", grants=["password"])
    user = await make_user("checker", PASSWORD)
    setup = Setup(settings, creds.client_id, creds.secret, user.username, user.password)
    outcome = await setup.run(Tamper(app))
    assert outcome.failures == 0, outcome.lines
    assert outcome.reason("client-credentials") == (
        "the client is not allowed the grant (client_credentials grant)"
    )
    for name in ("dpop-bound-token", "dpop-proof-replay", "dpop-proof-wrong-htu"):
        assert outcome.reason(name) == outcome.reason("client-credentials")
    no_refresh = "no refresh_token issued (client not allowed refresh_token)"
    for name in ("refresh-rotation", "refresh-reuse-detection", "refresh-token-revocation"):
        assert outcome.reason(name) == no_refresh
    assert outcome.results["access-token-claims"][0] == "PASS"  # the password-grant token
    assert outcome.results["revoked-access-token-inactive"][0] == "PASS"


# -- a server with one fault ------------------------------------------------------------


def leak_private_key_member(
    request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
) -> httpx.Response:
    if request.url.path == "/.well-known/jwks.json" and body is not None:
        body["keys"][0]["d"] = "AQAB"
        return replace_json(response, body)
    return response


def drop_no_store(
    request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
) -> httpx.Response:
    if request.url.path == "/oauth2/token":
        del response.headers["cache-control"]
    return response


def introspect_everything_active(
    request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
) -> httpx.Response:
    if request.url.path == "/oauth2/introspect" and body == {"active": False}:
        return replace_json(response, {"active": True})
    return response


@pytest.mark.parametrize(
    ("edit", "failing"),
    [
        pytest.param(
            leak_private_key_member,
            {"jwks-hygiene": "publishes private member(s) d", "access-token-claims": "needs"},
            id="jwks-leaks-d",
        ),
        pytest.param(
            drop_no_store,
            {"no-store-headers": "lack Cache-Control: no-store, first: POST /oauth2/token"},
            id="token-without-no-store",
        ),
        pytest.param(
            introspect_everything_active,
            {
                "introspection-hostile-tokens": "garbage: active, expected {active: false}",
                "revoked-family-inactive": "active, expected {active: false}",
                "revoked-access-token-inactive": "active, expected {active: false}",
            },
            id="introspection-always-active",
        ),
    ],
)
async def test_a_fault_fails_exactly_the_checks_that_see_it(
    app: FastAPI, setup: Setup, edit: Edit, failing: dict[str, str]
) -> None:
    outcome = await setup.run(Tamper(app, edit))
    assert outcome.named("FAIL") == set(failing), outcome.lines
    assert outcome.failures == len(failing)
    for name, fragment in failing.items():
        assert fragment in outcome.reason(name), outcome.lines
    assert outcome.named("PASS") == set(ALL) - set(failing)


# -- many small faults, one reason each (SQLite only: the checks, not the backend, are tested)


def form_of(request: httpx.Request) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(request.content.decode()).items()}


Change = Callable[[dict[str, Any], dict[str, str]], dict[str, Any] | None]
When = Callable[[dict[str, str], httpx.Response], bool]


def rewrite(paths: str | tuple[str, ...], change: Change) -> Edit:
    """Rewrite the JSON body answered on ``paths``; ``change(body, form)`` returns the new
    body, or None to leave the response alone."""
    wanted = (paths,) if isinstance(paths, str) else paths

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path not in wanted or body is None:
            return response
        new = change(copy.deepcopy(body), form_of(request))
        return response if new is None else replace_json(response, new)

    return edit


def answer(path: str, status: int, when: When, headers: dict[str, str] | None = None) -> Edit:
    """Replace the status (and add ``headers``) of the answers on ``path`` that match ``when``."""

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path != path or not when(form_of(request), response):
            return response
        merged = {**response.headers, **(headers or {})}
        return httpx.Response(status, headers=merged, content=response.content)

    return edit


def header(path: str, name: str, value: str | None) -> Edit:
    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path == path:
            if value is None:
                response.headers.pop(name, None)
            else:
                response.headers[name] = value
        return response

    return edit


def granted(grant: str, change: Callable[[dict[str, Any], dict[str, str]], None]) -> Edit:
    """Change the successful token responses of ``grant`` in place."""

    def apply(body: dict[str, Any], form: dict[str, str]) -> dict[str, Any] | None:
        if form.get("grant_type") != grant or "access_token" not in body:
            return None
        change(body, form)
        return body

    return rewrite("/oauth2/token", apply)


def b64json(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def retyped(token: str) -> str:
    _, payload, signature = token.split(".")
    return f"{b64json({'alg': 'RS256', 'typ': 'JWT'})}.{payload}.{signature}"


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


FAKE_ROTATION = {
    "access_token": "a.b.c",
    "token_type": "Bearer",
    "expires_in": 60,
    "refresh_token": "r" * 43,
}
BOTH_DOCUMENTS = (
    "/.well-known/openid-configuration",
    "/.well-known/oauth-authorization-server",
)
JWKS = "/.well-known/jwks.json"
TOKEN = "/oauth2/token"
INTROSPECT = "/oauth2/introspect"


def ignore_revocation() -> Edit:
    """A server whose revocation endpoint says 200 and forgets: revoked tokens live on."""
    revoked: set[str] = set()

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        form = form_of(request)
        path = request.url.path
        if path == "/oauth2/revoke" and response.status_code == 200:
            revoked.add(form.get("token", ""))
        elif path == INTROSPECT and form.get("token") in revoked:
            return replace_json(response, {"active": True})
        return response

    fake = rotate_anyway(lambda form, response: form.get("refresh_token") in revoked)
    return lambda request, response, body: fake(request, edit(request, response, body), body)


def forgive_refresh(*, reuse: bool) -> Edit:
    """A server without reuse detection: with ``reuse`` a spent refresh token refreshes
    again; without, the reuse is refused but the family lives on (its newest token works)."""
    issued: set[str] = set()
    spent: set[str] = set()

    def remember(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path == TOKEN and response.status_code == 200 and body is not None:
            issued.add(body.get("refresh_token", ""))
            spent.add(form_of(request).get("refresh_token", ""))
        return response

    def forgiven(form: dict[str, str], response: httpx.Response) -> bool:
        token = form.get("refresh_token")
        return "scope" not in form and token in (spent if reuse else issued - spent)

    fake = rotate_anyway(forgiven)
    return lambda request, response, body: fake(request, remember(request, response, body), body)


def rotate_anyway(when: When) -> Edit:
    """Answer refused refreshes that match ``when`` with a (fake) successful rotation."""

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        form = form_of(request)
        refused = response.status_code == 400 and form.get("grant_type") == "refresh_token"
        if request.url.path == TOKEN and refused and when(form, response):
            return httpx.Response(200, headers={"Cache-Control": "no-store"}, json=FAKE_ROTATION)
        return response

    return edit


def set_item(name: str, value: Any) -> Callable[[dict[str, Any], dict[str, str]], None]:
    def change(body: dict[str, Any], form: dict[str, str]) -> None:
        body[name] = value

    return change


def pop_item(name: str) -> Callable[[dict[str, Any], dict[str, str]], None]:
    def change(body: dict[str, Any], form: dict[str, str]) -> None:
        body.pop(name, None)

    return change


def transform(
    name: str, fn: Callable[[str], str]
) -> Callable[[dict[str, Any], dict[str, str]], None]:
    def change(body: dict[str, Any], form: dict[str, str]) -> None:
        body[name] = fn(body[name])

    return change


def first_key(change: Callable[[dict[str, Any]], None]) -> Change:
    def apply(body: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
        change(body["keys"][0])
        return body

    return apply


def error_for(form_matches: Callable[[dict[str, str]], bool], new: dict[str, Any]) -> Edit:
    def apply(body: dict[str, Any], form: dict[str, str]) -> dict[str, Any] | None:
        return {**body, **new} if "error" in body and form_matches(form) else None

    return rewrite(TOKEN, apply)


FAULTS: list[Any] = [
    pytest.param(
        lambda: answer("/readyz", 503, lambda form, response: True),
        "health",
        "GET /readyz: HTTP 503",
        id="not-ready",
    ),
    pytest.param(
        lambda: rewrite(BOTH_DOCUMENTS, lambda body, form: {**body, "issuer": "http://evil.test"}),
        "discovery",
        "issuer is 'http://evil.test', expected 'http://127.0.0.1:8000'",
        id="wrong-issuer",
    ),
    pytest.param(
        lambda: rewrite(
            "/.well-known/oauth-authorization-server",
            lambda body, form: {**body, "token_endpoint": "http://127.0.0.1:8000/token"},
        ),
        "discovery",
        "the two documents disagree on token_endpoint",
        id="documents-disagree",
    ),
    pytest.param(
        lambda: rewrite(
            BOTH_DOCUMENTS, lambda body, form: body.pop("revocation_endpoint") and body
        ),
        "discovery",
        "revocation_endpoint is None",
        id="no-revocation-endpoint",
    ),
    pytest.param(
        lambda: rewrite(
            BOTH_DOCUMENTS,
            lambda body, form: {**body, "userinfo_endpoint": "https://elsewhere.test/userinfo"},
        ),
        "discovery",
        "userinfo_endpoint is not under the issuer",
        id="endpoint-elsewhere",
    ),
    pytest.param(
        lambda: rewrite(BOTH_DOCUMENTS, lambda body, form: {**body, "grant_types_supported": []}),
        "discovery",
        "grant_types_supported lacks one of",
        id="grants-not-listed",
    ),
    pytest.param(
        lambda: rewrite(
            BOTH_DOCUMENTS,
            lambda body, form: {**body, "introspection_endpoint_auth_methods_supported": "x"},
        ),
        "discovery",
        "introspection_endpoint_auth_methods_supported lacks client_secret_basic",
        id="auth-methods-not-listed",
    ),
    pytest.param(
        lambda: rewrite(JWKS, first_key(lambda key: key.update(use="enc"))),
        "jwks-hygiene",
        "use is 'enc', expected sig",
        id="encryption-key",
    ),
    pytest.param(
        lambda: rewrite(JWKS, lambda body, form: {"keys": body["keys"] + body["keys"][:1]}),
        "jwks-hygiene",
        "appears twice",
        id="duplicate-kid",
    ),
    pytest.param(
        lambda: rewrite(
            JWKS, first_key(lambda key: key.update(n=check.b64url_encode(b"\x80" + b"\0" * 127)))
        ),
        "jwks-hygiene",
        "has a 1024-bit modulus, expected >= 2048",
        id="short-key",
    ),
    pytest.param(
        lambda: rewrite(JWKS, first_key(lambda key: key.pop("kid"))),
        "jwks-hygiene",
        "key #0 has no kid",
        id="no-kid",
    ),
    pytest.param(
        lambda: rewrite(JWKS, lambda body, form: {"keys": []}),
        "jwks-hygiene",
        "no keys in the JWKS",
        id="empty-jwks",
    ),
    pytest.param(
        lambda: header(JWKS, "etag", None),
        "jwks-cache",
        "no ETag header",
        id="no-etag",
    ),
    pytest.param(
        lambda: header(JWKS, "cache-control", "no-cache"),
        "jwks-cache",
        "Cache-Control is 'no-cache', expected public, max-age=N",
        id="jwks-not-cacheable",
    ),
    pytest.param(
        lambda: answer(JWKS, 200, lambda form, response: response.status_code == 304),
        "jwks-cache",
        "If-None-Match with the ETag: HTTP 200, expected 304",
        id="etag-ignored",
    ),
    pytest.param(
        lambda: error_for(
            lambda form: form.get("grant_type") == "check-nonsense", {"error": "invalid_grant"}
        ),
        "token-error-format",
        "unknown grant_type: expected HTTP 400 unsupported_grant_type, got HTTP 400 invalid_grant",
        id="wrong-error-code",
    ),
    pytest.param(
        lambda: error_for(lambda form: "grant_type" not in form, {"error_description": 5}),
        "token-error-format",
        "missing grant_type: error_description is not a string",
        id="description-not-a-string",
    ),
    pytest.param(
        lambda: header(TOKEN, "www-authenticate", None),
        "invalid-client",
        "wrong client secret: 401 without a WWW-Authenticate: Basic header",
        id="no-challenge",
    ),
    pytest.param(
        lambda: granted("client_credentials", set_item("refresh_token", "x" * 43)),
        "client-credentials",
        "client_credentials issued a refresh_token",
        id="cc-refresh-token",
    ),
    pytest.param(
        lambda: granted("client_credentials", set_item("token_type", "mac")),
        "client-credentials",
        "token_type is 'mac', expected Bearer",
        id="not-bearer",
    ),
    pytest.param(
        lambda: granted("client_credentials", pop_item("expires_in")),
        "client-credentials",
        "expires_in is None, expected seconds > 0",
        id="no-expires-in",
    ),
    pytest.param(
        lambda: granted("password", set_item("refresh_token", "short-one")),
        "password-grant",
        "refresh_token has 9 characters (< 256 bits)",
        id="weak-refresh-token",
    ),
    pytest.param(
        lambda: answer(
            TOKEN,
            429,
            lambda form, response: form.get("grant_type") == "password",
            {"Retry-After": "7"},
        ),
        "password-grant",
        "password grant: HTTP 429 (rate limited, Retry-After 7; run the check again later)",
        id="rate-limited",
    ),
    pytest.param(
        lambda: granted("client_credentials", transform("access_token", retyped)),
        "access-token-claims",
        "client_credentials token: typ is 'JWT', expected at+jwt",
        id="typ-jwt",
    ),
    pytest.param(
        lambda: granted("client_credentials", transform("access_token", tampered)),
        "access-token-claims",
        "client_credentials token: the signature does not verify",
        id="bad-signature",
    ),
    pytest.param(
        lambda: granted(
            "refresh_token", lambda body, form: body.update(refresh_token=form["refresh_token"])
        ),
        "refresh-rotation",
        "the refresh returned the same refresh_token (no rotation)",
        id="no-rotation",
    ),
    pytest.param(
        lambda: granted("refresh_token", pop_item("refresh_token")),
        "refresh-rotation",
        "the refresh response has no new refresh_token (no rotation)",
        id="no-new-refresh-token",
    ),
    pytest.param(
        lambda: rotate_anyway(lambda form, response: "scope" in form),
        "refresh-scope-widening",
        "a refresh asking for a wider scope was granted",
        id="scope-widened",
    ),
    pytest.param(
        lambda: rewrite(INTROSPECT, lambda body, form: body.pop("jti", None) and body),
        "introspection-active",
        "introspecting the client_credentials token: jti differs from the token's",
        id="introspection-without-jti",
    ),
    pytest.param(
        lambda: rewrite(
            INTROSPECT,
            lambda body, form: (
                {**body, "aud": "x"} if form.get("token_type_hint") == "refresh_token" else None
            ),
        ),
        "introspection-active",
        "introspecting the refresh token: aud/jti belong to access tokens only",
        id="refresh-token-with-aud",
    ),
    pytest.param(
        lambda: forgive_refresh(reuse=True),
        "refresh-reuse-detection",
        # A new token for a replay: neither reuse detection nor a retry's same successor.
        "presenting a rotated refresh token again was granted a different refresh token",
        id="reuse-accepted",
    ),
    pytest.param(
        lambda: forgive_refresh(reuse=False),
        "refresh-reuse-detection",
        "the newest refresh token after a reuse: expected HTTP 400 invalid_grant, got HTTP 200",
        id="family-survives-reuse",
    ),
    pytest.param(
        lambda: answer(
            "/oauth2/revoke",
            503,
            lambda form, response: response.status_code == 200,
        ),
        "revocation",
        "revoking an unknown token: HTTP 503, expected 200",
        id="revocation-unavailable",
    ),
    pytest.param(
        ignore_revocation,
        "refresh-token-revocation",
        "refreshing with a revoked refresh token: expected HTTP 400 invalid_grant, got HTTP 200",
        id="revoked-refresh-token-works",
    ),
    pytest.param(
        ignore_revocation,
        "revoked-access-token-inactive",
        "introspecting a revoked access token: active, expected {active: false}",
        id="revoked-access-token-active",
    ),
    pytest.param(
        lambda: error_for(
            lambda form: form.get("username", "").startswith("check-"),
            {"error_description": "No such user."},
        ),
        "password-invalid-grant",
        "wrong password and unknown user answer with different bodies",
        id="user-enumeration",
    ),
]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("fault", "name", "reason"), FAULTS)
async def test_each_fault_is_reported_by_its_check(
    app: FastAPI, setup: Setup, fault: Callable[[], Edit], name: str, reason: str
) -> None:
    transport = Tamper(app, fault())
    outcome = await setup.run(transport)
    assert outcome.results[name] == ("FAIL", outcome.reason(name)), outcome.lines
    assert reason in outcome.reason(name)
    assert outcome.failures >= 1
    text = "\n".join(outcome.lines)
    for value in [setup.client_secret, setup.password, *transport.tokens]:
        assert value and value not in text


# -- a server that is not there, or not a token server --------------------------------


async def test_an_unreachable_server_fails_every_check() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("Connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        outcome = await run(
            http,
            "http://127.0.0.1:9",
            client_id="app",
            client_secret="a-secret",
            username="alice",
            password="a-password",
        )
    assert outcome.failures == len(ALL)
    assert outcome.reason("health") == (
        "cannot connect to http://127.0.0.1:9: ConnectError: Connection refused"
    )
    assert outcome.reason("no-store-headers") == (
        "server unreachable (ConnectError: Connection refused)"
    )
    assert calls == ["/healthz"]  # no time wasted on the rest


async def test_nonsense_answers_are_failures_with_reasons_not_tracebacks() -> None:
    def nonsense(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200, text="ok")
        if request.url.path == "/oauth2/token" and b"client_credentials" in request.content:
            raise RuntimeError("the transport broke")
        if request.url.path == "/oauth2/revoke":
            raise httpx.ReadTimeout("timed out", request=request)
        if request.url.path == "/oauth2/introspect":
            raise httpx.RemoteProtocolError("peer closed connection", request=request)
        if request.url.path.startswith("/.well-known/"):
            return httpx.Response(200, text="<html>not json</html>")
        return httpx.Response(500, text="Internal Server Error")

    async with httpx.AsyncClient(transport=httpx.MockTransport(nonsense)) as http:
        outcome = await run(http, "http://auth.test", client_id="c", client_secret="s3cr3t-value")
    assert outcome.named("PASS") == set()
    assert outcome.reason("health") == "GET /readyz: HTTP 500"
    assert outcome.reason("discovery") == (
        "GET /.well-known/openid-configuration: HTTP 200 body is not a JSON object"
    )
    assert outcome.reason("token-error-format") == (
        "unknown grant_type: expected HTTP 400 unsupported_grant_type, got HTTP 500"
    )
    assert outcome.reason("client-credentials") == "unexpected RuntimeError: the transport broke"
    assert outcome.reason("access-token-claims") == "needs jwks-hygiene, which failed"
    assert outcome.reason("revocation") == "timed out (ReadTimeout)"
    assert outcome.reason("introspection-auth") == (
        "HTTP error RemoteProtocolError: peer closed connection"
    )
    assert "s3cr3t-value" not in "\n".join(outcome.lines)


async def test_reasons_never_carry_known_secrets() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        # A hostile server that puts the client's credentials into its error code.
        basic = request.headers.get("authorization", "Basic ").removeprefix("Basic ")
        return httpx.Response(400, json={"error": base64.b64decode(basic).decode()})

    async with httpx.AsyncClient(transport=httpx.MockTransport(echo)) as http:
        outcome = await run(http, "http://auth.test", client_id="c", client_secret="hunter2")
    text = "\n".join(outcome.lines)
    assert "HTTP 400 c:***" in text  # the echo is printed (bounded) ...
    assert "hunter2" not in text  # ... and a raw secret never is


# -- the command line -------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    check.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["check", *argv])


@dataclass
class Captured:
    calls: list[dict[str, Any]]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "AUTH_CHECK_CLIENT_ID",
        "AUTH_CHECK_CLIENT_SECRET",
        "AUTH_CHECK_USERNAME",
        "AUTH_CHECK_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_run(clean_env: pytest.MonkeyPatch) -> Captured:
    """``run_checks`` replaced by a recorder; it reports one failure for client ``failing``."""
    captured = Captured([])
    monkeypatch = clean_env

    async def fake(http: httpx.AsyncClient, base_url: str, **kwargs: Any) -> int:
        captured.calls.append({"base_url": base_url, "timeout": http.timeout.read, **kwargs})
        return int(kwargs["client_id"] == "failing")

    monkeypatch.setattr(check, "run_checks", fake)
    return captured


def test_parser_defaults() -> None:
    args = parse("http://auth.test")
    assert args.url == "http://auth.test"
    assert (args.client_id, args.client_secret, args.username) == (None, None, None)
    assert args.password_stdin is False
    assert args.timeout == 10.0


def test_password_from_stdin_first_line(
    fake_run: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pass word\nsecond line\n"))
    argv = ["https://auth.test", "--client-id", "app", "--client-secret", "s"]
    argv += ["--username", "alice", "--password-stdin", "--timeout", "3"]
    assert check.cmd_check(parse(*argv)) == 0
    [call] = fake_run.calls
    assert call["password"] == "pass word"
    assert call["username"] == "alice"
    assert (call["client_id"], call["client_secret"]) == ("app", "s")
    assert call["base_url"] == "https://auth.test"
    assert call["timeout"] == 3.0


def test_password_prompt_on_a_terminal(fake_run: Captured, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(""))
    monkeypatch.setattr("getpass.getpass", lambda prompt: "typed secret")
    argv = ["http://auth.test", "--client-id", "app", "--username", "alice", "--password-stdin"]
    assert check.cmd_check(parse(*argv)) == 0
    assert fake_run.calls[0]["password"] == "typed secret"
    assert fake_run.calls[0]["client_secret"] is None  # a public client


def test_credentials_from_the_environment(
    fake_run: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTH_CHECK_CLIENT_ID", "env-app")
    monkeypatch.setenv("AUTH_CHECK_CLIENT_SECRET", "env-secret")
    monkeypatch.setenv("AUTH_CHECK_USERNAME", "env-user")
    monkeypatch.setenv("AUTH_CHECK_PASSWORD", "env-password")
    assert check.cmd_check(parse("http://auth.test")) == 0
    assert check.cmd_check(parse("http://auth.test", "--client-id", "cli-app")) == 0
    first, second = fake_run.calls
    assert first["client_id"] == "env-app"
    assert (first["client_secret"], first["username"]) == ("env-secret", "env-user")
    assert first["password"] == "env-password"
    assert second["client_id"] == "cli-app"  # the command line wins


def test_any_failure_is_exit_status_one(fake_run: Captured) -> None:
    assert check.cmd_check(parse("http://auth.test", "--client-id", "failing")) == 1


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["--password-stdin"], "pw\n", "error: --password-stdin needs --username"),
        (["--client-id", "a", "--username", "u"], "", "error: --username needs --password-stdin"),
        (["--client-id", "a", "--username", "u", "--password-stdin"], "\n", "error: no password"),
        (["--client-secret", "s"], "", "error: a client secret needs --client-id"),
        (["--username", "u", "--password-stdin"], "pw\n", "error: the user checks need a client"),
        (["--timeout", "0"], "", "error: --timeout must be a positive number"),
    ],
)
def test_bad_options_are_one_error_line(
    fake_run: Captured,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    stdin: str,
    message: str,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert check.cmd_check(parse("http://auth.test", *argv)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(message)
    assert len(err.splitlines()) == 1
    assert fake_run.calls == []


def test_a_url_without_scheme_is_refused(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    assert check.cmd_check(parse("auth.test")) == 1
    assert capsys.readouterr().err.startswith("error: URL must start with http:// or https://")


def test_a_closed_port_is_exit_status_one(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert check.cmd_check(parse(f"http://127.0.0.1:{port}", "--timeout", "5")) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"FAIL health: cannot connect to http://127.0.0.1:{port}")
    assert lines[-1] == f"summary: 0 passed, {len(ALL)} failed, 0 skipped"


# -- issue 19: client authentication metadata and the registration endpoint ------------------

ISSUER = "http://127.0.0.1:8000"
REGISTER = "/oauth2/register"
#: What discovery will publish once issue 19 lands (RFC 8414 §2, RFC 7591, the CIMD draft).
ISSUE_19_METADATA: dict[str, Any] = {
    "registration_endpoint": ISSUER + REGISTER,
    "token_endpoint_auth_methods_supported": [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "client_secret_jwt",
        "none",
    ],
    "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256", "HS256"],
    "client_id_metadata_document_supported": True,
}


#: A member of ``Registrar.metadata`` to leave out of the documents the app serves.
REMOVED: Any = object()


@dataclass
class Registrar:
    """The real app, advertising ``metadata`` in both documents (``REMOVED``: not at all),
    with ``register`` answering at the registration endpoint instead of the app's own, and a
    record of what the check sent there."""

    metadata: dict[str, Any]
    register: Callable[[httpx.Request], httpx.Response]
    seen: list[httpx.Request]

    def __call__(
        self, request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path in BOTH_DOCUMENTS and body is not None:
            merged = {**body, **self.metadata}
            return replace_json(response, {k: v for k, v in merged.items() if v is not REMOVED})
        if request.url.path.startswith(REGISTER):
            self.seen.append(request)
            return self.register(request)
        return response


def registrar(
    register: Callable[[httpx.Request], httpx.Response] | None = None, **metadata: Any
) -> Registrar:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "invalid_token"})

    return Registrar({**ISSUE_19_METADATA, **metadata}, register or refuse, [])


def answering(status: int, body: dict[str, Any] | None = None) -> Registrar:
    def register(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(status, json=body if body is not None else {})

    return registrar(register)


async def without_credentials(app: FastAPI, edit: Edit) -> Outcome:
    async with httpx.AsyncClient(transport=Tamper(app, edit), base_url=ISSUER) as http:
        return await run(http, ISSUER)


async def test_a_server_with_issue_19_metadata_passes_every_check(
    app: FastAPI, setup: Setup
) -> None:
    fake = registrar()
    outcome = await setup.run(Tamper(app, fake))
    assert outcome.failures == 0, outcome.lines
    assert outcome.named("PASS") == set(ALL)
    # One request, carrying nothing a server could register: no token, no metadata.
    (sent,) = fake.seen
    assert (sent.method, str(sent.url)) == ("POST", ISSUER + REGISTER)
    assert sent.content == b"{}"
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers
    assert "cookie" not in sent.headers


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "refusal",
    [
        (401, {"error": "invalid_token"}),
        (401, {}),
        (400, {"error": "invalid_redirect_uri"}),
        (400, {"error": "invalid_client_metadata", "error_description": "redirect_uris"}),
    ],
    ids=["initial-token-required", "401-without-body", "redirect-uri", "client-metadata"],
)
async def test_each_refusal_of_an_empty_registration_passes(
    app: FastAPI, refusal: tuple[int, dict[str, Any]]
) -> None:
    outcome = await without_credentials(app, answering(*refusal))
    assert outcome.results["registration-refuses-empty"] == ("PASS", ""), outcome.lines
    assert outcome.failures == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_without_a_registration_endpoint_there_is_nothing_to_refuse(
    app: FastAPI,
) -> None:
    """AUTH_CLIENT_REGISTRATION=off: none advertised, nothing sent, nothing registered."""
    fake = registrar()
    fake.metadata["registration_endpoint"] = REMOVED
    outcome = await without_credentials(app, fake)
    assert outcome.results["registration-refuses-empty"] == ("PASS", "")
    assert fake.seen == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda: answering(400, {"error": "invalid_request"}),
            "POST registration_endpoint with {}: HTTP 400 invalid_request, expected 400 "
            "invalid_client_metadata or invalid_redirect_uri, or 401",
        ),
        (lambda: answering(400, {}), "with {}: HTTP 400, expected 400 invalid_client_metadata"),
        (lambda: answering(403, {"error": "access_denied"}), "HTTP 403 access_denied, expected"),
        (lambda: answering(404), "HTTP 404, expected 400"),
        (lambda: answering(302), "HTTP 302, expected 400"),
        (lambda: answering(500), "HTTP 500, expected 400"),
        (lambda: answering(503, {"error": "temporarily_unavailable"}), "HTTP 503 temporarily"),
        (
            lambda: answering(200, {"client_id": "x"}),
            "HTTP 200, a client was registered from nothing (and no registration_client_uri",
        ),
        (
            lambda: answering(
                201,
                {
                    "client_id": "x",
                    "registration_client_uri": "https://elsewhere.test/oauth2/register/x",
                    "registration_access_token": "rat-never-printed",
                },
            ),
            "registered from nothing (its registration_client_uri is not under the issuer: "
            "not deleted)",
        ),
    ],
    ids=[
        "other-error",
        "400-without-error",
        "forbidden",
        "not-there",
        "redirect",
        "server-error",
        "unavailable",
        "registered-200",
        "registered-elsewhere",
    ],
)
async def test_an_endpoint_that_does_not_refuse_an_empty_registration_fails(
    app: FastAPI, make: Callable[[], Registrar], reason: str
) -> None:
    fake = make()
    outcome = await without_credentials(app, fake)
    status, seen = outcome.results["registration-refuses-empty"]
    assert status == "FAIL", outcome.lines
    assert reason in seen
    assert outcome.named("FAIL") == {"registration-refuses-empty"}
    assert [r.method for r in fake.seen] == ["POST"]  # nothing deleted outside the issuer
    assert "rat-never-printed" not in "\n".join(outcome.lines)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_client_registered_by_mistake_is_deleted_again(app: FastAPI) -> None:
    """RFC 7592 §2.3 with the registration access token it was given; never printed."""
    token = "rat-" + "x" * 40
    fake = answering(
        201,
        {
            "client_id": "oops",
            "client_secret": "secret-" + "y" * 40,
            "registration_client_uri": ISSUER + REGISTER + "/oops",
            "registration_access_token": token,
        },
    )
    outcome = await without_credentials(app, fake)
    assert outcome.reason("registration-refuses-empty") == (
        "POST registration_endpoint with {}: HTTP 201, a client was registered from nothing "
        "(deleted again)"
    )
    _, delete = fake.seen
    assert (delete.method, str(delete.url)) == ("DELETE", ISSUER + REGISTER + "/oops")
    assert delete.headers["authorization"] == "Bearer " + token
    text = "\n".join(outcome.lines)
    assert token not in text and "y" * 40 not in text

    def refuse_delete(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(401, json={"error": "invalid_token"})
        return httpx.Response(201, json={**post_body, "registration_access_token": token})

    post_body = {"client_id": "oops", "registration_client_uri": ISSUER + REGISTER + "/oops"}
    outcome = await without_credentials(app, registrar(refuse_delete))
    assert outcome.reason("registration-refuses-empty").endswith(
        "(deleting it: HTTP 401 invalid_token)"
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (
            {"token_endpoint_auth_signing_alg_values_supported": None},
            "token_endpoint_auth_signing_alg_values_supported is required with private_key_jwt",
        ),
        (
            {
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_jwt",
                ],
                "token_endpoint_auth_signing_alg_values_supported": None,
            },
            "token_endpoint_auth_signing_alg_values_supported is required with client_secret_jwt",
        ),
        (
            {"token_endpoint_auth_signing_alg_values_supported": ["RS256", "none"]},
            "token_endpoint_auth_signing_alg_values_supported lists none",
        ),
        (
            {"token_endpoint_auth_signing_alg_values_supported": "RS256"},
            "token_endpoint_auth_signing_alg_values_supported is not a list of algorithm names",
        ),
        (
            {"token_endpoint_auth_signing_alg_values_supported": []},
            "is not a list of algorithm names",
        ),
        (
            {"token_endpoint_auth_signing_alg_values_supported": ["RS256", 7]},
            "is not a list of algorithm names",
        ),
        (
            # Without a JWT method the list is optional, but never names none.
            {
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "token_endpoint_auth_signing_alg_values_supported": ["none"],
            },
            "token_endpoint_auth_signing_alg_values_supported lists none",
        ),
        (
            {
                "revocation_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "private_key_jwt",
                ],
                "revocation_endpoint_auth_signing_alg_values_supported": None,
            },
            "revocation_endpoint_auth_signing_alg_values_supported is required with "
            "private_key_jwt",
        ),
        (
            {
                "introspection_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_jwt",
                ],
                "introspection_endpoint_auth_signing_alg_values_supported": ["HS256", "none"],
            },
            "introspection_endpoint_auth_signing_alg_values_supported lists none",
        ),
        (
            {"client_id_metadata_document_supported": "true"},
            "client_id_metadata_document_supported is not a boolean",
        ),
        (
            {"registration_endpoint": "https://elsewhere.test/oauth2/register"},
            "registration_endpoint is not under the issuer",
        ),
        (
            # The issuer's scheme: https for an http issuer is another origin, and back.
            {"registration_endpoint": "https://127.0.0.1:8000/oauth2/register"},
            "registration_endpoint is not under the issuer",
        ),
        (
            {"registration_endpoint": "http://127.0.0.1:8000.evil.test/oauth2/register"},
            "registration_endpoint is not under the issuer",
        ),
        ({"registration_endpoint": 42}, "registration_endpoint is not under the issuer"),
    ],
    ids=[
        "private-key-jwt-without-algs",
        "client-secret-jwt-without-algs",
        "alg-none",
        "algs-not-a-list",
        "algs-empty",
        "algs-not-strings",
        "alg-none-without-jwt-methods",
        "revocation-without-algs",
        "introspection-alg-none",
        "cimd-not-boolean",
        "registration-elsewhere",
        "registration-other-scheme",
        "registration-lookalike-host",
        "registration-not-a-string",
    ],
)
async def test_issue_19_metadata_faults_fail_discovery(
    app: FastAPI, metadata: dict[str, Any], reason: str
) -> None:
    fake = registrar()
    for name, value in metadata.items():
        fake.metadata[name] = REMOVED if value is None else value
    outcome = await without_credentials(app, fake)
    assert outcome.named("FAIL") == {
        "discovery",
        "registration-refuses-empty",
        "dpop-discovery",
        "par-refuses-unauthenticated",
    }
    assert reason in outcome.reason("discovery")
    assert outcome.reason("registration-refuses-empty") == "needs discovery, which failed"
    assert outcome.reason("dpop-discovery") == "needs discovery, which failed"
    assert outcome.reason("par-refuses-unauthenticated") == "needs discovery, which failed"
    assert fake.seen == []  # a URL the documents got wrong is never sent anything


# -- DPoP (RFC 9449) at the token endpoint ---------------------------------------------------

DPOP_ALGS_NAME = "dpop_signing_alg_values_supported"
DPOP_TOKEN_CHECKS = ("dpop-bound-token", "dpop-proof-replay", "dpop-proof-wrong-htu")
DPOP_CHECKS = ("dpop-discovery", *DPOP_TOKEN_CHECKS)


@dataclass
class Sent:
    """One token request that carried a DPoP proof, and what the server answered."""

    proof: str
    status: int
    error: str | None
    body: dict[str, Any] | None

    def part(self, index: int) -> dict[str, Any]:
        segment = self.proof.split(".")[index]
        value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * 4))
        return value


def proofs_seen(log: list[Sent], edit: Edit | None = None) -> Edit:
    """Record every DPoP request at the token endpoint and its answer (after ``edit``)."""

    def record(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if edit is not None:
            response = edit(request, response, body)
        proof = request.headers.get("dpop")
        if request.url.path == TOKEN and proof is not None:
            seen = json.loads(response.content) if response.content else None
            seen = seen if isinstance(seen, dict) else None
            error = seen.get("error") if seen else None
            log.append(Sent(proof, response.status_code, error, seen))
        return response

    return record


class Before(Tamper):
    """``Tamper`` whose app first sees each request through ``change`` (which may drop or
    alter its headers): a server that reads requests differently."""

    def __init__(
        self, app: FastAPI, change: Callable[[httpx.Request], None], edit: Edit | None = None
    ) -> None:
        super().__init__(app, edit)
        self.change = change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.change(request)
        return await super().handle_async_request(request)


def claims_of(proof: str) -> dict[str, Any]:
    return Sent(proof, 0, None, None).part(1)


def ignore_proofs(when: Callable[[str, set[str]], bool]) -> Callable[[httpx.Request], None]:
    """Drop the DPoP header (the app then never sees a proof) when ``when(proof, seen)``."""
    seen: set[str] = set()

    def change(request: httpx.Request) -> None:
        proof = request.headers.get("dpop")
        if request.url.path != TOKEN or proof is None:
            return
        if when(proof, seen):
            del request.headers["dpop"]
        seen.add(proof)

    return change


def advertise(**metadata: Any) -> Edit:
    """Both discovery documents with ``metadata`` (``REMOVED``: the member left out)."""

    def apply(body: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
        merged = {**body, **metadata}
        return {name: value for name, value in merged.items() if value is not REMOVED}

    return rewrite(BOTH_DOCUMENTS, apply)


@pytest.mark.feature("dpop-tokens")
async def test_the_dpop_checks_bind_a_token_and_see_bad_proofs_refused(
    app: FastAPI, setup: Setup
) -> None:
    log: list[Sent] = []
    transport = Tamper(app, proofs_seen(log))
    outcome = await setup.run(transport, user=False)
    assert outcome.failures == 0, outcome.lines
    for name in DPOP_CHECKS:
        assert outcome.results[name] == ("PASS", ""), outcome.lines
    bound, replay, wrong_htu = log
    # A fresh ES256 proof with a public P-256 key, for a POST to the token endpoint.
    header, claims = bound.part(0), bound.part(1)
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"} and header["jwk"]["crv"] == "P-256"
    assert claims["htm"] == "POST"
    assert claims["htu"] == setup.settings.issuer + TOKEN
    assert "nonce" not in claims  # the server asked for none
    assert (bound.status, bound.body and bound.body["token_type"]) == (200, "DPoP")
    # The server did bind the token to that key (what the check compared too).
    assert bound.body is not None
    token_claims = claims_of(bound.body["access_token"])
    assert token_claims["cnf"] == {"jkt": ECKey.import_key(header["jwk"]).thumbprint()}
    # The replay is the very same proof; the wrong htu one is fresh, for another endpoint.
    assert replay.proof == bound.proof
    assert (replay.status, replay.error) == (400, "invalid_dpop_proof")
    assert wrong_htu.part(1)["htu"] == setup.settings.issuer + INTROSPECT
    assert wrong_htu.part(1)["jti"] != claims["jti"]
    assert wrong_htu.part(0)["jwk"] == header["jwk"]
    assert (wrong_htu.status, wrong_htu.error) == (400, "invalid_dpop_proof")
    text = "\n".join(outcome.lines)
    assert bound.body["access_token"] not in text


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_without_dpop_in_discovery_the_dpop_checks_skip(app: FastAPI, setup: Setup) -> None:
    log: list[Sent] = []
    transport = Tamper(app, proofs_seen(log, advertise(**{DPOP_ALGS_NAME: REMOVED})))
    outcome = await setup.run(transport)
    assert outcome.failures == 0, outcome.lines
    reason = (
        "the server does not advertise DPoP (no dpop_signing_alg_values_supported in discovery)"
    )
    for name in DPOP_CHECKS:
        assert outcome.results[name] == ("SKIP", reason), outcome.lines
    assert outcome.named("PASS") == set(ALL) - set(DPOP_CHECKS)
    assert log == []  # not one proof sent


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_without_es256_the_token_checks_skip(app: FastAPI, setup: Setup) -> None:
    log: list[Sent] = []
    edit = advertise(**{DPOP_ALGS_NAME: ["RS256", "PS256", "EdDSA"]})
    outcome = await setup.run(Tamper(app, proofs_seen(log, edit)), user=False)
    assert outcome.results["dpop-discovery"] == ("PASS", "")
    for name in DPOP_TOKEN_CHECKS:
        assert outcome.reason(name) == (
            "ES256 (what check signs proofs with) is not in dpop_signing_alg_values_supported"
        )
    assert outcome.failures == 0
    assert log == []


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            advertise(**{DPOP_ALGS_NAME: ["ES256", "none"]}),
            "dpop_signing_alg_values_supported lists none",
        ),
        (
            advertise(**{DPOP_ALGS_NAME: ["ES256", "NONE"]}),
            "dpop_signing_alg_values_supported lists none",
        ),
        (
            advertise(**{DPOP_ALGS_NAME: ["ES256", "HS256"]}),
            "dpop_signing_alg_values_supported lists the symmetric 'HS256'",
        ),
        (advertise(**{DPOP_ALGS_NAME: "ES256"}), "is not a list of algorithm names"),
        (advertise(**{DPOP_ALGS_NAME: []}), "is not a list of algorithm names"),
        (advertise(**{DPOP_ALGS_NAME: ["ES256", 7]}), "is not a list of algorithm names"),
        (
            rewrite(
                "/.well-known/openid-configuration",
                lambda body, form: {k: v for k, v in body.items() if k != DPOP_ALGS_NAME},
            ),
            "/.well-known/openid-configuration: no dpop_signing_alg_values_supported, though "
            "the other document lists it",
        ),
    ],
    ids=["none", "none-upper-case", "mac", "not-a-list", "empty", "not-strings", "one-document"],
)
async def test_dpop_metadata_faults_fail_dpop_discovery(
    app: FastAPI, setup: Setup, edit: Edit, reason: str
) -> None:
    log: list[Sent] = []
    outcome = await setup.run(Tamper(app, proofs_seen(log, edit)), user=False)
    assert outcome.named("FAIL") == set(DPOP_CHECKS), outcome.lines
    assert reason in outcome.reason("dpop-discovery")
    for name in ("dpop-bound-token", "dpop-proof-wrong-htu"):
        assert outcome.reason(name) == "needs dpop-discovery, which failed"
    assert outcome.reason("dpop-proof-replay") == "needs dpop-bound-token, which failed"
    assert outcome.failures == len(DPOP_CHECKS)
    assert log == []


def forged_binding(cnf: Any) -> Edit:
    """Token responses to DPoP requests say DPoP, with ``cnf`` (``REMOVED``: none) in the
    access token's payload (its signature is then wrong: access-token-claims never sees
    these tokens, the bound-token check reads the binding only)."""

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path != TOKEN or "dpop" not in request.headers or body is None:
            return response
        if "access_token" not in body:
            return response
        head, _, signature = body["access_token"].split(".")
        claims = {k: v for k, v in claims_of(body["access_token"]).items() if k != "cnf"}
        if cnf is not REMOVED:
            claims["cnf"] = cnf
        token = f"{head}.{b64json(claims)}.{signature}"
        return replace_json(response, {**body, "access_token": token, "token_type": "DPoP"})

    return edit


def refuse_replays_with(error: str) -> Edit:
    """A server that answers a proof it saw before with 400 ``error``."""
    seen: set[str] = set()

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        proof = request.headers.get("dpop")
        if request.url.path != TOKEN or proof is None:
            return response
        if proof in seen:
            return httpx.Response(400, headers={"Cache-Control": "no-store"}, json={"error": error})
        seen.add(proof)
        return response

    return edit


def other_htu(proof: str, seen: set[str]) -> bool:
    return not str(claims_of(proof)["htu"]).endswith(TOKEN)


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("change", "edit", "failing"),
    [
        pytest.param(
            ignore_proofs(lambda proof, seen: True),
            None,
            {
                "dpop-bound-token": "client_credentials grant with a DPoP proof: token_type is "
                "'Bearer', expected DPoP",
                "dpop-proof-replay": "needs dpop-bound-token, which failed",
                "dpop-proof-wrong-htu": "a DPoP proof with htu /oauth2/introspect: accepted "
                "(HTTP 200, a token was issued)",
            },
            id="proofs-ignored",
        ),
        pytest.param(
            None,
            forged_binding(REMOVED),
            {
                "dpop-bound-token": "the access token has no cnf.jkt (it is not bound)",
                "dpop-proof-replay": "needs dpop-bound-token, which failed",
            },
            id="says-dpop-binds-nothing",
        ),
        pytest.param(
            None,
            forged_binding({"jkt": "c29tZW9uZSBlbHNlJ3Mga2V5"}),
            {
                "dpop-bound-token": "cnf.jkt is 'c29tZW9uZSBlbHNlJ3Mga2V5', not the RFC 7638 "
                "thumbprint of the proof key",
                "dpop-proof-replay": "needs dpop-bound-token, which failed",
            },
            id="bound-to-another-key",
        ),
        pytest.param(
            ignore_proofs(lambda proof, seen: proof in seen),
            None,
            {
                "dpop-proof-replay": "a replayed DPoP proof (same jti): accepted (HTTP 200, a "
                "token was issued)"
            },
            id="replay-accepted",
        ),
        pytest.param(
            None,
            refuse_replays_with("invalid_request"),
            {
                "dpop-proof-replay": "a replayed DPoP proof (same jti): expected HTTP 400 "
                "invalid_dpop_proof, got HTTP 400 invalid_request"
            },
            id="replay-wrong-error",
        ),
        pytest.param(
            ignore_proofs(other_htu),
            None,
            {
                "dpop-proof-wrong-htu": "a DPoP proof with htu /oauth2/introspect: accepted "
                "(HTTP 200, a token was issued)"
            },
            id="htu-not-compared",
        ),
    ],
)
async def test_a_dpop_fault_fails_exactly_its_checks(
    app: FastAPI,
    setup: Setup,
    change: Callable[[httpx.Request], None] | None,
    edit: Edit | None,
    failing: dict[str, str],
) -> None:
    transport = Before(app, change or (lambda request: None), edit)
    outcome = await setup.run(transport, user=False)
    assert outcome.named("FAIL") == set(failing), outcome.lines
    for name, fragment in failing.items():
        assert fragment in outcome.reason(name), outcome.lines
    assert outcome.failures == len(failing)
    text = "\n".join(outcome.lines)
    for value in [setup.client_secret, *transport.tokens]:
        assert value and value not in text


# -- DPoP nonces (RFC 9449 §8): one retry with the server's nonce -----------------------------


async def nonce_setup(settings: Settings, shared_apps: SharedApps) -> tuple[FastAPI, Setup]:
    """The app with ``AUTH_DPOP_REQUIRE_NONCE`` on, and a client of its own."""
    nonce_settings = settings.model_copy(update={"dpop_require_nonce": True})
    application: FastAPI = await shared_apps.get(nonce_settings)
    await reset_app(application)
    state: AppState = application.state.auth
    async with state.db.sessions() as db:
        created = await manage.create_client(
            db, client_id="check-app", grants=["client_credentials"], scope="api"
        )
        await db.commit()
    return application, Setup(nonce_settings, "check-app", created.secret, "", "")


@pytest.mark.feature("dpop-tokens")
async def test_a_server_that_wants_a_nonce_gets_it_on_the_retry(
    settings: Settings, shared_apps: SharedApps
) -> None:
    application, nonce_setup_ = await nonce_setup(settings, shared_apps)
    log: list[Sent] = []
    outcome = await nonce_setup_.run(Tamper(application, proofs_seen(log)), user=False)
    assert outcome.failures == 0, outcome.lines
    for name in DPOP_CHECKS:
        assert outcome.results[name] == ("PASS", ""), outcome.lines
    asked, bound, replay, wrong_htu = log
    assert (asked.status, asked.error) == (400, "use_dpop_nonce")
    assert "nonce" not in asked.part(1)
    # The retry: a new proof (new jti) carrying the nonce the server sent.
    nonce = application.state.oauth.dpop.current_nonce()
    assert bound.part(1)["nonce"] == nonce
    assert bound.part(1)["jti"] != asked.part(1)["jti"]
    assert bound.status == 200
    assert replay.proof == bound.proof
    assert (replay.status, replay.error) == (400, "invalid_dpop_proof")
    # Later proofs carry the newest nonce at once (§8.2: the token response sent it).
    assert wrong_htu.part(1)["nonce"] == nonce
    assert (wrong_htu.status, wrong_htu.error) == (400, "invalid_dpop_proof")


def demand_nonce(
    when: Callable[[str, int], bool], nonce: Callable[[int], str] | None
) -> tuple[Edit, list[str]]:
    """Answer the ``count``-th DPoP request where ``when(proof, count)`` with 400
    use_dpop_nonce and, unless ``nonce`` is None, ``DPoP-Nonce: nonce(count)``; the nonces
    handed out are listed."""
    handed: list[str] = []
    counter = [0]

    def edit(
        request: httpx.Request, response: httpx.Response, body: dict[str, Any] | None
    ) -> httpx.Response:
        proof = request.headers.get("dpop")
        if request.url.path != TOKEN or proof is None:
            return response
        counter[0] += 1
        if not when(proof, counter[0]):
            return response
        headers = {"Cache-Control": "no-store"}
        if nonce is not None:
            handed.append(nonce(counter[0]))
            headers["DPoP-Nonce"] = handed[-1]
        return httpx.Response(400, headers=headers, json={"error": "use_dpop_nonce"})

    return edit, handed


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_nonce_demanded_again_after_the_retry_fails(app: FastAPI, setup: Setup) -> None:
    edit, handed = demand_nonce(lambda proof, count: True, lambda count: f"nonce-{count}")
    log: list[Sent] = []
    outcome = await setup.run(Tamper(app, proofs_seen(log, edit)), user=False)
    assert outcome.reason("dpop-bound-token") == (
        "client_credentials grant with a DPoP proof: HTTP 400 use_dpop_nonce again, with the "
        "nonce it sent"
    )
    assert outcome.reason("dpop-proof-wrong-htu") == (
        "a DPoP proof with htu /oauth2/introspect: HTTP 400 use_dpop_nonce again, with the "
        "nonce it sent"
    )
    # One retry each, carrying the nonce just handed out; never a third request.
    assert [sent.part(1).get("nonce") for sent in log] == [
        None,
        handed[0],
        handed[1],  # the next check starts with the newest nonce it was sent
        handed[2],
    ]
    assert outcome.named("FAIL") == set(DPOP_TOKEN_CHECKS)


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_use_dpop_nonce_without_a_nonce_fails(app: FastAPI, setup: Setup) -> None:
    edit, _ = demand_nonce(lambda proof, count: count == 1, None)
    outcome = await setup.run(Tamper(app, edit), user=False)
    assert outcome.reason("dpop-bound-token") == (
        "client_credentials grant with a DPoP proof: HTTP 400 use_dpop_nonce without a "
        "usable DPoP-Nonce header"
    )
    assert outcome.named("FAIL") == {"dpop-bound-token", "dpop-proof-replay"}


@pytest.mark.feature("dpop-tokens")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_replay_asked_for_a_nonce_is_resent_with_the_same_jti(
    app: FastAPI, setup: Setup
) -> None:
    """The server wants a newer nonce before it looks at the replay: the same jti goes again,
    under the nonce (a real one of the app's), and must still be refused as a replay."""
    nonce = app.state.oauth.dpop.current_nonce()
    seen: set[str] = set()

    def replay_first(proof: str, count: int) -> bool:
        if proof in seen:
            return True
        seen.add(proof)
        return False

    edit, _ = demand_nonce(replay_first, lambda count: nonce)

    log: list[Sent] = []
    outcome = await setup.run(Tamper(app, proofs_seen(log, edit)), user=False)
    assert outcome.failures == 0, outcome.lines
    bound, replay, resent, _ = log
    assert replay.proof == bound.proof and replay.error == "use_dpop_nonce"
    assert resent.part(1)["jti"] == bound.part(1)["jti"]
    assert resent.part(1)["nonce"] == nonce
    assert (resent.status, resent.error) == (400, "invalid_dpop_proof")
    assert outcome.results["dpop-proof-replay"] == ("PASS", "")


# -- a FAPI 2.0 server (AUTH_FAPI2) ----------------------------------------------------------

FAPI2_SHAPE = {
    "require_pushed_authorization_requests": True,
    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    "revocation_endpoint_auth_methods_supported": ["private_key_jwt"],
    "introspection_endpoint_auth_methods_supported": ["private_key_jwt"],
    "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
}


@pytest.mark.feature("fapi2")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (
            {"grant_types_supported": ["authorization_code", "password", "client_credentials"]},
            "grant_types_supported lacks one of refresh_token, client_credentials",
        ),
        (
            {"grant_types_supported": ["password", "refresh_token", "client_credentials"]},
            "a FAPI 2.0 server lists the password grant",
        ),
        (
            {"revocation_endpoint_auth_methods_supported": ["client_secret_basic"]},
            "revocation_endpoint_auth_methods_supported lacks private_key_jwt",
        ),
        (
            # Not FAPI-shaped any more (PAR not required): the baseline applies again.
            {"require_pushed_authorization_requests": False},
            "grant_types_supported lacks one of password",
        ),
    ],
    ids=["fapi-without-refresh", "fapi-with-password", "fapi-secret-revocation", "not-fapi"],
)
async def test_a_fapi2_server_is_held_to_the_profile_not_the_baseline(
    app: FastAPI, metadata: dict[str, Any], reason: str
) -> None:
    shaped = await without_credentials(app, advertise(**FAPI2_SHAPE))
    assert "discovery" in shaped.named("PASS"), shaped.lines
    outcome = await without_credentials(app, advertise(**{**FAPI2_SHAPE, **metadata}))
    assert "discovery" in outcome.named("FAIL"), outcome.lines
    assert reason in outcome.reason("discovery")


# -- PAR (RFC 9126) ----------------------------------------------------------------------------

PAR_ENDPOINT = "pushed_authorization_request_endpoint"


def answer_par(status: int, body: dict[str, Any]) -> Edit:
    """The pushed-request endpoint answering ``status`` and ``body``, whatever was sent."""

    def edit(
        request: httpx.Request, response: httpx.Response, form: dict[str, Any] | None
    ) -> httpx.Response:
        if request.url.path == "/oauth2/par":
            return httpx.Response(status, json=body, request=request)
        return response

    return edit


@pytest.mark.feature("par")
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_par_check_passes_skips_and_fails(app: FastAPI) -> None:
    outcome = await without_credentials(app, advertise())
    assert outcome.results["par-refuses-unauthenticated"] == ("PASS", "")
    assert await rows_of_pushed_requests(app) == 0
    skipped = await without_credentials(app, advertise(**{PAR_ENDPOINT: REMOVED}))
    assert skipped.results["par-refuses-unauthenticated"] == (
        "SKIP",
        f"the server does not advertise PAR (no {PAR_ENDPOINT} in discovery)",
    )
    stored = await without_credentials(
        app, answer_par(201, {"request_uri": "urn:ietf:params:oauth:request_uri:x"})
    )
    assert stored.results["par-refuses-unauthenticated"][0] == "FAIL"
    reason = stored.reason("par-refuses-unauthenticated")
    assert "stored for a client nobody authenticated" in reason
    wrong = await without_credentials(app, answer_par(400, {"error": "invalid_request"}))
    assert wrong.reason("par-refuses-unauthenticated") == (
        f"POST {PAR_ENDPOINT} for an unknown client: HTTP 400 invalid_request, "
        "expected 401 invalid_client"
    )


async def rows_of_pushed_requests(app: FastAPI) -> int:
    state: AppState = app.state.auth
    async with state.db.sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(PushedRequest)) or 0)


@pytest.mark.feature("mfa-policy")
async def test_an_account_with_a_second_factor_is_skipped_with_the_reason(
    app: FastAPI, settings: Settings, make_client: MakeClient, make_user: MakeUser, state: AppState
) -> None:
    """The password grant refuses an account that signs in with a second factor (here: a
    one-time code app): ``check`` says so, rather than a bare invalid_grant that reads as a
    wrong password."""
    creds = await make_client("check-mfa", grants=["password", "refresh_token"])
    user = await make_user("checker", PASSWORD)
    async with state.db.sessions() as db:
        db.add(TotpFactor(user_id=user.id, secret_sealed="x", confirmed_at=1))
        await db.commit()
    setup = Setup(settings, creds.client_id, creds.secret, user.username, user.password)
    outcome = await setup.run(Tamper(app))
    assert outcome.failures == 0, outcome.lines
    assert outcome.reason("password-grant") == (
        "the account signs in with a second factor, which the password grant cannot ask for "
        "(give an account without one, or leave out --username)"
    )
