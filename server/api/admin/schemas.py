"""The admin API's request and response bodies (its OpenAPI schemas): clients, users,
signing keys."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ... import manage
from ...boundary import NO_NUL
from ...client_metadata import MAX_KEYS
from ...config import MAX_REFRESH_RETRY_WINDOW
from ...names import AuthMethod, GrantType
from ..account import UserSession
from ..auth import Body

_SCOPE_TOKEN = manage.SCOPE_TOKEN_RE.pattern.strip("^$")
#: Scope tokens (RFC 6749 §3.3) separated by single spaces, or nothing.
SCOPE_PATTERN = rf"^({_SCOPE_TOKEN}( {_SCOPE_TOKEN})*)?$"
Uri = Annotated[str, Field(min_length=1, max_length=manage.MAX_URI_LENGTH, pattern=NO_NUL)]


class JwkSet(BaseModel):
    """RFC 7517 §5: public signing keys (RSA of 2048 bits or more, EC, OKP); checked in full by
    ``client_metadata.check_jwks``."""

    model_config = ConfigDict(extra="allow")

    keys: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_KEYS)


# -- clients ---------------------------------------------------------------------------------


class ClientOut(BaseModel):
    """A client as ``clients show --json`` prints it (RFC 7591 §2 names where one exists)."""

    model_config = ConfigDict(extra="forbid")

    client_id: str
    name: str
    #: No secret: authenticates with PKCE only (``authorization_code``) or not at all.
    public: bool
    admin: bool
    resource_server: bool
    first_party: bool
    grant_types: list[str]
    #: Space-separated (RFC 6749 §3.3).
    scope: str
    redirect_uris: list[str]
    post_logout_redirect_uris: list[str]
    #: Seconds a just-rotated refresh token may be presented again for the same successor;
    #: ``null``: ``AUTH_REFRESH_RETRY_WINDOW``.
    refresh_retry_window: int | None
    #: RFC 7591 §2: how it authenticates at the token, revocation and introspection endpoints.
    token_endpoint_auth_method: AuthMethod
    #: ``private_key_jwt``: its public keys (a JWK Set), or where they are published.
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None
    #: RFC 8707 resources of ``AUTH_RESOURCES`` it may ask for; ``null``: all of them.
    resources: list[str] | None
    #: ``null``: created by an operator; ``registration`` (RFC 7591); ``document`` (its
    #: client_id is the URL of its metadata document).
    origin: str | None
    #: RFC 9449 §5.2: its token requests without a DPoP proof are refused.
    dpop_bound_access_tokens: bool
    #: RFC 9126 §6: its authorization requests must be pushed (PAR); plain ones are refused.
    require_pushed_authorization_requests: bool
    created_at: int


class ChangedClient(ClientOut):
    #: A new secret when the change of ``token_endpoint_auth_method`` needed one (shown once,
    #: in this answer only), else ``null``.
    client_secret: str | None


class CreatedClient(ClientOut):
    #: Shown once, in this answer only; ``null`` for a public client.
    client_secret: str | None


class ClientSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_id: str
    #: Shown once; the previous secret stops working at once.
    client_secret: str


class _Registration(Body):
    """What creating and changing a client share."""

    #: The operator's own app: people are not asked to consent.
    first_party: bool = False
    grant_types: list[GrantType] = Field(default_factory=list, max_length=4)
    #: Space-separated scope tokens (RFC 6749 §3.3); ``admin`` only for an admin client.
    scope: str = Field(default="", max_length=2000, pattern=SCOPE_PATTERN)
    redirect_uris: list[Uri] = Field(default_factory=list, max_length=20)
    post_logout_redirect_uris: list[Uri] = Field(default_factory=list, max_length=20)
    #: Seconds during which presenting a just-rotated refresh token again gets the same
    #: successor (a retry whose answer was lost); ``null``: ``AUTH_REFRESH_RETRY_WINDOW``.
    refresh_retry_window: int | None = Field(default=None, ge=0, le=MAX_REFRESH_RETRY_WINDOW)
    #: RFC 7591 §2; default ``client_secret_basic`` (``none`` when ``public``).
    token_endpoint_auth_method: AuthMethod | None = None
    #: ``private_key_jwt`` only, exactly one of them: a JWK Set of public signing keys, or an
    #: https URL where it is published.
    jwks: JwkSet | None = None
    jwks_uri: Uri | None = None
    #: RFC 8707 resources (of ``AUTH_RESOURCES``) it may ask for; ``null``: all of them.
    resources: list[Uri] | None = Field(default=None, max_length=20)
    #: RFC 9449 §5.2: its access tokens must be DPoP-bound; token requests without a DPoP
    #: proof are refused.
    dpop_bound_access_tokens: bool = False
    #: RFC 9126 §6: its authorization requests must be pushed first (PAR); plain requests to
    #: /oauth2/authorize are refused.
    require_pushed_authorization_requests: bool = False


class NewClient(_Registration):
    """``grant_types`` defaults to password and refresh_token (+ client_credentials unless
    public); none for a resource server."""

    client_id: str = Field(min_length=1, max_length=100, pattern=manage.CLIENT_ID_RE.pattern)
    name: str = Field(default="", max_length=200, pattern=NO_NUL)
    public: bool = False
    #: May receive the ``admin`` scope, and so act on this API.
    admin: bool = False
    #: May introspect every token (RFC 7662 §2.1); must be confidential.
    resource_server: bool = False


class ClientChange(_Registration):
    """Only the fields sent change; lists are replaced whole."""

    name: str = Field(default="", min_length=1, max_length=200, pattern=NO_NUL)


class ClientPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ClientOut]
    next_cursor: str | None


# -- users -----------------------------------------------------------------------------------


class UserOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    username: str
    email: str | None
    name: str | None
    disabled: bool
    created_at: int
    password_changed_at: int


class UserPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[UserOut]
    next_cursor: str | None


class PasswordReset(Body):
    password: str = Field(min_length=1, max_length=4096, pattern=NO_NUL)


class UserSessions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sessions: list[UserSession]


class Revoked(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Sign-ins ended by this request.
    revoked: int


# -- signing keys ----------------------------------------------------------------------------


class KeyOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kid: str
    #: ``next`` (published, not yet signing), ``current`` (signs) or ``retired`` (published
    #: until its tokens expire).
    state: str
    created_at: int
    activated_at: int | None
    retired_at: int | None


class Keys(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyOut]


class KeyRotation(Body):
    #: Promote the next key even if it was published less than a JWKS max-age ago (only
    #: safe when no verifier caches the JWKS, or all refetch it on an unknown ``kid``).
    force: bool = False


class KeysPruned(BaseModel):
    model_config = ConfigDict(extra="forbid")

    removed: list[str]
    #: Why each retired key that stays is still needed.
    kept: list[str]
    #: Files keys.json did not list (left by an interrupted rotation), now deleted.
    orphans: list[str]
