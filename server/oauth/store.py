"""Every statement of the token, introspection and revocation endpoints, in SQLAlchemy Core.

No ORM session on these paths: each statement is built once, here, with bound parameters, so
SQLAlchemy compiles it once per process and asyncpg prepares it once per connection. Rows come
back as plain tuples; where Authlib wants an object with methods (a client, a code) a
transient model instance is built from the row, never attached to a session.

Round trips (``tests/test_store.py`` counts the statements):
- client_credentials: none, with the client cached (``server/clients.py``);
- refresh_token: one read (token, family and user together, ``find_refresh``) and one write
  (``rotate``: on PostgreSQL a single statement that touches the family, claims the token and
  inserts its successor, sent without BEGIN and COMMIT since it is atomic on its own; on
  SQLite, which has no writable CTEs, three statements in the same local transaction);
- introspection and bearer checks of an access token: one (``access_token_live``); of a
  refresh token: one (``live_refresh``).

Parameters are named ``p_…``: given a parameter named like a column of its table, an UPDATE
would also SET that column.

``Db`` is a synchronous ``Connection`` (the token endpoint, inside ``run_sync``) or ORM
``Session`` (the authorization endpoint); both execute Core statements the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Connection,
    String,
    Table,
    and_,
    bindparam,
    exists,
    false,
    insert,
    literal,
    not_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..db import CommitUncertain, is_unavailable
from ..models import (
    AuthorizationCode,
    BrowserSession,
    Client,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    TotpFactor,
    User,
    new_id,
    revoke_families,
)

Db = Connection | Session

families = cast(Table, RefreshFamily.__table__)
tokens = cast(Table, RefreshToken.__table__)
users = cast(Table, User.__table__)
clients = cast(Table, Client.__table__)
codes = cast(Table, AuthorizationCode.__table__)
revoked = cast(Table, RevokedAccessToken.__table__)
browser_sessions = cast(Table, BrowserSession.__table__)


@dataclass
class Family:
    """One sign-in (a ``refresh_families`` row), as the grants use it."""

    id: str
    client_id: str
    user_id: str
    scope: str
    resources: str
    auth_time: int
    expires_at: int
    browser_session_id: str | None = None
    #: RFC 9449 §5: a public client's refresh tokens are bound to this DPoP key thumbprint.
    dpop_jkt: str | None = None
    #: RFC 8176 methods of the sign-in (``server/mfa.py``); empty for one from before 0011.
    #: (Last, as in ``_FAMILY_COLUMNS``: rows become a ``Family`` by position.)
    amr: str = ""


@dataclass(frozen=True)
class Subject:
    """The person a refresh token was issued to: the grant needs only the id."""

    id: str


@dataclass(frozen=True)
class PresentedRefresh:
    """``find_refresh``'s row: the presented token, its family and whether its user is live."""

    token_id: str
    #: When it was rotated (``None``: it is the family's live token).
    rotated_at: int | None
    expires_at: int
    family: Family
    family_revoked: bool
    user_live: bool


_FAMILY_COLUMNS = (
    families.c.id,
    families.c.client_id,
    families.c.user_id,
    families.c.scope,
    families.c.resources,
    families.c.auth_time,
    families.c.expires_at,
    families.c.browser_session_id,
    families.c.dpop_jkt,
    families.c.amr,
)

# -- refresh_token ----------------------------------------------------------------------------

_FIND_REFRESH = (
    select(
        tokens.c.id,
        tokens.c.rotated_at,
        tokens.c.expires_at,
        families.c.revoked_at,
        users.c.disabled,
        *_FAMILY_COLUMNS,
    )
    .join(families, families.c.id == tokens.c.family_id)
    .join(users, users.c.id == families.c.user_id)
    .where(tokens.c.token_hash == bindparam("p_token_hash"))
)


def find_refresh(db: Db, token_hash: str) -> PresentedRefresh | None:
    """The presented refresh token with its family and user, in one statement."""
    row = db.execute(_FIND_REFRESH, {"p_token_hash": token_hash}).first()
    if row is None:
        return None
    token_id, rotated_at, expires_at, revoked_at, disabled, *family = row
    return PresentedRefresh(
        token_id=token_id,
        rotated_at=rotated_at,
        expires_at=expires_at,
        family=Family(*family),
        family_revoked=revoked_at is not None,
        user_live=not disabled,
    )


