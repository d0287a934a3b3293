"""One-time codes (TOTP, RFC 6238) and recovery codes on the hosted pages: enrolment, the
second step of a sign-in, replay, throttling and the pending sign-in's limits."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx
import pyotp
import pytest
from fastapi import FastAPI
from limits import parse_many
from sqlalchemy import func, select, update

import server.models
from server import manage, mfa, totp
from server.deps import AppState
from server.models import BrowserSession, RecoveryCode, TotpFactor
from server.web.totp_pages import BAD_CODE, WRONG_SETUP_CODE
from tests.conftest import Events, MakeUser, UserCreds, csrf_of, sign_in

#: Where an expired or spent second step sends the browser: the sign-in, keeping ``next``.
EXPIRED = "/login?next=%2Faccount&notice=mfa_expired"

pytestmark = pytest.mark.feature("mfa-totp")

#: A fixed time at the start of a 30-second step (RFC 6238 §4), far from the real one.
T0 = 63_333_334 * 30
SECRET_RE = re.compile(r'class="totp-secret">([A-Z2-7 ]+)</code>')
CODE_RE = re.compile(r"<code>([a-z2-9]{5}-[a-z2-9]{5})</code>")


@dataclass
class Clock:
    t: int = T0

    def advance(self, seconds: int) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(server.models, "clock", lambda: fake.t)
    return fake


@pytest.fixture
def new_browser(app: FastAPI) -> Callable[[], httpx.AsyncClient]:
    def factory() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000"
        )

    return factory


SETUP_ID_RE = re.compile(r'name="setup" value="([0-9a-f]+)"')


def setup_of(page: httpx.Response) -> str:
    """Which setup the page shows (its form says, so a restarted one is told apart)."""
    match = SETUP_ID_RE.search(page.text)
    assert match is not None, page.text[:500]
    return match.group(1)


def code_at(secret: str, t: int) -> str:
    return pyotp.TOTP(secret).at(t)


@dataclass
class Enrolled:
    user: UserCreds
    secret: str
    codes: list[str]


async def open_setup(http: httpx.AsyncClient, next_url: str = "") -> tuple[httpx.Response, str]:
    """Start a setup from the security page (a POST with its form token), then open it."""
    security = await http.get("/account/security")
    started = await http.post(
        "/account/security/totp/new",
        data={"csrf_token": csrf_of(security), "next": next_url},
    )
    assert started.status_code == 303, started.text
    page = await http.get(started.headers["location"])
    assert page.status_code == 200, page.text
    match = SECRET_RE.search(page.text)
    assert match is not None, page.text
    return page, match.group(1).replace(" ", "")


async def enrol(
    http: httpx.AsyncClient, user: UserCreds, clock: Clock, next_url: str = ""
) -> tuple[httpx.Response, str, list[str]]:
    await sign_in(http, user)
    page, secret = await open_setup(http, next_url)
    done = await http.post(
        "/account/security/totp",
        data={
            "csrf_token": csrf_of(page),
            "setup": setup_of(page),
            "code": code_at(secret, clock.t),
            "next": next_url,
        },
    )
    assert done.status_code == 200, done.text
    codes = CODE_RE.findall(done.text)
    return done, secret, codes


@pytest.fixture
async def enrolled(
    browser: httpx.AsyncClient, make_user: MakeUser, clock: Clock, state: AppState
) -> AsyncIterator[Enrolled]:
    """A person with a confirmed app and ten recovery codes, and a browser signed out."""
    user = await make_user()
    _, secret, codes = await enrol(browser, user, clock)
    browser.cookies.clear()
    async with state.db.sessions() as db:  # signed out
        await manage.end_browser_sessions(db, BrowserSession.user_id == user.id, reason="test")
        await db.commit()
    clock.advance(30)  # the enrolment spent the step it was confirmed at
    yield Enrolled(user, secret, codes)


async def password_step(http: httpx.AsyncClient, user: UserCreds, next_url: str = "") -> str:
    """Sign in with the password; returns the second-step page's CSRF token."""
    response = await sign_in(http, user, next_url)
    assert response.headers["location"].startswith("/login/verify?"), response.headers
    page = await http.get(response.headers["location"])
    assert page.status_code == 200, page.text
    return csrf_of(page)


