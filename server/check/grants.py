"""Checks of the token endpoint: error format, client authentication, grants, access tokens."""

from __future__ import annotations

import secrets
import time
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError

from .context import TOKEN_PATH, Context, Family, check
from .outcome import CheckFailed
from .parse import expect_error, int_claim, scope_of, short, str_claim, unverified_part

#: 256 bits in base64url (SPEC.md: refresh tokens carry at least 256 bits).
MIN_REFRESH_TOKEN_CHARS = 43
#: Tolerated difference between this machine's clock and the server's.
CLOCK_SKEW = 120


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
    """RFC 9068 access tokens: RS256 (PS256 where discovery says so), typ at+jwt, a published
    kid, valid signature and claims."""
    ctx.need("jwks-hygiene")
    ctx.need_any("client-credentials", "password-grant")
    if ctx.client_token is not None:
        verify_access_token(ctx, ctx.client_token, "client_credentials token", user=False)
    if ctx.family is not None:
        verify_access_token(ctx, ctx.family.access_token, "password-grant token", user=True)


def verify_access_token(ctx: Context, token: str, what: str, *, user: bool) -> dict[str, Any]:
    header = unverified_part(token, 0, what)
    alg = ctx.signing_alg
    if header.get("alg") != alg:
        raise CheckFailed(f"{what}: alg is {short(header.get('alg'))}, expected {alg}")
    typ = header.get("typ")
    # RFC 9068 §2.1 (RFC 7515 §4.1.9: compared case-insensitively, "application/" optional).
    if not isinstance(typ, str) or typ.lower() not in ("at+jwt", "application/at+jwt"):
        raise CheckFailed(f"{what}: typ is {short(typ)}, expected at+jwt")
    kid = header.get("kid")
    key = ctx.keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise CheckFailed(f"{what}: kid {short(kid)} is not in the JWKS")
    try:
        claims = jwt.decode(token, key, algorithms=[alg]).claims
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
