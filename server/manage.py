"""Operator actions on clients and users: what the CLI (and later the admin API) call.

Every function takes an open session and leaves committing to the caller.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from .models import (
    Client,
    RefreshFamily,
    RevokedAccessToken,
    User,
    now,
    revoke_families,
    sha256_hex,
)
from .observability import audit
from .passwords import Passwords, normalize_username

SUPPORTED_GRANTS = ("password", "refresh_token", "client_credentials", "authorization_code")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,100}$")
USERNAME_RE = re.compile(r"^[\w.@+-]{1,150}$")
SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §3.3 scope-token
#: Spelled without ``\s``: the same pattern is published in the OpenAPI schema, and ECMAScript's
#: ``\s`` (what schema tools use) and Python's differ on characters such as U+0085.
_EMAIL_CHAR = r"[^@ \t\n\r\f\v\x00-\x1f\x7f-\x9f]"
EMAIL_RE = re.compile(rf"^{_EMAIL_CHAR}{{1,64}}@{_EMAIL_CHAR}{{1,189}}\.{_EMAIL_CHAR}{{1,63}}$")
SECRET_BYTES = 32  # 256 bits


class ManageError(ValueError):
    """An operator mistake; the message is one line meant for the operator."""


class AlreadyExistsError(ManageError):
    """The username or client id is taken (the JSON APIs answer 409)."""


class PasswordPolicyError(ManageError):
    """The password policy refused the password (the JSON APIs answer 400 weak_password)."""


@dataclass(frozen=True)
class NewClient:
    client: Client
    #: Shown once, never stored; ``None`` for a public client.
    secret: str | None


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def _check_redirect_uri(uri: str) -> str:
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s#]+$", uri) and not re.match(
        r"^[a-z][a-z0-9+.-]*\.[a-z0-9+.-]+:/[^\s#]*$", uri
    ):
        raise ManageError(f"redirect URI {uri!r} must be absolute, without a fragment or spaces")
    return uri


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
) -> NewClient:
    if not CLIENT_ID_RE.match(client_id):
        raise ManageError("client id must be 1-100 characters of A-Z a-z 0-9 . _ ~ -")
    if resource_server and public:
        raise ManageError("a resource server must be confidential: it authenticates to introspect")
    if not grants:
        # A resource server only introspects; it needs no grant unless asked for one.
        grants = (
            []
            if resource_server
            else ["password", "refresh_token"] + ([] if public else ["client_credentials"])
        )
    unknown = [g for g in grants if g not in SUPPORTED_GRANTS]
    if unknown:
        raise ManageError(
            f"unsupported grant {unknown[0]!r}; choose from {', '.join(SUPPORTED_GRANTS)}"
        )
    if public and "client_credentials" in grants:
        raise ManageError("a public client cannot use client_credentials (it has no secret)")
    scopes = scope.split()
    bad = [s for s in scopes if not SCOPE_TOKEN_RE.match(s)]
    if bad:
        raise ManageError(f"invalid scope token {bad[0]!r}")
    if "admin" in scopes and not admin:
        raise ManageError("only an --admin client may be given the admin scope")
    if admin and "admin" not in scopes:
        scopes.append("admin")
    uris = [_check_redirect_uri(uri) for uri in redirect_uris or []]
    logout_uris = [_check_redirect_uri(uri) for uri in post_logout_redirect_uris or []]
    if "authorization_code" in grants and not uris:
        raise ManageError("the authorization_code grant needs at least one --redirect-uri")
    if await db.get(Client, client_id) is not None:
        raise AlreadyExistsError(f"client {client_id!r} already exists")
    secret = None if public else new_secret()
    client = Client(
        client_id=client_id,
        name=name or client_id,
        secret_hash=None if secret is None else sha256_hex(secret),
        is_admin=admin,
        is_resource_server=resource_server,
        grant_types=" ".join(dict.fromkeys(grants)),
        scope=" ".join(dict.fromkeys(scopes)),
        redirect_uris=" ".join(uris),
        is_first_party=first_party,
        post_logout_redirect_uris=" ".join(logout_uris),
    )
    db.add(client)
    await db.flush()
    audit(
        "client.created",
        client_id=client_id,
        public=public,
        admin=admin,
        resource_server=resource_server,
    )
    return NewClient(client=client, secret=secret)


async def get_client(db: AsyncSession, client_id: str) -> Client:
    client = await db.get(Client, client_id)
    if client is None:
        raise ManageError(f"no client {client_id!r}")
    return client


async def list_clients(db: AsyncSession) -> list[Client]:
    return list(await db.scalars(select(Client).order_by(Client.client_id)))


async def delete_client(db: AsyncSession, client_id: str) -> None:
    client = await get_client(db, client_id)
    await db.delete(client)
    audit("client.deleted", client_id=client_id)


async def rotate_client_secret(db: AsyncSession, client_id: str) -> str:
    client = await get_client(db, client_id)
    if client.is_public:
        raise ManageError(f"client {client_id!r} is public: it has no secret")
    secret = new_secret()
    client.secret_hash = sha256_hex(secret)
    audit("client.secret_rotated", client_id=client_id)
    return secret


async def create_user(
    db: AsyncSession,
    passwords: Passwords,
    *,
    username: str,
    password: str,
    email: str | None = None,
    name: str | None = None,
) -> User:
    if not USERNAME_RE.match(username):
        raise ManageError("username must be 1-150 letters, digits or . @ + - _")
    if email is not None and (len(email) > 254 or not EMAIL_RE.match(email)):
        raise ManageError(f"{email!r} is not a valid email address")
    try:
        passwords.check_policy(password, username=username)
    except ValueError as exc:
        raise PasswordPolicyError(str(exc)) from None
    key = normalize_username(username)
    if await db.scalar(select(User.id).where(User.username_key == key)) is not None:
        raise AlreadyExistsError(f"user {username!r} already exists")
    user = User(
        username=username,
        username_key=key,
        email=email,
        name=name,
        password_hash=await passwords.hash_async(password),
    )
    db.add(user)
    await db.flush()
    audit("user.created", user_id=user.id)
    return user


async def get_user(db: AsyncSession, username: str) -> User:
    user = await db.scalar(select(User).where(User.username_key == normalize_username(username)))
    if user is None:
        raise ManageError(f"no user {username!r}")
    return user


async def list_users(db: AsyncSession) -> list[User]:
    return list(await db.scalars(select(User).order_by(User.username_key)))


async def revoke_user_families(db: AsyncSession, user_id: str, *, reason: str) -> int:
    result = await db.execute(
        revoke_families(RefreshFamily.user_id == user_id, at=now(), reason=reason)
    )
    count: int = result.rowcount  # type: ignore[attr-defined]
    return count


async def disable_user(db: AsyncSession, username: str) -> int:
    """Disable the account and end every sign-in it has; returns the families revoked."""
    user = await get_user(db, username)
    user.disabled = True
    revoked = await revoke_user_families(db, user.id, reason="user_disabled")
    audit("user.disabled", user_id=user.id, families_revoked=revoked)
    return revoked


async def set_password(db: AsyncSession, passwords: Passwords, username: str, password: str) -> int:
    """Change the password and end every sign-in; returns the families revoked."""
    user = await get_user(db, username)
    try:
        passwords.check_policy(password, username=user.username)
    except ValueError as exc:
        raise PasswordPolicyError(str(exc)) from None
    user.password_hash = await passwords.hash_async(password)
    user.password_changed_at = now()
    revoked = await revoke_user_families(db, user.id, reason="password_changed")
    audit("user.password_changed", user_id=user.id, families_revoked=revoked)
    return revoked


@dataclass(frozen=True)
class Pruned:
    families: int
    revoked_access_tokens: int


async def prune_tokens(db: AsyncSession, *, access_token_ttl: int) -> Pruned:
    """Delete what can no longer matter: sign-ins ended (revoked or past their cap) for longer
    than an access token lives, with their refresh tokens, and deny-listed ``jti``s whose
    tokens have expired. Live families keep their rotated tokens: replaying one must still
    be recognised as reuse."""
    stamp = now()
    ended_before = stamp - access_token_ttl
    families = await db.execute(
        delete(RefreshFamily).where(
            or_(
                RefreshFamily.revoked_at <= ended_before,
                RefreshFamily.expires_at <= ended_before,
            )
        )
    )
    # Refresh tokens go with their family (ON DELETE CASCADE).
    revoked = await db.execute(
        delete(RevokedAccessToken).where(RevokedAccessToken.expires_at <= stamp)
    )
    result = Pruned(
        families=families.rowcount,  # type: ignore[attr-defined]
        revoked_access_tokens=revoked.rowcount,  # type: ignore[attr-defined]
    )
    audit(
        "tokens.pruned",
        families=result.families,
        revoked_access_tokens=result.revoked_access_tokens,
    )
    return result