async def send_code(
    http: httpx.AsyncClient, csrf: str, code: str, next_url: str = "/account"
) -> httpx.Response:
    return await http.post(
        "/login/verify/code", data={"csrf_token": csrf, "code": code, "next": next_url}
    )


async def live_sessions(state: AppState, user_id: str) -> list[BrowserSession]:
    async with state.db.sessions() as db:
        rows = await db.scalars(
            select(BrowserSession).where(
                BrowserSession.user_id == user_id, BrowserSession.ended_at.is_(None)
            )
        )
        return list(rows)


async def unused_codes(state: AppState, user_id: str) -> int:
    async with state.db.sessions() as db:
        count = await db.scalar(
            select(func.count())
            .select_from(RecoveryCode)
            .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
        )
    return int(count or 0)


# -- enrolment ----------------------------------------------------------------------------------


async def test_enrolment_confirms_the_app_with_its_first_code(
    browser: httpx.AsyncClient, make_user: MakeUser, clock: Clock, state: AppState, events: Events
) -> None:
    user = await make_user()
    await sign_in(browser, user)
    page, secret = await open_setup(browser)
    # The QR code is drawn here, inline, with nothing the CSP would block.
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page.text and 'class="qr-code"' in page.text
    assert "style=" not in page.text and "<script" not in page.text
    assert len(secret) == 32 and len(base64.b32decode(secret)) == 20  # 160 bits
    async with state.db.sessions() as db:
        row = await db.get(TotpFactor, user.id)
        assert row is not None and row.confirmed_at is None
        assert secret not in row.secret_sealed  # sealed at rest
        assert totp.unseal(state.settings, user.id, row.secret_sealed) == secret
        assert totp.unseal(state.settings, "someone-else", row.secret_sealed) is None

    wrong = str((int(code_at(secret, clock.t)) + 1) % 1_000_000).zfill(6)
    refused = await browser.post(
        "/account/security/totp",
        data={"csrf_token": csrf_of(page), "setup": setup_of(page), "code": wrong},
    )
    assert refused.status_code == 400
    assert WRONG_SETUP_CODE.split(".")[0] in refused.text
    assert SECRET_RE.search(refused.text).group(1).replace(" ", "") == secret  # type: ignore[union-attr]

    done = await browser.post(
        "/account/security/totp",
        data={
            "csrf_token": csrf_of(refused),
            "setup": setup_of(refused),
            "code": code_at(secret, clock.t),
        },
    )
    assert done.status_code == 200, done.text
    assert done.headers["cache-control"] == "no-store"
    codes = CODE_RE.findall(done.text)
    assert len(set(codes)) == 10
    assert 'href="/account/security?notice=totp_added"' in done.text
    async with state.db.sessions() as db:
        row = await db.get(TotpFactor, user.id)
        assert row is not None and row.confirmed_at == clock.t
        assert row.last_step == clock.t // 30
        hashes = set(await db.scalars(select(RecoveryCode.code_hash)))
    assert hashes == {mfa.recovery_code_hash(state.settings, user.id, c) for c in codes}
    # The session was upgraded: a new one with both factors, the old one ended.
    sessions = await live_sessions(state, user.id)
    assert [s.amr for s in sessions] == ["pwd otp mfa"]
    assert ("factor.added", {"user_id": user.id, "kind": "totp"}) in [
        (e, {k: f[k] for k in ("user_id", "kind") if k in f}) for e, f in events
    ]
    assert not any(c in str(events) for c in codes) and secret not in str(events)

    # Set up already: the setup page sends to the security page, which counts the codes.
    again = await browser.get("/account/security/totp")
    assert again.status_code == 303 and again.headers["location"] == "/account/security"
    security = await browser.get("/account/security")
    assert "10 unused recovery codes left" in security.text
    assert 'action="/account/security/recovery-codes"' in security.text


