"""Passkey pages: adding and renaming one (``/account/security/passkeys...``), signing in with
one and no username (``/login/passkey``, from the button or the autofill of /login), and the
second step with one (``/login/verify/passkey``). The ceremonies' checks are
``server.passkeys``; the WebAuthn calls are static/passkeys.js, which posts each answer as a
normal CSRF-checked form. Removing a passkey is the generic
``/account/security/factors/{id}/remove``.

Where passkeys cannot work (``mfa.rp_id`` is ``None``: an IP-address issuer, or plain http off
localhost) the pages say so and these routes answer 404.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import mfa, passkeys
from ..boundary import text_problem
from ..deps import AppState, StateDep
from ..models import User, WebAuthnCredential
from ..observability import audit
from ..replay import ReplayGuard
from .browser import (
    Csrf,
    SignedIn,
    current_session,
    error_page,
    posted_form,
    redirect,
    render,
    safe_next,
)
from .pages import BAD_SIGN_IN, _login_page, _too_many, client_name_for
from .second_factor import (
    FACTOR_ID_LENGTH,
    _passkey_rows,
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

NEW_URL = "/account/security/passkeys/new"


def _unavailable() -> Response:
    return error_page(
        404,
        "Passkeys unavailable",
        "Passkeys are not available on this server: they need its address to be a domain "
        "name served over https (or localhost).",
        "/account/security",
    )


def _guard(state: AppState) -> ReplayGuard:
    return ReplayGuard(state.limiter.storage)


def _next_of(value: str | None) -> str:
    """The enrolment flow's ``next`` (kept through the add page), or empty."""
    return safe_next(value) if value else ""


# -- adding a passkey -------------------------------------------------------------------------


async def _new_page(
    request: Request,
    state: AppState,
    who: SignedIn,
    rows: list[WebAuthnCredential],
    *,
    next_url: str,
    name: str = "",
    error: str | None = None,
    http_status: int = 200,
) -> Response:
    settings = state.settings
    return render(
        "passkey_new.html",
        http_status=http_status,
        csrf=Csrf.of(request, settings),
        settings=settings,
        title="Add a passkey",
        user=who.user,
        next=next_url,
        name=name,
        name_max=passkeys.NAME_MAX,
        error=error,
        passkey_options=passkeys.registration_options(settings, who.user, rows),
    )


@router.get(NEW_URL)
async def new_passkey(request: Request, state: StateDep) -> Response:
    settings = state.settings
    next_url = _next_of(request.query_params.get("next"))
    here = NEW_URL + ("?" + urlencode({"next": next_url}) if next_url else "")
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?" + urlencode({"next": here}))
        if mfa.rp_id(settings) is None:
            return _unavailable()
        blocked, _ = await may_change_factors(db, who, here, settings)
        if blocked is not None:
            return blocked
        rows = await _passkey_rows(db, who.user.id)
        return await _new_page(request, state, who, rows, next_url=next_url)


