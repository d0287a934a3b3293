"""One-time codes in a real (headless) Chromium against a real server process.

Set up an authenticator app on /account/security (the key read off the page, the codes
computed here as the app would, RFC 6238) → ten recovery codes, shown once → sign out → sign
in: password, then a code → a replayed code refused → a recovery code signs in once and only
once. On a server with ``AUTH_MFA=required``: the person, without a factor at first, is sent
to set one up right after the password and then goes on where they were going. Screenshots of
each new page at desktop and phone width go where test_browser.py's go (``AUTH_SCREENSHOT_DIR``
when set).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from .conftest import (
    FAST_ARGON2_ENV,
    RunningServer,
    create_user,
    fresh_database,
    launch_server,
    wait_until_up,
)
from .test_browser import Watch, assert_accessible, screenshot_dir
from .test_passkeys_browser import DESKTOP, PASSWORD, chromium, shoot

pytestmark = [
    pytest.mark.feature("mfa-totp", "mfa-recovery-codes", "mfa-policy", "mfa-factor-management"),
    pytest.mark.one_backend,
]

__all__ = ["chromium"]  # the fixture, imported to be found


@contextmanager
def own_server(directory: Path, **env: str) -> Iterator[RunningServer]:
    """A server of this test's own (SQLite) with its own settings."""
    with fresh_database("sqlite", directory) as url:
        running = launch_server(
            url, directory / "keys", directory / "server.log", **FAST_ARGON2_ENV, **env
        )
        try:
            wait_until_up(running)
            yield running
        finally:
            running.stop()


@pytest.fixture
def required_server(chromium: str, tmp_path: Path) -> Iterator[RunningServer]:
    with own_server(tmp_path, AUTH_MFA="required") as running:
        yield running


@pytest.fixture
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def password_step(page: Page, username: str) -> None:
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()


def set_up_app(
    page: Page, origin: str, watch: Watch, shots: Path | None
) -> tuple[pyotp.TOTP, list[str]]:
    """From the security page: scan (read the key), confirm with a code; the codes shown."""
    page.get_by_role("button", name="Set up an authenticator app").click()
    expect(page.get_by_role("heading", level=1, name="Set up an authenticator app")).to_be_visible()
    qr = page.locator("figure.qr svg")
    expect(qr).to_be_visible()
    assert qr.bounding_box() is not None and qr.bounding_box()["width"] > 100  # type: ignore[index]
    watch.check(page)
    assert_accessible(page)
    if shots is not None:
        shoot(page, shots, "totp-setup")
    secret = page.locator(".totp-secret").inner_text().replace(" ", "")
    app = pyotp.TOTP(secret)
    # A wrong code first: refused, the same key still on the page.
    page.get_by_label("Code from the app").fill("000000" if app.now() != "000000" else "111111")
    page.get_by_role("button", name="Turn on").click()
    expect(page.get_by_role("alert")).to_be_visible()
    assert page.locator(".totp-secret").inner_text().replace(" ", "") == secret
    page.get_by_label("Code from the app").fill(app.now())
    page.get_by_role("button", name="Turn on").click()
    expect(page.get_by_role("heading", level=1, name="Your recovery codes")).to_be_visible()
    codes = [c.strip() for c in page.locator(".recovery-codes code").all_inner_texts()]
    assert len(codes) == 10 and len(set(codes)) == 10
    watch.check(page)
    assert_accessible(page)
    if shots is not None:
        shoot(page, shots, "recovery-codes")
    return app, codes


def signed_in_as(page: Page, username: str) -> None:
    expect(page.get_by_role("navigation", name="Account")).to_contain_text(
        f"Signed in as {username}"
    )


def test_set_up_an_app_sign_in_with_codes_and_recovery_codes(
    required_server: RunningServer, browser: Browser, tmp_path: Path
) -> None:
    """One server, ``AUTH_MFA=required`` (one process and one browser, not two: the suite's
    time): the person without a factor is sent to set one up right after the password, then
    goes on where they were going; from then on, what every person with an app sees."""
    server = required_server
    origin = server.url
    user = create_user(server.database_url, "totp-person", PASSWORD)
    shots = screenshot_dir(server.env, tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    context: BrowserContext = browser.new_context(base_url=origin, viewport=DESKTOP)
    page = context.new_page()
    watch = Watch(origin)
    watch.attach(page)

    page.goto("/login?next=/account")
    password_step(page, user.username)
    expect(page).to_have_url(origin + "/account/security?next=%2Faccount&notice=enrol")
    expect(page.get_by_text("asks for a second sign-in method")).to_be_visible()
    watch.check(page)
    assert_accessible(page)
    shoot(page, shots, "security-enrol")
    app, codes = set_up_app(page, origin, watch, shots)
    page.get_by_role("link", name="Continue").click()
    expect(page).to_have_url(origin + "/account")  # where they were going
    signed_in_as(page, user.username)
    page.goto("/account/security")
    expect(page.get_by_text("Authenticator app").first).to_be_visible()
    expect(page.get_by_text("10 unused recovery codes left")).to_be_visible()
    shoot(page, shots, "security-totp")

    # Signed out, the password alone no longer signs in: the second step asks for a code.
    context.clear_cookies()
    page.goto("/login?next=/account")
    password_step(page, user.username)
    expect(page.get_by_role("heading", level=1, name="Confirm it is you")).to_be_visible()
    watch.check(page)
    assert_accessible(page)
    shoot(page, shots, "verify")
    assert context.request.get("/account", max_redirects=0).status == 303  # not signed in yet
    # Not the code that confirmed the app (a code works once, and that one may still be the
    # app's current one): the next step's, which RFC 6238 §5.2's one step of drift admits.
    used = app.at(time.time() + 30)
    page.get_by_label("Code from your authenticator app").fill(used)
    page.get_by_role("button", name="Verify").click()
    expect(page).to_have_url(origin + "/account")
    signed_in_as(page, user.username)

    # The same code again, in a new sign-in: refused (RFC 6238 §5.2, one use per code).
    context.clear_cookies()
    page.goto("/login?next=/account")
    password_step(page, user.username)
    page.get_by_label("Code from your authenticator app").fill(used)
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_role("alert")).to_be_visible()
    expect(page.get_by_role("heading", level=1, name="Confirm it is you")).to_be_visible()
    watch.check(page)

    # A recovery code instead: once.
    page.get_by_label("Code from your authenticator app").fill(codes[0].upper())
    page.get_by_role("button", name="Verify").click()
    expect(page).to_have_url(origin + "/account")
    signed_in_as(page, user.username)
    context.clear_cookies()
    page.goto("/login?next=/account")
    password_step(page, user.username)
    page.get_by_label("Code from your authenticator app").fill(codes[0])
    page.get_by_role("button", name="Verify").click()
    expect(page.get_by_role("alert")).to_be_visible()
    context.close()