@pytest.mark.one_backend
async def test_enrolment_keeps_next_and_required_policy_sends_there(
    browser: httpx.AsyncClient,
    make_user: MakeUser,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"mfa": "required"}))
    user = await make_user()
    signed = await sign_in(browser, user, "/account?from=app")
    target = signed.headers["location"]
    assert target.startswith("/account/security?")
    next_url = parse_qs(urlsplit(target).query)["next"][0]
    assert next_url == "/account?from=app"
    security = await browser.get(target)
    assert 'action="/account/security/totp/new"' in security.text
    assert 'name="next" value="/account?from=app"' in security.text
    done, _, _ = await enrol(browser, user, clock, next_url)
    assert 'href="/account?from=app"' in done.text
    # An outside ``next`` is dropped, never followed.
    page = await browser.get("/account/security/totp", params={"next": "https://evil.example/"})
    assert page.status_code == 303 and "evil" not in page.headers["location"]


@pytest.mark.one_backend
async def test_setup_needs_a_recent_sign_in(
    browser: httpx.AsyncClient, make_user: MakeUser, clock: Clock
) -> None:
    assert (
        (await browser.get("/account/security/totp"))
        .headers["location"]
        .startswith("/login?next=%2Faccount%2Fsecurity%2Ftotp")
    )
    user = await make_user()
    await sign_in(browser, user)
    page, secret = await open_setup(browser)
    clock.advance(mfa.RECENT_SIGN_IN + 1)
    stale = await browser.get("/account/security/totp")
    assert stale.status_code == 303
    assert stale.headers["location"] == "/login?next=%2Faccount%2Fsecurity%2Ftotp&notice=reauth"
    posted = await browser.post(
        "/account/security/totp",
        data={
            "csrf_token": csrf_of(page),
            "setup": setup_of(page),
            "code": code_at(secret, clock.t),
        },
    )
    assert posted.status_code == 303 and "notice=reauth" in posted.headers["location"]
    renew = await browser.post(
        "/account/security/recovery-codes", data={"csrf_token": csrf_of(page)}
    )
    assert renew.status_code == 303 and "notice=reauth" in renew.headers["location"]


async def test_a_setup_started_again_replaces_the_secret(
    browser: httpx.AsyncClient, make_user: MakeUser, clock: Clock
) -> None:
    user = await make_user()
    await sign_in(browser, user)
    first, old = await open_setup(browser)
    _, new = await open_setup(browser)
    assert old != new
    stale = await browser.post(
        "/account/security/totp",
        data={
            "csrf_token": csrf_of(first),
            "setup": setup_of(first),
            "code": code_at(old, clock.t),
        },
    )
    # The first window's code is for a secret that is gone: it says so (not "wrong code",
    # which would send the person to their phone's clock), and shows the new secret.
    assert stale.status_code == 409
    assert "started again in another window" in stale.text
    assert SECRET_RE.search(stale.text).group(1).replace(" ", "") == new  # type: ignore[union-attr]
    # Posting with no setup under way starts one.
    other = await make_user("bob")
    browser.cookies.clear()
    await sign_in(browser, other)
    page = await browser.get("/logout")
    blind = await browser.post(
        "/account/security/totp",
        data={"csrf_token": csrf_of(page), "setup": "", "code": "123456"},
    )
    assert blind.status_code == 303 and blind.headers["location"] == "/account/security/totp"


# -- the second step ------------------------------------------------------------------------------


async def test_password_then_code_signs_in_with_two_factors(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock, state: AppState, events: Events
) -> None:
    csrf = await password_step(browser, enrolled.user, "/account?x=1")
    assert await live_sessions(state, enrolled.user.id) == []
    done = await send_code(browser, csrf, code_at(enrolled.secret, clock.t), "/account?x=1")
    assert done.status_code == 303 and done.headers["location"] == "/account?x=1"
    [session] = await live_sessions(state, enrolled.user.id)
    assert session.amr == "pwd otp mfa"
    assert (await browser.get("/account")).status_code == 200
    signed = [f for e, f in events if e == "signin.succeeded"]
    assert signed[-1]["amr"] == "pwd otp mfa" and signed[-1]["second_factor"] == "totp"