_TOUCH_FAMILY = (
    update(families)
    .where(families.c.id == bindparam("p_family_id"), families.c.revoked_at.is_(None))
    .values(last_used_at=bindparam("p_now"))
)
_NEW_REFRESH_VALUES: dict[str, Any] = {
    "id": bindparam("p_successor_id"),
    "family_id": bindparam("p_family_id"),
    "token_hash": bindparam("p_successor_hash"),
    "created_at": bindparam("p_now"),
    "expires_at": bindparam("p_successor_expires_at"),
}
_INSERT_REFRESH = insert(tokens).values(_NEW_REFRESH_VALUES)


def _rotate_postgresql() -> Any:
    """One statement: touch the family (if not revoked), claim the token (if not rotated, and
    only if the family was touched), insert the successor (only if the token was claimed).

    The family row is locked first, as every revocation locks it, so rotations and revocations
    of one family serialise (PostgreSQL runs the family CTE when the claim's condition reads
    it). Of two simultaneous rotations of one token, the second waits on that lock, then finds
    the token rotated (READ COMMITTED rechecks the updated row) and inserts nothing.
    """
    touched = _TOUCH_FAMILY.returning(families.c.id).cte("touched")
    claimed = (
        update(tokens)
        .where(
            tokens.c.id == bindparam("p_token_id"),
            tokens.c.rotated_at.is_(None),
            exists(select(touched.c.id)),
        )
        .values(rotated_at=bindparam("p_now"))
        .returning(tokens.c.family_id)
        .cte("claimed")
    )
    # Typed: PostgreSQL cannot infer the type of a parameter in a SELECT list.
    successor = select(
        bindparam("p_successor_id", type_=String),
        claimed.c.family_id,
        bindparam("p_successor_hash", type_=String),
        bindparam("p_now", type_=BigInteger),
        bindparam("p_successor_expires_at", type_=BigInteger),
    )
    return (
        insert(tokens)
        .from_select(["id", "family_id", "token_hash", "created_at", "expires_at"], successor)
        .returning(tokens.c.id)
    )


_ROTATE_POSTGRESQL = _rotate_postgresql()
_CLAIM = (
    update(tokens)
    .where(tokens.c.id == bindparam("p_token_id"), tokens.c.rotated_at.is_(None))
    .values(rotated_at=bindparam("p_now"))
)


def rotate(
    db: Db,
    *,
    family_id: str,
    token_id: str,
    now: int,
    successor_hash: str,
    successor_expires_at: int,
) -> bool:
    """Rotate ``token_id`` to a new token of the family; True for exactly one caller, False if
    the family is revoked or another request rotated the token first (reuse)."""
    params = {
        "p_family_id": family_id,
        "p_token_id": token_id,
        "p_now": now,
        "p_successor_id": new_id(),
        "p_successor_hash": successor_hash,
        "p_successor_expires_at": successor_expires_at,
    }
    if _dialect(db) == "postgresql":
        try:
            return db.execute(_ROTATE_POSTGRESQL, params).first() is not None
        except Exception as exc:
            if is_unavailable(exc) and _autocommit(db):
                # Sent without a transaction (``routes._run``), the statement may have
                # committed before the answer was lost: settled by the caller, never rerun
                # (a rerun would find the token rotated and revoke the sign-in as reuse).
                raise CommitUncertain("connection lost during the rotation") from exc
            raise
    # SQLite: the transaction holds the database's one write lock (BEGIN IMMEDIATE).
    if db.execute(_TOUCH_FAMILY, params).rowcount != 1:  # type: ignore[attr-defined]
        return False
    if db.execute(_CLAIM, params).rowcount != 1:  # type: ignore[attr-defined]
        return False
    db.execute(_INSERT_REFRESH, params)
    return True


_presented = tokens.alias("presented")
_RETRY_SUCCESSOR = (
    select(_presented.c.rotated_at)
    .join(tokens, tokens.c.family_id == _presented.c.family_id)
    .join(families, families.c.id == _presented.c.family_id)
    .where(
        _presented.c.id == bindparam("p_token_id"),
        tokens.c.token_hash == bindparam("p_successor_hash"),
        tokens.c.rotated_at.is_(None),
        tokens.c.expires_at > bindparam("p_now"),
        families.c.revoked_at.is_(None),
        families.c.expires_at > bindparam("p_now"),
    )
)


def retry_successor(db: Db, *, token_id: str, successor_hash: str, now: int) -> int | None:
    """When ``token_id`` was rotated, if its successor is ``successor_hash`` and still the
    family's live token (not rotated itself, unexpired, family live); else ``None``."""
    row = db.execute(
        _RETRY_SUCCESSOR,
        {"p_token_id": token_id, "p_successor_hash": successor_hash, "p_now": now},
    ).first()
    return None if row is None or row.rotated_at is None else int(row.rotated_at)


