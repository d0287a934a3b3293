"""Revocation (RFC 7009) and introspection (RFC 7662) on Authlib's endpoint classes.

Authlib does the protocol (client authentication, the ``token`` parameter, the hint, the
response shape); we supply the lookup. ``query_token`` returns only *live* tokens, so
Authlib's ``is_expired``/``is_revoked`` checks are already settled by the time it asks:
- an access token is live when ``decode_access_token`` accepts it (signature with a key we
  publish, RS256 only, ``typ`` at+jwt, ``iss``, ``aud``, ``exp``) and the database does not
  say otherwise (``store.access_token_live``);
- a refresh token is live when its row is the family's newest (not rotated), unexpired, and
  its family is neither revoked nor past its cap, for a user who is not disabled.

Revoking a refresh token revokes its whole family, and with it (through ``sid``) every
access token of that sign-in (RFC 7009 §2.1: "SHOULD also invalidate all access tokens based
on the same authorization grant"). Revoking an access token adds its ``jti`` to a deny-list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from ..bearer import DPOP, bound_key
from ..models import Client, sha256_hex
from ..names import CONFIDENTIAL_AUTH_METHODS, USER_AUTH_METHODS
from ..observability import audit
from ..tokens import decode_access_token
from . import store
from .context import OAuthServer


@dataclass
class LiveToken:
    """A token ``query_token`` found live; ``claims`` is what introspection may tell."""

    kind: str  # "access_token" | "refresh_token"
    client_id: str
    claims: dict[str, Any] = field(default_factory=dict)
    jti: str | None = None
    exp: int = 0
    family_id: str | None = None

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def is_expired(self) -> bool:
        return False  # only live tokens are ever returned by query_token

    def is_revoked(self) -> bool:
        return False


class _Lookup:
    server: OAuthServer
    SUPPORTED_TOKEN_TYPES = ("access_token", "refresh_token")

    def check_params(self, request: Any, client: Client) -> None:
        if "token" not in request.form:
            raise InvalidRequestError("Missing 'token' parameter.")
        hint = request.form.get("token_type_hint")
        if hint is not None and hint not in self.SUPPORTED_TOKEN_TYPES:
            # RFC 7009 §2.2.1: an RFC 6749 §5.2 error, so 400. Authlib raises its
            # ForbiddenError subclass, which is a 401.
            raise OAuth2Error(
                error="unsupported_token_type",
                description="token_type_hint must be access_token or refresh_token.",
                status_code=400,
            )

    def authenticate_token(self, request: Any, client: Client) -> LiveToken | None:
        """Authlib's, with the lookup on this request's connection and clock (Authlib's
        ``query_token`` gets neither)."""
        self.check_params(request, client)
        return self.live_token(request, request.form["token"])

    def live_token(self, request: Any, token: str) -> LiveToken | None:
        """RFC 7009 §2.1, RFC 7662 §2.1: the hint may only speed the search up. Ours cannot
        mislead it: an access token is a JWT (two dots), a refresh token is base64url. One
        statement either way."""
        if token.count(".") == 2:
            return self._access_token(request, token)
        return self._refresh_token(request, token)

    def _access_token(self, request: Any, token: str) -> LiveToken | None:
        settings = self.server.settings
        claims = decode_access_token(
            self.server.state.keys.keyset(),
            token,
            issuer=settings.issuer,
            # Tokens for every resource we serve (RFC 8707): a resource server introspects
            # its own, and any of them may be revoked.
            audience=settings.audiences,
            now=request.issued_at,
        )
        if claims is None or not store.access_token_live(request.db, claims):
            return None
        public = {
            "token_type": "Bearer",  # RFC 7662 §2.2, the type of RFC 6749 §7.1
            **{
                name: claims[name]
                for name in ("scope", "client_id", "sub", "exp", "iat", "iss", "aud", "jti")
            },
        }
        jkt = bound_key(claims)
        if jkt is not None:
            # RFC 9449 §6.2: a bound token, and the key it is bound to.
            public["token_type"] = DPOP
            public["cnf"] = {"jkt": jkt}
        return LiveToken(
            kind="access_token",
            client_id=claims["client_id"],
            claims=public,
            jti=claims["jti"],
            exp=claims["exp"],
            family_id=claims.get("sid"),
        )

    def _refresh_token(self, request: Any, token: str) -> LiveToken | None:
        live = store.live_refresh(request.db, sha256_hex(token), now=request.issued_at)
        if live is None:
            return None
        return LiveToken(
            kind="refresh_token",
            client_id=live.client_id,
            claims={
                "token_type": "refresh_token",
                "scope": live.scope,
                "client_id": live.client_id,
                "sub": live.user_id,
                "exp": live.expires_at,
                "iat": live.created_at,
                "iss": self.server.settings.issuer,
            },
            exp=live.expires_at,
            family_id=live.family_id,
        )


class Revocation(_Lookup, RevocationEndpoint):  # type: ignore[misc]
    """RFC 7009. Public clients identify themselves by ``client_id`` (§2.1: the request is
    authenticated as RFC 6749 §2.3 allows for that client)."""

    CLIENT_AUTH_METHODS = USER_AUTH_METHODS

    def authenticate_token(self, request: Any, client: Client) -> LiveToken | None:
        token = super().authenticate_token(request, client)
        if token is not None and not token.check_client(client):
            raise InvalidGrantError()  # Authlib's answer: another client's token
        return token

    def revoke_token(self, token: LiveToken, request: Any) -> None:
        if token.kind == "refresh_token":
            assert token.family_id is not None
            store.revoke_family(
                request.db, token.family_id, now=request.issued_at, reason="revoked"
            )
        else:
            assert token.jti is not None
            store.revoke_access_token(
                request.db,
                jti=token.jti,
                client_id=token.client_id,
                expires_at=token.exp,
                now=request.issued_at,
            )
        audit(
            "token.revoked",
            token_type=token.kind,
            client_id=token.client_id,
            family_id=token.family_id,
            jti=token.jti,
        )


class Introspection(_Lookup, IntrospectionEndpoint):  # type: ignore[misc]
    """RFC 7662, for confidential clients only (§2.1: the endpoint requires authorization)."""

    CLIENT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS

    def check_permission(self, token: LiveToken, client: Client, request: Any) -> bool:
        # SPEC.md: a client may introspect its own tokens, a resource server any token;
        # anything else is {"active": false} (RFC 7662 §2.2 allows it, against scanning).
        return client.is_resource_server or token.check_client(client)

    def authenticate_token(self, request: Any, client: Client) -> LiveToken | None:
        token = super().authenticate_token(request, client)
        if token is None or not self.check_permission(token, client, request):
            return None
        return token

    def introspect_token(self, token: LiveToken) -> dict[str, Any]:
        return {"active": True, **token.claims}
