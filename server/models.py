"""Storage: users, clients, refresh-token families and their tokens.

Times are integer Unix seconds (UTC) so SQLite and PostgreSQL compare them the same way.
The methods on ``Client`` are the interface Authlib's ``ClientMixin`` describes; they are
duck-typed so that only ``server.oauth`` imports Authlib.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Boolean,
    ColumnElement,
    ForeignKey,
    Integer,
    LargeBinary,
    Select,
    String,
    Text,
    Update,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .names import SECRET_AUTH_METHODS

#: The wall clock behind ``now()``: seconds since the epoch. Every expiry decision reads it
#: through ``now()`` (issuing: ``iat``/``exp`` and row lifetimes; checking: bearer tokens,
#: introspection, sessions, families), so a test moves time by replacing this one attribute
#: (``monkeypatch.setattr(models, "clock", ...)``) instead of sleeping. Nothing else sets it.
clock: Callable[[], float] = time.time


def now() -> int:
    """Whole seconds since the epoch, read from ``clock``."""
    return int(clock())


def new_id() -> str:
    return uuid.uuid4().hex


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def narrow_scope(requested: str | None, allowed: list[str]) -> str | None:
    """RFC 6749 §3.3: the requested scope if it lies within ``allowed`` (``None`` if not);
    omitted means all of ``allowed``. Duplicates are dropped, order kept."""
    if not requested:
        return " ".join(allowed)
    wanted = requested.split()
    if not set(wanted) <= set(allowed):
        return None
    return " ".join(dict.fromkeys(wanted))


#: The account API's scope: reads and changes the person's profile and ends their sign-ins, so
#: it is granted only with consent that names it, or to a first-party client.
ACCOUNT_SCOPE = "account"


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    #: As the person typed it, for display.
    username: Mapped[str] = mapped_column(String(150))
    #: NFKC + casefold of ``username``: the one form every lookup and uniqueness check uses.
    username_key: Mapped[str] = mapped_column(String(150), unique=True)
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    password_changed_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Client(Base):
    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    #: SHA-256 of a 256-bit random secret; ``None`` for a public client.
    secret_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    #: A resource server may introspect any token (RFC 7662 §2.1); other clients their own.
    is_resource_server: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The operator's own app: people are not asked to consent to it.
    is_first_party: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Where end-session may send the browser back to (exact match), space-separated.
    post_logout_redirect_uris: Mapped[str] = mapped_column(Text, default="")
    grant_types: Mapped[str] = mapped_column(Text, default="")
    scope: Mapped[str] = mapped_column(Text, default="")
    redirect_uris: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    #: Seconds after a rotation during which presenting the rotated refresh token again gets
    #: the same successor instead of revoking the family; ``None``: ``AUTH_REFRESH_RETRY_WINDOW``.
    refresh_retry_window: Mapped[int | None] = mapped_column(Integer, default=None)
    #: RFC 7591 §2 ``token_endpoint_auth_method``; ``None`` for a client created before it was
    #: recorded: ``none`` without a secret, else a secret method (``token_endpoint_auth_method``).
    auth_method: Mapped[str | None] = mapped_column(String(32), default=None)
    #: ``private_key_jwt``: the client's public keys, as a JWK Set (JSON), or where to fetch it.
    jwks: Mapped[str | None] = mapped_column(Text, default=None)
    jwks_uri: Mapped[str | None] = mapped_column(Text, default=None)
    #: ``client_secret_jwt``: the secret itself (HMAC needs it), sealed with AES-256-GCM under a
    #: key derived from ``AUTH_SECRET_KEY`` (``server/secretbox.py``).
    secret_sealed: Mapped[str | None] = mapped_column(Text, default=None)
    #: RFC 8707 resources (of ``AUTH_RESOURCES``) it may ask for, space-separated; ``None``: all.
    resources: Mapped[str | None] = mapped_column(Text, default=None)
    #: How it came to exist: ``None`` by an operator (CLI, admin API), ``registration`` (RFC 7591),
    #: ``document`` (its ``client_id`` is the URL of its metadata document).
    origin: Mapped[str | None] = mapped_column(String(16), default=None)
    #: RFC 7592 §3: SHA-256 of the registration access token of a registered client.
    registration_token_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    #: RFC 9449 §5 (``dpop_bound_access_tokens``): every token request needs a DPoP proof.
    dpop_bound: Mapped[bool | None] = mapped_column(Boolean, default=None)
    #: RFC 9126 §6 (``require_pushed_authorization_requests``): /oauth2/authorize accepts only
    #: a ``request_uri`` from /oauth2/par.
    require_par: Mapped[bool | None] = mapped_column(Boolean, default=None)

    def retry_window(self, default: int) -> int:
        return default if self.refresh_retry_window is None else self.refresh_retry_window

    @property
    def token_endpoint_auth_method(self) -> str:
        if self.auth_method is not None:
            return self.auth_method
        return "none" if self.secret_hash is None else "client_secret_basic"

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"  # noqa: S105 (a method name)

    @property
    def uses_secret(self) -> bool:
        """Authenticates with a shared secret sent as such (Basic or in the form)."""
        return self.token_endpoint_auth_method in SECRET_AUTH_METHODS

    @property
    def resource_list(self) -> list[str] | None:
        return None if self.resources is None else self.resources.split()

    @property
    def grant_type_list(self) -> list[str]:
        return self.grant_types.split()

    @property
    def scope_list(self) -> list[str]:
        """Scopes the client may ask for; ``admin`` only ever for an admin client."""
        return [s for s in self.scope.split() if s != "admin" or self.is_admin]

    @property
    def scope_list_without_consent(self) -> list[str]:
        """What a grant that shows no consent page (the password grant) may give: ``account``
        only to a first-party client."""
        return [s for s in self.scope_list if s != ACCOUNT_SCOPE or self.is_first_party]

    @property
    def redirect_uri_list(self) -> list[str]:
        return self.redirect_uris.split()

    @property
    def post_logout_redirect_uri_list(self) -> list[str]:
        return self.post_logout_redirect_uris.split()

    def get_client_id(self) -> str:
        return self.client_id

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string match (RFC 9700 §4.1.3): no prefix or pattern matching.
        return redirect_uri in self.redirect_uri_list

    def check_client_secret(self, client_secret: str) -> bool:
        # A client_secret_jwt client's secret only ever keys its assertions (one method per
        # client): sent as such it is refused.
        if self.secret_hash is None or not self.uses_secret:
            return False
        return hmac.compare_digest(self.secret_hash, sha256_hex(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        """One method per client (its registered one); the two secret methods are one."""
        mine = self.token_endpoint_auth_method
        if mine in SECRET_AUTH_METHODS:
            return method in SECRET_AUTH_METHODS
        return method == mine

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_type_list

    def check_response_type(self, response_type: str | None) -> bool:
        # Only the authorization code flow (RFC 9700 §2.1.2: no implicit grant).
        return response_type == "code" and self.check_grant_type("authorization_code")

    def get_default_redirect_uri(self) -> str | None:
        # RFC 6749 §3.1.2.3: redirect_uri may be omitted only when exactly one is registered.
        uris = self.redirect_uri_list
        return uris[0] if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        # ``None`` is answered by Authlib with invalid_scope.
        return narrow_scope(scope, self.scope_list)


class RefreshFamily(Base):
    """One sign-in: every refresh token rotated from it, bound to one client, user and scope."""

    __tablename__ = "refresh_families"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.client_id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    #: RFC 8707 resources the sign-in was granted, space-separated; empty: the default
    #: audience only. A refresh may ask for any of them, never another.
    resources: Mapped[str] = mapped_column(Text, default="")
    auth_time: Mapped[int] = mapped_column(BigInteger)
    #: RFC 8176 methods of the sign-in (space-separated, ``server/mfa.py``); ``acr`` follows.
    amr: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_used_at: Mapped[int] = mapped_column(BigInteger, default=now)
    #: Absolute cap: no token of the family lives past it.
    expires_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    revoked_reason: Mapped[str | None] = mapped_column(String(50), default=None)
    #: The browser sign-in that created it (authorization code flow); signing that browser
    #: out ends this family too.
    browser_session_id: Mapped[str | None] = mapped_column(
        ForeignKey("browser_sessions.id", ondelete="SET NULL"), default=None, index=True
    )
    #: RFC 9449 §5: the JWK thumbprint (RFC 7638) of the key a public client's refresh tokens
    #: of this sign-in are bound to; refreshing needs a proof with that key. ``None``: unbound.
    dpop_jkt: Mapped[str | None] = mapped_column(String(64), default=None)


def live_families(user_id: str, at: int) -> Select[RefreshFamily, str]:
    """A person's live sign-ins with their client's name, most recently used first."""
    return (
        select(RefreshFamily, Client.name)
        .join(Client, Client.client_id == RefreshFamily.client_id)
        .where(
            RefreshFamily.user_id == user_id,
            RefreshFamily.revoked_at.is_(None),
            RefreshFamily.expires_at > at,
        )
        .order_by(RefreshFamily.last_used_at.desc(), RefreshFamily.id)
    )


def revoke_families(
    *where: ColumnElement[bool], at: int | BindParameter[int], reason: str | BindParameter[str]
) -> Update:
    """The one way a family (sign-in) dies: revoked once, never re-stamped. Every rotation and
    revocation updates the family row, so they serialise on it (see ``RefreshTokenGrant``)."""
    return (
        update(RefreshFamily)
        .where(*where, RefreshFamily.revoked_at.is_(None))
        .values(revoked_at=at, revoked_reason=reason)
        .execution_options(synchronize_session=False)
    )


class RefreshToken(Base):
    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    family_id: Mapped[str] = mapped_column(
        ForeignKey("refresh_families.id", ondelete="CASCADE"), index=True
    )
    #: SHA-256 of the token: the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    #: Set once, atomically, by the one request that rotates this token.
    rotated_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class RevokedAccessToken(Base):
    """An access token revoked before it expired (RFC 7009 §2.1), by its ``jti``.

    Access tokens are self-contained JWTs, so revocation is a deny-list that introspection
    consults; a row is useless once ``expires_at`` has passed and may then be deleted.
    """

    __tablename__ = "revoked_access_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(100))
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    revoked_at: Mapped[int] = mapped_column(BigInteger, default=now)


class BrowserSession(Base):
    """A person signed in on the hosted pages, in one browser (the session cookie)."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    #: SHA-256 of the cookie value: a stolen database does not yield live cookies.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    auth_time: Mapped[int] = mapped_column(BigInteger)
    #: RFC 8176 methods the person signed in with (space-separated, ``server/mfa.py``).
    amr: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    ended_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class AuthorizationCode(Base):
    """RFC 6749 §4.1: single use, short-lived, bound to client, redirect URI and PKCE."""

    __tablename__ = "authorization_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.client_id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    browser_session_id: Mapped[str | None] = mapped_column(String(32), default=None)
    redirect_uri: Mapped[str] = mapped_column(Text)
    #: Whether the authorization request carried ``redirect_uri`` (then the token request
    #: must repeat it, RFC 6749 §4.1.3).
    redirect_uri_given: Mapped[bool] = mapped_column(Boolean, default=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    #: RFC 8707 resources of the authorization request (as on ``RefreshFamily``).
    resources: Mapped[str] = mapped_column(Text, default="")
    nonce: Mapped[str | None] = mapped_column(String(255), default=None)
    code_challenge: Mapped[str | None] = mapped_column(String(128), default=None)
    code_challenge_method: Mapped[str | None] = mapped_column(String(10), default=None)
    auth_time: Mapped[int] = mapped_column(BigInteger)
    #: The browser session's ``amr`` when the code was issued.
    amr: Mapped[str] = mapped_column(String(64), default="", server_default="")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    #: Set once, atomically, by the exchange that wins; a second exchange is reuse.
    used_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: The family the exchange started, so reuse can revoke what the code issued.
    family_id: Mapped[str | None] = mapped_column(String(32), default=None)
    #: RFC 9449 §10: the thumbprint of the DPoP key the code is bound to (``dpop_jkt`` at
    #: /oauth2/authorize, or the key of the proof sent to /oauth2/par).
    dpop_jkt: Mapped[str | None] = mapped_column(String(64), default=None)

    def get_redirect_uri(self) -> str | None:
        # What Authlib's token-request validation compares the token request's URI with.
        return self.redirect_uri if self.redirect_uri_given else None


class Consent(Base):
    """What a person has allowed a client, remembered so they are asked once per scope."""

    __tablename__ = "consents"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.client_id", ondelete="CASCADE"), primary_key=True
    )
    scope: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


