"""Checks of the refresh grant: rotation, no scope widening, reuse detection (and, for a
test client with a refresh retry window, the identical successor on a retry)."""

from __future__ import annotations

import secrets

from .context import TOKEN_PATH, Context, Family, check
from .outcome import CheckFailed, CheckSkipped
from .parse import expect_error


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
    """RFC 9700 §4.14.2: reusing a rotated refresh token fails and revokes its whole family.

    A test client with a refresh retry window (SPEC, refresh retries) gets the identical
    successor for the token it just rotated: that is checked instead, and reuse is then a
    token two rotations back."""
    refreshable_family(ctx)
    first = (await ctx.sign_in()).get("refresh_token")  # a family of its own
    if not isinstance(first, str) or not first:
        raise CheckFailed("a second sign-in issued no refresh_token")
    newest = await _rotate(ctx, first)
    data = {"grant_type": "refresh_token", "refresh_token": first}
    reuse = await ctx.post(TOKEN_PATH, data)
    if reuse.status_code == 200:
        retried = ctx.token_body(reuse, "retrying a just-rotated refresh token")
        if retried.get("refresh_token") != newest:
            raise CheckFailed(
                "presenting a rotated refresh token again was granted a different refresh "
                "token: the sign-in branched (neither reuse detection nor a retry window)"
            )
        newest = await _rotate(ctx, newest)
        reuse = await ctx.post(TOKEN_PATH, data)  # now two rotations back
        expect_error(reuse, 400, "invalid_grant", "reusing a refresh token two rotations back")
    else:
        expect_error(reuse, 400, "invalid_grant", "reusing a rotated refresh token")
    after = await ctx.post(TOKEN_PATH, {"grant_type": "refresh_token", "refresh_token": newest})
    expect_error(after, 400, "invalid_grant", "the newest refresh token after a reuse")


async def _rotate(ctx: Context, refresh_token: str) -> str:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    new = (await ctx.token(data, "refresh")).get("refresh_token")
    if not isinstance(new, str) or not new:
        raise CheckFailed("the refresh response has no new refresh_token")
    return new
