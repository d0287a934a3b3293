"""Operator actions on clients and users: what the CLI and the admin API call.

Every function takes an open session and leaves committing to the caller. Functions that
change something emit an audit event; ``actor`` names the admin-API client acting (the CLI
passes none: its operator is whoever ran it, in the shell's own history).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from . import clients, models
from .boundary import column_length, text_problem
from .client_metadata import MetadataError, check_fetch_url, check_jwks
from .config import MAX_REFRESH_RETRY_WINDOW, Settings
from .models import (
    AuthorizationCode,
    BrowserSession,
    Client,
    PushedRequest,
    RefreshFamily,
    RegistrationToken,
    RevokedAccessToken,
    User,
    now,
    revoke_families,
    sha256_hex,
)
from .names import CLIENT_AUTH_METHODS, GRANT_TYPES, SECRET_AUTH_METHODS
from .observability import audit
from .passwords import Passwords, normalize_username
from .secretbox import seal
from .usernames import UsernameError, check_username

#: Checked with ``fullmatch``: Python's ``$`` also matches before a final newline, which would let
#: "alice\n" through as a look-alike of "alice". (The ``^…$`` stay for the OpenAPI schema.)
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,100}$")
USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")
SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §3.3 scope-token
#: Spelled without ``\s``: the same pattern is published in the OpenAPI schema, and ECMAScript's
#: ``\s`` (what schema tools use) and Python's differ on characters such as U+0085.
_EMAIL_CHAR = r"[^@ \t\n\r\f\v\x00-\x1f\x7f-\x9f]"
EMAIL_RE = re.compile(rf"^{_EMAIL_CHAR}{{1,64}}@{_EMAIL_CHAR}{{1,189}}\.{_EMAIL_CHAR}{{1,63}}$")
SECRET_BYTES = 32  # 256 bits
MAX_URI_LENGTH = 2000


class ManageError(ValueError):
    """An operator mistake; the message is one line meant for the operator."""


class AlreadyExistsError(ManageError):
    """The username or client id is taken (the JSON APIs answer 409)."""


class PasswordPolicyError(ManageError):
    """The password policy refused the password (the JSON APIs answer 400 weak_password)."""


class RedirectUriError(ManageError):
    """A redirect URI we will not register (the admin API answers 400 invalid_redirect_uri)."""


class PublicClientError(ManageError):
    """A public client has no secret to rotate (the admin API answers 409 public_client)."""


class NotFoundError(ManageError):
    """No such client or user (the JSON APIs answer 404)."""


def _audit(event: str, actor: str | None, **fields: Any) -> None:
    if actor is not None:
        fields.update(actor_client_id=actor, via="admin_api")
    audit(event, **fields)


def client_view(client: Client) -> dict[str, Any]:
    """A client as ``clients … --json`` prints it and the admin API answers it (member names
    from RFC 7591 §2 client metadata where one exists); never a secret or its hash."""
    return {
        "client_id": client.client_id,
        "name": client.name,
        "public": client.is_public,
        "admin": client.is_admin,
        "resource_server": client.is_resource_server,
        "first_party": client.is_first_party,
        "grant_types": client.grant_type_list,
        "scope": client.scope,
        "redirect_uris": client.redirect_uri_list,
        "post_logout_redirect_uris": client.post_logout_redirect_uri_list,
        "refresh_retry_window": client.refresh_retry_window,
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        **({"jwks": json.loads(client.jwks)} if client.jwks is not None else {}),
        **({"jwks_uri": client.jwks_uri} if client.jwks_uri is not None else {}),
        #: RFC 8707 resources it may ask for; ``None``: every one of ``AUTH_RESOURCES``.
        "resources": client.resource_list,
        #: ``None``: an operator's; ``registration`` (RFC 7591); ``document`` (a metadata URL).
        "origin": client.origin,
        #: RFC 9449 §5.2: its token requests must carry a DPoP proof.
        "dpop_bound_access_tokens": bool(client.dpop_bound),
        #: RFC 9126 §6: its authorization requests must be pushed (PAR) first.
        "require_pushed_authorization_requests": bool(client.require_par),
        "created_at": client.created_at,
    }


def user_view(user: User) -> dict[str, Any]:
    """A user as ``users … --json`` prints it and the admin API answers it; never the hash."""
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "name": user.name,
        "disabled": user.disabled,
        "created_at": user.created_at,
        "password_changed_at": user.password_changed_at,
    }


@dataclass(frozen=True)
class NewClient:
    client: Client
    #: Shown once, never stored; ``None`` for a public client.
    secret: str | None


@dataclass(frozen=True)
class UpdatedClient:
    client: Client
    #: A new secret when the change of method needed one (shown once), else ``None``.
    secret: str | None


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


@dataclass(frozen=True)
class Credentials:
    #: Shown once, never stored in the clear; ``None`` when the client has no secret.
    secret: str | None
    secret_hash: str | None
    secret_sealed: str | None


def credentials_for(method: str, client_id: str, secret_key: str) -> Credentials:
    """The secret columns of a client authenticating with ``method``.

    - ``client_secret_basic``/``client_secret_post``: a new secret, stored as its hash.
    - ``client_secret_jwt``: a new secret, also sealed (``server/secretbox.py``), since the
      server needs it to check the HMAC of the client's assertions.
    - ``private_key_jwt``: no secret; the hash of one nobody knows is stored, so that code
      older than migration 0007 (which tells public clients by a missing hash) sees a
      confidential client whose secret nobody has, not a public one.
    - ``none``: nothing.
    """
    if method == "none":
        return Credentials(None, None, None)
    secret = new_secret()
    if method == "private_key_jwt":
        return Credentials(None, sha256_hex(new_secret()), None)
    sealed = seal(secret_key, secret, context=client_id) if method == "client_secret_jwt" else None
    return Credentials(secret, sha256_hex(secret), sealed)


def check_redirect_uri(uri: str, *, https_only: bool = False) -> str:
    """An absolute URI, stored and later compared as the exact string (RFC 9700 §4.1.3): no
    fragment (RFC 6749 §3.1.2), no spaces, no wildcard. ``https_only`` (production, through
    the admin API) also refuses every other scheme."""
    if len(uri) > MAX_URI_LENGTH:
        raise RedirectUriError(f"a redirect URI is at most {MAX_URI_LENGTH} characters")
    if not re.fullmatch(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s#]+$", uri) and not re.fullmatch(
        r"^[a-z][a-z0-9+.-]*\.[a-z0-9+.-]+:/[^\s#]*$", uri
    ):
        raise RedirectUriError(
            f"redirect URI {uri!r} must be absolute, without a fragment or spaces"
        )
    if "*" in uri:
        raise RedirectUriError(f"redirect URI {uri!r}: URIs are exact strings, not patterns")
    if https_only:
        parts = urlsplit(uri)
        if parts.scheme != "https" or not parts.hostname:
            raise RedirectUriError(f"redirect URI {uri!r} must be https in production")
    return uri


def _checked_grants(grants: Sequence[str], *, public: bool) -> list[str]:
    unknown = [g for g in grants if g not in GRANT_TYPES]
    if unknown:
        raise ManageError(f"unsupported grant {unknown[0]!r}; choose from {', '.join(GRANT_TYPES)}")
    if public and "client_credentials" in grants:
        raise ManageError("a public client cannot use client_credentials (it has no secret)")
    return list(dict.fromkeys(grants))


def _checked_scopes(scopes: Sequence[str], *, admin: bool) -> list[str]:
    bad = [s for s in scopes if not SCOPE_TOKEN_RE.fullmatch(s)]
    if bad:
        raise ManageError(f"invalid scope token {bad[0]!r}")
    if "admin" in scopes and not admin:
        raise ManageError("only an --admin client may be given the admin scope")
    result = list(dict.fromkeys(scopes))
    if admin and "admin" not in result:
        result.append("admin")
    return result


def _check_redirect_needs(grants: Sequence[str], uris: Sequence[str]) -> None:
    if "authorization_code" in grants and not uris:
        raise ManageError("the authorization_code grant needs at least one --redirect-uri")


def _checked_method(method: str | None, *, public: bool) -> str:
    """``--public`` is ``none``; without a method a client is public or ``client_secret_basic``."""
    if method is None:
        return "none" if public else "client_secret_basic"
    if method not in CLIENT_AUTH_METHODS:
        raise ManageError(f"auth method must be one of {', '.join(CLIENT_AUTH_METHODS)}")
    if public and method != "none":
        raise ManageError(f"a public client authenticates with none, not {method}")
    return method


def _checked_keys(
    method: str, jwks: Any, jwks_uri: str | None, settings: Settings | None
) -> tuple[str | None, str | None]:
    """The ``jwks`` (JSON text) and ``jwks_uri`` columns: exactly one of them for
    ``private_key_jwt`` (RFC 7591 §2), neither for any other method."""
    if method != "private_key_jwt":
        if jwks is not None or jwks_uri is not None:
            raise ManageError("jwks and jwks_uri are only for private_key_jwt clients")
        return None, None
    if (jwks is None) == (jwks_uri is None):
        raise ManageError("a private_key_jwt client needs its public keys: jwks or jwks_uri")
    try:
        if jwks is not None:
            return json.dumps(check_jwks(jwks), separators=(",", ":")), None
        assert jwks_uri is not None
        return None, check_fetch_url(jwks_uri, _need(settings), "jwks_uri")
    except MetadataError as error:
        raise ManageError(error.description) from None


def _checked_resources(resources: Sequence[str] | None, settings: Settings | None) -> str | None:
    """``Client.resources``: some of ``AUTH_RESOURCES`` (RFC 8707), ``None`` for all of them."""
    if resources is None:
        return None
    known = _need(settings).resources
    unknown = [r for r in resources if r not in known]
    if unknown:
        raise ManageError(
            f"resource {unknown[0][:200]!r} is not one of AUTH_RESOURCES"
            if known
            else "no resources are configured (AUTH_RESOURCES is empty)"
        )
    return " ".join(dict.fromkeys(resources))


def _need(settings: Settings | None) -> Settings:
    if settings is None:
        raise ValueError("this change needs the server's settings")
    return settings


def _check_retry_window(window: int | None) -> None:
    if window is not None and not 0 <= window <= MAX_REFRESH_RETRY_WINDOW:
        raise ManageError(
            f"refresh retry window must be 0-{MAX_REFRESH_RETRY_WINDOW} seconds (or unset)"
        )


async def create_client(
    db: AsyncSession,
    *,
    client_id: str,
    public: bool = False,
    admin: bool = False,
    resource_server: bool = False,
    grants: list[str] | None = None,
    scope: str = "",
    redirect_uris: list[str] | None = None,
    name: str = "",
    first_party: bool = False,
    post_logout_redirect_uris: list[str] | None = None,
    https_only: bool = False,
    refresh_retry_window: int | None = None,
    auth_method: str | None = None,
    jwks: Any = None,
    jwks_uri: str | None = None,
    resources: Sequence[str] | None = None,
    dpop_bound: bool = False,
    require_par: bool = False,
    settings: Settings | None = None,
    actor: str | None = None,
) -> NewClient:
    """``auth_method``: RFC 7591 §2 ``token_endpoint_auth_method`` (default: ``none`` when
    ``public``, else ``client_secret_basic``); ``jwks`` (a JWK Set) or ``jwks_uri`` for
    ``private_key_jwt``; ``resources``: the RFC 8707 resources it may ask for (``None``: all);
    ``dpop_bound``: RFC 9449 §5.2 ``dpop_bound_access_tokens``, the token endpoint refuses
    its requests without a DPoP proof; ``require_par``: RFC 9126 §6
    ``require_pushed_authorization_requests``, /oauth2/authorize accepts only a pushed request.
    ``settings`` is needed for ``client_secret_jwt`` (its secret is sealed with
    ``AUTH_SECRET_KEY``), a ``jwks_uri`` and ``resources``."""
    if not CLIENT_ID_RE.fullmatch(client_id):
        raise ManageError("client id must be 1-100 characters of A-Z a-z 0-9 . _ ~ -")
    method = _checked_method(auth_method, public=public)
    public = method == "none"
    if resource_server and public:
        raise ManageError("a resource server must be confidential: it authenticates to introspect")
    jwks_text, jwks_uri = _checked_keys(method, jwks, jwks_uri, settings)
    resource_text = _checked_resources(resources, settings)
    if not grants:
        # A resource server only introspects; it needs no grant unless asked for one.
        grants = (
            []
            if resource_server
            else ["password", "refresh_token"] + ([] if public else ["client_credentials"])
        )
    grants = _checked_grants(grants, public=public)
    scopes = _checked_scopes(scope.split(), admin=admin)
    uris = [check_redirect_uri(uri, https_only=https_only) for uri in redirect_uris or []]
    logout_uris = [
        check_redirect_uri(uri, https_only=https_only) for uri in post_logout_redirect_uris or []
    ]
    _check_redirect_needs(grants, uris)
    _check_retry_window(refresh_retry_window)
    if await db.get(Client, client_id) is not None:
        raise AlreadyExistsError(f"client {client_id!r} already exists")
    credentials = credentials_for(
        method, client_id, _need(settings).secret_key if method == "client_secret_jwt" else ""
    )
    client = Client(
        client_id=client_id,
        name=name or client_id,
        secret_hash=credentials.secret_hash,
        secret_sealed=credentials.secret_sealed,
        auth_method=method,
        jwks=jwks_text,
        jwks_uri=jwks_uri,
        resources=resource_text,
        is_admin=admin,
        is_resource_server=resource_server,
        grant_types=" ".join(grants),
        scope=" ".join(scopes),
        redirect_uris=" ".join(uris),
        is_first_party=first_party,
        post_logout_redirect_uris=" ".join(logout_uris),
        refresh_retry_window=refresh_retry_window,
        dpop_bound=dpop_bound,
        require_par=require_par,
    )
    db.add(client)
    await db.flush()
    _audit(
        "client.created",
        actor,
        client_id=client_id,
        public=public,
        admin=admin,
        resource_server=resource_server,
        auth_method=method,
        dpop_bound=dpop_bound,
        require_par=require_par,
    )
    return NewClient(client=client, secret=credentials.secret)


async def get_client(db: AsyncSession, client_id: str) -> Client:
    client = await db.get(Client, client_id)
    if client is None:
        raise NotFoundError(f"no client {client_id!r}")
    return client


async def list_clients(db: AsyncSession) -> list[Client]:
    return list(await db.scalars(select(Client).order_by(Client.client_id)))


async def page_clients(db: AsyncSession, *, after: str | None, limit: int) -> list[Client]:
    """Up to ``limit`` clients by ``client_id``, after ``after`` (keyset pagination)."""
    query = select(Client).order_by(Client.client_id).limit(limit)
    if after is not None:
        query = query.where(Client.client_id > after)
    return list(await db.scalars(query))


#: What ``update_client`` may change: everything but identity, secret and the admin and
#: resource-server roles (which decide what the client may do to others: set at creation).
CLIENT_CHANGES = frozenset(
    {
        "name",
        "grant_types",
        "scope",
        "redirect_uris",
        "post_logout_redirect_uris",
        "first_party",
        "refresh_retry_window",
        "token_endpoint_auth_method",
        "jwks",
        "jwks_uri",
        "resources",
        "dpop_bound_access_tokens",
        "require_pushed_authorization_requests",
    }
)


async def update_client(
    db: AsyncSession,
    client_id: str,
    changes: dict[str, Any],
    *,
    https_only: bool = False,
    settings: Settings | None = None,
    actor: str | None = None,
) -> UpdatedClient:
    """Change the fields in ``changes`` (keys from ``CLIENT_CHANGES``), checked as at creation
    against the client's resulting registration.

    ``token_endpoint_auth_method`` moves a confidential client between the confidential
    methods (a public one stays public; a confidential one, confidential): into a method
    that needs a new secret (from ``private_key_jwt``, or into ``client_secret_jwt``, whose
    secret must be sealed), a new secret is made and returned once, as by a rotation. Its
    keys (``jwks``/``jwks_uri``) are checked against the resulting method; changing one
    replaces the other. ``resources``: a list, or ``None`` for all.
    ``dpop_bound_access_tokens``: a bool (RFC 9449 §5.2);
    ``require_pushed_authorization_requests``: a bool (RFC 9126 §6)."""
    unknown = set(changes) - CLIENT_CHANGES
    if unknown:
        raise ManageError(f"cannot change {sorted(unknown)[0]!r}")
    for flag in ("dpop_bound_access_tokens", "require_pushed_authorization_requests"):
        if not isinstance(changes.get(flag, False), bool):
            raise ManageError(f"{flag} must be true or false")
    client = await get_client(db, client_id)
    grants = _checked_grants(
        changes.get("grant_types", client.grant_type_list), public=client.is_public
    )
    scopes = _checked_scopes(changes.get("scope", client.scope).split(), admin=client.is_admin)
    uris = [
        check_redirect_uri(uri, https_only=https_only)
        for uri in changes.get("redirect_uris", client.redirect_uri_list)
    ]
    logout_uris = [
        check_redirect_uri(uri, https_only=https_only)
        for uri in changes.get("post_logout_redirect_uris", client.post_logout_redirect_uri_list)
    ]
    _check_redirect_needs(grants, uris)
    old_method = client.token_endpoint_auth_method
    method = changes.get("token_endpoint_auth_method") or old_method
    if method not in CLIENT_AUTH_METHODS:
        raise ManageError(f"auth method must be one of {', '.join(CLIENT_AUTH_METHODS)}")
    if (method == "none") != client.is_public:
        raise ManageError("a client cannot change between public and confidential")
    if "jwks" in changes or "jwks_uri" in changes:
        jwks, jwks_uri = changes.get("jwks"), changes.get("jwks_uri")
    elif method == "private_key_jwt":
        # The keys it has, checked again under the (possibly new) method.
        jwks = json.loads(client.jwks) if client.jwks is not None else None
        jwks_uri = client.jwks_uri
    else:
        jwks, jwks_uri = None, None
    jwks_text, jwks_uri = _checked_keys(method, jwks, jwks_uri, settings)
    if "resources" in changes:
        client.resources = _checked_resources(changes["resources"], settings)
    secret = None
    if method != old_method:
        same_secret = old_method in SECRET_AUTH_METHODS and method in SECRET_AUTH_METHODS
        if not same_secret:
            credentials = credentials_for(
                method,
                client_id,
                _need(settings).secret_key if method == "client_secret_jwt" else "",
            )
            client.secret_hash = credentials.secret_hash
            client.secret_sealed = credentials.secret_sealed
            secret = credentials.secret
    client.auth_method = method
    client.jwks, client.jwks_uri = jwks_text, jwks_uri
    client.name = changes.get("name") or client.name
    client.is_first_party = bool(changes.get("first_party", client.is_first_party))
    client.grant_types = " ".join(grants)
    client.scope = " ".join(scopes)
    client.redirect_uris = " ".join(dict.fromkeys(uris))
    client.post_logout_redirect_uris = " ".join(dict.fromkeys(logout_uris))
    if "dpop_bound_access_tokens" in changes:
        client.dpop_bound = changes["dpop_bound_access_tokens"]
    if "require_pushed_authorization_requests" in changes:
        client.require_par = changes["require_pushed_authorization_requests"]
    if "refresh_retry_window" in changes:
        _check_retry_window(changes["refresh_retry_window"])
        client.refresh_retry_window = changes["refresh_retry_window"]
    await clients.announce(db, [client_id])
    _audit("client.updated", actor, client_id=client_id, fields=sorted(changes))
    return UpdatedClient(client=client, secret=secret)


async def delete_client(db: AsyncSession, client_id: str, *, actor: str | None = None) -> None:
    """Delete the client; its sign-ins and codes go with it (ON DELETE CASCADE), and its
    access tokens stop being live (introspection and the APIs look the client up)."""
    client = await get_client(db, client_id)
    await db.delete(client)
    await clients.announce(db, [client_id])
    _audit("client.deleted", actor, client_id=client_id)


async def rotate_client_secret(
    db: AsyncSession,
    client_id: str,
    *,
    settings: Settings | None = None,
    actor: str | None = None,
) -> str:
    """A new secret for a secret or ``client_secret_jwt`` client (sealed again for the
    latter: ``settings`` needed); a ``private_key_jwt`` client has none (it rotates its keys)."""
    client = await get_client(db, client_id)
    if client.is_public:
        raise PublicClientError(f"client {client_id!r} is public: it has no secret")
    method = client.token_endpoint_auth_method
    if method == "private_key_jwt":
        raise ManageError(
            f"client {client_id!r} authenticates with private_key_jwt: it has no secret "
            "(change its jwks or jwks_uri instead)"
        )
    credentials = credentials_for(
        method, client_id, _need(settings).secret_key if method == "client_secret_jwt" else ""
    )
    secret = credentials.secret
    assert secret is not None
    client.secret_hash = credentials.secret_hash
    client.secret_sealed = credentials.secret_sealed
    await clients.announce(db, [client_id])
    _audit("client.secret_rotated", actor, client_id=client_id)
    return secret


#: Bounds of an initial access token's lifetime (``clients registration-token --ttl``).
REGISTRATION_TOKEN_TTL = 3600
REGISTRATION_TOKEN_MAX_TTL = 30 * 86_400


@dataclass(frozen=True)
class NewRegistrationToken:
    #: Shown once; only its hash is stored.
    token: str
    expires_at: int


async def create_registration_token(
    db: AsyncSession, *, ttl: int = REGISTRATION_TOKEN_TTL
) -> NewRegistrationToken:
    """An initial access token (RFC 7591 §3) for ``POST /oauth2/register``: any number of
    registrations until it expires."""
    if not 60 <= ttl <= REGISTRATION_TOKEN_MAX_TTL:
        raise ManageError(f"--ttl must be 60-{REGISTRATION_TOKEN_MAX_TTL} seconds")
    token = secrets.token_urlsafe(SECRET_BYTES)
    stamp = models.now()
    db.add(
        RegistrationToken(token_hash=sha256_hex(token), created_at=stamp, expires_at=stamp + ttl)
    )
    await db.flush()
    audit("registration_token.created", expires_at=stamp + ttl)
    return NewRegistrationToken(token=token, expires_at=stamp + ttl)


@dataclass(frozen=True)
class NewUserRecord:
    """A person about to be created: checked, the password already hashed."""

    username: str
    username_key: str
    email: str | None
    name: str | None
    password_hash: str


async def new_user_record(
    passwords: Passwords,
    *,
    username: str,
    password: str,
    email: str | None = None,
    name: str | None = None,
) -> NewUserRecord:
    """Every check that needs no database, then argon2: called before a request takes its
    connection, so none is held (nor SQLite's write lock) while the hash runs."""
    if not USERNAME_RE.fullmatch(username):
        raise ManageError("username must be 1-150 letters, digits or . @ + - _")
    try:
        check_username(username)  # no look-alikes: invisible characters, mixed scripts
    except UsernameError as error:
        raise ManageError(str(error)) from None
    if email is not None and (len(email) > 254 or not EMAIL_RE.fullmatch(email)):
        raise ManageError(f"{email!r} is not a valid email address")
    try:
        passwords.check_policy(password, username=username)
    except ValueError as exc:
        raise PasswordPolicyError(str(exc)) from None
    key = normalize_username(username)
    if text_problem(key, column_length(User.username_key)) is not None:
        # NFKC can lengthen a username (one "ﷺ" becomes 18 characters): the key must fit too.
        raise ManageError("username must be 1-150 letters, digits or . @ + - _")
    return NewUserRecord(username, key, email, name, await passwords.hash_async(password))


async def insert_user(db: AsyncSession, record: NewUserRecord, *, actor: str | None = None) -> User:
    taken = select(User.id).where(User.username_key == record.username_key)
    if await db.scalar(taken) is not None:
        raise AlreadyExistsError(f"user {record.username!r} already exists")
    user = User(
        username=record.username,
        username_key=record.username_key,
        email=record.email,
        name=record.name,
        password_hash=record.password_hash,
    )
    db.add(user)
    await db.flush()
    _audit("user.created", actor, user_id=user.id)
    return user


async def create_user(
    db: AsyncSession,
    passwords: Passwords,
    *,
    username: str,
    password: str,
    email: str | None = None,
    name: str | None = None,
    actor: str | None = None,
) -> User:
    """``new_user_record`` then ``insert_user`` (the CLI and tests; request handlers call the
    two apart, hashing before they take a connection)."""
    record = await new_user_record(
        passwords, username=username, password=password, email=email, name=name
    )
    return await insert_user(db, record, actor=actor)


async def get_user(db: AsyncSession, username: str) -> User:
    user = await db.scalar(select(User).where(User.username_key == normalize_username(username)))
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    return user


async def get_user_by_id(db: AsyncSession, user_id: str) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user {user_id!r}")
    return user


async def list_users(db: AsyncSession) -> list[User]:
    return list(await db.scalars(select(User).order_by(User.username_key)))


async def page_users(
    db: AsyncSession,
    *,
    after: str | None,
    limit: int,
    search: str | None = None,
    disabled: bool | None = None,
) -> list[User]:
    """Up to ``limit`` users by normalised username, after ``after`` (keyset pagination).
    ``search`` matches part of the username (compared normalised, as sign-in does) or of the
    email address (case-insensitively); ``%`` and ``_`` in it are literal."""
    query = select(User).order_by(User.username_key).limit(limit)
    if after is not None:
        query = query.where(User.username_key > after)
    if search:
        query = query.where(
            or_(
                User.username_key.contains(normalize_username(search), autoescape=True),
                func.lower(User.email).contains(search.lower(), autoescape=True),
            )
        )
    if disabled is not None:
        query = query.where(User.disabled.is_(disabled))
    return list(await db.scalars(query))


async def end_sign_in(db: AsyncSession, user_id: str, family_id: str, *, reason: str) -> bool:
    """End one live sign-in of ``user_id`` (never another person's); False if there is none."""
    result = await db.execute(
        revoke_families(
            RefreshFamily.id == family_id,
            RefreshFamily.user_id == user_id,
            at=now(),
            reason=reason,
        )
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EndedBrowserSessions:
    sessions: int
    #: Authorization codes issued through them and not yet exchanged, now spent.
    codes: int
    #: Sign-ins (families) created through them and revoked (only when asked to).
    families: int


async def end_browser_sessions(
    db: AsyncSession, *where: ColumnElement[bool], reason: str, end_families: bool = False
) -> EndedBrowserSessions:
    """End the live browser sessions (hosted-page sign-ins) matching ``where``: their cookies
    stop working and the codes issued through them and not yet exchanged are spent. With
    ``end_families`` (an explicit sign-out) the sign-ins they created are revoked too.

    The one way a browser session ends. The statements run in this order so that a code
    exchange racing with it either loses or has its family revoked: the exchange claims its
    code with one conditional UPDATE (``used_at IS NULL``) and only then creates the family.
    - Codes first: if the exchange claimed the code first, this UPDATE waits for its row lock
      (PostgreSQL) and, once the exchange has committed, skips the used code; the family the
      exchange created is then visible to the next statement, which revokes it. If this
      UPDATE spends the code first, the exchange's claim finds it used and fails.
    - Families next (only with ``end_families``), then the session rows.
    SQLite runs one writing transaction at a time, so there the two simply serialise.
    """
    stamp = now()
    # A subquery, not a list of ids: however many sessions a person has piled up, one
    # statement each. A session that starts between these statements and matches ``where``
    # is ended by the last one; a code issued through it meanwhile is refused at the token
    # endpoint, which checks that the code's browser session has not ended.
    ids = select(BrowserSession.id).where(*where, BrowserSession.ended_at.is_(None))
    # RFC 6749 §4.1.2: a code must not outlive what it was issued through; marked used, so
    # the exchange's claim (``used_at IS NULL``) refuses it, and expired at the same second,
    # which tells it from a code an exchange claimed (a later use of that one is a replay).
    codes = await db.execute(
        update(AuthorizationCode)
        .where(AuthorizationCode.browser_session_id.in_(ids), AuthorizationCode.used_at.is_(None))
        .values(used_at=stamp, expires_at=stamp)
        .execution_options(synchronize_session=False)
    )
    families = 0
    if end_families:
        revoked = await db.execute(
            revoke_families(RefreshFamily.browser_session_id.in_(ids), at=stamp, reason=reason)
        )
        families = revoked.rowcount  # type: ignore[attr-defined]
    ended = await db.execute(
        update(BrowserSession)
        .where(*where, BrowserSession.ended_at.is_(None))
        .values(ended_at=stamp)
        .execution_options(synchronize_session=False)
    )
    return EndedBrowserSessions(
        ended.rowcount,  # type: ignore[attr-defined]
        codes.rowcount,  # type: ignore[attr-defined]
        families,
    )


async def revoke_user_families(
    db: AsyncSession, user_id: str, *, reason: str, keep: str | None = None
) -> int:
    """End every sign-in of the user but ``keep``: every browser session (but the one
    ``keep`` was created through, if any) with its unexchanged codes, then every family.
    Returns the families revoked.

    Browser sessions go first, codes before families, for the reason given in
    ``end_browser_sessions``: a code exchange racing with this either loses or has its new
    family revoked by the statement that follows."""
    sessions: list[ColumnElement[bool]] = [BrowserSession.user_id == user_id]
    kept_session = (
        None
        if keep is None
        else await db.scalar(
            select(RefreshFamily.browser_session_id).where(
                RefreshFamily.id == keep, RefreshFamily.user_id == user_id
            )
        )
    )
    if kept_session is not None:
        sessions.append(BrowserSession.id != kept_session)
    await end_browser_sessions(db, *sessions, reason=reason)
    where = [RefreshFamily.user_id == user_id]
    if keep is not None:
        where.append(RefreshFamily.id != keep)
    result = await db.execute(revoke_families(*where, at=now(), reason=reason))
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


async def disable(db: AsyncSession, user: User, *, actor: str | None = None) -> int:
    """Disable the account and end every sign-in it has, browser sessions included (so that
    enabling it again revives none of them); returns the families revoked. A session is
    also refused while its person is disabled (``current_session`` checks the flag)."""
    user.disabled = True
    revoked = await revoke_user_families(db, user.id, reason="user_disabled")
    _audit("user.disabled", actor, user_id=user.id, families_revoked=revoked)
    return revoked


async def disable_user(db: AsyncSession, username: str) -> int:
    return await disable(db, await get_user(db, username))


async def enable(db: AsyncSession, user: User, *, actor: str | None = None) -> None:
    """Let the person sign in again; the sign-ins ended by disabling stay ended."""
    user.disabled = False
    _audit("user.enabled", actor, user_id=user.id)


async def reset_password(
    db: AsyncSession,
    passwords: Passwords,
    user: User,
    password: str,
    *,
    actor: str | None = None,
    keep_family: str | None = None,
) -> int:
    """Change the password and end every sign-in and browser session but ``keep_family`` (the
    one a person changing their own password is using) and the browser session it was
    created through; returns the families revoked."""
    try:
        passwords.check_policy(password, username=user.username)
    except ValueError as exc:
        raise PasswordPolicyError(str(exc)) from None
    user.password_hash = await passwords.hash_async(password)
    user.password_changed_at = now()
    revoked = await revoke_user_families(db, user.id, reason="password_changed", keep=keep_family)
    _audit("user.password_changed", actor, user_id=user.id, families_revoked=revoked)
    return revoked


async def set_password(db: AsyncSession, passwords: Passwords, username: str, password: str) -> int:
    return await reset_password(db, passwords, await get_user(db, username), password)


@dataclass(frozen=True)
class Pruned:
    families: int
    revoked_access_tokens: int
    authorization_codes: int = 0
    browser_sessions: int = 0
    pushed_requests: int = 0


#: Seconds a row whose deletion would widen access (a revocation) outlives what it guards.
#: ``tokens prune`` reads its own host's clock, but access tokens are checked against the
#: serving hosts' clocks: run on a host whose clock is fast, pruning at ``expires_at`` would
#: delete the revocation of a token the server still accepts, and that token would be live
#: again. An hour is far more than any plausible clock skew and costs a few rows.
PRUNE_SKEW_MARGIN = 3600


async def prune_tokens(
    db: AsyncSession,
    *,
    access_token_ttl: int,
    authorization_code_ttl: int = 600,
    now: int | None = None,
) -> Pruned:
    """Delete what can no longer matter, each only a safety margin after it stopped mattering
    (deleting must never widen access):

    - sign-ins ended (revoked or past their cap) for longer than an access token lives, with
      their refresh tokens: their access tokens have expired by then. Live families keep
      their rotated tokens: replaying one must still be recognised as reuse;
    - deny-listed ``jti``s whose tokens have expired;
    - authorization codes expired for longer than the margin, unless the sign-in their
      exchange started is still live (see below);
    - browser sessions ended or expired for longer than the margin;
    - pushed authorization requests expired for longer than the margin.

    The margin is the longer of an access token's and a code's lifetime (``margin_before``).
    Where deleting early would make something live again, ``PRUNE_SKEW_MARGIN`` is added, as
    this host's clock (``now``, by default ``models.now()``) may run ahead of the servers'.
    """
    stamp = models.now() if now is None else now
    ended_before = stamp - access_token_ttl
    margin_before = stamp - max(access_token_ttl, authorization_code_ttl)
    families = await db.execute(
        delete(RefreshFamily).where(
            or_(
                RefreshFamily.revoked_at <= ended_before,
                RefreshFamily.expires_at <= ended_before,
            )
        )
    )
    # Refresh tokens go with their family (ON DELETE CASCADE). Why deleting a family early
    # (on a fast clock) is still safe: it only ever fails closed. ``store.access_token_live``
    # refuses a user token whose family row is missing exactly as one whose family is
    # revoked, and a refresh token whose row is gone is ``invalid_grant``; only ended
    # families are deleted, so nothing live loses its row.
    #
    # A revocation is the opposite: without its row, an unexpired token is accepted again.
    # It is kept ``PRUNE_SKEW_MARGIN`` past its token's expiry, so a fast clock here cannot
    # delete it while a server still accepts the token.
    revoked = await db.execute(
        delete(RevokedAccessToken).where(RevokedAccessToken.expires_at <= stamp - PRUNE_SKEW_MARGIN)
    )
    # Why deleting these codes is safe: the token endpoint refuses an expired code whether
    # its row exists or not (a missing row is ``invalid_grant`` too), so no exchange can
    # succeed that would have failed; and with the margin no exchange that read the row
    # before it expired is still running. What a row adds after expiry is reuse detection
    # (RFC 6749 §4.1.2: a replayed code revokes the sign-in it started), so a code whose
    # sign-in is still live is kept until that sign-in ends and is pruned itself. A code
    # deleted early on a fast clock fails closed too (a missing code is ``invalid_grant``);
    # only its reuse detection would be lost, so a family counts as live here until
    # ``PRUNE_SKEW_MARGIN`` after its cap.
    live_family_ids = select(RefreshFamily.id).where(
        RefreshFamily.revoked_at.is_(None),
        RefreshFamily.expires_at > stamp - PRUNE_SKEW_MARGIN,
    )
    codes = await db.execute(
        delete(AuthorizationCode).where(
            AuthorizationCode.expires_at <= margin_before,
            or_(
                AuthorizationCode.family_id.is_(None),
                AuthorizationCode.family_id.not_in(live_family_ids),
            ),
        )
    )
    # Why deleting these browser sessions is safe: ``current_session`` refuses an ended or
    # expired row, so a cookie whose row is gone signs in nobody, exactly as before. A
    # family created through a deleted session loses its link (ON DELETE SET NULL); the link
    # only lets a sign-out of that session end the family, and nobody can sign out of an
    # ended or expired session any more. The margin outlasts the session's codes (a code
    # issued just before the session expired may still be exchanged for up to a code's
    # lifetime, and its family refers to the session). On a fast clock a session the server
    # still accepts may go early: that fails closed (its cookie signs in nobody), and its
    # families stay as they would after the session's own expiry.
    sessions = await db.execute(
        delete(BrowserSession).where(
            or_(
                BrowserSession.ended_at <= margin_before,
                BrowserSession.expires_at <= margin_before,
            )
        )
    )
    # Why deleting these pushed requests (RFC 9126) is safe: /oauth2/authorize refuses an
    # expired one whether its row exists or not, and an unknown request_uri alike.
    pushed = await db.execute(
        delete(PushedRequest).where(PushedRequest.expires_at <= margin_before)
    )
    result = Pruned(
        families=families.rowcount,  # type: ignore[attr-defined]
        revoked_access_tokens=revoked.rowcount,  # type: ignore[attr-defined]
        authorization_codes=codes.rowcount,  # type: ignore[attr-defined]
        browser_sessions=sessions.rowcount,  # type: ignore[attr-defined]
        pushed_requests=pushed.rowcount,  # type: ignore[attr-defined]
    )
    audit(
        "tokens.pruned",
        families=result.families,
        revoked_access_tokens=result.revoked_access_tokens,
        authorization_codes=result.authorization_codes,
        browser_sessions=result.browser_sessions,
        pushed_requests=result.pushed_requests,
    )
    return result
