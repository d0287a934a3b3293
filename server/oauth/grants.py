"""The token grants: each an ordered list of small checks, then one issue step.

Authlib's defaults are overridden where they fall short of SPEC.md:
- the password grant answers a bad username *or* password with ``invalid_grant``
  (Authlib: ``invalid_request``) and verifies a dummy hash for unknown users;
- the refresh grant always rotates (Authlib: ``INCLUDE_NEW_REFRESH_TOKEN = False``), claims
  the old token with one conditional UPDATE so exactly one of simultaneous requests wins
  (Authlib revokes in a separate, racy step), and treats reuse as theft: the family dies;
- scope is checked against the client's registration, and refresh may narrow, never widen.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    UnauthorizedClientError,
)
from authlib.oauth2.rfc7636 import CodeChallenge
from sqlalchemy import select, update

from ..models import (
    AuthorizationCode,
    BrowserSession,
    Client,
    RefreshFamily,
    RefreshToken,
    User,
    narrow_scope,
    revoke_families,
    sha256_hex,
)
from ..observability import audit
from . import resources as rfc8707
from .context import OAuthServer

USER_CLIENT_AUTH = ["client_secret_basic", "client_secret_post", "none"]
CONFIDENTIAL_CLIENT_AUTH = ["client_secret_basic", "client_secret_post"]
BAD_CREDENTIALS = "Invalid username or password."
BAD_REFRESH_TOKEN = "The refresh token is invalid, expired or revoked."  # noqa: S105
BAD_CODE = "The authorization code is invalid, expired or already used."


def resolve_scope(requested: str | None, allowed: list[str]) -> str:
    """RFC 6749 §3.3: the requested scope, which must lie within ``allowed``; default all."""
    scope = narrow_scope(requested, allowed)
    if scope is None:
        raise InvalidScopeError("The requested scope exceeds what this grant allows.")
    return scope


class _Grant:
    server: OAuthServer
    request: Any
    GRANT_TYPE: str

    def _client(self) -> Client:
        client: Client = self.authenticate_token_endpoint_client()  # type: ignore[attr-defined]
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError(
                f"The client is not allowed the grant_type {self.GRANT_TYPE}."
            )
        self.request.client = client
        return client

    def _resources(self) -> list[str]:
        """RFC 8707 §2: the ``resource`` values asked for, each one we serve."""
        return rfc8707.allowed(rfc8707.requested(self.request.form), self.server.settings)

    def _required(self, name: str) -> str:
        value: str | None = self.request.form.get(name)
        if value is None:
            raise InvalidRequestError(f"Missing {name!r} parameter.")
        return value


class PasswordGrant(_Grant, grants.ResourceOwnerPasswordCredentialsGrant):  # type: ignore[misc]
    """RFC 6749 §4.3, kept for first-party clients although RFC 9700 §2.4 deprecates it."""

    TOKEN_ENDPOINT_AUTH_METHODS = USER_CLIENT_AUTH

    def validate_token_request(self) -> None:
        client = self._client()
        username = self._required("username")
        password = self._required("password")
        # No consent page here: the account scope only for a first-party client.
        allowed = client.scope_list_without_consent
        self.request.scope = resolve_scope(self.request.payload.scope, allowed)
        self.request.resources = self._resources()
        self.request.user = self.authenticate_user(username, password)

    def authenticate_user(self, username: str, password: str) -> User:
        server = self.server
        user = server.find_user(username)
        result = server.verify_password(user, password)
        if user is None or not result.ok or user.disabled:
            # One error for unknown user, wrong password and disabled account.
            raise InvalidGrantError(BAD_CREDENTIALS)
        if result.needs_rehash:
            server.rehash(user, password)
        return user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        self.server.start_family(
            request,
            scope=request.scope,
            resources=" ".join(request.resources),
            auth_time=request.issued_at,
        )
        token = self.server.issue(request, scope=request.scope)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshTokenGrant(_Grant, grants.RefreshTokenGrant):  # type: ignore[misc]
    """RFC 6749 §6 with rotation and reuse detection (RFC 9700 §4.14.2)."""

    TOKEN_ENDPOINT_AUTH_METHODS = USER_CLIENT_AUTH
    INCLUDE_NEW_REFRESH_TOKEN = True

    def validate_token_request(self) -> None:
        client = self._client()
        presented = self._required("refresh_token")
        db = self.server.db
        row = db.execute(
            select(RefreshToken, RefreshFamily)
            .join(RefreshFamily, RefreshFamily.id == RefreshToken.family_id)
            .where(RefreshToken.token_hash == sha256_hex(presented))
        ).first()
        if row is None:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        token, family = row
        if family.client_id != client.client_id:
            # Issued to another client: refuse, but leave the owner's family alone.
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        if family.revoked_at is not None:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        if token.rotated_at is not None:
            self._revoke_family(family, reason="reuse")
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        now = self.request.issued_at
        if token.expires_at <= now or family.expires_at <= now:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        user = db.get(User, family.user_id)
        if user is None or user.disabled:
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        # RFC 6749 §6: never wider than the sign-in's grant, nor than what the client is
        # registered for now (the admin API may have withdrawn a scope since).
        registered = set(client.scope_list)
        granted = [s for s in family.scope.split() if s in registered]
        self.request.scope = resolve_scope(self.request.payload.scope, granted)
        # RFC 8707 §2.2: a token for any of the sign-in's resources, never another.
        self.request.resources = rfc8707.within(
            rfc8707.requested(self.request.form), family.resources, self.server.settings
        )
        self.request.refresh_token = token
        self.request.family = family
        self.request.user = user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        if not self._claim(request.refresh_token, request.family):
            # Another request rotated this token first: a replay or a race, both reuse.
            self._revoke_family(request.family, reason="reuse")
            raise InvalidGrantError(BAD_REFRESH_TOKEN)
        token = self.server.issue(request, scope=request.scope)
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def _claim(self, token: RefreshToken, family: RefreshFamily) -> bool:
        """Atomically mark ``token`` rotated; True for exactly one caller.

        The family row is updated first: every rotation and revocation of a family takes
        that row lock in the same order, so they serialise on PostgreSQL (and SQLite holds
        one write lock per transaction anyway).
        """
        db = self.server.db
        now = self.request.issued_at
        live_family = db.execute(
            update(RefreshFamily)
            .where(RefreshFamily.id == family.id, RefreshFamily.revoked_at.is_(None))
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        if live_family.rowcount != 1:  # type: ignore[attr-defined]
            return False
        claimed = db.execute(
            update(RefreshToken)
            .where(RefreshToken.id == token.id, RefreshToken.rotated_at.is_(None))
            .values(rotated_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(claimed.rowcount == 1)  # type: ignore[attr-defined]

    def _revoke_family(self, family: RefreshFamily, *, reason: str) -> None:
        audit(
            "refresh.reuse_detected",
            family_id=family.id,
            client_id=family.client_id,
            user_id=family.user_id,
        )
        self.server.db.execute(
            revoke_families(RefreshFamily.id == family.id, at=self.request.issued_at, reason=reason)
        )


class ClientCredentialsGrant(_Grant, grants.ClientCredentialsGrant):  # type: ignore[misc]
    """RFC 6749 §4.4: confidential clients only, never a refresh token."""

    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_CLIENT_AUTH

    def validate_token_request(self) -> None:
        client = self._client()
        self.request.scope = resolve_scope(self.request.payload.scope, client.scope_list)
        self.request.resources = self._resources()

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.server.issue(self.request, scope=self.request.scope)
        return 200, token, self.TOKEN_RESPONSE_HEADER


#: RFC 7636 §4.2: base64url of a SHA-256 digest is 43 characters; 43-128 unreserved ones.
CODE_CHALLENGE = re.compile(r"[A-Za-z0-9._~-]{43,128}")


class Pkce(CodeChallenge):  # type: ignore[misc]
    """RFC 7636 with the rules of RFC 9700 §2.1.1: public clients must send a challenge, and
    only S256 is accepted (``plain`` would let a leaked code be redeemed)."""

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") and not data.get("code_challenge_method"):
            if grant.request.client.is_public:
                raise InvalidRequestError(
                    "PKCE is required: send code_challenge and code_challenge_method=S256."
                )
            return
        super().validate_code_challenge(grant, redirect_uri)
        # Authlib matches ``^…{43,128}$``, and ``$`` also matches before a final newline.
        if not CODE_CHALLENGE.fullmatch(data.get("code_challenge") or ""):
            raise InvalidRequestError("Invalid 'code_challenge'.")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256.")


def _replayed(code: AuthorizationCode) -> bool:
    """Whether a used code was claimed by an exchange (so using it again is a replay), not
    spent when its browser session ended. An exchange claims a code only before it expires
    (``used_at < expires_at``); ending a session stamps both with the same time."""
    return code.used_at is not None and code.used_at < code.expires_at


class CodeGrant(_Grant, grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = USER_CLIENT_AUTH

    @staticmethod
    def validate_authorization_redirect_uri(request: Any, client: Client) -> str:
        """Authlib's check with a fixed description: its own quotes the URI, and refuses to
        build the error (``ValueError``, a 500) when the URI holds ``"``, ``\\`` or non-ASCII
        text, which RFC 6749 §4.1.2.1 bars from ``error_description``. Never redirected to
        (§4.1.2.1: the URI is not known to be the client's)."""
        uri: str | None = request.payload.redirect_uri
        if uri:
            if not client.check_redirect_uri(uri):
                raise InvalidRequestError("The redirect_uri is not registered for this client.")
            return uri
        default: str | None = client.get_default_redirect_uri()
        if not default:
            raise InvalidRequestError("Missing 'redirect_uri' in request.")
        return default

    def save_authorization_code(self, code: str, request: Any) -> None:
        data = request.payload.data
        issued = self.server.now
        self.server.db.add(
            AuthorizationCode(
                code_hash=sha256_hex(code),
                client_id=request.client.client_id,
                user_id=request.user.id,
                browser_session_id=request.browser_session_id,
                redirect_uri=data.get("redirect_uri") or request.client.get_default_redirect_uri(),
                redirect_uri_given=bool(data.get("redirect_uri")),
                scope=request.scope,
                resources=" ".join(request.resources),
                nonce=data.get("nonce"),
                code_challenge=data.get("code_challenge"),
                code_challenge_method=data.get("code_challenge_method"),
                auth_time=request.auth_time,
                created_at=issued,
                expires_at=issued + self.server.settings.authorization_code_ttl,
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        row = self.server.db.get(AuthorizationCode, sha256_hex(code))
        if row is None or row.client_id != client.client_id:
            return None  # another client's code is refused and left alone
        if row.used_at is not None:
            if _replayed(row):
                self._revoke_what_it_issued(row)
            return None
        if row.expires_at <= self.server.now:
            return None
        return row

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User | None:
        user = self.server.db.get(User, authorization_code.user_id)
        return None if user is None or user.disabled else user

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        request = self.request
        code: AuthorizationCode = request.authorization_code
        db = self.server.db
        # RFC 8707 §2.2: within the authorization request's resources; checked before the
        # code is spent, so a client can correct the request.
        request.resources = rfc8707.within(
            rfc8707.requested(request.form), code.resources, self.server.settings
        )
        # The browser session is read back from the claimed row, not from the row loaded
        # before: signing in again may have moved the code to the browser's new session
        # meanwhile, and the family must follow it there (a later sign-out ends it).
        claimed = db.execute(
            update(AuthorizationCode)
            .where(
                AuthorizationCode.code_hash == code.code_hash, AuthorizationCode.used_at.is_(None)
            )
            .values(used_at=self.server.now)
            .returning(AuthorizationCode.browser_session_id)
            .execution_options(synchronize_session=False)
        ).first()
        if claimed is None:
            # Another exchange of this code won (a replay, RFC 6749 §4.1.2), or the browser
            # session it was issued through ended (``manage.end_browser_sessions``).
            db.refresh(code)
            if _replayed(code):
                self._revoke_what_it_issued(code)
            raise InvalidGrantError(BAD_CODE)
        if not self._browser_session_live(claimed.browser_session_id):
            # Issued while the browser was signing out (after the sign-out spent the
            # session's codes): the sign-in it would start would outlive the sign-out.
            raise InvalidGrantError(BAD_CODE)
        user = self.authenticate_user(code)
        if user is None:
            raise InvalidGrantError(BAD_CODE)
        request.user = user
        request.scope = code.scope
        self.server.start_family(
            request,
            scope=code.scope,
            resources=code.resources,
            auth_time=code.auth_time,
            browser_session_id=claimed.browser_session_id,
        )
        token = self.server.issue(request, scope=code.scope, nonce=code.nonce)
        db.execute(
            update(AuthorizationCode)
            .where(AuthorizationCode.code_hash == code.code_hash)
            .values(family_id=request.family.id)
            .execution_options(synchronize_session=False)
        )
        return 200, token, self.TOKEN_RESPONSE_HEADER

    def _browser_session_live(self, session_id: str | None) -> bool:
        """Whether the browser session a code was issued through has not ended (one that
        merely expired still counts: its codes were issued while it lived)."""
        if session_id is None:
            return True
        ended = self.server.db.execute(
            select(BrowserSession.ended_at).where(BrowserSession.id == session_id)
        ).first()
        return ended is not None and ended.ended_at is None

    def _revoke_what_it_issued(self, code: AuthorizationCode) -> None:
        audit("code.reuse_detected", client_id=code.client_id, family_id=code.family_id)
        if code.family_id is None:
            return
        self.server.db.execute(
            revoke_families(
                RefreshFamily.id == code.family_id, at=self.server.now, reason="code_reuse"
            )
        )