async def test_a_code_works_once(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    new_browser: Callable[[], httpx.AsyncClient],
) -> None:
    code = code_at(enrolled.secret, clock.t)
    csrf = await password_step(browser, enrolled.user)
    assert (await send_code(browser, csrf, code)).status_code == 303
    async with new_browser() as other:
        again = await send_code(other, await password_step(other, enrolled.user), code)
    assert again.status_code == 400 and BAD_CODE in again.text


async def test_a_code_of_an_earlier_step_than_the_last_used_is_refused(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock
) -> None:
    # Two steps inside the window: the later one used first, then the earlier one.
    earlier, later = code_at(enrolled.secret, clock.t), code_at(enrolled.secret, clock.t + 30)
    clock.advance(15)
    assert (
        await send_code(browser, await password_step(browser, enrolled.user), later)
    ).status_code == 303
    browser.cookies.clear()
    refused = await send_code(browser, await password_step(browser, enrolled.user), earlier)
    assert refused.status_code == 400
    # Outside the window (RFC 6238 §5.2: one step either way) a code is refused too.
    clock.advance(120)
    stale = await send_code(browser, csrf_of(refused), later)
    assert stale.status_code == 400


async def test_the_same_code_twice_at_once_signs_in_once(
    enrolled: Enrolled, clock: Clock, new_browser: Callable[[], httpx.AsyncClient]
) -> None:
    code = code_at(enrolled.secret, clock.t)
    async with new_browser() as one, new_browser() as two:
        csrfs = [await password_step(b, enrolled.user) for b in (one, two)]
        results = await asyncio.gather(
            send_code(one, csrfs[0], code), send_code(two, csrfs[1], code)
        )
    assert sorted(r.status_code for r in results) == [303, 400]


@pytest.mark.feature("mfa-recovery-codes")
async def test_a_recovery_code_works_once(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock, state: AppState, events: Events
) -> None:
    code = enrolled.codes[3]
    typed = code.replace("-", " ").upper()  # case and separators do not matter
    done = await send_code(browser, await password_step(browser, enrolled.user), typed)
    assert done.status_code == 303, done.text
    [session] = await live_sessions(state, enrolled.user.id)
    assert session.amr == "pwd otp mfa"
    assert ("recovery_code.used", {"user_id": enrolled.user.id}) in events
    assert code not in str(events) and typed not in str(events)
    assert await unused_codes(state, enrolled.user.id) == 9
    browser.cookies.clear()
    again = await send_code(browser, await password_step(browser, enrolled.user), code)
    assert again.status_code == 400 and BAD_CODE in again.text
    # Another person's code is not this person's.
    assert (await send_code(browser, csrf_of(again), "abcde-fghjk")).status_code == 400


@pytest.mark.feature("mfa-recovery-codes")
async def test_new_recovery_codes_replace_the_old(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock, state: AppState
) -> None:
    await send_code(browser, await password_step(browser, enrolled.user), enrolled.codes[0])
    page = await browser.get("/account/security")
    assert "9 unused recovery codes left" in page.text
    renewed = await browser.post(
        "/account/security/recovery-codes", data={"csrf_token": csrf_of(page)}
    )
    assert renewed.status_code == 200 and renewed.headers["cache-control"] == "no-store"
    fresh = CODE_RE.findall(renewed.text)
    assert len(fresh) == 10 and not set(fresh) & set(enrolled.codes)
    assert await unused_codes(state, enrolled.user.id) == 10
    browser.cookies.clear()
    old = await send_code(browser, await password_step(browser, enrolled.user), enrolled.codes[1])
    assert old.status_code == 400
    assert (await send_code(browser, csrf_of(old), fresh[0])).status_code == 303


