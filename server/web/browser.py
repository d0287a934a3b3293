"""What the hosted pages need from a browser: the session cookie, CSRF tokens, safe redirects,
security headers and rendering.

- **Session**: a random cookie value; the database keeps only its SHA-256 (``BrowserSession``).
  A new session (new value, new row) on every sign-in, so a value planted before sign-in is
  worthless after it (session fixation). Every use of a session goes through
  ``current_session``, which also re-checks that the person is not disabled.
- **CSRF**: signed double-submit (OWASP): a random ``csrf`` cookie, and in every form
  HMAC(secret_key, cookie). A cross-site form can neither read the cookie nor forge the HMAC.
  ``SameSite=Lax`` on both cookies is a second layer.
- **Cookies**: ``HttpOnly``, ``SameSite=Lax``, ``Path=/``; with an https issuer also ``Secure``
  and the ``__Host-`` prefix, so no subdomain can set or shadow them.
- **Redirects**: only to a local path (``safe_next``) or a registered URI (exact match, done by
  the callers).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import manage
from ..config import Settings
from ..forms import FormError, read_form
from ..models import AuthorizationCode, BrowserSession, RefreshFamily, User, new_id, now, sha256_hex

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
SESSION_BYTES = 32
CSRF_FIELD = "csrf_token"
#: Room for an authorization request (``MAX_AUTHORIZE_QUERY``, 4096) as the sign-in's ``next``.
MAX_NEXT_LENGTH = 8192

#: Every response. No ``form-action``: browsers apply it to the redirect that follows a form
#: post, which must reach the client's registered redirect URI.
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (
        b"content-security-policy",
        # ``script-src 'self'``: the one script, static/passkeys.js (WebAuthn calls); no
        # inline script anywhere, so an injected one would not run.
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # The authorization response carries a code in its URL: never leak it as a Referer.
    (b"referrer-policy", b"no-referrer"),
]

templates = Environment(
    loader=FileSystemLoader(TEMPLATES_DIR),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    auto_reload=False,
)
templates.filters["when"] = lambda stamp: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


class SecurityHeadersMiddleware:
    """Adds ``SECURITY_HEADERS`` to every HTTP response (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


# -- cookies ------------------------------------------------------------------------------


def cookie_name(settings: Settings, base: str) -> str:
    return f"__Host-{base}" if settings.secure_cookies else base


def set_cookie(
    response: Response, settings: Settings, base: str, value: str, max_age: int | None
) -> None:
    response.set_cookie(
        cookie_name(settings, base),
        value,
        max_age=max_age,
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="lax",
    )


def clear_cookie(response: Response, settings: Settings, base: str) -> None:
    response.delete_cookie(
        cookie_name(settings, base),
        path="/",
        secure=settings.secure_cookies,
        httponly=True,
        samesite="lax",
    )


# -- CSRF ---------------------------------------------------------------------------------


def _csrf_for(settings: Settings, cookie: str) -> str:
    mac = hmac.new(settings.secret_key.encode(), b"csrf|" + cookie.encode(), hashlib.sha256)
    return mac.hexdigest()


@dataclass
class Csrf:
    """The CSRF cookie of this request (a new one if it had none) and its form token."""

    cookie: str
    fresh: bool

    @classmethod
    def of(cls, request: Request, settings: Settings) -> Csrf:
        value = request.cookies.get(cookie_name(settings, "csrf"), "")
        if re.fullmatch(r"[A-Za-z0-9_-]{43}", value):
            return cls(value, fresh=False)
        return cls(secrets.token_urlsafe(SESSION_BYTES), fresh=True)

    @classmethod
    def new(cls) -> Csrf:
        return cls(secrets.token_urlsafe(SESSION_BYTES), fresh=True)

    def token(self, settings: Settings) -> str:
        return _csrf_for(settings, self.cookie)

    def valid(self, settings: Settings, submitted: str | None) -> bool:
        if self.fresh or not submitted:
            return False  # no cookie came with the post: nothing to match
        # As bytes: compare_digest raises TypeError on a str with non-ASCII characters, and a
        # posted token is whatever the poster sent.
        expected = _csrf_for(settings, self.cookie).encode()
        return hmac.compare_digest(expected, submitted.encode("utf-8", "surrogatepass"))

    def attach(self, response: Response, settings: Settings) -> None:
        if self.fresh:
            set_cookie(response, settings, "csrf", self.cookie, None)


async def posted_form(
    request: Request, settings: Settings
) -> tuple[dict[str, str], Csrf] | Response:
    """The form of a POST from one of our pages, CSRF-checked; else the error page to answer
    (400/413 for a malformed body, 403 when the CSRF pair does not match)."""
    try:
        form = await read_form(request, settings.max_body_bytes)
    except FormError as error:
        return error_page(error.status, "Bad request", str(error))
    csrf = Csrf.of(request, settings)
    if not csrf.valid(settings, form.pop(CSRF_FIELD, None)):
        return error_page(
            403,
            "Form expired",
            "This form is no longer valid (or did not come from this site). "
            "Go back, reload the page and try again.",
        )
    return form, csrf


# -- sessions -----------------------------------------------------------------------------


@dataclass
class SignedIn:
    session: BrowserSession
    user: User


async def current_session(
    request: Request, db: AsyncSession, settings: Settings
) -> SignedIn | None:
    value = request.cookies.get(cookie_name(settings, "session"))
    if not value or len(value) > 100:
        return None
    row = (
        await db.execute(
            select(BrowserSession, User)
            .join(User, User.id == BrowserSession.user_id)
            .where(
                BrowserSession.token_hash == sha256_hex(value),
                BrowserSession.ended_at.is_(None),
                BrowserSession.expires_at > now(),
                User.disabled.is_(False),
            )
        )
    ).first()
    if row is None:
        return None
    session, user = row
    return SignedIn(session, user)


async def start_session(
    db: AsyncSession,
    settings: Settings,
    user: User,
    previous: SignedIn | None,
    *,
    amr: str,
    auth_time: int | None = None,
) -> tuple[BrowserSession, str]:
    """A new session for ``user`` (new cookie value, new row, new ``auth_time``), so that a
    value planted or seen before this sign-in is worthless after it (session fixation).

    The browser's previous session (if any) ends, but signing in again is not signing out:
    nothing another client was granted ends with it. When the same person signs in again
    (``prompt=login``, ``max_age``, or simply twice), the sign-ins and unexchanged codes of
    the previous session move to the new one, so that a later sign-out still ends them.
    When another person signs in, the previous person's sign-ins stay theirs (linked to the
    ended session, which nobody can sign out any more) and the previous session's
    unexchanged codes are spent with it."""
    value = secrets.token_urlsafe(SESSION_BYTES)
    stamp = now()
    session = BrowserSession(
        id=new_id(),
        token_hash=sha256_hex(value),
        user_id=user.id,
        auth_time=stamp if auth_time is None else auth_time,
        amr=amr,
        created_at=stamp,
        expires_at=stamp + settings.session_ttl,
    )
    db.add(session)
    await db.flush()
    if previous is not None:
        old = previous.session.id
        if previous.user.id == user.id:
            # Codes first, then families, as in ``end_browser_sessions``: an exchange racing
            # with this either has its code moved before it claims it (and reads the new id
            # when claiming), or has claimed it first and its family is moved next.
            await db.execute(
                update(AuthorizationCode)
                .where(
                    AuthorizationCode.browser_session_id == old,
                    AuthorizationCode.used_at.is_(None),
                )
                .values(browser_session_id=session.id)
                .execution_options(synchronize_session=False)
            )
            await db.execute(
                update(RefreshFamily)
                .where(RefreshFamily.browser_session_id == old)
                .values(browser_session_id=session.id)
                .execution_options(synchronize_session=False)
            )
        await manage.end_browser_sessions(db, BrowserSession.id == old, reason="signed_in_again")
    return session, value


async def end_session(db: AsyncSession, session: BrowserSession, *, reason: str) -> int:
    """Sign out: end the browser session, spend its unexchanged codes and end every sign-in
    (family) it created; returns the sign-ins ended."""
    ended = await manage.end_browser_sessions(
        db, BrowserSession.id == session.id, reason=reason, end_families=True
    )
    return ended.families


# -- redirects ----------------------------------------------------------------------------


def safe_next(value: str | None, default: str = "/account") -> str:
    """``value`` if it is a path on this server, else ``default`` (no open redirect).

    Refuses absolute URLs, scheme-relative ``//host``, ``/\\host`` (browsers read ``\\`` as
    ``/``), userinfo and host tricks, control characters and whitespace.
    """
    if not value or len(value) > MAX_NEXT_LENGTH or not value.startswith("/"):
        return default
    if value.startswith("//") or "\\" in value:
        return default
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def redirect(url: str) -> RedirectResponse:
    """303 See Other: after a POST the browser follows with a GET (RFC 9110 §15.4.4)."""
    return RedirectResponse(url, status_code=303)


# -- rendering ----------------------------------------------------------------------------


def render(
    template: str,
    *,
    http_status: int = 200,
    csrf: Csrf | None = None,
    settings: Settings | None = None,
    **context: Any,
) -> HTMLResponse:
    context.setdefault("user", None)
    if csrf is not None and settings is not None:
        context["csrf_token"] = csrf.token(settings)
    body = templates.get_template(template).render(**context)
    response = HTMLResponse(body, status_code=http_status)
    # Pages hold CSRF tokens and personal data: never stored by a browser or a proxy.
    response.headers["Cache-Control"] = "no-store"
    if csrf is not None and settings is not None:
        csrf.attach(response, settings)
    return response


def error_page(status: int, heading: str, message: str, back_url: str | None = None) -> Response:
    return render(
        "error.html",
        http_status=status,
        title=heading,
        status=status,
        heading=heading,
        message=message,
        back_url=back_url,
    )
