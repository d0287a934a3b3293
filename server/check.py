"""``python -m server check URL``: a self-test of a running server (SPEC.md, "Operator contract").

Each check is an async function registered with ``@check(name)``, run in registration order
against the server at ``URL`` over HTTP only (it needs no database, no keys, no settings).
It returns to pass, raises ``CheckFailed`` to fail or ``CheckSkipped`` when the credentials it
needs were not given (or the client is not allowed the grant). Anything else it raises is a
failure with a one-line reason, never a traceback. Checks share a ``Context``: tokens obtained
by one check are reused by later ones, which name the check they depend on (``ctx.need``).

Output is one line per check, ``PASS name`` / ``FAIL name: why`` / ``SKIP name: why``, then
``summary: P passed, F failed, S skipped``. Reasons carry status codes and OAuth error codes,
never a body, a secret, a password or a token (``Context.redact`` is the last safety net).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO
from urllib.parse import quote

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path, not a password)
REVOKE_PATH = "/oauth2/revoke"
INTROSPECT_PATH = "/oauth2/introspect"
JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATHS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")
#: Endpoint metadata (RFC 8414 §2) and the fixed path each must point to (SPEC.md, Endpoints).
ENDPOINTS = {
    "token_endpoint": TOKEN_PATH,
    "jwks_uri": JWKS_PATH,
    "revocation_endpoint": REVOKE_PATH,
    "introspection_endpoint": INTROSPECT_PATH,
}
GRANTS = ("password", "refresh_token", "client_credentials")
AUTH_METHOD_LISTS = (
    "token_endpoint_auth_methods_supported",
    "revocation_endpoint_auth_methods_supported",
    "introspection_endpoint_auth_methods_supported",
)
#: RFC 7518 §6.3.2: the private members of an RSA JWK; none may be published.
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
MIN_RSA_BITS = 2048
#: 256 bits in base64url (SPEC.md: refresh tokens carry at least 256 bits).
MIN_REFRESH_TOKEN_CHARS = 43
#: Tolerated difference between this machine's clock and the server's.
CLOCK_SKEW = 120
INACTIVE = {"active": False}
REASON_LENGTH = 200
MIN_REDACTED_LENGTH = 4

Status = Literal["PASS", "FAIL", "SKIP"]
CheckFn = Callable[["Context"], Awaitable[None]]


class CheckFailed(Exception):
    """The server does not do what SPEC.md says; the message says what was seen."""


class CheckSkipped(Exception):
    """The check needs credentials that were not given, or a grant the client lacks."""


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFn


CHECKS: list[Check] = []


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn`` as the check ``name``; checks run in the order they are defined."""

    def register(fn: CheckFn) -> CheckFn:
        assert all(c.name != name for c in CHECKS), name
        CHECKS.append(Check(name, fn))
        return fn

    return register


@dataclass
class Family:
    """One password-grant sign-in: its newest access token and refresh token."""

    access_token: str
    refresh_token: str | None
    scope: str