@pytest.mark.one_backend
async def test_wrong_codes_are_throttled_like_passwords(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    events: Events,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state.limiter, "failures_account_ip", parse_many("3/minute"))
    csrf = await password_step(browser, enrolled.user)
    right = code_at(enrolled.secret, clock.t)
    wrong = str((int(right) + 1) % 1_000_000).zfill(6)
    for attempt in (wrong, "zzzzz-zzzzz", wrong):
        assert (await send_code(browser, csrf, attempt)).status_code == 400
    refused = await send_code(browser, csrf, right)
    assert refused.status_code == 400 and BAD_CODE in refused.text
    assert events[-1] == (
        "signin.second_factor_failed",
        {"user_id": enrolled.user.id, "throttled": True},
    )
    # The right code was not spent by the throttled attempt.
    async with state.db.sessions() as db:
        row = await db.get(TotpFactor, enrolled.user.id)
        assert row is not None and row.last_step < clock.t // 30


@pytest.mark.one_backend
async def test_wrong_setup_codes_are_throttled(
    browser: httpx.AsyncClient,
    make_user: MakeUser,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state.limiter, "failures_account_ip", parse_many("2/minute"))
    await sign_in(browser, await make_user())
    page, secret = await open_setup(browser)
    for _ in range(2):
        wrong = await browser.post(
            "/account/security/totp",
            data={"csrf_token": csrf_of(page), "setup": setup_of(page), "code": "000000"},
        )
        assert wrong.status_code == 400
    late = await browser.post(
        "/account/security/totp",
        data={
            "csrf_token": csrf_of(page),
            "setup": setup_of(page),
            "code": code_at(secret, clock.t),
        },
    )
    assert late.status_code == 429 and "Too many wrong codes" in late.text


@pytest.mark.one_backend
async def test_an_expired_or_tampered_pending_sign_in_goes_back_to_login(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock
) -> None:
    csrf = await password_step(browser, enrolled.user)
    value = browser.cookies["mfa"]
    browser.cookies.set("mfa", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    tampered = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert tampered.status_code == 303
    assert tampered.headers["location"] == EXPIRED
    browser.cookies.set("mfa", value)
    clock.advance(mfa.PENDING_TTL + 1)
    expired = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert expired.headers["location"] == EXPIRED
    browser.cookies.delete("mfa")
    assert (await send_code(browser, csrf, "123456")).headers["location"] == (EXPIRED)


@pytest.mark.one_backend
async def test_a_password_change_voids_the_pending_sign_in(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock, state: AppState
) -> None:
    csrf = await password_step(browser, enrolled.user)
    clock.advance(5)
    async with state.db.sessions() as db:
        await manage.set_password(
            db, state.passwords, enrolled.user.username, "a new long passphrase"
        )
        await db.commit()
    refused = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert refused.headers["location"] == EXPIRED
    assert await live_sessions(state, enrolled.user.id) == []


@pytest.mark.feature("mfa-recovery-codes")
async def test_removing_the_app_removes_the_recovery_codes(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock, state: AppState
) -> None:
    await send_code(
        browser, await password_step(browser, enrolled.user), code_at(enrolled.secret, clock.t)
    )
    page = await browser.get("/account/security")
    removed = await browser.post(
        "/account/security/factors/totp/remove",
        data={"csrf_token": csrf_of(page), "password": enrolled.user.password},
    )
    assert removed.status_code == 303, removed.text
    async with state.db.sessions() as db:
        assert await db.get(TotpFactor, enrolled.user.id) is None
    assert await unused_codes(state, enrolled.user.id) == 0
    # A sign-in is a password again; recovery codes are worthless.
    browser.cookies.clear()
    assert (await sign_in(browser, enrolled.user)).headers["location"] == "/account"
    renew = await browser.post(
        "/account/security/recovery-codes",
        data={"csrf_token": csrf_of(await browser.get("/logout"))},
    )
    assert renew.status_code == 303 and renew.headers["location"] == "/account/security"


@pytest.mark.feature("mfa-step-up")
async def test_a_step_up_with_a_code_replaces_the_session(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    optional = state.settings
    monkeypatch.setattr(state, "settings", optional.model_copy(update={"mfa": "off"}))
    await sign_in(browser, enrolled.user)
    [weak] = await live_sessions(state, enrolled.user.id)
    assert weak.amr == "pwd"
    monkeypatch.setattr(state, "settings", optional)
    step_up = await browser.get("/login/step-up", params={"next": "/account"})
    assert step_up.headers["location"].startswith("/login/verify?")
    csrf = csrf_of(await browser.get(step_up.headers["location"]))
    done = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert done.status_code == 303 and done.headers["location"] == "/account"
    [strong] = await live_sessions(state, enrolled.user.id)
    assert strong.id != weak.id and strong.amr == "pwd otp mfa"


# -- hostile input ------------------------------------------------------------------------------


@pytest.mark.one_backend
@pytest.mark.feature("mfa-recovery-codes")
async def test_new_recovery_codes_need_a_second_factor_in_the_session(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"mfa": "off"}))
    assert (await sign_in(browser, enrolled.user)).headers["location"] == "/account"
    page = await browser.get("/account/security")
    renew = await browser.post(
        "/account/security/recovery-codes", data={"csrf_token": csrf_of(page)}
    )
    assert renew.status_code == 303
    assert renew.headers["location"] == "/login/step-up?next=%2Faccount%2Fsecurity"
    async with state.db.sessions() as db:
        hashes = set(await db.scalars(select(RecoveryCode.code_hash)))
    assert hashes == {
        mfa.recovery_code_hash(state.settings, enrolled.user.id, c) for c in enrolled.codes
    }


