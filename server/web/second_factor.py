"""The second step of a sign-in and the account's security page.

A password that checks out for a person who needs a second factor (``mfa.second_step_needed``)
does not start a session: the browser gets a signed, five-minute ``mfa`` cookie (who, what was
proved so far, the password's date) and the second-step page, ``/login/verify``, where a
one-time code, a recovery code or a passkey finishes the sign-in (``finish_sign_in``). A
signed-in person asked for a stronger ``acr`` than their sign-in reached goes the same way
(``/login/step-up``), and the new session replaces theirs.

``/account/security`` lists the factors and removes them; adding a one-time code app lives in
``totp_pages``, adding and renaming passkeys in ``passkey_pages``. Adding a factor needs a
sign-in at most ``mfa.RECENT_SIGN_IN`` old; removing the last one asks for the password.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from .. import factors as factor_store
from .. import mfa, passkeys
from ..boundary import column_length, text_problem
from ..config import Settings
from ..deps import AppState, StateDep
from ..models import User, WebAuthnCredential, now
from ..observability import audit
from ..passwords import normalize_username
from ..replay import ReplayGuard
from .browser import (
    Csrf,
    SignedIn,
    clear_cookie,
    cookie_name,
    current_session,
    error_page,
    posted_form,
    redirect,
    render,
    safe_next,
    set_cookie,
    start_session,
)

router = APIRouter()

PENDING_COOKIE = "mfa"
FACTOR_ID_LENGTH = column_length(WebAuthnCredential.id)
SECURITY_NOTICES = {
    "removed": "The sign-in method was removed. Your other browsers were signed out.",
    "totp_added": "Your authenticator app is set up.",
    "passkey_added": "Your passkey is saved.",
    "passkey_renamed": "Your passkey was renamed.",
    "codes_renewed": "New recovery codes are ready; the old ones no longer work.",
    "enrol": "This server asks for a second sign-in method: add an authenticator app or a "
    "passkey to continue.",
}


def security_url(next_url: str | None = None, notice: str | None = None) -> str:
    query = {k: v for k, v in (("next", next_url), ("notice", notice)) if v}
    return "/account/security" + ("?" + urlencode(query) if query else "")


# -- finishing a sign-in ----------------------------------------------------------------------


async def finish_sign_in(
    request: Request,
    state: AppState,
    db: AsyncSession,
    user: User,
    *,
    amr: str,
    next_url: str,
    keep_auth_time: bool = False,
    **audited: object,
) -> Response:
    """Start the browser session of a complete sign-in by ``amr`` and go on to ``next_url``
    (with ``AUTH_MFA=required``, to enrolment first when the sign-in had one factor and the
    person has none: ``mfa.second_step_needed`` sent the others through the second step)."""
    settings = state.settings
    previous = await current_session(request, db, settings)
    # ``keep_auth_time``: a new session (a new cookie) that proves nothing new, after
    # enrolling a further factor: ``auth_time`` (and ``max_age``, and "recent") stay true.
    kept = previous.session.auth_time if keep_auth_time and previous is not None else None
    session, cookie = await start_session(db, settings, user, previous, amr=amr, auth_time=kept)
    await db.commit()
    audit("signin.succeeded", user_id=user.id, session_id=session.id, amr=amr, **audited)
    target = next_url
    if settings.mfa == "required" and not mfa.is_multi_factor(amr):
        target = security_url(next_url, "enrol")
    response = redirect(target)
    set_cookie(response, settings, "session", cookie, settings.session_ttl)
    # A new CSRF secret with the new session: nothing from before sign-in carries over.
    set_cookie(response, settings, "csrf", Csrf.new().cookie, None)
    clear_cookie(response, settings, PENDING_COOKIE)
    return response


def to_second_step(
    state: AppState,
    user: User,
    *,
    amr: str,
    next_url: str,
    session: str | None = None,
    level: str | None = None,
) -> Response:
    """Hand the browser a pending sign-in and send it to the second-step page (``session``
    and ``level``: a step-up of that session to that ``acr``)."""
    settings = state.settings
    pending = mfa.Pending(
        user_id=user.id,
        amr=amr,
        expires_at=now() + mfa.PENDING_TTL,
        changed=user.password_changed_at,
        session=session,
        level=level,
        # Two sign-ins of one person in one second (a laptop and a phone) are two pending
        # sign-ins, each spent on its own (``spend_pending``).
        nonce=secrets.token_urlsafe(12),
    )
    response = redirect("/login/verify?" + urlencode({"next": next_url}))
    set_cookie(
        response, settings, PENDING_COOKIE, mfa.seal_pending(settings, pending), mfa.PENDING_TTL
    )
    return response


async def pending_sign_in(
    request: Request, state: AppState, db: AsyncSession
) -> tuple[mfa.Pending, User] | None:
    """The sign-in this browser has half done, while it still stands: the person is not
    disabled, their password has not changed since, and a step-up is for the session this
    browser still has."""
    settings = state.settings
    pending = mfa.open_pending(settings, request.cookies.get(cookie_name(settings, PENDING_COOKIE)))
    if pending is None:
        return None
    user = await db.get(User, pending.user_id)
    if user is None or user.disabled or user.password_changed_at != pending.changed:
        return None
    if pending.session is not None:
        who = await current_session(request, db, settings)
        if who is None or who.session.id != pending.session:
            return None
    return pending, user


async def spend_pending(request: Request, state: AppState) -> bool:
    """Mark this browser's pending sign-in finished (once, across replicas: ``ReplayGuard``),
    so that a copy of its cookie cannot finish it again elsewhere within its five minutes;
    False when it was finished already."""
    settings = state.settings
    value = request.cookies.get(cookie_name(settings, PENDING_COOKIE), "")
    guard = ReplayGuard(state.limiter.storage)
    return await guard.first_use("mfa-pending", value, mfa.PENDING_TTL)


def throttle_keys(state: AppState, request: Request, user: User) -> tuple[str, str]:
    """The account and address a second step's failures count against, the same counts as
    a wrong password's (``Limiter.failed``): guessing codes is guessing passwords."""
    return normalize_username(user.username), state.limiter.client_ip(request)