_REVOKE_FAMILY = revoke_families(
    families.c.id == bindparam("p_family_id"),
    at=bindparam("p_now", type_=BigInteger),
    reason=bindparam("p_reason", type_=String),
)


def revoke_family(db: Db, family_id: str, *, now: int, reason: str) -> None:
    db.execute(_REVOKE_FAMILY, {"p_family_id": family_id, "p_now": now, "p_reason": reason})


# -- families: every user token belongs to one ------------------------------------------------

_INSERT_FAMILY = insert(families).values(
    {
        "id": bindparam("p_id"),
        "client_id": bindparam("p_client_id"),
        "user_id": bindparam("p_user_id"),
        "scope": bindparam("p_scope"),
        "resources": bindparam("p_resources"),
        "auth_time": bindparam("p_auth_time"),
        "created_at": bindparam("p_now"),
        "last_used_at": bindparam("p_now"),
        "expires_at": bindparam("p_expires_at"),
        "browser_session_id": bindparam("p_browser_session_id"),
        "dpop_jkt": bindparam("p_dpop_jkt"),
        "amr": bindparam("p_amr"),
    }
)


def insert_family(db: Db, family: Family, *, now: int) -> None:
    db.execute(
        _INSERT_FAMILY,
        {
            "p_id": family.id,
            "p_client_id": family.client_id,
            "p_user_id": family.user_id,
            "p_scope": family.scope,
            "p_resources": family.resources,
            "p_auth_time": family.auth_time,
            "p_now": now,
            "p_expires_at": family.expires_at,
            "p_browser_session_id": family.browser_session_id,
            "p_dpop_jkt": family.dpop_jkt,
            "p_amr": family.amr,
        },
    )


def insert_refresh(db: Db, *, family_id: str, token_hash: str, now: int, expires_at: int) -> None:
    """The first refresh token of a family (rotations insert theirs in ``rotate``)."""
    db.execute(
        _INSERT_REFRESH,
        {
            "p_successor_id": new_id(),
            "p_family_id": family_id,
            "p_successor_hash": token_hash,
            "p_now": now,
            "p_successor_expires_at": expires_at,
        },
    )


# -- users ------------------------------------------------------------------------------------

_USER_COLUMNS = tuple(users.c)
_FIND_USER = select(*_USER_COLUMNS).where(users.c.username_key == bindparam("p_key"))
_GET_USER = select(*_USER_COLUMNS).where(users.c.id == bindparam("p_id"))
_REHASH = (
    update(users)
    .where(users.c.id == bindparam("p_user_id"))
    .values(password_hash=bindparam("p_new_hash"))
)


def find_user(db: Db, username_key: str) -> User | None:
    row = db.execute(_FIND_USER, {"p_key": username_key}).first()
    return User(**row._mapping) if row is not None else None


def get_user(db: Db, user_id: str) -> User | None:
    row = db.execute(_GET_USER, {"p_id": user_id}).first()
    return User(**row._mapping) if row is not None else None


_TOTP_CONFIRMED = select(literal(1)).where(
    cast(Table, TotpFactor.__table__).c.user_id == bindparam("p_user_id"),
    cast(Table, TotpFactor.__table__).c.confirmed_at.is_not(None),
)


def totp_confirmed(db: Db, user_id: str) -> bool:
    """Whether the person has a confirmed one-time code app: with ``AUTH_MFA=optional``
    that is what turns the second step on (``mfa.second_step_needed``)."""
    return db.execute(_TOTP_CONFIRMED, {"p_user_id": user_id}).first() is not None


def rehash(db: Db, user_id: str, password_hash: str) -> None:
    db.execute(_REHASH, {"p_user_id": user_id, "p_new_hash": password_hash})


# -- authorization codes ----------------------------------------------------------------------

_GET_CODE = select(*codes.c).where(codes.c.code_hash == bindparam("p_code_hash"))
_CLAIM_CODE = (
    update(codes)
    .where(codes.c.code_hash == bindparam("p_hash"), codes.c.used_at.is_(None))
    .values(used_at=bindparam("p_now"))
    .returning(codes.c.browser_session_id)
)
_CODE_FAMILY = (
    update(codes)
    .where(codes.c.code_hash == bindparam("p_hash"))
    .values(family_id=bindparam("p_started"))
)
_SESSION_ENDED = select(browser_sessions.c.ended_at).where(
    browser_sessions.c.id == bindparam("p_id")
)


def get_code(db: Db, code_hash: str) -> AuthorizationCode | None:
    row = db.execute(_GET_CODE, {"p_code_hash": code_hash}).first()
    return AuthorizationCode(**row._mapping) if row is not None else None