@pytest.mark.one_backend
async def test_posts_without_csrf_are_refused(
    browser: httpx.AsyncClient, enrolled: Enrolled, clock: Clock
) -> None:
    await password_step(browser, enrolled.user)
    for path in [
        "/account/security/totp",
        "/account/security/recovery-codes",
        "/login/verify/code",
    ]:
        for csrf in ({}, {"csrf_token": "forged"}):
            data = {"code": code_at(enrolled.secret, clock.t), **csrf}
            assert (await browser.post(path, data=data)).status_code == 403, path


@pytest.mark.one_backend
async def test_hostile_codes_are_refused_plainly(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state.limiter, "failures_account_ip", parse_many("50/minute"))
    csrf = await password_step(browser, enrolled.user)
    right = code_at(enrolled.secret, clock.t)
    arabic = "".join(chr(0x0660 + int(d)) for d in right)  # the right digits, not ASCII
    for code in ["", " ", arabic, right[:5], right + "0", "x" * 5000, "' OR 1=1 --", "ａｂｃ"]:
        response = await send_code(browser, csrf, code)
        assert response.status_code == 400 and BAD_CODE in response.text, code
    # A code with spaces is still the code.
    assert (await send_code(browser, csrf, right[:3] + " " + right[3:])).status_code == 303


@pytest.mark.one_backend
@pytest.mark.feature("mfa-recovery-codes")
def test_codes_and_steps() -> None:
    secret = totp.new_secret()
    generator = pyotp.TOTP(secret)
    assert totp.matching_step(secret, generator.at(T0), T0) == T0 // 30
    assert totp.matching_step(secret, generator.at(T0 - 30), T0) == T0 // 30 - 1
    assert totp.matching_step(secret, generator.at(T0 + 30), T0) == T0 // 30 + 1
    assert totp.matching_step(secret, generator.at(T0 - 60), T0) is None
    assert totp.matching_step(secret, " " + generator.at(T0)[:3] + " " + generator.at(T0)[3:], T0)
    code = totp.new_recovery_code()
    assert re.fullmatch(r"[a-z2-9]{5}-[a-z2-9]{5}", code) and not set(code) & set("01ilo")
    assert totp.is_totp_code("123 456") and not totp.is_totp_code(code)


