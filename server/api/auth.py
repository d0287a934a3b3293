"""Protecting the JSON APIs with our own access tokens, as a resource server must.

``current_user`` validates the bearer token exactly as introspection does (tokens.py: RFC 9068
§4 signature with a published key, ``typ`` at+jwt, ``iss``, ``aud``, ``exp``; then the deny-list,
the client and the family in the database) and injects the signed-in user. Errors follow
RFC 6750 §3: 401 with ``WWW-Authenticate: Bearer`` (no error code when no token was sent,
``error="invalid_token"`` otherwise) and 403 ``insufficient_scope``; the body is SPEC's
``{"detail", "error_code"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from ..deps import AppState, StateDep
from ..models import User, now
from ..tokens import access_token_is_live, decode_access_token

REALM = "api"


class ApiError(Exception):
    """An error of the JSON APIs: ``{"detail", "error_code"}`` with ``status`` and headers."""

    def __init__(
        self, status: int, error_code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.headers = headers or {}


def _challenge(error: str | None = None, description: str = "", scope: str = "") -> dict[str, str]:
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return {"WWW-Authenticate": "Bearer " + ", ".join(parts)}


@dataclass(frozen=True)
class Caller:
    """The person behind a validated user access token, and what the token grants."""

    user: User
    claims: dict[str, Any]

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(str(self.claims.get("scope", "")).split())

    @property
    def family_id(self) -> str:
        return str(self.claims["sid"])


async def _claims(request: Request, state: AppState) -> dict[str, Any]:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # RFC 6750 §3.1: a request without credentials gets the challenge and no error code.
        raise ApiError(401, "missing_token", "A bearer access token is required.", _challenge())
    claims = decode_access_token(
        state.keys.keyset(),
        token.strip(),
        issuer=state.settings.issuer,
        audience=state.settings.audience,
        now=now(),
    )
    if claims is None:
        raise _invalid()
    return claims


def _invalid() -> ApiError:
    description = "The access token is invalid, expired or revoked."
    return ApiError(401, "invalid_token", description, _challenge("invalid_token", description))


async def current_caller(request: Request, state: StateDep) -> Caller:
    """The signed-in person: a live user token (not a client_credentials one)."""
    claims = await _claims(request, state)
    if "auth_time" not in claims:
        # A valid client_credentials token: no person behind it (RFC 6750 §3.1, 403).
        description = "This API needs a token issued to a person, not to a client."
        raise ApiError(
            403, "insufficient_scope", description, _challenge("insufficient_scope", description)
        )
    async with state.db.session() as db:
        live = await db.run_sync(lambda session: access_token_is_live(session, claims))
        user = await db.get(User, claims["sub"]) if live else None
    if user is None or user.disabled:
        raise _invalid()
    return Caller(user, claims)


CallerDep = Annotated[Caller, Depends(current_caller)]
