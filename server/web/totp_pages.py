"""The authenticator app (TOTP, RFC 6238) and recovery codes on the hosted pages.

- ``GET /account/security/totp``: a fresh secret (a new unconfirmed app, replacing any
  unconfirmed one), shown as a QR code drawn here and as text; needs a recent sign-in.
- ``POST /account/security/totp``: the first code from the app confirms it; the person gets
  ten recovery codes (shown once) and their session is upgraded to ``pwd otp mfa``.
- ``POST /account/security/recovery-codes``: ten new codes replace the old ones.
- ``POST /login/verify/code``: the second step of a sign-in with a code from the app or a
  recovery code. Wrong codes count like wrong passwords (``Limiter.failed``).

The codes themselves (steps, replay, hashing) are ``server/totp.py``. Never logged: codes,
secrets, recovery codes.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from .. import mfa, totp
from ..deps import AppState, StateDep
from ..mfa import Factors
from ..models import TotpFactor, now
from ..observability import audit, log
from .browser import (
    Csrf,
    SignedIn,
    current_session,
    posted_form,
    redirect,
    render,
    safe_next,
    set_cookie,
    start_session,
)
from .second_factor import (
    expired_sign_in,
    finish_sign_in,
    may_change_factors,
    pending_sign_in,
    security_url,
    spend_pending,
    throttle_keys,
    verify_page,
)

router = APIRouter()

SETUP_URL = "/account/security/totp"
START_URL = SETUP_URL + "/new"
#: One message for every refused second step: a wrong code, a used one, throttling.
BAD_CODE = "That code is not right, or was already used. Try the next code from your app."
WRONG_SETUP_CODE = (
    "That code does not match. Check the time on your phone, then enter the code the app shows now."
)
TOO_MANY = "Too many wrong codes. Wait a few minutes, then try again."
RESTARTED = (
    "The setup was started again in another window, with a new code. Delete the entry you "
    "just added in your app, scan this code, and enter the code it shows."
)


def _setup_url(next_url: str) -> str:
    return SETUP_URL + ("?" + urlencode({"next": next_url}) if next_url else "")


def _next_param(value: str | None) -> str:
    """``next`` kept through enrolment: a local path, or empty (back to the security page)."""
    return safe_next(value, default="") if value else ""


async def _signed_in(
    request: Request, state: AppState, db: AsyncSession, back: str
) -> tuple[SignedIn, Factors] | Response:
    """The person, signed in recently enough (and with a second factor, if they have one:
    ``may_change_factors``) to add a factor, and what they have; else where to send them."""
    who = await current_session(request, db, state.settings)
    if who is None:
        return redirect("/login?" + urlencode({"next": back}))
    refused, have = await may_change_factors(db, who, back, state.settings)
    if refused is not None:
        return refused
    return who, have


def _setup_page(
    request: Request,
    state: AppState,
    who: SignedIn,
    secret: str,
    *,
    next_url: str,
    error: str | None = None,
    http_status: int = 200,
) -> Response:
    settings = state.settings
    uri = totp.provisioning_uri(settings, who.user.username, secret)
    return render(
        "totp_setup.html",
        http_status=http_status,
        csrf=Csrf.of(request, settings),
        settings=settings,
        title="Set up an authenticator app",
        user=who.user,
        qr_svg=totp.qr_svg(uri),
        secret=totp.grouped(secret),
        issuer=totp.issuer_label(settings),
        # Which secret this page shows: a code for it, posted after another window started
        # a new setup, is told apart from a wrong one.
        setup_id=_setup_id(secret),
        next=next_url,
        error=error,
    )


def _setup_id(secret: str) -> str:
    return hashlib.sha256(b"totp-setup|" + secret.encode()).hexdigest()[:16]


def _codes_page(
    state: AppState, who: SignedIn, codes: list[str], *, next_url: str, notice: str
) -> Response:
    return render(
        "recovery_codes.html",
        title="Your recovery codes",
        user=who.user,
        codes=codes,
        continue_url=next_url or security_url(notice=notice),
        enrolled=notice == "totp_added",
    )


# -- enrolment ------------------------------------------------------------------------------


@router.post(START_URL)
async def start_setup(request: Request, state: StateDep) -> Response:
    """A new secret (a POST with the form token: a cross-site link must not replace the
    secret a person is scanning), then the setup page (303: reloading it shows the same
    secret, it never makes another)."""
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = _next_param(form.get("next"))
    async with state.db.session() as db:
        signed = await _signed_in(request, state, db, security_url(next_url or None))
        if isinstance(signed, Response):
            return signed
        who, _ = signed
        user_id = who.user.id
        sealed = totp.seal(settings, user_id, totp.new_secret())
        # Replace an unconfirmed app, never a confirmed one (removing that is the security
        # page's, with its own checks).
        replaced = await db.execute(
            update(TotpFactor)
            .where(TotpFactor.user_id == user_id, TotpFactor.confirmed_at.is_(None))
            .values(secret_sealed=sealed, created_at=now(), last_step=0)
            .execution_options(synchronize_session=False)
        )
        if not replaced.rowcount:  # type: ignore[attr-defined]
            if await db.get(TotpFactor, user_id) is not None:
                return redirect(security_url(next_url or None))  # already set up
            db.add(TotpFactor(user_id=user_id, secret_sealed=sealed, created_at=now()))
            try:
                await db.flush()
            except IntegrityError:
                # Another request created it meanwhile: that one's page stands.
                await db.rollback()
                return redirect(_setup_url(next_url))
        await db.commit()
    return redirect(_setup_url(next_url))


@router.get(SETUP_URL)
async def setup(request: Request, state: StateDep) -> Response:
    """The setup under way (``start_setup`` began it): its QR code and key. Changes nothing."""
    settings = state.settings
    next_url = _next_param(request.query_params.get("next"))
    async with state.db.session() as db:
        signed = await _signed_in(request, state, db, _setup_url(next_url))
        if isinstance(signed, Response):
            return signed
        who, _ = signed
        factor = await db.get(TotpFactor, who.user.id)
        secret = (
            None
            if factor is None or factor.confirmed_at is not None
            else totp.unseal(settings, who.user.id, factor.secret_sealed)
        )
    if secret is None:
        # Nothing under way (or already set up): the security page, to start one.
        return redirect(security_url(next_url or None))
    return _setup_page(request, state, who, secret, next_url=next_url)


@router.post(SETUP_URL)
async def confirm_setup(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = _next_param(form.get("next"))
    async with state.db.session() as db:
        signed = await _signed_in(request, state, db, _setup_url(next_url))
        if isinstance(signed, Response):
            return signed
        who, had = signed
        user = who.user
        factor = await db.get(TotpFactor, user.id)
        if factor is not None and factor.confirmed_at is not None:
            return redirect(security_url(next_url or None))
        secret = None if factor is None else totp.unseal(settings, user.id, factor.secret_sealed)
        if factor is None or secret is None:
            return redirect(_setup_url(next_url))  # no setup under way: start one
        sealed = factor.secret_sealed
        if form.get("setup", "") != _setup_id(secret):
            # Another window started a new setup meanwhile: this page's secret is gone.
            return _setup_page(
                request,
                state,
                who,
                secret,
                next_url=next_url,
                error=RESTARTED,
                http_status=409,
            )
        account, ip = throttle_keys(state, request, user)
        limiter = state.limiter
        if await limiter.throttled(account, ip):
            audit("factor.add_refused", user_id=user.id, kind="totp", throttled=True)
            return _setup_page(
                request, state, who, secret, next_url=next_url, error=TOO_MANY, http_status=429
            )
        step = totp.matching_step(secret, form.get("code", ""))
        if step is None or not await totp.confirm(db, user.id, sealed, step):
            # Nothing was written (the UPDATE matched no row): no rollback, which would
            # expire the loaded rows.
            await limiter.failed(account, ip)
            audit("factor.add_refused", user_id=user.id, kind="totp")
            return _setup_page(
                request,
                state,
                who,
                secret,
                next_url=next_url,
                error=WRONG_SETUP_CODE,
                http_status=400,
            )
        codes = await totp.replace_recovery_codes(db, settings, user.id)
        # A first factor: the person just proved the app, and their session now has two
        # factors; a further one changes nothing (``mfa.enrolled_amr``). A new session
        # either way, as at every sign-in, so that nothing seen before this counts after it.
        amr = mfa.enrolled_amr(who.session.amr, had, mfa.OTP)
        # A further factor proves nothing new: the sign-in's time stays (``finish_sign_in``).
        kept = who.session.auth_time if had.any else None
        session, cookie = await start_session(db, settings, user, who, amr=amr, auth_time=kept)
        await db.commit()
    audit("factor.added", user_id=user.id, kind="totp", session_id=session.id, amr=amr)
    response = _codes_page(state, who, codes, next_url=next_url, notice="totp_added")
    set_cookie(response, settings, "session", cookie, settings.session_ttl)
    set_cookie(response, settings, "csrf", Csrf.new().cookie, None)
    return response


@router.post("/account/security/recovery-codes")
async def renew_recovery_codes(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = _next_param(form.get("next"))
    async with state.db.session() as db:
        # A person with the app has a factor: ``_signed_in`` asks a password-only session
        # (``AUTH_MFA=off``, or one from before the app) to prove one first, so that a
        # password alone never mints codes that pass for the second factor.
        signed = await _signed_in(request, state, db, security_url(next_url or None))
        if isinstance(signed, Response):
            return signed
        who, _ = signed
        factor = await db.get(TotpFactor, who.user.id)
        if factor is None or factor.confirmed_at is None:
            return redirect(security_url(next_url or None))
        codes = await totp.replace_recovery_codes(db, settings, who.user.id)
        await db.commit()
    audit("recovery_codes.renewed", user_id=who.user.id)
    return _codes_page(state, who, codes, next_url=next_url, notice="codes_renewed")


# -- the second step of a sign-in -------------------------------------------------------------


@router.post("/login/verify/code")
async def verify_code(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = safe_next(form.get("next"))
    code = form.get("code", "")
    async with state.db.session() as db:
        found = await pending_sign_in(request, state, db)
        if found is None:
            return expired_sign_in(next_url)
        pending, user = found
        account, ip = throttle_keys(state, request, user)
        limiter = state.limiter

        async def refuse(**why: bool) -> Response:
            audit("signin.second_factor_failed", user_id=user.id, **why)
            return await verify_page(
                request,
                state,
                db,
                pending,
                user,
                next_url=next_url,
                error=BAD_CODE,
                http_status=400,
            )

        if not mfa.accepts(pending, mfa.OTP):
            # A step-up for a passkey's level: a code would not reach it (the page offers no
            # code field), and spending one would only send the browser round again.
            return await refuse(level=True)
        if await limiter.throttled(account, ip, second_factor=True):
            return await refuse(throttled=True)
        used = ""
        unreadable = False
        if totp.is_totp_code(code):
            factor = await db.get(TotpFactor, user.id)
            if factor is not None and factor.confirmed_at is not None:
                secret = totp.unseal(settings, user.id, factor.secret_sealed)
                # Sealed under another AUTH_SECRET_KEY: no code can ever match, so the
                # person's right codes are not counted as guesses, and the operator is told.
                unreadable = secret is None
                step = None if secret is None else totp.matching_step(secret, code)
                if step is not None and await totp.spend_step(db, user.id, step):
                    used = "totp"
        elif await totp.use_recovery_code(db, settings, user.id, code):
            used = "recovery_code"
        if unreadable:
            log.warning(
                "totp.unseal_failed",
                user_id=user.id,
                hint="AUTH_SECRET_KEY changed since the app was set up: reset the person's "
                "factors (users reset-factors) or restore the key",
            )
            return await refuse(unreadable=True)
        if not used:  # nothing written: the UPDATEs matched no row
            await limiter.failed(account, ip, second_factor=True)
            return await refuse()
        # RFC 8176 §2 "otp": a one-time code, from the app or the recovery list.
        amr = mfa.amr_of(*pending.amr.split(), mfa.OTP)
        if not await spend_pending(request, state):
            # A copy of this pending sign-in was finished already: nothing is kept (the
            # code's UPDATE is not committed).
            return expired_sign_in(next_url)
        if used == "recovery_code":
            audit("recovery_code.used", user_id=user.id)
        return await finish_sign_in(
            request, state, db, user, amr=amr, next_url=next_url, second_factor=used
        )