@pytest.mark.one_backend
async def test_wrong_codes_meet_an_absolute_cap_per_account(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
    new_browser: Callable[[], httpx.AsyncClient],
) -> None:
    """``AUTH_THROTTLE_SECOND_FACTOR``: a six-digit code falls to a patient guesser far sooner
    than a password, so second-step failures have a cap of their own, per account, from any
    address (NIST SP 800-63B §5.2.2), on top of the password throttle."""
    monkeypatch.setattr(state.limiter, "failures_second_factor", parse_many("2/day"))
    right = code_at(enrolled.secret, clock.t)
    wrong = str((int(right) + 1) % 1_000_000).zfill(6)
    for _ in range(2):
        async with new_browser() as guesser:  # a fresh browser, as from another address
            csrf = await password_step(guesser, enrolled.user)
            assert (await send_code(guesser, csrf, wrong)).status_code == 400
    csrf = await password_step(browser, enrolled.user)  # the password still works…
    refused = await send_code(browser, csrf, right)  # …but no code does, the right one neither
    assert refused.status_code == 400 and BAD_CODE in refused.text
    assert await live_sessions(state, enrolled.user.id) == []


@pytest.mark.one_backend
async def test_a_finished_second_step_cannot_be_finished_again_from_a_copy(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    new_browser: Callable[[], httpx.AsyncClient],
) -> None:
    """The pending sign-in cookie is spent by the sign-in it finishes (across replicas): a
    copy taken before (another device, a proxy's log) is worth nothing after."""
    csrf = await password_step(browser, enrolled.user)
    copied = browser.cookies.get("mfa")
    assert copied
    assert (await send_code(browser, csrf, code_at(enrolled.secret, clock.t))).status_code == 303
    async with new_browser() as other:
        other.cookies.set("mfa", copied)
        page = await other.get("/login/verify")
        assert page.status_code == 200  # still signed and live…
        answer = await send_code(other, csrf_of(page), code_at(enrolled.secret, clock.t + 30))
    assert answer.status_code == 303  # …but spent
    assert answer.headers["location"] == EXPIRED
    assert len(await live_sessions(state, enrolled.user.id)) == 1


