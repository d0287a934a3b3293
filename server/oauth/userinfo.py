"""/userinfo (OpenID Connect Core §5.3): the claims about the person a bearer access token
(RFC 6750 §2.1) was issued for, as its scopes allow.

The token is checked as the JSON APIs check theirs (bearer.py); the refusals are the
``USERINFO`` realm's, in the OAuth shape OpenID Connect Core §5.3.3 asks for.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..bearer import Realm, live_bearer, token_claims
from ..deps import StateDep
from ..models import RefreshFamily
from .routes import json_response
from .server import sign_in_claims

router = APIRouter()

USERINFO = Realm("userinfo", "oauth", invalid="The access token is invalid or expired.", dpop=True)


@router.api_route("/userinfo", methods=["GET", "POST"])
async def userinfo(request: Request, state: StateDep) -> Response:
    """OpenID Connect Core §5.3, with a bearer access token (RFC 6750 §2.1)."""
    claims = await token_claims(request, state, USERINFO)
    async with state.db.session() as db:
        bearer = await live_bearer(db, claims)
        # The sign-in the token belongs to (its family, ``sid``): what it proved. Read in the
        # same transaction that found the token live.
        sid = claims.get("sid")
        family = await db.get(RefreshFamily, sid) if isinstance(sid, str) else None
    if bearer is None or bearer.user is None:
        # A client_credentials token has nobody behind it to describe.
        raise USERINFO.invalid_token()
    user = bearer.user
    if "openid" not in bearer.scopes:
        # OpenID Connect Core §5.3: only a token with openid; RFC 6750 §3 names the scope.
        raise USERINFO.insufficient_scope("The token lacks the openid scope.", scope="openid")
    body: dict[str, Any] = {"sub": user.id}
    if family is not None:
        # OpenID Connect Core §5.3.2: any claim of the End-User; amr and acr (§2) of the
        # sign-in, as its ID token said them (none for a sign-in from before they were kept).
        body.update(sign_in_claims(family.amr))
    if "profile" in bearer.scopes:
        body["preferred_username"] = user.username
        if user.name:
            body["name"] = user.name
    if "email" in bearer.scopes and user.email:
        body["email"] = user.email
        body["email_verified"] = False  # addresses are not verified by this server
    return json_response(200, body, {"Cache-Control": "no-store"})