class RegistrationToken(Base):
    """An initial access token (RFC 7591 §3): lets whoever holds it register clients until it
    expires. Only its hash is stored; ``clients registration-token`` shows it once."""

    __tablename__ = "registration_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)


class PushedRequest(Base):
    """RFC 9126: an authorization request pushed to /oauth2/par, until one code is issued for
    it. Only the hash of its ``request_uri`` is stored. It must be opened at /oauth2/authorize
    before ``expires_at``; the first browser that opens it holds it (``browser_hash``, the
    hash of that browser's ``par`` cookie) for the sign-in, and nobody else can open it."""

    __tablename__ = "pushed_requests"

    request_uri_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.client_id", ondelete="CASCADE"), index=True
    )
    #: The validated request parameters, as a JSON object of strings.
    params: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    browser_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    #: Set once, atomically, when the request ends at the client (a code or an error).
    used_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class SigningKey(Base):
    """A signing key of ``AUTH_KEY_STORE=database``: its state (next → current → retired, as
    in ``keys.json``), its public JWK, and its private key (PEM) sealed with AES-256-GCM under
    the encryption key whose id is ``encryption_key_id`` (``server/keycrypt.py``)."""

    __tablename__ = "signing_keys"

    #: The key's RFC 7638 thumbprint (checked against ``public_jwk`` at every load).
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: The key type's family: ``RS256`` keys are RSA (also used for PS256).
    alg: Mapped[str] = mapped_column(String(16), default="RS256")
    public_jwk: Mapped[str] = mapped_column(Text)
    private_key: Mapped[bytes] = mapped_column(LargeBinary)
    encryption_key_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    activated_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    retired_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class WebAuthnCredential(Base):
    """A passkey (WebAuthn Level 3 public key credential) a person registered on /account."""

    __tablename__ = "webauthn_credentials"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: The credential id, base64url without padding (§5.1: at most 1023 bytes).
    credential_id: Mapped[str] = mapped_column(String(1400), unique=True)
    #: The COSE public key (§6.5.1.1) the registration gave.
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    #: §6.1.1: the last signature counter seen; 0 for authenticators that keep none.
    sign_count: Mapped[int] = mapped_column(BigInteger, default=0)
    #: §6.1.3: BE never changes for a credential; BS (backed up) may.
    backup_eligible: Mapped[bool] = mapped_column(Boolean, default=False)
    backed_up: Mapped[bool] = mapped_column(Boolean, default=False)
    #: ``AuthenticatorTransport`` values, space-separated, as hints for ``allowCredentials``.
    transports: Mapped[str] = mapped_column(String(200), default="")
    aaguid: Mapped[str] = mapped_column(String(36), default="")
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, default=None)


class TotpFactor(Base):
    """A one-time code app (RFC 6238), one per person; usable once ``confirmed_at`` is set."""

    __tablename__ = "totp_factors"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    #: The shared secret, sealed with AES-256-GCM under ``AUTH_SECRET_KEY`` (``secretbox``).
    secret_sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    confirmed_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: The last time step (RFC 6238 §4) a code was accepted for: a code of that step or an
    #: earlier one is refused (§5.2: one use per code), by one conditional UPDATE.
    last_step: Mapped[int] = mapped_column(BigInteger, default=0)


class RecoveryCode(Base):
    """One of the ten single-use codes shown once at TOTP enrolment; only a keyed hash kept."""

    __tablename__ = "recovery_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    used_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