@pytest.mark.one_backend
async def test_a_session_from_before_methods_were_recorded_steps_up_as_a_password_one(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session with no ``amr`` (older than migration 0011, or made by a 0010 replica during
    a rolling upgrade) was a password sign-in: a step-up from it reaches ``pwd otp mfa``, not
    ``otp`` (which claimed a one-time code alone, and never met the level: a loop)."""
    optional = state.settings
    monkeypatch.setattr(state, "settings", optional.model_copy(update={"mfa": "off"}))
    await sign_in(browser, enrolled.user)
    monkeypatch.setattr(state, "settings", optional)
    async with state.db.sessions() as db:
        await db.execute(update(BrowserSession).values(amr=""))
        await db.commit()
    step_up = await browser.get("/login/step-up", params={"next": "/account"})
    csrf = csrf_of(await browser.get(step_up.headers["location"]))
    done = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert done.headers["location"] == "/account"
    [strong] = await live_sessions(state, enrolled.user.id)
    assert strong.amr == "pwd otp mfa"


@pytest.mark.one_backend
async def test_a_setup_starts_only_with_the_form_token(
    browser: httpx.AsyncClient, make_user: MakeUser, clock: Clock, state: AppState
) -> None:
    """A cross-site link (a top-level GET carries the SameSite=Lax cookie) must not start or
    replace a setup: the secret someone is scanning stays. Opening the page changes nothing;
    starting one is a POST with the form token."""
    user = await make_user()
    await sign_in(browser, user)
    assert (await browser.get("/account/security/totp")).headers["location"] == (
        "/account/security"
    )
    async with state.db.sessions() as db:
        assert await db.get(TotpFactor, user.id) is None  # nothing made by a GET
    refused = await browser.post("/account/security/totp/new", data={"next": ""})
    assert refused.status_code == 403
    _, secret = await open_setup(browser)
    again = await browser.get("/account/security/totp")
    assert SECRET_RE.search(again.text).group(1).replace(" ", "") == secret  # type: ignore[union-attr]


@pytest.mark.one_backend
async def test_the_second_factor_cap_holds_with_rate_limits_off(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``AUTH_RATE_LIMITS_ENABLED=false`` (benchmarks, trusted use) turns the limits off, but
    not this cap: without it a six-digit code falls to an online guesser."""
    monkeypatch.setattr(state.limiter, "enabled", False)
    monkeypatch.setattr(state.limiter, "failures_second_factor", parse_many("2/day"))
    right = code_at(enrolled.secret, clock.t)
    wrong = str((int(right) + 1) % 1_000_000).zfill(6)
    csrf = await password_step(browser, enrolled.user)
    for _ in range(2):
        assert (await send_code(browser, csrf, wrong)).status_code == 400
    refused = await send_code(browser, csrf, right)
    assert refused.status_code == 400 and BAD_CODE in refused.text


@pytest.mark.one_backend
async def test_an_app_sealed_under_another_secret_key_is_not_counted_as_guessing(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After AUTH_SECRET_KEY changed, no code can match the sealed secret: the right codes
    are refused, but not counted against the person (who would be locked out for hours once
    the key is restored), and the log says why."""
    monkeypatch.setattr(state.limiter, "failures_second_factor", parse_many("1/day"))
    original = state.settings
    monkeypatch.setattr(state, "settings", original.model_copy(update={"secret_key": "n" * 48}))
    csrf = await password_step(browser, enrolled.user)
    refused = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert refused.status_code == 400
    assert "totp.unseal_failed" in capsys.readouterr().out
    monkeypatch.setattr(state, "settings", original)
    browser.cookies.clear()
    csrf = await password_step(browser, enrolled.user)
    done = await send_code(browser, csrf, code_at(enrolled.secret, clock.t))
    assert done.status_code == 303  # the cap of one was not spent by the unreadable attempt


@pytest.mark.one_backend
async def test_two_sign_ins_in_the_same_second_are_two_second_steps(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    new_browser: Callable[[], httpx.AsyncClient],
) -> None:
    """A laptop and a phone signing in in the same second: each pending sign-in is its own
    (a random part), so finishing one does not spend the other's."""
    async with new_browser() as phone:
        laptop_csrf = await password_step(browser, enrolled.user)
        phone_csrf = await password_step(phone, enrolled.user)
        assert browser.cookies["mfa"] != phone.cookies["mfa"]
        laptop = await send_code(browser, laptop_csrf, code_at(enrolled.secret, clock.t))
        assert laptop.headers["location"] == "/account"
        phone_done = await send_code(phone, phone_csrf, enrolled.codes[0])
        assert phone_done.headers["location"] == "/account"
    assert len(await live_sessions(state, enrolled.user.id)) == 2


async def test_a_spent_second_step_keeps_the_recovery_code_and_logs_no_use(
    browser: httpx.AsyncClient,
    enrolled: Enrolled,
    clock: Clock,
    state: AppState,
    events: Events,
    new_browser: Callable[[], httpx.AsyncClient],
) -> None:
    """A recovery code sent with a copy of a finished second step is refused as expired:
    not spent, and not logged as used (the audit log said it was)."""
    csrf = await password_step(browser, enrolled.user)
    copied = browser.cookies["mfa"]
    assert (await send_code(browser, csrf, code_at(enrolled.secret, clock.t))).status_code == 303
    async with new_browser() as other:
        other.cookies.set("mfa", copied)
        page = await other.get("/login/verify")
        answer = await send_code(other, csrf_of(page), enrolled.codes[0])
    assert answer.headers["location"] == EXPIRED
    assert await unused_codes(state, enrolled.user.id) == 10
    assert not [e for e, _ in events if e == "recovery_code.used"]
