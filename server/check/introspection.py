"""Checks of token introspection (RFC 7662): who may call it, active and hostile tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

from .context import INTROSPECT_PATH, Context, check
from .metadata import MIN_RSA_BITS
from .outcome import CheckFailed
from .parse import (
    b64url_encode,
    b64url_json,
    describe,
    expect_error,
    int_claim,
    json_object,
    short,
    unverified_part,
)


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
