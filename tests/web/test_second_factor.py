"""The second step of a sign-in, the step-up and the security page (web/second_factor.py)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, select

from server import mfa, models
from server.deps import AppState
from server.models import BrowserSession, RecoveryCode, TotpFactor, WebAuthnCredential, now
from server.web.browser import start_session
from tests.conftest import Events, MakeUser, UserCreds, csrf_of, sign_in

#: Where an expired or spent second step sends the browser: the sign-in, keeping ``next``.
EXPIRED = "/login?next=%2Faccount&notice=mfa_expired"

pytestmark = pytest.mark.feature("mfa-policy")

#: A session that used a second factor: what changing a person's factors needs.
TWO_FACTORS = "pwd otp mfa"


async def add_totp(state: AppState, user_id: str) -> None:
    async with state.db.sessions() as db:
        db.add(TotpFactor(user_id=user_id, secret_sealed="x", confirmed_at=now(), last_step=0))
        db.add(RecoveryCode(code_hash="h" * 63 + user_id[:1], user_id=user_id))
        await db.commit()


async def add_passkey(state: AppState, user_id: str, name: str = "Phone") -> str:
    credential = WebAuthnCredential(
        user_id=user_id,
        credential_id=models.new_id(),
        public_key=b"\x01",
        sign_count=0,
        backup_eligible=True,
        backed_up=True,
        transports="internal",
        aaguid="",
        name=name,
    )
    async with state.db.sessions() as db:
        db.add(credential)
        await db.commit()
    return credential.id


async def sessions_of(state: AppState, user_id: str) -> list[BrowserSession]:
    async with state.db.sessions() as db:
        rows = await db.scalars(
            select(BrowserSession)
            .where(BrowserSession.user_id == user_id)
            .order_by(BrowserSession.created_at)
        )
        return list(rows)


def with_policy(monkeypatch: pytest.MonkeyPatch, state: AppState, policy: str) -> None:
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"mfa": policy}))


async def post_password(http: httpx.AsyncClient, user: UserCreds, next_url: str) -> httpx.Response:
    page = await http.get("/login", params={"next": next_url})
    return await http.post(
        "/login",
        data={
            "csrf_token": csrf_of(page),
            "username": user.username,
            "password": user.password,
            "next": next_url,
        },
    )


@pytest.mark.one_backend
async def test_a_password_alone_signs_in_with_amr_pwd(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await sign_in(browser, user)
    [session] = await sessions_of(state, user.id)
    assert session.amr == "pwd"


@pytest.mark.one_backend
async def test_a_person_with_an_authenticator_app_gets_the_second_step_not_a_session(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser, events: Events
) -> None:
    user = await make_user()
    await add_totp(state, user.id)
    response = await post_password(browser, user, "/account")
    assert response.status_code == 303
    assert response.headers["location"] == "/login/verify?next=%2Faccount"
    assert "session" not in browser.cookies  # nothing signed in yet
    assert await sessions_of(state, user.id) == []
    assert ("signin.password_accepted", {"user_id": user.id}) in [
        (e, {k: v for k, v in f.items() if k == "user_id"}) for e, f in events
    ]
    page = await browser.get(response.headers["location"])
    assert page.status_code == 200
    assert 'action="/login/verify/code"' in page.text
    assert 'name="next" value="/account"' in page.text
    # The account pages are not reachable half signed in.
    assert (await browser.get("/account")).headers["location"].startswith("/login")


@pytest.mark.one_backend
async def test_the_second_step_is_skipped_when_the_deployment_turns_it_off(
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await make_user()
    await add_totp(state, user.id)
    with_policy(monkeypatch, state, "off")
    await sign_in(browser, user)
    [session] = await sessions_of(state, user.id)
    assert session.amr == "pwd"


@pytest.mark.one_backend
async def test_a_passkey_alone_does_not_add_a_step_to_password_sign_ins(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await add_passkey(state, user.id)
    response = await sign_in(browser, user, "/account")
    assert response.headers["location"] == "/account"


@pytest.mark.one_backend
async def test_required_sends_a_person_without_a_factor_to_enrolment(
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await make_user()
    with_policy(monkeypatch, state, "required")
    response = await post_password(browser, user, "/account")
    target = urlsplit(response.headers["location"])
    assert target.path == "/account/security"
    assert parse_qs(target.query) == {"next": ["/account"], "notice": ["enrol"]}
    page = await browser.get(response.headers["location"])
    assert "asks for a second sign-in method" in page.text
    assert ">Continue</a>" not in page.text  # no way on without a factor…
    await add_passkey(state, user.id)
    page = await browser.get(response.headers["location"])
    assert '<a href="/account">Continue</a>' in page.text  # …and one once there is


@pytest.mark.one_backend
async def test_a_passkey_that_cannot_work_here_does_not_count(
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On an issuer where passkeys cannot work (an IP address: this app's), a person whose
    one factor is a passkey is sent to add one that works, not to a second step that offers
    nothing. (Where passkeys work, ``required`` asks for the passkey: test_passkeys.py.)"""
    user = await make_user()
    await add_passkey(state, user.id)
    with_policy(monkeypatch, state, "required")
    response = await post_password(browser, user, "/account")
    assert response.headers["location"] == "/account/security?next=%2Faccount&notice=enrol"