def expired_sign_in(next_url: str) -> Response:
    """Back to the sign-in page, with where the person was going (an application's
    authorization request, say): a second step that expired is no reason to lose it."""
    return redirect("/login?" + urlencode({"next": next_url, "notice": "mfa_expired"}))


# -- the second-step page -------------------------------------------------------------------


async def _passkey_rows(db: AsyncSession, user_id: str) -> list[WebAuthnCredential]:
    rows = await db.scalars(select(WebAuthnCredential).where(WebAuthnCredential.user_id == user_id))
    return list(rows)


async def verify_page(
    request: Request,
    state: AppState,
    db: AsyncSession,
    pending: mfa.Pending,
    user: User,
    *,
    next_url: str,
    error: str | None = None,
    http_status: int = 200,
) -> Response:
    """The second-step page: whichever of a code field and a passkey button the person can
    use, of those that reach the level a step-up is for (``mfa.accepts``). Rendered again
    (with ``error``) when a code is wrong."""
    settings = state.settings
    have = await factor_store.load(db, user.id, settings)
    credentials = [
        row
        for row in await _passkey_rows(db, user.id)
        if mfa.accepts(pending, mfa.SWK if row.backup_eligible else mfa.HWK)
    ]
    codes = mfa.accepts(pending, mfa.OTP)
    options = (
        passkeys.assertion_options(settings, binding=user.id, credentials=credentials)
        if credentials and mfa.rp_id(settings) is not None
        else None
    )
    return render(
        "verify.html",
        http_status=http_status,
        csrf=Csrf.of(request, settings),
        settings=settings,
        title="Confirm it is you",
        next=next_url,
        error=error,
        totp=have.totp and codes,
        recovery_codes=have.recovery_codes if codes else 0,
        passkey_options=options,
        step_up=pending.session is not None,
    )


@router.get("/login/verify")
async def verify_form(request: Request, state: StateDep) -> Response:
    next_url = safe_next(request.query_params.get("next"))
    async with state.db.session() as db:
        found = await pending_sign_in(request, state, db)
        if found is None:
            return expired_sign_in(next_url)
        pending, user = found
        return await verify_page(request, state, db, pending, user, next_url=next_url)


@router.get("/login/step-up")
async def step_up(request: Request, state: StateDep) -> Response:
    """A signed-in person whose sign-in is weaker than asked (``acr_values``, or
    ``AUTH_MFA=required``): a second factor if they have one, else enrolment. ``acr``: the
    level to reach (``mfa.target_level``; ``2`` unless a stronger one is named)."""
    next_url = safe_next(request.query_params.get("next"))
    asked = request.query_params.get("acr", "")
    level = asked if asked in mfa.ACR_VALUES and asked not in ("1",) else "2"
    async with state.db.session() as db:
        who = await current_session(request, db, state.settings)
        if who is None:
            return redirect("/login?" + urlencode({"next": next_url}))
        have = await factor_store.load(db, who.user.id, state.settings)
    if not have.any:
        return redirect(security_url(next_url, "enrol"))
    if not mfa.satisfies(have.best_amr(), [level]):
        level = "2"  # nothing they have reaches it (a hand-made URL): any second factor
    return to_second_step(
        state,
        who.user,
        amr=mfa.session_amr(who.session.amr),
        next_url=next_url,
        session=who.session.id,
        level=level,
    )


