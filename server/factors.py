"""A person's second factors in the database: what they have, and the changes every surface
(the account page, the account API, the admin API) makes the same way.

Each change ends the person's other browser sessions when it weakens the account (a factor
removed, all of them reset): a session that might belong to whoever removed it must not
outlive the change (NIST SP 800-63B §6.1.2.1). The caller keeps its own session, writes the
audit event and commits.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from . import manage
from .config import Settings
from .mfa import Factors, rp_id
from .models import BrowserSession, RecoveryCode, TotpFactor, User, WebAuthnCredential


async def load(db: AsyncSession, user_id: str, settings: Settings | None = None) -> Factors:
    """What the person has enrolled; with ``settings``, what they can use here: passkeys do
    not count where they cannot work (``mfa.rp_id`` is ``None``: an IP-address or plain-http
    issuer), so nobody is sent to a second step that offers nothing."""
    totp = await db.scalar(
        select(func.count())
        .select_from(TotpFactor)
        .where(TotpFactor.user_id == user_id, TotpFactor.confirmed_at.is_not(None))
    )
    passkeys = await db.scalar(
        select(func.count())
        .select_from(WebAuthnCredential)
        .where(WebAuthnCredential.user_id == user_id)
    )
    bound = await db.scalar(
        select(func.count())
        .select_from(WebAuthnCredential)
        .where(
            WebAuthnCredential.user_id == user_id,
            WebAuthnCredential.backup_eligible.is_(False),
        )
    )
    codes = await db.scalar(
        select(func.count())
        .select_from(RecoveryCode)
        .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
    )
    if settings is not None and rp_id(settings) is None:
        passkeys = bound = 0
    return Factors(
        totp=bool(totp),
        passkeys=int(passkeys or 0),
        bound_passkeys=int(bound or 0),
        recovery_codes=int(codes or 0),
    )


@dataclass(frozen=True)
class Factor:
    """One factor as the account page and the APIs list it."""

    id: str  # ``totp`` for the one-time code app, else the passkey's id
    kind: str  # ``totp`` or ``passkey``
    name: str
    created_at: int
    last_used_at: int | None = None
    #: Passkeys: whether the key may be synced (backup eligible) and is (backed up).
    synced: bool | None = None
    backed_up: bool | None = None


async def listed(db: AsyncSession, user_id: str) -> list[Factor]:
    out: list[Factor] = []
    totp = await db.get(TotpFactor, user_id)
    if totp is not None and totp.confirmed_at is not None:
        out.append(Factor("totp", "totp", "Authenticator app", totp.confirmed_at))
    rows = await db.scalars(
        select(WebAuthnCredential)
        .where(WebAuthnCredential.user_id == user_id)
        .order_by(WebAuthnCredential.created_at, WebAuthnCredential.id)
    )
    for row in rows:
        out.append(
            Factor(
                row.id,
                "passkey",
                row.name,
                row.created_at,
                row.last_used_at,
                synced=row.backup_eligible,
                backed_up=row.backed_up,
            )
        )
    return out


async def lock(db: AsyncSession, user_id: str) -> None:
    """Take the person's row lock (PostgreSQL ``SELECT … FOR UPDATE``) until the transaction
    ends, so that two removals of the same person's factors run one after the other: each
    then sees what the other left, and two simultaneous removals cannot together take away
    the last factor without the password. SQLite needs none: its writers are serialised by
    ``BEGIN IMMEDIATE`` (``server/db.py``), and SQLAlchemy leaves ``FOR UPDATE`` out there."""
    await db.execute(select(User.id).where(User.id == user_id).with_for_update())


async def remove(db: AsyncSession, user_id: str, factor_id: str) -> str | None:
    """Remove one factor of ``user_id`` (``totp`` removes the app and the recovery codes with
    it); returns its kind, or ``None`` when the person has no such factor."""
    if factor_id == "totp":
        result = await db.execute(delete(TotpFactor).where(TotpFactor.user_id == user_id))
        if not result.rowcount:  # type: ignore[attr-defined]
            return None
        await db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
        return "totp"
    result = await db.execute(
        delete(WebAuthnCredential).where(
            WebAuthnCredential.id == factor_id, WebAuthnCredential.user_id == user_id
        )
    )
    return "passkey" if result.rowcount else None  # type: ignore[attr-defined]


async def reset(db: AsyncSession, user_id: str) -> int:
    """Remove every factor and recovery code of ``user_id``; returns how many factors went."""
    totp = await db.execute(delete(TotpFactor).where(TotpFactor.user_id == user_id))
    await db.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    keys = await db.execute(delete(WebAuthnCredential).where(WebAuthnCredential.user_id == user_id))
    return int(totp.rowcount + keys.rowcount)  # type: ignore[attr-defined]


async def reset_person(db: AsyncSession, user_id: str) -> tuple[int, int]:
    """An operator's reset (admin API, CLI) for a person who lost their factors: every factor
    and recovery code goes, and every browser session ends with the sign-ins made through it
    (they were signed in with factors that no longer exist, NIST SP 800-63B §6.1.2.3).
    Returns the factors removed and the sessions ended."""
    removed = await reset(db, user_id)
    return removed, await end_other_sessions(db, user_id, None)


async def end_other_sessions(db: AsyncSession, user_id: str, keep_session: str | None) -> int:
    """End the person's browser sessions but ``keep_session`` (with the sign-ins they created:
    whoever holds one of them is signed out of the apps too); returns the sessions ended."""
    where = [BrowserSession.user_id == user_id]
    if keep_session is not None:
        where.append(BrowserSession.id != keep_session)
    ended = await manage.end_browser_sessions(
        db, *where, reason="factors_changed", end_families=True
    )
    return ended.sessions