@pytest.mark.one_backend
async def test_sign_up_under_required_goes_to_enrolment(
    browser: httpx.AsyncClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_policy(monkeypatch, state, "required")
    page = await browser.get("/register")
    response = await browser.post(
        "/register",
        data={
            "csrf_token": csrf_of(page),
            "username": "newbie",
            "password": "correct horse battery",
            "password_confirm": "correct horse battery",
            "next": "/account",
        },
    )
    assert response.status_code == 303
    assert response.headers["location"].startswith("/account/security?next=%2Faccount")


@pytest.mark.one_backend
async def test_the_second_step_page_needs_a_live_pending_sign_in(
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (await browser.get("/login/verify")).headers["location"] == EXPIRED
    user = await make_user()
    await add_totp(state, user.id)
    await post_password(browser, user, "/account")
    assert (await browser.get("/login/verify")).status_code == 200
    later = models.now() + mfa.PENDING_TTL + 1
    monkeypatch.setattr(models, "clock", lambda: float(later))
    response = await browser.get("/login/verify")
    assert response.headers["location"] == EXPIRED
    assert "took too long" in (await browser.get(response.headers["location"])).text


@pytest.mark.one_backend
async def test_a_password_change_voids_a_pending_sign_in(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await add_totp(state, user.id)
    await post_password(browser, user, "/account")
    async with state.db.sessions() as db:
        row = await db.get(models.User, user.id)
        assert row is not None
        row.password_changed_at += 1
        await db.commit()
    assert (await browser.get("/login/verify")).status_code == 303


async def signed_in_with(
    browser: httpx.AsyncClient, state: AppState, user_id: str, amr: str
) -> BrowserSession:
    async with state.db.sessions() as db:
        row = await db.get(models.User, user_id)
        assert row is not None
        session, value = await start_session(db, state.settings, row, None, amr=amr)
        await db.commit()
    browser.cookies.set("session", value)
    return session


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_step_up_asks_a_signed_in_person_for_their_factor(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await signed_in_with(browser, state, user.id, "pwd")
    # No factor: nothing to ask for, enrolment instead.
    response = await browser.get("/login/step-up", params={"next": "/account"})
    assert response.headers["location"] == "/account/security?next=%2Faccount&notice=enrol"
    await add_totp(state, user.id)
    response = await browser.get("/login/step-up", params={"next": "/account"})
    assert response.headers["location"] == "/login/verify?next=%2Faccount"
    page = await browser.get("/login/verify")
    assert "Confirm with one of your sign-in methods to go on." in page.text
    # The step-up is for this browser's session: signed in again (another session), it is void.
    await signed_in_with(browser, state, user.id, "pwd")
    assert (await browser.get("/login/verify")).status_code == 303


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_step_up_without_a_session_is_a_sign_in(browser: httpx.AsyncClient) -> None:
    response = await browser.get("/login/step-up", params={"next": "https://evil.example/"})
    assert response.headers["location"] == "/login?next=%2Faccount"  # safe_next held


# -- the security page --------------------------------------------------------------------


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_the_security_page_lists_factors_and_needs_a_session(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    response = await browser.get("/account/security")
    assert response.headers["location"] == "/login?next=%2Faccount%2Fsecurity"
    user = await make_user()
    await sign_in(browser, user)
    page = await browser.get("/account/security")
    assert "You sign in with your password only." in page.text
    await add_totp(state, user.id)
    await add_passkey(state, user.id, name="Work <laptop>")
    page = await browser.get("/account/security")
    assert "Authenticator app" in page.text
    assert "Work &lt;laptop&gt;" in page.text  # escaped
    assert "Passkey, synced" in page.text
    assert page.headers["cache-control"] == "no-store"


@pytest.mark.feature("mfa-factor-management")
async def test_removing_a_factor_signs_out_the_other_browsers(
    browser: httpx.AsyncClient,
    state: AppState,
    make_user: MakeUser,
    events: Events,
) -> None:
    user = await make_user()
    other = await signed_in_with(browser, state, user.id, "pwd")
    browser.cookies.clear()
    await signed_in_with(browser, state, user.id, TWO_FACTORS)
    await add_totp(state, user.id)
    passkey = await add_passkey(state, user.id)
    page = await browser.get("/account/security")
    response = await browser.post(
        f"/account/security/factors/{passkey}/remove", data={"csrf_token": csrf_of(page)}
    )
    assert response.headers["location"] == "/account/security?notice=removed"
    sessions = {s.id: s for s in await sessions_of(state, user.id)}
    assert sessions[other.id].ended_at is not None
    assert sum(s.ended_at is None for s in sessions.values()) == 1  # this browser's
    assert any(e == "factor.removed" and f["kind"] == "passkey" for e, f in events)
    async with state.db.sessions() as db:
        assert await db.get(WebAuthnCredential, passkey) is None


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_removing_the_last_factor_needs_the_password(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await signed_in_with(browser, state, user.id, TWO_FACTORS)
    await add_totp(state, user.id)
    page = await browser.get("/account/security")
    assert 'name="password"' in page.text
    token = csrf_of(page)
    for wrong in [{}, {"password": "nope"}]:
        response = await browser.post(
            "/account/security/factors/totp/remove", data={"csrf_token": token, **wrong}
        )
        assert response.status_code == 400
        assert "needs your current password" in response.text
    response = await browser.post(
        "/account/security/factors/totp/remove",
        data={"csrf_token": token, "password": user.password},
    )
    assert response.status_code == 303
    async with state.db.sessions() as db:
        assert await db.get(TotpFactor, user.id) is None
        # The app's recovery codes go with it.
        assert (await db.scalars(select(RecoveryCode))).all() == []


@pytest.mark.feature("mfa-factor-management")
@pytest.mark.parametrize("factor_id", ["nope", "x" * 5000, "a\x00b", "ü", "totp"])
async def test_removing_what_is_not_yours_is_not_found(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser, factor_id: str
) -> None:
    mallory = await make_user("mallory")
    alice = await make_user("alice")
    theirs = await add_passkey(state, alice.id)
    await add_totp(state, alice.id)
    await sign_in(browser, mallory)
    page = await browser.get("/logout")  # a form of this browser's (theirs has none yet)
    for target in [factor_id, theirs]:
        response = await browser.post(
            "/account/security/factors/" + target.replace("\x00", "%00") + "/remove",
            data={"csrf_token": csrf_of(page), "password": mallory.password},
        )
        assert response.status_code == 404, target
    async with state.db.sessions() as db:
        assert await db.get(WebAuthnCredential, theirs) is not None
        assert await db.get(TotpFactor, alice.id) is not None


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_removing_needs_the_form_token(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    await sign_in(browser, user)
    passkey = await add_passkey(state, user.id)
    response = await browser.post(f"/account/security/factors/{passkey}/remove", data={"a": "1"})
    assert response.status_code == 403


@pytest.mark.feature("mfa-factor-management")
async def test_two_tabs_cannot_remove_the_last_two_factors_without_the_password(
    browser: httpx.AsyncClient, app: FastAPI, state: AppState, make_user: MakeUser
) -> None:
    user = await make_user()
    first = await add_passkey(state, user.id)
    second = await add_passkey(state, user.id, "Second")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=str(browser.base_url)) as other:
        forms = []
        for http in (browser, other):
            await signed_in_with(http, state, user.id, TWO_FACTORS)
            forms.append(csrf_of(await http.get("/account/security")))

        async def remove(http: httpx.AsyncClient, token: str, factor: str) -> str:
            response = await http.post(
                f"/account/security/factors/{factor}/remove", data={"csrf_token": token}
            )
            return response.headers.get("location") or str(response.status_code)

        answers = await asyncio.gather(
            remove(browser, forms[0], first), remove(other, forms[1], second)
        )
    # One went first. The other then found the last factor, which needs the password, or
    # (when the first had already committed) found its browser signed out by that removal.
    assert "/account/security?notice=removed" in answers
    answers.remove("/account/security?notice=removed")
    assert answers[0] in ("400", "/login?next=/account/security")
    async with state.db.sessions() as db:
        left = (await db.scalars(select(WebAuthnCredential.id))).all()
    assert len(left) == 1


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_a_password_alone_cannot_change_the_factors_of_a_person_who_has_one(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    """Whoever knows only the password of a person with a factor (a password-only session:
    ``AUTH_MFA=off`` then, a session from before the factor, or a passkey-only person under
    ``optional``) must not add their own factor (then claim the strongest level, and sign in
    with it for ever) nor remove the person's: a step-up first."""
    user = await make_user()
    await add_totp(state, user.id)
    await signed_in_with(browser, state, user.id, "pwd")
    form = csrf_of(await browser.get("/logout"))
    attempts = [
        await browser.get("/account/security/totp"),
        await browser.post("/account/security/totp/new", data={"csrf_token": form}),
        await browser.post("/account/security/totp", data={"csrf_token": form, "code": "1"}),
        # (Adding a passkey: tests/web/test_passkeys.py, on an issuer passkeys work with.)
        await browser.post(
            "/account/security/factors/totp/remove",
            data={"csrf_token": form, "password": user.password},
        ),
    ]
    for response in attempts:
        assert response.status_code == 303
        assert response.headers["location"].startswith("/login/step-up?next=%2Faccount%2Fsecurity")
    async with state.db.sessions() as db:
        assert await db.get(TotpFactor, user.id) is not None
    # The step-up asks for the factor the person has.
    stepped = await browser.get(attempts[0].headers["location"])
    assert stepped.headers["location"].startswith("/login/verify")


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_the_second_step_says_so_when_nothing_can_confirm(
    browser: httpx.AsyncClient, state: AppState, make_user: MakeUser
) -> None:
    """Factors removed between the step-up and the answer (another browser, an admin reset):
    the page says nothing here can confirm, instead of showing no form at all."""
    user = await make_user()
    await add_totp(state, user.id)
    await signed_in_with(browser, state, user.id, "pwd")
    step = await browser.get("/login/step-up", params={"next": "/account"})
    async with state.db.sessions() as db:
        await db.execute(delete(TotpFactor))
        await db.execute(delete(RecoveryCode))
        await db.commit()
    page = await browser.get(step.headers["location"])
    assert page.status_code == 200
    assert "<form" not in page.text.split("<main", 1)[1]
    assert "None of your sign-in methods can confirm this here" in page.text


@pytest.mark.one_backend
async def test_an_expired_second_step_keeps_where_the_person_was_going(
    browser: httpx.AsyncClient,
) -> None:
    """An application's authorization request survives a second step that expired: the
    sign-in page gets it back as ``next`` (it went to /account before)."""
    target = "/oauth2/authorize?client_id=web&state=s1"
    response = await browser.get("/login/verify", params={"next": target})
    location = urlsplit(response.headers["location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": [target], "notice": ["mfa_expired"]}
