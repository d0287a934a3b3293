"""Passkeys in a real (headless) Chromium against a real server process on
http://localhost:<port> (WebAuthn needs a domain RP id and a secure context; localhost is
one), with a CTAP2 virtual authenticator (Chrome DevTools Protocol ``WebAuthn`` domain:
internal transport, resident keys, user verification).

Add a passkey on /account/security → sign out → sign in with the passkey button of /login,
no username → /account shows the person → remove the passkey → the same authenticator no
longer signs in. Screenshots of the new pages (desktop 1280x800 and phone 390x844) go where
test_browser.py's go (``AUTH_SCREENSHOT_DIR`` when set, else the test's tmp_path). Without
Chromium the test skips, unless ``AUTH_TEST_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from .conftest import (
    FAST_ARGON2_ENV,
    RunningServer,
    create_user,
    free_port,
    fresh_database,
    launch_server,
    wait_until_up,
)
from .test_browser import Watch, assert_accessible, chromium_path, screenshot_dir

pytestmark = [
    pytest.mark.feature("mfa-passkeys", "mfa-passkey-signin", "mfa-factor-management"),
    pytest.mark.one_backend,
]

DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)
PASSWORD = "correct horse battery staple"


@pytest.fixture
def chromium() -> str:
    import os

    executable = chromium_path()
    if executable is None:
        reason = "Chromium not found: install it with `apt-get install chromium`"
        if os.environ.get("AUTH_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return executable


@pytest.fixture
def localhost_server(chromium: str, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of this test's own whose issuer is http://localhost:<port> (SQLite)."""
    with fresh_database("sqlite", tmp_path) as url:
        port = free_port()
        running = launch_server(
            url,
            tmp_path / "keys",
            tmp_path / "server.log",
            issuer=f"http://localhost:{port}",
            port=port,
            **FAST_ARGON2_ENV,
        )
        try:
            wait_until_up(running)
            yield running
        finally:
            running.stop()


@pytest.fixture
def browser(chromium: str, localhost_server: RunningServer) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


def shoot(page: Page, directory: Path, name: str) -> None:
    """Desktop then phone (where nothing may scroll sideways)."""
    page.set_viewport_size(DESKTOP)
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)
    page.set_viewport_size(PHONE)
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0, f"{page.url} scrolls sideways on a phone by {overflow}px"
    page.screenshot(path=str(directory / f"{name}-phone.png"), full_page=True)
    page.set_viewport_size(DESKTOP)


def test_add_a_passkey_sign_in_with_it_and_remove_it(
    localhost_server: RunningServer, browser: Browser, tmp_path: Path
) -> None:
    server = localhost_server
    origin = server.env["AUTH_ISSUER"]
    user = create_user(server.database_url, "passkey-person", PASSWORD)
    shots = screenshot_dir(server.env, tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(base_url=origin, viewport=DESKTOP)
    page = context.new_page()
    watch = Watch(origin)
    watch.attach(page)
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    added = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    authenticator = added["authenticatorId"]

    # Sign in with the password, then add a passkey.
    page.goto("/login")
    page.get_by_label("Username").fill(user.username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page).to_have_url(origin + "/account")
    page.goto("/account/security")
    page.get_by_role("link", name="Add a passkey").click()
    expect(page.get_by_role("heading", level=1, name="Add a passkey")).to_be_visible()
    watch.check(page)
    assert_accessible(page)
    shoot(page, shots, "passkey-add")
    page.get_by_label("Name").fill("Test laptop")
    page.get_by_role("button", name="Create passkey").click()
    expect(page).to_have_url(origin + "/account/security?notice=passkey_added")
    expect(page.get_by_text("Your passkey is saved.")).to_be_visible()
    expect(page.get_by_role("heading", name="Test laptop")).to_be_visible()
    watch.check(page)
    assert_accessible(page)
    shoot(page, shots, "security-passkey")
    credentials = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    assert len(credentials["credentials"]) == 1
    assert credentials["credentials"][0]["isResidentCredential"] is True

    def presence(on: bool) -> None:
        """Whether the authenticator answers by itself: off, the autofill request /login
        starts (conditional mediation) waits; on, it answers at once."""
        cdp.send(
            "WebAuthn.setAutomaticPresenceSimulation",
            {"authenticatorId": authenticator, "enabled": on},
        )

    # Sign out (a browser without cookies), then sign in with the passkey alone: first from
    # the username field's autofill (conditional mediation answers as soon as it can).
    context.clear_cookies()
    page.goto("/login")
    expect(page).to_have_url(origin + "/account")
    expect(page.get_by_role("navigation", name="Account")).to_contain_text(
        f"Signed in as {user.username}"
    )
    # Then with the button.
    context.clear_cookies()
    presence(False)
    page.goto("/login")
    button = page.get_by_role("button", name="Sign in with a passkey")
    expect(button).to_be_visible()
    expect(page.get_by_label("Username")).to_have_attribute("autocomplete", "username webauthn")
    watch.check(page)
    assert_accessible(page)
    shoot(page, shots, "login-passkey")
    presence(True)
    button.click()
    expect(page).to_have_url(origin + "/account")
    expect(page.get_by_role("navigation", name="Account")).to_contain_text(
        f"Signed in as {user.username}"
    )
    watch.check(page)

    # Remove it (the last method: the password is asked), and it no longer signs in.
    page.goto("/account/security")
    page.get_by_placeholder("Current password").fill(PASSWORD)
    page.get_by_role("button", name="Remove Test laptop").click()
    expect(page).to_have_url(origin + "/account/security?notice=removed")
    expect(page.get_by_text("You sign in with your password only.")).to_be_visible()
    # The autofill request answers at once and is refused; the page then offers no autofill
    # request again (a refused passkey is not retried by itself).
    context.clear_cookies()
    page.goto("/login")
    expect(page.get_by_role("alert")).to_contain_text("may have been removed")
    signed_out = context.request.get("/account", max_redirects=0)
    assert signed_out.status == 303
    assert signed_out.headers["location"].startswith("/login")
    context.close()
