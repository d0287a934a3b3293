"""Second-factor rows put straight into the database, and browser sessions, for the API tests
of tests/api/test_account_factors.py and tests/api/test_admin_factors.py."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select, update

from server.deps import AppState
from server.models import (
    BrowserSession,
    RecoveryCode,
    RefreshFamily,
    TotpFactor,
    User,
    WebAuthnCredential,
)
from server.web.browser import start_session


async def add_totp(state: AppState, user_id: str, *, codes: int = 0, used: int = 0) -> None:
    """A confirmed one-time code app, with ``codes`` recovery codes of which ``used`` used."""
    async with state.db.sessions() as db:
        db.add(
            TotpFactor(user_id=user_id, secret_sealed="sealed", created_at=100, confirmed_at=150)
        )
        for i in range(codes):
            db.add(
                RecoveryCode(
                    code_hash=secrets.token_hex(32),
                    user_id=user_id,
                    used_at=200 if i < used else None,
                )
            )
        await db.commit()


async def add_passkey(
    state: AppState,
    user_id: str,
    name: str = "Laptop",
    *,
    created_at: int = 300,
    synced: bool = False,
    backed_up: bool = False,
    last_used_at: int | None = None,
) -> str:
    async with state.db.sessions() as db:
        row = WebAuthnCredential(
            user_id=user_id,
            credential_id=secrets.token_urlsafe(32),
            public_key=b"\xa5\x01\x02",
            name=name,
            created_at=created_at,
            backup_eligible=synced,
            backed_up=backed_up,
            last_used_at=last_used_at,
        )
        db.add(row)
        await db.commit()
        return row.id


async def start_browser_session(state: AppState, user_id: str) -> str:
    """A person signed in on the hosted pages in one more browser; its id."""
    async with state.db.sessions() as db:
        user = await db.get(User, user_id)
        assert user is not None
        session, _ = await start_session(db, state.settings, user, None, amr="pwd")
        await db.commit()
        return session.id


async def link_family(state: AppState, family_id: str, session_id: str) -> None:
    """Make a sign-in as if it had been created through the browser session (a code flow)."""
    async with state.db.sessions() as db:
        await db.execute(
            update(RefreshFamily)
            .where(RefreshFamily.id == family_id)
            .values(browser_session_id=session_id)
        )
        await db.commit()


async def ended_at(state: AppState, session_id: str) -> int | None:
    async with state.db.sessions() as db:
        session = await db.get(BrowserSession, session_id)
        assert session is not None
        return session.ended_at


async def factor_rows(state: AppState, user_id: str) -> tuple[int, int, int]:
    """(one-time code apps, passkeys, recovery codes) of the person in the database."""
    counts = []
    async with state.db.sessions() as db:
        for model in (TotpFactor, WebAuthnCredential, RecoveryCode):
            counts.append(
                int(
                    await db.scalar(
                        select(func.count()).select_from(model).where(model.user_id == user_id)
                    )
                    or 0
                )
            )
    return counts[0], counts[1], counts[2]
