"""What every grant shares: the client check, scope and resource rules, and the check runner.

A grant is an ordered tuple of named checks (``CHECKS``), each a method that reads the request
and either raises the OAuth error or records what it found on the request, followed by one
issue step (``create_token_response``), in the manner of node-oidc-provider's
``lib/actions/grants/``. Authlib calls ``validate_token_request`` then
``create_token_response``; its grant instance lives for one request, the server it is given
for the life of the app (``server.py``), and the per-request state travels on the request:
``db`` (the transaction, ``None`` for a grant that needs no database), ``issued_at`` (the one
clock reading), ``client``, ``user``, ``family``, ``scope`` and ``resources``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from authlib.oauth2.rfc6749.errors import (
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    UnauthorizedClientError,
)

from ...dpop import INVALID_DPOP_PROOF
from ...models import Client, narrow_scope
from .. import resources as rfc8707
from ..context import OAuthServer

BAD_CREDENTIALS = "Invalid username or password."
BAD_REFRESH_TOKEN = "The refresh token is invalid, expired or revoked."  # noqa: S105
BAD_CODE = "The authorization code is invalid, expired or already used."
#: The password grant's answer to a right password that is not enough (RFC 6749 §5.2).
SECOND_FACTOR_NEEDED = (
    "This account signs in with a second factor: use the authorization code flow in a browser."
)


class InvalidDpopProofError(OAuth2Error):  # type: ignore[misc]
    """RFC 9449 §12.2: the request's DPoP proof is missing, malformed or refused."""

    error = INVALID_DPOP_PROOF


def resolve_scope(requested: str | None, allowed: list[str]) -> str:
    """RFC 6749 §3.3: the requested scope, which must lie within ``allowed``; default all."""
    scope = narrow_scope(requested, allowed)
    if scope is None:
        raise InvalidScopeError("The requested scope exceeds what this grant allows.")
    return scope


class Grant:
    """Mixed into each of Authlib's grant classes, before it."""

    server: OAuthServer
    request: Any
    GRANT_TYPE: str
    #: The checks of ``validate_token_request``, in order.
    CHECKS: ClassVar[tuple[Callable[[Any], None], ...]] = ()

    def validate_token_request(self) -> None:
        for check in self.CHECKS:
            check(self)

    def check_client(self) -> None:
        """The client authenticates (RFC 6749 §2.3) and is registered for this grant."""
        client: Client = self.authenticate_token_endpoint_client()  # type: ignore[attr-defined]
        if self.GRANT_TYPE == "password" and self.server.settings.fapi2:
            # FAPI 2.0 Security Profile §5.3.2.1: the password grant is refused.
            raise UnauthorizedClientError("The password grant is not allowed on this server.")
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                f"The client is not allowed the grant_type {self.GRANT_TYPE}."
            )
        self.request.client = client

    def check_resources(self) -> None:
        """RFC 8707 §2: the ``resource`` values asked for, each one we serve to this client."""
        request = self.request
        request.resources = rfc8707.allowed(
            rfc8707.requested(request.form), self.server.settings, request.client
        )

    def required(self, name: str) -> str:
        value: str | None = self.request.form.get(name)
        if value is None:
            raise InvalidRequestError(f"Missing {name!r} parameter.")
        return value