# -- the security page ----------------------------------------------------------------------


def recent(who: SignedIn) -> bool:
    """Whether the sign-in is fresh enough to add a factor (whoever took over an open browser
    must not be able to add their own)."""
    return now() - who.session.auth_time <= mfa.RECENT_SIGN_IN


def sign_in_again(next_url: str) -> Response:
    return redirect("/login?" + urlencode({"next": next_url, "notice": "reauth"}))


async def may_change_factors(
    db: AsyncSession, who: SignedIn, back: str, settings: Settings
) -> tuple[Response | None, mfa.Factors]:
    """Whether this session may add or remove a factor now (``mfa.may_change_factors``, and a
    recent sign-in); if not, where to send the browser (``back`` afterwards): a step-up with
    one of the person's factors, or a fresh sign-in. Also what the person has (and can use
    here: ``factors.load``)."""
    have = await factor_store.load(db, who.user.id, settings)
    if not mfa.may_change_factors(who.session.amr, have):
        return redirect("/login/step-up?" + urlencode({"next": back})), have
    if not recent(who):
        return sign_in_again(back), have
    return None, have


@router.get("/account/security")
async def security(request: Request, state: StateDep) -> Response:
    settings = state.settings
    next_param = request.query_params.get("next")
    next_url = safe_next(next_param) if next_param else ""
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?" + urlencode({"next": security_url(next_url or None)}))
        listed = await factor_store.listed(db, who.user.id)
        have = await factor_store.load(db, who.user.id, state.settings)
    return render(
        "security.html",
        csrf=Csrf.of(request, settings),
        settings=settings,
        title="Sign-in methods",
        user=who.user,
        factors=listed,
        totp=have.totp,
        recovery_codes=have.recovery_codes,
        passkeys_available=mfa.rp_id(settings) is not None,
        mfa_policy=settings.mfa,
        next=next_url,
        notice=SECURITY_NOTICES.get(request.query_params.get("notice", "")),
    )


@router.post("/account/security/factors/{factor_id}/remove")
async def remove_factor(factor_id: str, request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    if factor_id != "totp" and text_problem(factor_id, FACTOR_ID_LENGTH) is not None:
        return error_page(404, "Not found", "That sign-in method does not exist.", security_url())
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?next=/account/security")
        user, session_id = who.user, who.session.id
        refused, _ = await may_change_factors(db, who, security_url(), settings)
        if refused is not None:
            return refused
        # Under the person's lock: two removals at once (two tabs) each see what the other
        # left, so together they cannot take the last factor without the password.
        await factor_store.lock(db, user.id)
        listed = await factor_store.listed(db, user.id)
        if not any(f.id == factor_id for f in listed):
            return error_page(
                404, "Not found", "That sign-in method does not exist.", security_url()
            )
        if len(listed) == 1:
            # The last factor: the account falls back to a password alone, so the person
            # proves they know it (a borrowed browser must not be enough).
            account, ip = throttle_keys(state, request, user)
            password_hash = user.password_hash
            await db.commit()
            limiter = state.limiter
            result = await state.passwords.verify_async(password_hash, form.get("password", ""))
            if await limiter.throttled(account, ip) or not result.ok:
                await limiter.failed(account, ip)
                audit("factor.remove_refused", user_id=user.id, factor=factor_id)
                return error_page(
                    400,
                    "Password needed",
                    "Removing your last sign-in method needs your current password. "
                    "Go back and enter it.",
                    security_url(),
                )
            # argon2 ran outside the transaction: lock again before removing.
            await factor_store.lock(db, user.id)
        kind = await factor_store.remove(db, user.id, factor_id)
        ended = await factor_store.end_other_sessions(db, user.id, session_id)
        await db.commit()
    if kind is None:
        return error_page(404, "Not found", "That sign-in method does not exist.", security_url())
    audit("factor.removed", user_id=user.id, kind=kind, factor=factor_id, sessions_ended=ended)
    return redirect(security_url(notice="removed"))
