"""Checks of token revocation (RFC 7009) and what it does to refresh and access tokens."""

from __future__ import annotations

import secrets

from .context import REVOKE_PATH, TOKEN_PATH, Context, check
from .introspection import introspect_active
from .outcome import CheckFailed
from .parse import describe, expect_error


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
