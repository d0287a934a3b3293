"""The checks that run last: failed sign-ins, and no-store on every response the others saw."""

from __future__ import annotations

import secrets

from .context import TOKEN_PATH, Context, check
from .outcome import CheckFailed, CheckSkipped
from .parse import cache_directives, error_code, expect_error


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