def insert_code(db: Db, code: AuthorizationCode) -> None:
    db.execute(insert(codes).values({c.name: getattr(code, c.name) for c in codes.c}))


def claim_code(db: Db, code_hash: str, *, now: int) -> tuple[bool, str | None]:
    """Mark the code used; (claimed, the browser session it is bound to *now*)."""
    row = db.execute(_CLAIM_CODE, {"p_hash": code_hash, "p_now": now}).first()
    return (False, None) if row is None else (True, row.browser_session_id)


def record_code_family(db: Db, code_hash: str, family_id: str) -> None:
    db.execute(_CODE_FAMILY, {"p_hash": code_hash, "p_started": family_id})


def browser_session_live(db: Db, session_id: str) -> bool:
    """Whether the browser session has not ended (one that merely expired still counts)."""
    row = db.execute(_SESSION_ENDED, {"p_id": session_id}).first()
    return row is not None and row.ended_at is None


# -- introspection, revocation and bearer checks ----------------------------------------------

_NOT_REVOKED = not_(exists().where(revoked.c.jti == bindparam("p_jti")))
_CLIENT_EXISTS = exists().where(clients.c.client_id == bindparam("p_client_id"))
_FAMILY_LIVE = exists().where(families.c.id == bindparam("p_sid"), families.c.revoked_at.is_(None))
_ACCESS_TOKEN_LIVE = select(and_(_NOT_REVOKED, _CLIENT_EXISTS, _FAMILY_LIVE))
_CLIENT_TOKEN_LIVE = select(and_(_NOT_REVOKED, _CLIENT_EXISTS))


def access_token_live(db: Db, claims: dict[str, Any]) -> bool:
    """The database's view of a validly signed, unexpired access token, in one statement: not
    revoked by ``jti``, its client still registered, and its family (sign-in) not revoked,
    which is what signing out, disabling the user and changing the password do."""
    sid = claims.get("sid")
    params = {"p_jti": claims["jti"], "p_client_id": claims["client_id"], "p_sid": sid}
    if isinstance(sid, str):
        return bool(db.execute(_ACCESS_TOKEN_LIVE, params).scalar())
    # Only client_credentials tokens have no family; a user token always has one.
    return "auth_time" not in claims and bool(db.execute(_CLIENT_TOKEN_LIVE, params).scalar())


_LIVE_REFRESH = (
    select(
        tokens.c.expires_at,
        tokens.c.created_at,
        families.c.id,
        families.c.client_id,
        families.c.user_id,
        families.c.scope,
    )
    .join(families, families.c.id == tokens.c.family_id)
    .join(users, users.c.id == families.c.user_id)
    .where(
        tokens.c.token_hash == bindparam("p_token_hash"),
        tokens.c.rotated_at.is_(None),
        tokens.c.expires_at > bindparam("p_now"),
        families.c.revoked_at.is_(None),
        families.c.expires_at > bindparam("p_now"),
        users.c.disabled.is_(false()),
    )
)


@dataclass(frozen=True)
class LiveRefresh:
    expires_at: int
    created_at: int
    family_id: str
    client_id: str
    user_id: str
    scope: str


def live_refresh(db: Db, token_hash: str, *, now: int) -> LiveRefresh | None:
    """A refresh token that would rotate now: the family's newest, unexpired, family neither
    revoked nor past its cap, user not disabled."""
    row = db.execute(_LIVE_REFRESH, {"p_token_hash": token_hash, "p_now": now}).first()
    return LiveRefresh(*row) if row is not None else None


def revoke_access_token(db: Db, *, jti: str, client_id: str, expires_at: int, now: int) -> None:
    """Deny-list ``jti``; idempotent under concurrent revocations (no duplicate-key error)."""
    dialect = postgresql if _dialect(db) == "postgresql" else sqlite
    db.execute(
        dialect.insert(revoked)
        .values(jti=jti, client_id=client_id, expires_at=expires_at, revoked_at=now)
        .on_conflict_do_nothing(index_elements=["jti"])
    )


# -- after an uncertain commit ----------------------------------------------------------------

REFRESH_EXISTS = select(literal(1)).where(tokens.c.token_hash == bindparam("p_token_hash"))
FAMILY_EXISTS = select(literal(1)).where(families.c.id == bindparam("p_family_id"))


def _autocommit(db: Db) -> bool:
    connection = db if isinstance(db, Connection) else db.connection()
    return bool(connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT")


def _dialect(db: Db) -> str:
    return (db.dialect if isinstance(db, Connection) else db.get_bind().dialect).name