@router.post("/account/security/passkeys")
async def add_passkey(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = _next_of(form.get("next"))
    here = NEW_URL + ("?" + urlencode({"next": next_url}) if next_url else "")
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?" + urlencode({"next": here}))
        if mfa.rp_id(settings) is None:
            return _unavailable()
        blocked, had = await may_change_factors(db, who, here, settings)
        if blocked is not None:
            return blocked
        user, user_id = who.user, who.user.id
        raw_name = form.get("name", "")
        name = passkeys.clean_name(raw_name) if raw_name.strip() else passkeys.DEFAULT_NAME
        rows = await _passkey_rows(db, user.id)
        if name is None:
            return await _new_page(
                request,
                state,
                who,
                rows,
                next_url=next_url,
                name=raw_name[: passkeys.NAME_MAX],
                error=f"Give the passkey a name of 1 to {passkeys.NAME_MAX} characters.",
                http_status=400,
            )
        try:
            registered = await passkeys.verify_registration(
                settings, _guard(state), user, form.get("credential", "")
            )
            factor_id = await passkeys.store(db, user, registered, name)
        except passkeys.PasskeyError as refused:
            audit("factor.add_refused", user_id=user_id, kind="passkey", reason=refused.reason)
            # ``store`` may have rolled back (a unique conflict): read the person again.
            fresh = await db.get(User, user_id)
            if fresh is None:
                return redirect("/login")
            return await _new_page(
                request,
                state,
                SignedIn(who.session, fresh),
                await _passkey_rows(db, user_id),
                next_url=next_url,
                name=name,
                error=refused.message,
                http_status=400,
            )
        method = mfa.SWK if registered.backup_eligible else mfa.HWK
        audit("factor.added", user_id=user.id, kind="passkey", factor=factor_id)
        # A first factor upgrades the session to what it proved (a new session, as at every
        # sign-in); a further one changes nothing (``mfa.enrolled_amr``).
        return await finish_sign_in(
            request,
            state,
            db,
            user,
            amr=mfa.enrolled_amr(who.session.amr, had, method),
            keep_auth_time=had.any,
            next_url=security_url(next_url or None, "passkey_added"),
            method="passkey_enrolment",
        )


@router.post("/account/security/passkeys/{factor_id}/rename")
async def rename_passkey(factor_id: str, request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    missing = error_page(404, "Not found", "That passkey does not exist.", security_url())
    if text_problem(factor_id, FACTOR_ID_LENGTH) is not None:
        return missing
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?next=/account/security")
        row = await db.get(WebAuthnCredential, factor_id)
        if row is None or row.user_id != who.user.id:
            return missing
        # A name tells the person which passkey to remove: a password alone must not be able
        # to relabel them ("DO NOT USE"), as it cannot add or remove one.
        blocked, _ = await may_change_factors(db, who, security_url(), settings)
        if blocked is not None:
            return blocked
        name = passkeys.clean_name(form.get("name", ""))
        if name is None:
            return error_page(
                400,
                "Name needed",
                f"Give the passkey a name of 1 to {passkeys.NAME_MAX} characters.",
                security_url(),
            )
        row.name = name
        user_id = who.user.id
        await db.commit()
    audit("factor.renamed", user_id=user_id, kind="passkey", factor=factor_id)
    return redirect(security_url(notice="passkey_renamed"))


# -- signing in -------------------------------------------------------------------------------


@router.post("/login/passkey")
async def sign_in_with_passkey(request: Request, state: StateDep) -> Response:
    """A sign-in without a username (the discoverable credential names the person)."""
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, csrf = posted
    next_url = safe_next(form.get("next"))
    if mfa.rp_id(settings) is None:
        return _unavailable()
    limiter = state.limiter
    verdict = await limiter.hit([(limiter.login_ip, "login-ip", limiter.client_ip(request))])
    if not verdict.allowed:
        return _too_many(verdict, "login", "Too many sign-in attempts.", "/login")
    async with state.db.session() as db:
        try:
            used = await passkeys.verify_assertion(
                settings,
                _guard(state),
                db,
                form.get("credential", ""),
                purpose=passkeys.SIGNIN,
                binding=csrf.cookie,
            )
        except passkeys.PasskeyError as refused:
            await db.rollback()
            audit("signin.failed", user_id=None, passkey=True, reason=refused.reason)
            return _login_page(
                state,
                csrf,
                next_url=next_url,
                error=refused.message,
                client_name=await client_name_for(state, next_url),
                http_status=400,
            )
        user = await db.get(User, used.user_id)
        if user is None or user.disabled:
            await db.rollback()
            audit("signin.failed", user_id=used.user_id, passkey=True, reason="disabled")
            return _login_page(
                state,
                csrf,
                next_url=next_url,
                error=BAD_SIGN_IN,
                client_name=await client_name_for(state, next_url),
                http_status=400,
            )
        return await finish_sign_in(
            request,
            state,
            db,
            user,
            amr=mfa.amr_of(used.method),
            next_url=next_url,
            method="passkey",
            factor=used.id,
        )


@router.post("/login/verify/passkey")
async def verify_with_passkey(request: Request, state: StateDep) -> Response:
    """The second step (or a step-up) answered with one of the pending person's passkeys."""
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    next_url = safe_next(form.get("next"))
    if mfa.rp_id(settings) is None:
        return _unavailable()
    async with state.db.session() as db:
        found = await pending_sign_in(request, state, db)
        if found is None:
            return expired_sign_in(next_url)
        pending, user = found
        user_id = user.id
        account, ip = throttle_keys(state, request, user)
        limiter = state.limiter

        async def again(error: str, http_status: int, **why: object) -> Response:
            """The page again with ``error``; nothing of this attempt kept (a rollback, so the
            person is read again: the rollback expired the loaded rows)."""
            audit("signin.failed", user_id=user_id, passkey=True, **why)
            await db.rollback()
            found = await pending_sign_in(request, state, db)
            if found is None:
                return expired_sign_in(next_url)
            return await verify_page(
                request, state, db, *found, next_url=next_url, error=error, http_status=http_status
            )

        if await limiter.throttled(account, ip, second_factor=True):
            return await again(
                "Too many attempts. Wait a while and try again.", 429, throttled=True
            )
        try:
            used = await passkeys.verify_assertion(
                settings,
                _guard(state),
                db,
                form.get("credential", ""),
                purpose=passkeys.SECOND_STEP,
                binding=user_id,
                user_id=user_id,
            )
        except passkeys.PasskeyError as refused:
            await limiter.failed(account, ip, second_factor=True)
            return await again(refused.message, 400, reason=refused.reason)
        if not mfa.accepts(pending, used.method):
            # A step-up to ``phrh`` answered with a synced passkey (the page offered only the
            # device-bound ones): it would not reach the level, and the browser would come
            # round again.
            return await again(
                "This needs a passkey that stays on its device.", 400, reason="level"
            )
        if not await spend_pending(request, state):
            return expired_sign_in(next_url)  # a copy of this pending sign-in was finished already
        return await finish_sign_in(
            request,
            state,
            db,
            user,
            amr=mfa.amr_of(*pending.amr.split(), used.method),
            next_url=next_url,
            method="passkey",
            factor=used.id,
        )