@dataclass
class Context:
    http: httpx.AsyncClient
    base_url: str
    client_id: str | None
    client_secret: str | None
    username: str | None
    password: str | None
    outcomes: dict[str, tuple[Status, str]] = field(default_factory=dict)
    #: Set when the server cannot be reached at all: the remaining checks fail at once.
    unreachable: str | None = None
    #: kid -> public key, from a JWKS that passed ``jwks-hygiene``.
    keys: dict[str, RSAKey] = field(default_factory=dict)
    #: The access token of ``client-credentials``.
    client_token: str | None = None
    #: The sign-in of ``password-grant``; ``refresh-rotation`` advances it.
    family: Family | None = None
    #: (request, Cache-Control) of every response that must carry ``no-store``.
    cache_log: list[tuple[str, str]] = field(default_factory=list)
    #: Values that must never appear in the output.
    sensitive: set[str] = field(default_factory=set)

    # -- prerequisites ------------------------------------------------------------

    def need(self, name: str) -> None:
        """Go on only if the check ``name`` passed; skip if it skipped (same reason)."""
        status, reason = self.outcomes.get(name, ("FAIL", ""))
        if status == "SKIP":
            raise CheckSkipped(reason)
        if status != "PASS":
            raise CheckFailed(f"needs {name}, which failed")

    def need_any(self, *names: str) -> None:
        """Go on if at least one of ``names`` passed."""
        statuses = [self.outcomes.get(name, ("FAIL", ""))[0] for name in names]
        if "PASS" in statuses:
            return
        if all(status == "SKIP" for status in statuses):
            raise CheckSkipped(f"needs {' or '.join(names)}, which were skipped")
        raise CheckFailed(f"needs {' or '.join(names)}, which failed")

    def need_client(self) -> str:
        if self.client_id is None:
            raise CheckSkipped("no client given (--client-id, AUTH_CHECK_CLIENT_ID)")
        return self.client_id

    def need_confidential_client(self) -> str:
        client_id = self.need_client()
        if self.client_secret is None:
            raise CheckSkipped("needs a confidential client (--client-secret not given)")
        return client_id

    def need_user(self) -> tuple[str, str]:
        self.need_client()
        if self.username is None or self.password is None:
            raise CheckSkipped("no user given (--username, AUTH_CHECK_USERNAME)")
        return self.username, self.password

    # -- HTTP ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    async def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.get(self.url(path), headers=headers)

    async def post(
        self,
        path: str,
        data: Mapping[str, str | list[str]],
        *,
        auth: bool | tuple[str, str] = True,
    ) -> httpx.Response:
        """POST a form; ``auth=True`` authenticates as the configured client (if any):
        HTTP Basic for a confidential client, ``client_id`` in the form for a public one."""
        form: dict[str, str | list[str]] = dict(data)
        headers: dict[str, str] = {}
        if isinstance(auth, tuple):
            headers["Authorization"] = basic_auth(*auth)
        elif auth and self.client_id is not None:
            if self.client_secret is not None:
                headers["Authorization"] = basic_auth(self.client_id, self.client_secret)
            else:
                form["client_id"] = self.client_id
        response = await self.http.post(self.url(path), data=form, headers=headers)
        # SPEC.md: no-store on every token response, success or error, and on introspection.
        if path in (TOKEN_PATH, INTROSPECT_PATH):
            grant = form.get("grant_type")
            what = f"grant_type={printable(str(grant), 40)}" if grant is not None else "form"
            label = f"POST {path} ({what}) -> {response.status_code}"
            self.cache_log.append((label, response.headers.get("cache-control", "")))
        return response

    async def token(self, data: dict[str, str], what: str) -> dict[str, Any]:
        """A successful token response (RFC 6749 §5.1), or ``CheckFailed``."""
        response = await self.post(TOKEN_PATH, data)
        return self.token_body(response, what)

    def token_body(self, response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code == 400 and error_code(response) == "unauthorized_client":
            raise CheckSkipped(f"the client is not allowed the grant ({what})")
        if response.status_code != 200:
            raise CheckFailed(f"{what}: {describe(response)}")
        body = json_object(response, what)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise CheckFailed(f"{what}: no access_token in the response")
        self.sensitive.add(access_token)
        refresh_token = body.get("refresh_token")
        if isinstance(refresh_token, str) and refresh_token:
            self.sensitive.add(refresh_token)
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise CheckFailed(f"{what}: token_type is {short(token_type)}, expected Bearer")
        expires_in = body.get("expires_in")
        if type(expires_in) is not int or expires_in <= 0:
            raise CheckFailed(f"{what}: expires_in is {short(expires_in)}, expected seconds > 0")
        return body

    async def introspect(self, token: str, hint: str | None = None) -> httpx.Response:
        data = {"token": token} if hint is None else {"token": token, "token_type_hint": hint}
        return await self.post(INTROSPECT_PATH, data)

    async def expect_inactive(self, token: str, what: str) -> None:
        response = await self.introspect(token)
        if response.status_code != 200:
            raise CheckFailed(f"introspecting {what}: {describe(response)}, expected 200")
        body = json_object(response, f"introspecting {what}")
        if body != INACTIVE:
            seen = "active" if body.get("active") is True else "not exactly {active: false}"
            raise CheckFailed(f"introspecting {what}: {seen}, expected {{active: false}}")

    async def sign_in(self) -> dict[str, Any]:
        username, password = self.need_user()
        data = {"grant_type": "password", "username": username, "password": password}
        return await self.token(data, "password grant")

    def redact(self, text: str) -> str:
        # Values too short to be real secrets would mangle every message; none is printed anyway.
        for value in sorted(self.sensitive, key=len, reverse=True):
            if len(value) >= MIN_REDACTED_LENGTH:
                text = text.replace(value, "***")
        return text


# -- small helpers ---------------------------------------------------------------------


def basic_auth(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts form-urlencoded before Base64.
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def printable(text: str, limit: int) -> str:
    """``text`` on one line, without control characters, at most ``limit`` characters."""
    text = "".join(ch if ch.isprintable() else "?" for ch in re.sub(r"\s+", " ", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: object, limit: int = 60) -> str:
    """A bounded rendering of a value taken from a response (``repr``: types stay visible)."""
    return printable(repr(value), limit)


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def error_code(response: httpx.Response) -> str | None:
    body = parse_json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None


def describe(response: httpx.Response) -> str:
    """Status and OAuth error code: never the body, which may hold tokens."""
    text = f"HTTP {response.status_code}"
    error = error_code(response)
    if error is not None:
        text += " " + printable(error, 40)
    if response.status_code == 429:
        retry = printable(response.headers.get("retry-after", "?"), 20)
        text += f" (rate limited, Retry-After {retry}; run the check again later)"
    return text


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    body = parse_json(response)
    if not isinstance(body, dict):
        raise CheckFailed(f"{what}: HTTP {response.status_code} body is not a JSON object")
    return body


def expect_error(response: httpx.Response, status: int, error: str, what: str) -> dict[str, Any]:
    if response.status_code != status or error_code(response) != error:
        raise CheckFailed(f"{what}: expected HTTP {status} {error}, got {describe(response)}")
    return json_object(response, what)


def cache_directives(value: str) -> dict[str, str]:
    directives: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.lower()] = argument.strip().strip('"')
    return directives


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(data: dict[str, Any]) -> str:
    return b64url_encode(json.dumps(data, separators=(",", ":")).encode())


def unverified_part(token: str, index: int, what: str) -> dict[str, Any]:
    """The JSON header (0) or payload (1) of a compact JWS, without verifying it."""
    parts = token.split(".")
    if len(parts) != 3:
        raise CheckFailed(f"{what} is not a compact JWT (expected 3 parts, got {len(parts)})")
    try:
        value = json.loads(b64url_decode(parts[index]))
    except ValueError as exc:
        raise CheckFailed(f"{what}: part {index + 1} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise CheckFailed(f"{what}: part {index + 1} is not a JSON object")
    return value


def int_claim(claims: dict[str, Any], name: str, what: str) -> int:
    value = claims.get(name)
    if type(value) is not int:  # bool is an int subclass; true is not a time
        raise CheckFailed(f"{what}: claim {name} is {short(value)}, expected an integer")
    return value


def str_claim(claims: dict[str, Any], name: str, what: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise CheckFailed(f"{what}: claim {name} is {short(value)}, expected a string")
    return value


def scope_of(body: dict[str, Any]) -> str:
    """The granted scope: the response's ``scope``, else the access token's claim."""
    scope = body.get("scope")
    if isinstance(scope, str):
        return scope
    claimed = unverified_part(str(body["access_token"]), 1, "the access token").get("scope")
    return claimed if isinstance(claimed, str) else ""


# -- the checks ------------------------------------------------------------------------


@check("health")
async def check_health(ctx: Context) -> None:
    """/healthz (liveness) and /readyz (database and keys) answer 200."""
    for path in ("/healthz", "/readyz"):
        response = await ctx.get(path)
        if response.status_code != 200:
            raise CheckFailed(f"GET {path}: HTTP {response.status_code}")


@check("discovery")
async def check_discovery(ctx: Context) -> None:
    """Both metadata documents (RFC 8414, OIDC Discovery) agree and point at this server."""
    documents: list[dict[str, Any]] = []
    for path in DISCOVERY_PATHS:
        response = await ctx.get(path)
        if response.status_code != 200:
            raise CheckFailed(f"GET {path}: HTTP {response.status_code}")
        documents.append(json_object(response, f"GET {path}"))
    oidc, oauth = documents
    for name in sorted(oidc.keys() & oauth.keys()):
        if oidc[name] != oauth[name]:
            raise CheckFailed(f"the two documents disagree on {name}")
    for path, doc in zip(DISCOVERY_PATHS, documents, strict=True):
        issuer = doc.get("issuer")
        if issuer != ctx.base_url:
            raise CheckFailed(f"{path}: issuer is {short(issuer)}, expected {ctx.base_url!r}")
        for name, endpoint in ENDPOINTS.items():
            if doc.get(name) != ctx.base_url + endpoint:
                raise CheckFailed(f"{path}: {name} is {short(doc.get(name))}")
        for name, value in doc.items():
            # RFC 8414 §2: every endpoint of this server lives under its issuer.
            under = isinstance(value, str) and value.startswith(ctx.base_url + "/")
            if name.endswith("_endpoint") and not under:
                raise CheckFailed(f"{path}: {name} is not under the issuer")
        grants = doc.get("grant_types_supported")
        if not isinstance(grants, list) or not set(GRANTS) <= set(grants):
            raise CheckFailed(f"{path}: grant_types_supported lacks one of {', '.join(GRANTS)}")
        for name in AUTH_METHOD_LISTS:
            methods = doc.get(name)
            if not isinstance(methods, list) or "client_secret_basic" not in methods:
                raise CheckFailed(f"{path}: {name} lacks client_secret_basic")


@check("jwks-hygiene")
async def check_jwks_hygiene(ctx: Context) -> None:
    """The JWKS holds public RS256 signing keys only: kid, use sig, >= 2048 bits, unique kids."""
    response = await ctx.get(JWKS_PATH)
    if response.status_code != 200:
        raise CheckFailed(f"GET {JWKS_PATH}: HTTP {response.status_code}")
    keys = json_object(response, f"GET {JWKS_PATH}").get("keys")
    if not isinstance(keys, list) or not keys:
        raise CheckFailed("no keys in the JWKS")
    found: dict[str, RSAKey] = {}
    for index, key in enumerate(keys):
        if not isinstance(key, dict):
            raise CheckFailed(f"key #{index} is not a JSON object")
        kid = key.get("kid")
        label = f"key {short(kid, 50)}" if isinstance(kid, str) else f"key #{index}"
        leaked = [member for member in PRIVATE_MEMBERS if member in key]
        if leaked:
            raise CheckFailed(f"{label} publishes private member(s) {', '.join(leaked)}")
        if not isinstance(kid, str) or not kid:
            raise CheckFailed(f"{label} has no kid")
        if kid in found:
            raise CheckFailed(f"{label} appears twice")
        for name, expected in (("kty", "RSA"), ("use", "sig"), ("alg", "RS256")):
            if key.get(name) != expected:
                raise CheckFailed(f"{label}: {name} is {short(key.get(name))}, expected {expected}")
        try:
            bits = int.from_bytes(b64url_decode(str(key.get("n", ""))), "big").bit_length()
        except ValueError as exc:
            raise CheckFailed(f"{label}: n is not base64url") from exc
        if bits < MIN_RSA_BITS:
            raise CheckFailed(f"{label} has a {bits}-bit modulus, expected >= {MIN_RSA_BITS}")
        try:
            found[kid] = RSAKey.import_key(key)
        except (ValueError, JoseError) as exc:
            raise CheckFailed(f"{label} is not a valid RSA public key") from exc
    ctx.keys = found


@check("jwks-cache")
async def check_jwks_cache(ctx: Context) -> None:
    """The JWKS is cacheable (public, max-age > 0) and revalidates with its ETag (304)."""
    response = await ctx.get(JWKS_PATH)
    if response.status_code != 200:
        raise CheckFailed(f"GET {JWKS_PATH}: HTTP {response.status_code}")
    cache_control = response.headers.get("cache-control", "")
    directives = cache_directives(cache_control)
    max_age = directives.get("max-age", "")
    numeric = max_age.isascii() and max_age.isdigit()  # "²" is a digit to isdigit(), not int()
    if "public" not in directives or not numeric or int(max_age) <= 0:
        raise CheckFailed(f"Cache-Control is {short(cache_control)}, expected public, max-age=N")
    etag = response.headers.get("etag")
    if not etag:
        raise CheckFailed("no ETag header")
    again = await ctx.get(JWKS_PATH, headers={"If-None-Match": etag})
    if again.status_code != 304:
        raise CheckFailed(f"If-None-Match with the ETag: HTTP {again.status_code}, expected 304")


@check("token-error-format")
async def check_token_error_format(ctx: Context) -> None:
    """RFC 6749 §5.2 errors as JSON: unknown, missing and duplicated grant_type."""
    twice = ["client_credentials", "client_credentials"]
    cases: list[tuple[dict[str, str | list[str]], str, str]] = [
        ({"grant_type": "check-nonsense"}, "unsupported_grant_type", "unknown grant_type"),
        ({"scope": "check"}, "invalid_request", "missing grant_type"),
        # SPEC.md, Errors; RFC 6749 §3.2: "parameters MUST NOT be included more than once".
        ({"grant_type": twice}, "invalid_request", "grant_type sent twice"),
    ]
    for data, error, what in cases:
        response = await ctx.post(TOKEN_PATH, data)
        body = expect_error(response, 400, error, what)
        if not response.headers.get("content-type", "").startswith("application/json"):
            raise CheckFailed(f"{what}: Content-Type is not application/json")
        description = body.get("error_description")
        if description is not None and not isinstance(description, str):
            raise CheckFailed(f"{what}: error_description is not a string")


@check("invalid-client")
async def check_invalid_client(ctx: Context) -> None:
    """A wrong client secret and an unknown client: 401 invalid_client with WWW-Authenticate."""
    wrong = "check-wrong-" + secrets.token_urlsafe(16)
    cases = [(f"check-unknown-{secrets.token_hex(6)}", "unknown client")]
    if ctx.client_id is not None:
        cases.insert(0, (ctx.client_id, "wrong client secret"))
    for client_id, what in cases:
        data = {"grant_type": "client_credentials"}
        response = await ctx.post(TOKEN_PATH, data, auth=(client_id, wrong))
        expect_error(response, 401, "invalid_client", what)
        # RFC 6749 §5.2: the challenge matches the scheme the client used (Basic).
        if not response.headers.get("www-authenticate", "").lower().startswith("basic"):
            raise CheckFailed(f"{what}: 401 without a WWW-Authenticate: Basic header")


@check("client-credentials")
async def check_client_credentials(ctx: Context) -> None:
    """RFC 6749 §4.4: an access token and no refresh token."""
    ctx.need_confidential_client()
    body = await ctx.token({"grant_type": "client_credentials"}, "client_credentials grant")
    if "refresh_token" in body:
        raise CheckFailed("client_credentials issued a refresh_token (RFC 6749 §4.4.3)")
    ctx.client_token = str(body["access_token"])


@check("password-grant")
async def check_password_grant(ctx: Context) -> None:
    """RFC 6749 §4.3: an access token and, for a refreshing client, a 256-bit refresh token."""
    body = await ctx.sign_in()
    refresh_token = body.get("refresh_token")
    if refresh_token is not None:
        if not isinstance(refresh_token, str):
            raise CheckFailed("refresh_token is not a string")
        if len(refresh_token) < MIN_REFRESH_TOKEN_CHARS:
            raise CheckFailed(f"refresh_token has {len(refresh_token)} characters (< 256 bits)")
    ctx.family = Family(str(body["access_token"]), refresh_token, scope_of(body))


@check("access-token-claims")
async def check_access_token_claims(ctx: Context) -> None:
    """RFC 9068 access tokens: RS256, typ at+jwt, a published kid, valid signature and claims."""
    ctx.need("jwks-hygiene")
    ctx.need_any("client-credentials", "password-grant")
    if ctx.client_token is not None:
        verify_access_token(ctx, ctx.client_token, "client_credentials token", user=False)
    if ctx.family is not None:
        verify_access_token(ctx, ctx.family.access_token, "password-grant token", user=True)


def verify_access_token(ctx: Context, token: str, what: str, *, user: bool) -> dict[str, Any]:
    header = unverified_part(token, 0, what)
    if header.get("alg") != "RS256":
        raise CheckFailed(f"{what}: alg is {short(header.get('alg'))}, expected RS256")
    typ = header.get("typ")
    # RFC 9068 §2.1 (RFC 7515 §4.1.9: compared case-insensitively, "application/" optional).
    if not isinstance(typ, str) or typ.lower() not in ("at+jwt", "application/at+jwt"):
        raise CheckFailed(f"{what}: typ is {short(typ)}, expected at+jwt")
    kid = header.get("kid")
    key = ctx.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise CheckFailed(f"{what}: kid {short(kid)} is not in the JWKS")
    try:
        claims = jwt.decode(token, key, algorithms=["RS256"]).claims
    except JoseError as exc:
        raise CheckFailed(f"{what}: the signature does not verify") from exc
    if claims.get("iss") != ctx.base_url:
        raise CheckFailed(f"{what}: iss is {short(claims.get('iss'))}, expected {ctx.base_url!r}")
    str_claim(claims, "sub", what)
    str_claim(claims, "jti", what)
    if not isinstance(claims.get("scope"), str):
        raise CheckFailed(f"{what}: claim scope is {short(claims.get('scope'))}, expected a string")
    if claims.get("client_id") != ctx.client_id:
        raise CheckFailed(f"{what}: client_id is {short(claims.get('client_id'))}")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise CheckFailed(f"{what}: aud is {short(aud)}, expected a string or list of strings")
    now = int(time.time())
    exp, iat = int_claim(claims, "exp", what), int_claim(claims, "iat", what)
    if exp <= now - CLOCK_SKEW:
        raise CheckFailed(f"{what}: already expired (exp is {now - exp} s in the past)")
    if iat > now + CLOCK_SKEW or exp <= iat:
        raise CheckFailed(f"{what}: iat {iat} / exp {exp} are inconsistent with now ({now})")
    if user:
        int_claim(claims, "auth_time", what)  # SPEC.md: user tokens carry auth_time
    return claims


@check("refresh-rotation")
async def check_refresh_rotation(ctx: Context) -> None:
    """RFC 9700 §4.14.2: every refresh returns a new refresh token and a new access token."""
    family = refreshable_family(ctx)
    old = family.refresh_token
    assert old is not None
    family.refresh_token = None  # spent, whatever happens next
    data = {"grant_type": "refresh_token", "refresh_token": old}
    body = await ctx.token(data, "refresh")
    new = body.get("refresh_token")
    if not isinstance(new, str) or not new:
        raise CheckFailed("the refresh response has no new refresh_token (no rotation)")
    family.refresh_token = new
    family.access_token = str(body["access_token"])
    if new == old:
        raise CheckFailed("the refresh returned the same refresh_token (no rotation)")


def refreshable_family(ctx: Context) -> Family:
    ctx.need("password-grant")
    family = ctx.family
    assert family is not None
    if family.refresh_token is None:
        raise CheckSkipped("no refresh_token issued (client not allowed refresh_token)")
    return family


@check("refresh-scope-widening")
async def check_refresh_scope_widening(ctx: Context) -> None:
    """RFC 6749 §6: a refresh may narrow the scope, never widen it (invalid_scope)."""
    ctx.need("refresh-rotation")
    family = ctx.family
    assert family is not None and family.refresh_token is not None
    wider = f"{family.scope} check-wider-{secrets.token_hex(4)}".strip()
    data = {"grant_type": "refresh_token", "refresh_token": family.refresh_token, "scope": wider}
    response = await ctx.post(TOKEN_PATH, data)
    if response.status_code == 200:
        body = ctx.token_body(response, "refresh with a wider scope")
        new = body.get("refresh_token")
        family.refresh_token = new if isinstance(new, str) else None
        family.access_token = str(body["access_token"])
        raise CheckFailed("a refresh asking for a wider scope was granted")
    expect_error(response, 400, "invalid_scope", "refresh with a wider scope")


@check("refresh-reuse-detection")
async def check_refresh_reuse_detection(ctx: Context) -> None:
    """RFC 9700 §4.14.2: reusing a rotated refresh token fails and revokes its whole family."""
    refreshable_family(ctx)
    first = (await ctx.sign_in()).get("refresh_token")  # a family of its own
    if not isinstance(first, str) or not first:
        raise CheckFailed("a second sign-in issued no refresh_token")
    data = {"grant_type": "refresh_token", "refresh_token": first}
    second = (await ctx.token(data, "refresh")).get("refresh_token")
    if not isinstance(second, str) or not second:
        raise CheckFailed("the refresh response has no new refresh_token")
    reuse = await ctx.post(TOKEN_PATH, data)
    expect_error(reuse, 400, "invalid_grant", "reusing a rotated refresh token")
    after = await ctx.post(TOKEN_PATH, {"grant_type": "refresh_token", "refresh_token": second})
    expect_error(after, 400, "invalid_grant", "the newest refresh token after a reuse")


@check("introspection-auth")
async def check_introspection_auth(ctx: Context) -> None:
    """RFC 7662 §2.1: introspection needs a confidential client; else 401 invalid_client."""
    data = {"token": "check-" + secrets.token_urlsafe(16)}
    response = await ctx.post(INTROSPECT_PATH, data, auth=False)
    expect_error(response, 401, "invalid_client", "introspection without client auth")
    if ctx.client_id is not None and ctx.client_secret is None:
        response = await ctx.post(INTROSPECT_PATH, data)  # client_id alone: a public client
        expect_error(response, 401, "invalid_client", "introspection by a public client")


@check("introspection-active")
async def check_introspection_active(ctx: Context) -> None:
    """RFC 7662 §2.2: live tokens of the caller are active, with the claims that describe them."""
    ctx.need_confidential_client()
    ctx.need_any("client-credentials", "password-grant")
    access_tokens = [("client_credentials token", ctx.client_token)]
    if ctx.family is not None:
        access_tokens.append(("password-grant token", ctx.family.access_token))
    for what, token in access_tokens:
        if token is None:
            continue
        body = await introspect_active(ctx, token, "access_token", what)
        claims = unverified_part(token, 1, what)
        for name in ("iss", "aud", "sub", "exp", "iat", "jti", "scope"):
            if body.get(name) != claims.get(name):
                raise CheckFailed(f"introspecting the {what}: {name} differs from the token's")
        if str(body.get("token_type", "")).lower() != "bearer":
            raise CheckFailed(f"introspecting the {what}: token_type is not Bearer")
    family = ctx.family
    if (
        family is not None
        and family.refresh_token
        and ctx.outcomes["refresh-rotation"][0] == "PASS"
    ):
        # The newest refresh token of the family (the refresh checks ran first).
        what = "refresh token"
        body = await introspect_active(ctx, family.refresh_token, "refresh_token", what)
        if body.get("token_type") != "refresh_token":
            raise CheckFailed(f"introspecting the {what}: token_type is not refresh_token")
        if "aud" in body or "jti" in body:
            raise CheckFailed(f"introspecting the {what}: aud/jti belong to access tokens only")


async def introspect_active(ctx: Context, token: str, hint: str, what: str) -> dict[str, Any]:
    response = await ctx.introspect(token, hint)
    if response.status_code != 200:
        raise CheckFailed(f"introspecting the {what}: {describe(response)}")
    body = json_object(response, f"introspecting the {what}")
    if body.get("active") is not True:
        raise CheckFailed(f"introspecting the {what}: not active")
    if body.get("client_id") != ctx.client_id:
        raise CheckFailed(f"introspecting the {what}: client_id is {short(body.get('client_id'))}")
    if body.get("iss") != ctx.base_url:
        raise CheckFailed(f"introspecting the {what}: iss is {short(body.get('iss'))}")
    for name in ("scope", "sub"):
        if not isinstance(body.get(name), str):
            raise CheckFailed(f"introspecting the {what}: no {name}")
    for name in ("exp", "iat"):
        int_claim(body, name, f"introspecting the {what}")
    return body


@check("introspection-hostile-tokens")
async def check_introspection_hostile_tokens(ctx: Context) -> None:
    """Garbage, tampered, unsigned, HS256-confused and foreign-key tokens are {active: false}."""
    ctx.need_confidential_client()
    for what, token in hostile_tokens(ctx):
        await ctx.expect_inactive(token, what)


def hostile_tokens(ctx: Context) -> list[tuple[str, str]]:
    """Tokens that must never introspect active; built on a real token when there is one."""
    real = ctx.client_token or (ctx.family.access_token if ctx.family else None)
    if real is not None and (real.count(".") != 2 or real.endswith(".")):
        real = None  # not a signed JWT: access-token-claims says so
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ctx.base_url,
        "sub": "check",
        "aud": ctx.base_url,
        "exp": now + 600,
        "iat": now,
        "jti": secrets.token_urlsafe(16),
        "client_id": ctx.client_id,
        "scope": "",
    }
    kid = next(iter(ctx.keys), "check-kid")
    tokens = [
        ("garbage", "check-not-a-token-" + secrets.token_hex(8)),
        ("three-part garbage", "aaaa.bbbb.cccc"),
        ("unknown opaque token", secrets.token_urlsafe(32)),
    ]
    if real is not None:
        header, payload, signature = real.split(".")
        claims = {**unverified_part(real, 1, "the access token"), "jti": claims["jti"]}
        kid = str(unverified_part(real, 0, "the access token").get("kid", kid))
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        widened = b64url_json({**unverified_part(real, 1, "token"), "scope": "admin"})
        tokens += [
            ("tampered signature", f"{header}.{payload}.{flipped}"),
            ("tampered payload", f"{header}.{widened}.{signature}"),
        ]
    body = b64url_json(claims)
    for alg in ("none", "None"):
        tokens.append((f"alg {alg}", f"{b64url_json({'alg': alg, 'typ': 'at+jwt'})}.{body}."))
    if kid in ctx.keys:
        # RFC 8725 §2.1: HS256 "signed" with the server's public key as the HMAC secret.
        secret = ctx.keys[kid].as_pem(private=False)
        signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{body}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        tokens.append(("HS256 keyed with the public key", f"{signing_input}.{b64url_encode(mac)}"))
    foreign = RSAKey.generate_key(MIN_RSA_BITS)
    unknown_kid = "check-unknown-" + secrets.token_hex(6)
    for what, claimed_kid in (("unknown kid", unknown_kid), ("known kid, foreign key", kid)):
        jws_header = {"alg": "RS256", "typ": "at+jwt", "kid": claimed_kid}
        tokens.append((what, jwt.encode(jws_header, claims, foreign, algorithms=["RS256"])))
    return tokens


@check("revocation")
async def check_revocation(ctx: Context) -> None:
    """RFC 7009 §2.1-2.2: client auth required; an unknown token is 200; no token is 400."""
    ctx.need_client()
    data = {"token": "check-unknown-" + secrets.token_hex(16)}
    stranger = (f"check-unknown-{secrets.token_hex(6)}", "check-wrong-" + secrets.token_hex(8))
    response = await ctx.post(REVOKE_PATH, data, auth=stranger)
    expect_error(response, 401, "invalid_client", "revocation by an unknown client")
    unknown = await ctx.post(REVOKE_PATH, data)
    if unknown.status_code != 200:
        raise CheckFailed(f"revoking an unknown token: {describe(unknown)}, expected 200")
    missing = await ctx.post(REVOKE_PATH, {"token_type_hint": "access_token"})
    expect_error(missing, 400, "invalid_request", "revocation without a token")


@check("refresh-token-revocation")
async def check_refresh_token_revocation(ctx: Context) -> None:
    """RFC 7009: a revoked refresh token no longer refreshes (invalid_grant)."""
    ctx.need("refresh-rotation")
    family = ctx.family
    assert family is not None
    if family.refresh_token is None:
        raise CheckFailed("needs refresh-scope-widening, which spent the refresh token")
    data = {"token": family.refresh_token, "token_type_hint": "refresh_token"}
    response = await ctx.post(REVOKE_PATH, data)
    if response.status_code != 200:
        raise CheckFailed(f"revoking the refresh token: {describe(response)}, expected 200")
    data = {"grant_type": "refresh_token", "refresh_token": family.refresh_token}
    after = await ctx.post(TOKEN_PATH, data)
    expect_error(after, 400, "invalid_grant", "refreshing with a revoked refresh token")


@check("revoked-family-inactive")
async def check_revoked_family_inactive(ctx: Context) -> None:
    """SPEC.md: revoking a refresh token kills its family; its access tokens go inactive."""
    ctx.need("refresh-token-revocation")
    ctx.need_confidential_client()
    assert ctx.family is not None
    await ctx.expect_inactive(ctx.family.access_token, "an access token of a revoked family")


@check("revoked-access-token-inactive")
async def check_revoked_access_token_inactive(ctx: Context) -> None:
    """RFC 7009: a revoked access token (a JWT) introspects inactive."""
    ctx.need_confidential_client()
    ctx.need_any("client-credentials", "password-grant")
    if ctx.outcomes["client-credentials"][0] == "PASS":
        body = await ctx.token({"grant_type": "client_credentials"}, "client_credentials grant")
    else:
        body = await ctx.sign_in()
    token = str(body["access_token"])
    await introspect_active(ctx, token, "access_token", "fresh access token")
    response = await ctx.post(REVOKE_PATH, {"token": token, "token_type_hint": "access_token"})
    if response.status_code != 200:
        raise CheckFailed(f"revoking the access token: {describe(response)}, expected 200")
    await ctx.expect_inactive(token, "a revoked access token")


@check("password-invalid-grant")
async def check_password_invalid_grant(ctx: Context) -> None:
    """Wrong password and unknown user: the same 400 invalid_grant (no account enumeration)."""
    username, _ = ctx.need_user()
    wrong = "check-wrong-" + secrets.token_urlsafe(12)
    bodies = []
    for user, what in (
        (username, "wrong password"),
        (f"check-{secrets.token_hex(8)}", "unknown user"),
    ):
        data = {"grant_type": "password", "username": user, "password": wrong}
        response = await ctx.post(TOKEN_PATH, data)
        if response.status_code == 400 and error_code(response) == "unauthorized_client":
            raise CheckSkipped("the client is not allowed the password grant")
        bodies.append(expect_error(response, 400, "invalid_grant", what))
    if bodies[0] != bodies[1]:
        raise CheckFailed("wrong password and unknown user answer with different bodies")


@check("no-store-headers")
async def check_no_store_headers(ctx: Context) -> None:
    """RFC 6749 §5.1, SPEC.md: Cache-Control no-store on every token and introspection answer."""
    await ctx.post(TOKEN_PATH, {"grant_type": "check-nonsense"}, auth=False)
    offenders = [what for what, value in ctx.cache_log if "no-store" not in cache_directives(value)]
    if offenders:
        count = f"{len(offenders)} of {len(ctx.cache_log)} responses"
        raise CheckFailed(f"{count} lack Cache-Control: no-store, first: {offenders[0]}")


# -- running them ----------------------------------------------------------------------


async def run_one(ctx: Context, entry: Check) -> tuple[Status, str]:
    if ctx.unreachable is not None:
        return "FAIL", f"server unreachable ({ctx.unreachable})"
    try:
        await entry.run(ctx)
    except CheckSkipped as skip:
        return "SKIP", str(skip)
    except CheckFailed as failure:
        return "FAIL", str(failure)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        ctx.unreachable = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "FAIL", f"cannot connect to {ctx.base_url}: {ctx.unreachable}"
    except httpx.TimeoutException as exc:
        return "FAIL", f"timed out ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        return "FAIL", f"HTTP error {type(exc).__name__}: {exc}"
    except Exception as exc:  # any surprise is a failure with a reason, never a traceback
        return "FAIL", f"unexpected {type(exc).__name__}: {exc}"
    return "PASS", ""


def one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= REASON_LENGTH else text[: REASON_LENGTH - 3] + "..."


async def run_checks(
    http: httpx.AsyncClient,
    base_url: str,
    *,
    client_id: str | None,
    client_secret: str | None,
    username: str | None,
    password: str | None,
    out: TextIO,
) -> int:
    """Run every check against ``base_url`` with ``http``; write the lines; return failures."""
    ctx = Context(http, base_url.rstrip("/"), client_id, client_secret, username, password)
    ctx.sensitive.update(value for value in (client_secret, password) if value)
    for entry in CHECKS:
        status, reason = await run_one(ctx, entry)
        if status != "PASS":
            reason = one_line(ctx.redact(reason)) or "no reason given"
        ctx.outcomes[entry.name] = (status, reason)
        line = f"PASS {entry.name}" if status == "PASS" else f"{status} {entry.name}: {reason}"
        print(line, file=out, flush=True)
    counts = {status: count(ctx.outcomes.values(), status) for status in ("PASS", "FAIL", "SKIP")}
    print(
        f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped",
        file=out,
        flush=True,
    )
    return counts["FAIL"]


def count(outcomes: Iterable[tuple[Status, str]], status: Status) -> int:
    return sum(1 for seen, _ in outcomes if seen == status)


# -- command line ----------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="self-test a running server",
        description=(
            "Self-test the server at URL: one PASS/FAIL/SKIP line per check, then a summary; "
            "exit status 1 on any failure. Credentials may also come from AUTH_CHECK_CLIENT_ID, "
            "AUTH_CHECK_CLIENT_SECRET, AUTH_CHECK_USERNAME and AUTH_CHECK_PASSWORD."
        ),
    )
    parser.add_argument("url", help="the server's base URL (its issuer), e.g. https://auth.example")
    parser.add_argument("--client-id", help="a client to test with (confidential: give its secret)")
    parser.add_argument("--client-secret", help="prefer AUTH_CHECK_CLIENT_SECRET: argv is visible")
    parser.add_argument("--username", help="a user for the password and refresh checks")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the user's password from stdin"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")


class UsageError(Exception):
    """Ends ``check`` with ``error: <message>`` on stderr and exit status 1."""


def _option(value: str | None, env: str) -> str | None:
    return value if value else (os.environ.get(env) or None)


def _stdin_password() -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise UsageError("no password on standard input")
    return password


@dataclass(frozen=True)
class Credentials:
    client_id: str | None
    client_secret: str | None
    username: str | None
    password: str | None


def _resolve(args: argparse.Namespace) -> Credentials:
    url = str(args.url)
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"URL must start with http:// or https:// (got {short(url)})")
    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
    client_id = _option(args.client_id, "AUTH_CHECK_CLIENT_ID")
    client_secret = _option(args.client_secret, "AUTH_CHECK_CLIENT_SECRET")
    username = _option(args.username, "AUTH_CHECK_USERNAME")
    if args.password_stdin and username is None:
        raise UsageError("--password-stdin needs --username (or AUTH_CHECK_USERNAME)")
    password = _stdin_password() if args.password_stdin else _option(None, "AUTH_CHECK_PASSWORD")
    if client_secret is not None and client_id is None:
        raise UsageError("a client secret needs --client-id (or AUTH_CHECK_CLIENT_ID)")
    if username is not None and password is None:
        raise UsageError("--username needs --password-stdin (or AUTH_CHECK_PASSWORD)")
    if password is not None and username is None:
        raise UsageError("AUTH_CHECK_PASSWORD needs --username (or AUTH_CHECK_USERNAME)")
    if username is not None and client_id is None:
        raise UsageError("the user checks need a client: give --client-id")
    return Credentials(client_id, client_secret, username, password)


def cmd_check(args: argparse.Namespace) -> int:
    """``python -m server check URL …``: 0 when every check passed or skipped, else 1."""
    try:
        creds = _resolve(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def main() -> int:
        async with httpx.AsyncClient(timeout=float(args.timeout)) as http:
            return await run_checks(
                http,
                str(args.url),
                client_id=creds.client_id,
                client_secret=creds.client_secret,
                username=creds.username,
                password=creds.password,
                out=sys.stdout,
            )

    return 1 if asyncio.run(main()) else 0
