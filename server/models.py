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

from sqlalchemy import BigInteger, Boolean, ForeignKey, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> int:
    return int(time.time())


def new_id() -> str:
    return uuid.uuid4().hex


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


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
    grant_types: Mapped[str] = mapped_column(Text, default="")
    scope: Mapped[str] = mapped_column(Text, default="")
    redirect_uris: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)

    @property
    def is_public(self) -> bool:
        return self.secret_hash is None

    @property
    def grant_type_list(self) -> list[str]:
        return self.grant_types.split()

    @property
    def scope_list(self) -> list[str]:
        """Scopes the client may ask for; ``admin`` only ever for an admin client."""
        return [s for s in self.scope.split() if s != "admin" or self.is_admin]

    @property
    def redirect_uri_list(self) -> list[str]:
        return self.redirect_uris.split()

    def get_client_id(self) -> str:
        return self.client_id

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string match (RFC 9700 §4.1.3): no prefix or pattern matching.
        return redirect_uri in self.redirect_uri_list

    def check_client_secret(self, client_secret: str) -> bool:
        if self.secret_hash is None:
            return False
        return hmac.compare_digest(self.secret_hash, sha256_hex(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.is_public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_type_list


class RefreshFamily(Base):
    """One sign-in: every refresh token rotated from it, bound to one client, user and scope."""

    __tablename__ = "refresh_families"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    client_id: Mapped[str] = mapped_column(
        ForeignKey("clients.client_id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(Text, default="")
    auth_time: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    last_used_at: Mapped[int] = mapped_column(BigInteger, default=now)
    #: Absolute cap: no token of the family lives past it.
    expires_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    revoked_reason: Mapped[str | None] = mapped_column(String(50), default=None)


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
