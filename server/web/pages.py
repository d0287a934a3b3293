"""The hosted pages: sign in, sign up, sign out (OIDC RP-initiated logout), sessions.

Every form carries a CSRF token; every POST answers 303 (or re-renders the form with a 4xx
when the input is wrong); redirects go only to a local path or a registered URI.
The consent page belongs to the authorization endpoint (``server.oauth.authorize``).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from .. import factors as factor_store
from .. import manage, mfa, passkeys
from ..boundary import column_length, text_problem
from ..deps import AppState, StateDep
from ..models import Client, RefreshFamily, User, live_families, now, revoke_families
from ..observability import audit
from ..passwords import normalize_username
from ..ratelimit import Verdict
from ..tokens import decode_id_token_hint
from .browser import (
    Csrf,
    SignedIn,
    clear_cookie,
    current_session,
    end_session,
    error_page,
    posted_form,
    redirect,
    render,
    safe_next,
)
from .second_factor import finish_sign_in, to_second_step

router = APIRouter()

BAD_SIGN_IN = "Incorrect username or password."
#: Column lengths of the ids the pages look up (``server.boundary``).
CLIENT_ID_LENGTH = column_length(Client.client_id)
FAMILY_ID_LENGTH = column_length(RefreshFamily.id)
NOTICES = {
    "signed_out": "You have been signed out.",
    "revoked": "That session has been signed out.",
    "mfa_expired": "That sign-in took too long or was interrupted. Sign in again.",
    "reauth": "Sign in again to change how you sign in.",
}


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def _too_many(verdict: Verdict, endpoint: str, what: str, back_url: str) -> Response:
    """429 with ``Retry-After`` (RFC 6585 §4) when a rate limit is exhausted."""
    audit("rate_limit.exceeded", endpoint=endpoint, scope=verdict.scope)
    response = error_page(
        429,
        "Too many attempts",
        f"{what} Wait {verdict.retry_after} seconds and try again.",
        back_url,
    )
    response.headers["Retry-After"] = str(verdict.retry_after)
    return response


# -- sign in ------------------------------------------------------------------------------


def _login_page(
    state: AppState,
    csrf: Csrf,
    *,
    next_url: str,
    username: str = "",
    error: str | None = None,
    notice: str | None = None,
    client_name: str | None = None,
    http_status: int = 200,
) -> Response:
    register_url = (
        "/register?" + urlencode({"next": next_url})
        if state.settings.registration_enabled
        else None
    )
    return render(
        "login.html",
        http_status=http_status,
        csrf=csrf,
        settings=state.settings,
        title="Sign in",
        username=username,
        error=error,
        next=next_url,
        client_name=client_name,
        register_url=register_url,
        notice=notice,
        # A sign-in without a username (passkey_pages): bound to this browser's CSRF cookie.
        passkey_options=(
            passkeys.assertion_options(state.settings, binding=csrf.cookie, credentials=None)
            if mfa.rp_id(state.settings) is not None
            else None
        ),
    )


async def client_name_for(state: AppState, next_url: str) -> str | None:
    """The client a sign-in is for, when ``next`` is an authorization request."""
    parts = urlsplit(next_url)
    if parts.path != "/oauth2/authorize":
        return None
    client_id = parse_qs(parts.query).get("client_id", [""])[0]
    if not client_id or text_problem(client_id, CLIENT_ID_LENGTH) is not None:
        return None
    async with state.db.session() as db:
        client = await db.get(Client, client_id)
    return client.name if client is not None else None


@router.get("/login")
async def login_form(request: Request, state: StateDep) -> Response:
    next_url = safe_next(request.query_params.get("next"))
    notice = NOTICES.get(request.query_params.get("notice", ""))
    csrf = Csrf.of(request, state.settings)
    return _login_page(
        state,
        csrf,
        next_url=next_url,
        notice=notice,
        client_name=await client_name_for(state, next_url),
    )


@router.post("/login")
async def login(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, csrf = posted
    next_url = safe_next(form.get("next"))
    username = form.get("username", "")[:150]
    password = form.get("password", "")
    account = normalize_username(username)
    limiter = state.limiter
    ip = limiter.client_ip(request)
    checks = [(limiter.login_ip, "login-ip", ip), (limiter.login_account, "login-account", account)]
    verdict = await limiter.hit(checks)
    if not verdict.allowed:
        return _too_many(verdict, "login", "Too many sign-in attempts.", "/login")

    async def refuse(user_id: str | None, **why: bool) -> Response:
        # One message for unknown user, wrong password, disabled account and throttling.
        audit("signin.failed", user_id=user_id, **why)
        return _login_page(
            state,
            csrf,
            next_url=next_url,
            username=username,
            error=BAD_SIGN_IN,
            client_name=await client_name_for(state, next_url),
        )

    if await limiter.throttled(account, ip):
        return await refuse(None, throttled=True)
    async with state.db.session() as db:
        user = await db.scalar(select(User).where(User.username_key == account))
        password_hash = user.password_hash if user is not None else None
        await db.commit()  # no transaction held while argon2 runs
        result = await state.passwords.verify_async(password_hash, password)
        if user is None or not result.ok or user.disabled or not password:
            await limiter.failed(account, ip)
            return await refuse(user.id if user is not None else None)
        if result.needs_rehash:
            user.password_hash = await state.passwords.hash_async(password)
        have = await factor_store.load(db, user.id, settings)
        if mfa.second_step_needed(settings, have) and have.any:
            await db.commit()
            audit("signin.password_accepted", user_id=user.id)
            return to_second_step(state, user, amr=mfa.amr_of(mfa.PWD), next_url=next_url)
        return await finish_sign_in(
            request, state, db, user, amr=mfa.amr_of(mfa.PWD), next_url=next_url
        )


# -- sign up ------------------------------------------------------------------------------


def _register_page(
    state: AppState,
    csrf: Csrf,
    *,
    next_url: str,
    values: dict[str, str] | None = None,
    errors: list[str] | None = None,
    http_status: int = 200,
) -> Response:
    values = values or {}
    return render(
        "register.html",
        http_status=http_status,
        csrf=csrf,
        settings=state.settings,
        title="Create an account",
        next=next_url,
        username=values.get("username", ""),
        email=values.get("email", ""),
        name=values.get("name", ""),
        errors=errors or [],
        login_url="/login?" + urlencode({"next": next_url}),
        password_min_length=state.settings.password_min_length,
        password_max_length=state.settings.password_max_length,
    )


def _registration_closed() -> Response:
    return error_page(404, "Registration is closed", "Ask an administrator for an account.")


@router.get("/register")
async def register_form(request: Request, state: StateDep) -> Response:
    if not state.settings.registration_enabled:
        return _registration_closed()
    csrf = Csrf.of(request, state.settings)
    return _register_page(state, csrf, next_url=safe_next(request.query_params.get("next")))


@router.post("/register")
async def register(request: Request, state: StateDep) -> Response:
    settings = state.settings
    if not settings.registration_enabled:
        return _registration_closed()
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, csrf = posted
    # Sign-ups per address, in the same bucket as the account API's (``POST /api/v1/users``):
    # each one adds an account row, so the page must not be a way around that limit.
    limiter = state.limiter
    verdict = await limiter.hit([(limiter.login_ip, "register-ip", limiter.client_ip(request))])
    if not verdict.allowed:
        return _too_many(verdict, "register", "Too many sign-ups from this address.", "/register")
    next_url = safe_next(form.get("next"))
    values = {k: form.get(k, "")[:254] for k in ("username", "email", "name")}
    password = form.get("password", "")
    errors: list[str] = []
    if not values["username"]:
        errors.append("Choose a username.")
    if password != form.get("password_confirm", ""):
        errors.append("The two passwords do not match.")
    user: User | None = None
    if not errors:
        try:
            # Hashed before the connection is taken: none is held while argon2 runs.
            record = await manage.new_user_record(
                state.passwords,
                username=values["username"],
                password=password,
                email=values["email"] or None,
                name=values["name"][:200] or None,
            )
            async with state.db.session() as db:
                user = await manage.insert_user(db, record)
                return await finish_sign_in(
                    request,
                    state,
                    db,
                    user,
                    amr=mfa.amr_of(mfa.PWD),
                    next_url=next_url,
                    registered=True,
                )
        except manage.ManageError as error:
            errors.append(_sentence(str(error)))
        except IntegrityError:
            errors.append("That username is taken.")
    return _register_page(
        state, csrf, next_url=next_url, values=values, errors=errors, http_status=400
    )


def _sentence(message: str) -> str:
    if "already exists" in message:
        return "That username is taken."
    if "valid email" in message:
        # manage's message quotes the address: never repeat a submitted value on the page.
        return "That is not a valid email address."
    return message[:1].upper() + message[1:] + ("" if message.endswith(".") else ".")


# -- sign out (OIDC RP-Initiated Logout 1.0) ------------------------------------------------


async def _logout_target(
    state: AppState, params: dict[str, str]
) -> tuple[Client | None, str | None]:
    """The client asking, and where to send the browser afterwards: only a
    ``post_logout_redirect_uri`` registered for that client (exact match, §3)."""
    client_id = params.get("client_id")
    hint = params.get("id_token_hint")
    if hint:
        claims = decode_id_token_hint(state.keys.keyset(), hint, issuer=state.settings.issuer)
        aud = claims.get("aud") if claims else None
        hinted = aud if isinstance(aud, str) else None
        if client_id and hinted and hinted != client_id:
            return None, None
        client_id = client_id or hinted
    if not client_id or text_problem(client_id, CLIENT_ID_LENGTH) is not None:
        return None, None
    # Through the client cache, as every OAuth endpoint: a metadata-document client exists
    # only while its document does (server/documents.py), whatever rows it left behind.
    client = await state.clients.get(client_id)
    if client is None:
        return None, None
    uri = params.get("post_logout_redirect_uri")
    if uri and uri in client.post_logout_redirect_uri_list:
        state_param = params.get("state")
        separator = "&" if "?" in uri else "?"
        return client, uri + (separator + urlencode({"state": state_param}) if state_param else "")
    return client, None


LOGOUT_PARAMS = ("id_token_hint", "client_id", "post_logout_redirect_uri", "state")


@router.get("/logout")
async def logout_form(request: Request, state: StateDep) -> Response:
    params = {k: v for k in LOGOUT_PARAMS if (v := request.query_params.get(k))}
    client, target = await _logout_target(state, params)
    async with state.db.session() as db:
        who = await current_session(request, db, state.settings)
    if who is None:
        if target is not None:
            return redirect(target)
        return render(
            "signed_out.html",
            title="Signed out",
            message="You are not signed in.",
            login_url="/login",
        )
    csrf = Csrf.of(request, state.settings)
    return render(
        "logout.html",
        csrf=csrf,
        settings=state.settings,
        title="Sign out",
        user=who.user,
        client_name=client.name if client is not None else None,
        params=list(params.items()),
    )


@router.post("/logout")
async def logout(request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    form, _ = posted
    _, target = await _logout_target(state, {k: form[k] for k in LOGOUT_PARAMS if k in form})
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is not None:
            ended = await end_session(db, who.session, reason="signed_out")
            await db.commit()
            audit("signout", user_id=who.user.id, session_id=who.session.id, families=ended)
    response = redirect(target or "/login?notice=signed_out")
    clear_cookie(response, settings, "session")
    clear_cookie(response, settings, "csrf")
    clear_cookie(response, settings, "mfa")  # a second step half done goes too
    return response


# -- the person's sessions ---------------------------------------------------------------


async def _sessions(db: AsyncSession, who: SignedIn) -> list[dict[str, Any]]:
    rows = await db.execute(live_families(who.user.id, now()))
    return [
        {
            "id": family.id,
            "client_name": name,
            "created": _when(family.created_at),
            "last_used": _when(family.last_used_at),
            "current": family.browser_session_id == who.session.id,
        }
        for family, name in rows
    ]


@router.get("/account")
async def account(request: Request, state: StateDep) -> Response:
    async with state.db.session() as db:
        who = await current_session(request, db, state.settings)
        if who is None:
            return redirect("/login?next=/account")
        sessions = await _sessions(db, who)
    return render(
        "account.html",
        csrf=Csrf.of(request, state.settings),
        settings=state.settings,
        title="Your sessions",
        user=who.user,
        sessions=sessions,
        notice=NOTICES.get(request.query_params.get("notice", "")),
    )


@router.post("/account/sessions/{family_id}/revoke")
async def revoke_session(family_id: str, request: Request, state: StateDep) -> Response:
    settings = state.settings
    posted = await posted_form(request, settings)
    if isinstance(posted, Response):
        return posted
    if text_problem(family_id, FAMILY_ID_LENGTH) is not None:
        # Not an id this server made (and text the database would refuse): no such session.
        return error_page(404, "Session not found", "It may have ended already.", "/account")
    async with state.db.session() as db:
        who = await current_session(request, db, settings)
        if who is None:
            return redirect("/login?next=/account")
        result = await db.execute(
            revoke_families(
                RefreshFamily.id == family_id,
                RefreshFamily.user_id == who.user.id,  # only the person's own sessions
                at=now(),
                reason="signed_out",
            )
        )
        await db.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return error_page(404, "Session not found", "It may have ended already.", "/account")
    audit("session.revoked", family_id=family_id, user_id=who.user.id)
    return redirect("/account?notice=revoked")
