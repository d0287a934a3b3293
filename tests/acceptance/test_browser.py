"""A person in a real (headless) Chromium against a real server process.

Sign up → authorize → consent → back at the client with a code → token exchange (PKCE S256,
id_token checked against the JWKS with PyJWT) → /account lists the session → sign out of it →
its refresh token is dead. Along the way: a forged CSRF token is refused, the sign-out
confirmation and the error page render, every page has labelled controls and no console
errors or CSP violations, and nothing overflows a phone-sized screen. A second flow pushes its
request to /oauth2/par with a DPoP proof (RFC 9126, RFC 9449 §10): the browser carries only the
request_uri, and the code is redeemed only with a proof of the pushed key.

Screenshots go to ``AUTH_SCREENSHOT_DIR`` (``make report`` sets artifacts/screenshots) from the
SQLite run only, otherwise to the test's tmp_path. Without Chromium the test skips, unless
``AUTH_TEST_REQUIRE_BROWSER=1`` (set by .ci/run), which makes that a failure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import jwt
import pytest
from joserfc.jwk import ECKey
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    Route,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.test_dpop import serialize

from .conftest import RunningServer

pytestmark = pytest.mark.feature(
    "hosted-pages", "authorization-code-pkce", "id-tokens", "account-page", "csrf"
)

REQUIRE_BROWSER = os.environ.get("AUTH_TEST_REQUIRE_BROWSER") == "1"
DESKTOP = ViewportSize(width=1280, height=900)
PHONE = ViewportSize(width=390, height=844)
CLIENT_NAME = "Photo App"
REDIRECT_URI = "https://app.example/callback"
SCOPE = "openid profile email"
# The screenshots show it. Only this test signs up on the shared server, once per backend,
# and every other test's usernames have a random suffix: the name is this test's own.
USERNAME = "dana"
PASSWORD = "correct horse battery staple"
# Chromium reports a document answered with an error status as a console error; only the
# pages this test provokes on purpose (the error page, the refused form) may do that.
EXPECTED_STATUS_ERROR = re.compile(
    r"Failed to load resource: the server responded with a status of (400|403)\b.*"
)
# Recorded in the page (init scripts are not subject to the page's CSP), read after each step.
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} blocked ${event.blockedURI}`);
});
"""
# Cheap accessibility basics: language, title, one h1, a main landmark, every control labelled,
# every button and link named, ids unique, aria-describedby pointing at something real.
A11Y_PROBLEMS = """
() => {
  const problems = [];
  if (!document.documentElement.lang) problems.push("<html> has no lang");
  if (!document.title.trim()) problems.push("no <title>");
  const h1 = document.querySelectorAll("h1").length;
  if (h1 !== 1) problems.push(`${h1} <h1> elements`);
  if (!document.querySelector("main")) problems.push("no <main> landmark");
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
    if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label")) {
      problems.push(`unlabelled control ${el.name || el.id}`);
    }
  }
  for (const el of document.querySelectorAll("button, a[href]")) {
    if (!(el.getAttribute("aria-label") || el.textContent || "").trim()) {
      problems.push(`unnamed ${el.tagName.toLowerCase()}`);
    }
  }
  const ids = [...document.querySelectorAll("[id]")].map((el) => el.id);
  for (const id of new Set(ids)) {
    if (ids.filter((other) => other === id).length > 1) problems.push(`duplicate id ${id}`);
  }
  for (const el of document.querySelectorAll("[aria-describedby]")) {
    for (const id of el.getAttribute("aria-describedby").split(/\\s+/)) {
      if (!document.getElementById(id)) problems.push(`aria-describedby ${id} is missing`);
    }
  }
  return problems;
}
"""


def chromium_path() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


@pytest.fixture
def chromium() -> str:
    """The system Chromium (``playwright install`` is never needed); skip or fail without it."""
    executable = chromium_path()
    if executable is None:
        reason = (
            "Chromium not found: install it with `apt-get install chromium` "
            "(the browser test drives the system Chromium through Playwright)"
        )
        if REQUIRE_BROWSER:
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return executable


@pytest.fixture
def browser(chromium: str, server: RunningServer) -> Iterator[Browser]:
    """Chromium driven by Playwright's sync API.

    It depends on ``server`` only for the order: the sync API keeps an event loop running in
    this thread, so the database fixtures' ``asyncio.run`` must all happen before it starts.
    """
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Watch:
    """What the browser reported about the server's pages: console errors, CSP violations,
    failed subresources. (Requests to the fake client are not the server's to answer.)"""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_resources: list[str] = field(default_factory=list)
    stylesheets_loaded: int = 0

    def attach(self, page: Page) -> None:
        page.add_init_script(CSP_LISTENER)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("response", self._response)
        page.on("requestfailed", self._request_failed)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not EXPECTED_STATUS_ERROR.fullmatch(message.text):
            self.console_errors.append(f"{message.text} ({message.location.get('url')})")

    def _response(self, response: Response) -> None:
        if response.request.resource_type == "document" or not self._ours(response.url):
            return
        if response.status >= 400:
            self.failed_resources.append(f"{response.status} {response.url}")
        elif response.url.endswith("/static/style.css"):
            self.stylesheets_loaded += 1

    def _ours(self, url: str) -> bool:
        return url.startswith(self.origin + "/")

    def _request_failed(self, request: Request) -> None:
        # Chromium reports the redirect to the routed https://app.example as a failed DNS
        # lookup before Playwright fulfils it: only the server's own requests count.
        if self._ours(request.url):
            self.failed_resources.append(f"{request.failure} {request.url}")

    def check(self, page: Page) -> None:
        """After each page: no CSP violation in it, and nothing else reported so far."""
        if self._ours(page.url):
            violations: list[str] = page.evaluate("window.__cspViolations || []")
            assert violations == [], f"CSP violations on {page.url}: {violations}"
        assert self.console_errors == [], f"console errors (up to {page.url})"
        assert self.page_errors == [], f"page errors (up to {page.url})"
        assert self.failed_resources == [], f"failed subresources (up to {page.url})"


def assert_accessible(page: Page) -> None:
    problems: list[str] = page.evaluate(A11Y_PROBLEMS)
    assert problems == [], f"accessibility basics on {page.url}: {problems}"


@dataclass
class Screenshots:
    directory: Path
    taken: list[Path] = field(default_factory=list)

    def take(self, page: Page, name: str, *, phone: bool = False) -> None:
        """Full page at 1280x900, or at 390x844 (and then nothing may overflow sideways)."""
        if phone:
            page.set_viewport_size(PHONE)
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow == 0, f"{page.url} scrolls sideways on a phone by {overflow}px"
        path = self.directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        if phone:
            page.set_viewport_size(DESKTOP)


def screenshot_dir(env: dict[str, str], tmp_path: Path) -> Path:
    """``AUTH_SCREENSHOT_DIR`` for the SQLite run (one set), the test's tmp_path otherwise."""
    configured = os.environ.get("AUTH_SCREENSHOT_DIR")
    if configured and env["AUTH_DATABASE_URL"].startswith("sqlite"):
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    return tmp_path


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)  # 64 characters, RFC 7636 §4.1 allows 43-128
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def query_of(url: str) -> dict[str, str]:
    parsed = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert all(len(values) == 1 for values in parsed.values()), url
    return {key: values[0] for key, values in parsed.items()}


@pytest.mark.usefixtures("chromium")  # first: no server is started when the browser is missing
def test_sign_up_authorize_exchange_and_sign_out_of_the_session(
    server: RunningServer, browser: Browser, tmp_path: Path
) -> None:
    issuer = server.url
    created = server.new_client(
        "photo-app",
        public=True,
        grants=["authorization_code", "refresh_token"],
        scope=SCOPE,
        redirect_uris=[REDIRECT_URI],
        name=CLIENT_NAME,
    )
    assert created.secret is None
    client_id = created.client_id

    shots = Screenshots(screenshot_dir(server.env, tmp_path))
    watch = Watch(issuer)
    context = browser.new_context(viewport=DESKTOP, base_url=issuer)
    context.set_default_timeout(15_000)
    page = context.new_page()
    watch.attach(page)

    # The client's redirect URI does not exist: answer it in the browser and keep the URL.
    arrivals: list[str] = []

    def client_callback(route: Route) -> None:
        arrivals.append(route.request.url)
        route.fulfill(
            status=200,
            content_type="text/html; charset=utf-8",
            body="<!doctype html><html lang='en'><title>Photo App</title><p>Signed in</p></html>",
        )

    page.route("https://app.example/**", client_callback)

    # -- the client sends the browser to /oauth2/authorize: not signed in → sign-in page --
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    authorize_query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": SCOPE,
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    page.goto("/oauth2/authorize?" + authorize_query)
    assert urlsplit(page.url).path == "/login"
    assert query_of(page.url)["next"].startswith("/oauth2/authorize?")
    expect(page.get_by_role("heading", level=1, name="Sign in")).to_be_visible()
    expect(page.get_by_text(f"to continue to {CLIENT_NAME}")).to_be_visible()
    expect(page.get_by_label("Username")).to_be_focused()  # autofocus
    expect(page.get_by_label("Password")).to_have_attribute("type", "password")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.evaluate("document.styleSheets[0].cssRules.length") > 0, "style.css not applied"
    assert_accessible(page)
    shots.take(page, "01-login")
    shots.take(page, "02-login-phone", phone=True)
    watch.check(page)

    # -- "Create an account", fill the form, come back to the authorization request --
    page.get_by_role("link", name="Create an account").click()
    page.wait_for_url(re.compile(r".*/register\?next="))
    expect(page.get_by_role("heading", level=1, name="Create an account")).to_be_visible()
    assert_accessible(page)
    page.get_by_label("Username").fill(USERNAME)
    page.get_by_label("Email").fill("dana@example.com")
    page.get_by_label("Full name").fill("Dana Scully")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Confirm password").fill(PASSWORD)
    shots.take(page, "03-register")
    watch.check(page)
    page.get_by_role("button", name="Create account").click()

    # -- consent: a third-party client asks for openid profile email --
    page.wait_for_url(re.compile(r".*/oauth2/authorize\?"))
    expect(
        page.get_by_role("heading", level=1, name=f"{CLIENT_NAME} wants to access your account")
    ).to_be_visible()
    expect(page.locator(".subtitle")).to_contain_text(f"Signed in as {USERNAME}")
    scopes = page.locator(".scopes .scope-name")
    expect(scopes).to_have_text(["openid", "profile", "email"])
    expect(page.get_by_role("button", name="Allow")).to_be_visible()
    expect(page.get_by_role("button", name="Deny")).to_be_visible()
    assert_accessible(page)
    shots.take(page, "04-consent")
    shots.take(page, "05-consent-phone", phone=True)
    watch.check(page)
    page.get_by_role("button", name="Allow").click()

    # -- back at the client: code, state and iss (RFC 9207) in the redirect --
    page.wait_for_url(REDIRECT_URI + "?*")
    assert len(arrivals) == 1, arrivals
    assert arrivals[0].startswith(REDIRECT_URI + "?")
    answer = query_of(arrivals[0])
    assert answer["state"] == state
    assert answer["iss"] == issuer
    assert answer["code"]
    assert "error" not in answer
    watch.check(page)

    # -- the client exchanges the code (public client: PKCE, no secret) --
    with httpx.Client(base_url=issuer, timeout=10) as http:
        exchanged = http.post(
            "/oauth2/token",
            data={
                "grant_type": "authorization_code",
                "code": answer["code"],
                "redirect_uri": REDIRECT_URI,
                "client_id": client_id,
                "code_verifier": verifier,
            },
        )
        assert exchanged.status_code == 200, f"{exchanged.text}\n{server.log()}"
        tokens: dict[str, Any] = exchanged.json()
        assert tokens["token_type"].lower() == "bearer"
        assert set(tokens["scope"].split()) == set(SCOPE.split())
        assert tokens["access_token"] and tokens["refresh_token"] and tokens["id_token"]

        jwks = jwt.PyJWKClient(issuer + "/.well-known/jwks.json")
        id_claims = jwt.decode(
            tokens["id_token"],
            jwks.get_signing_key_from_jwt(tokens["id_token"]).key,
            algorithms=["RS256"],
            audience=client_id,
            issuer=issuer,
        )
        assert id_claims["nonce"] == nonce
        assert id_claims["aud"] in (client_id, [client_id])
        assert id_claims["sub"]
        access_claims = jwt.decode(
            tokens["access_token"],
            jwks.get_signing_key_from_jwt(tokens["access_token"]).key,
            algorithms=["RS256"],
            audience=issuer,
            issuer=issuer,
        )
        assert access_claims["sub"] == id_claims["sub"]

        # -- /account lists the session this browser started --
        page.goto("/account")
        expect(page.get_by_role("heading", level=1, name="Your sessions")).to_be_visible()
        sessions = page.locator("li.session")
        expect(sessions).to_have_count(1)
        session = sessions.filter(has_text=CLIENT_NAME)
        expect(session.get_by_role("heading", name=CLIENT_NAME)).to_be_visible()
        expect(session.get_by_text("This browser")).to_be_visible()
        expect(session).to_contain_text("Signed in ")
        expect(session).to_contain_text("Last used ")
        sign_out = session.get_by_role("button", name=f"Sign out of {CLIENT_NAME}")
        expect(sign_out).to_have_text("Sign out")
        assert_accessible(page)
        shots.take(page, "06-account")
        watch.check(page)

        # A forged CSRF token is refused and the session survives.
        session.locator("input[name=csrf_token]").evaluate("input => input.value = 'forged'")
        with page.expect_navigation() as refused:
            sign_out.click()
        refused_response = refused.value
        assert refused_response is not None and refused_response.status == 403
        expect(page.get_by_role("heading", level=1, name="Form expired")).to_be_visible()
        page.goto("/account")
        expect(page.locator("li.session")).to_have_count(1)

        # -- sign out of that session --
        page.get_by_role("button", name=f"Sign out of {CLIENT_NAME}").click()
        page.wait_for_url(re.compile(r".*/account\?notice=revoked$"))
        expect(page.get_by_role("status")).to_have_text("That session has been signed out.")
        expect(page.locator("li.session")).to_have_count(0)
        expect(page.get_by_text(CLIENT_NAME)).to_have_count(0)
        expect(page.get_by_text("No active sessions.")).to_be_visible()
        assert_accessible(page)
        shots.take(page, "07-account-signed-out")
        watch.check(page)

        # -- the refresh token from the exchange is dead --
        refreshed = http.post(
            "/oauth2/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": client_id,
            },
        )
        assert refreshed.status_code == 400, refreshed.text
        assert refreshed.json()["error"] == "invalid_grant"

    # -- the browser itself is still signed in: the sign-out confirmation page --
    page.goto("/logout")
    expect(page.get_by_role("heading", level=1, name="Sign out?")).to_be_visible()
    expect(page.get_by_text(f"You are signed in as {USERNAME}.")).to_be_visible()
    expect(page.get_by_role("link", name="Cancel")).to_have_attribute("href", "/account")
    assert_accessible(page)
    shots.take(page, "08-logout")
    watch.check(page)
    page.get_by_role("button", name="Sign out", exact=True).click()
    page.wait_for_url(re.compile(r".*/login\?notice=signed_out$"))
    expect(page.get_by_role("status")).to_have_text("You have been signed out.")
    page.goto("/account")
    assert urlsplit(page.url).path == "/login", "signed out: /account must ask to sign in"
    watch.check(page)

    # -- the error page: an unknown client is shown to the person, never redirected to --
    unknown = urlencode(
        {"response_type": "code", "client_id": "nobody", "redirect_uri": REDIRECT_URI}
    )
    failed = page.goto("/oauth2/authorize?" + unknown)
    assert failed is not None and failed.status == 400
    assert urlsplit(page.url).path == "/oauth2/authorize"
    assert len(arrivals) == 1, "an unknown client's redirect_uri must not be used"
    expect(page.get_by_role("heading", level=1)).to_have_text("This sign-in request is not valid")
    expect(page.get_by_text("Error 400")).to_be_visible()
    expect(page.get_by_text("invalid_client")).to_be_visible()
    assert_accessible(page)
    shots.take(page, "09-error")
    watch.check(page)

    assert watch.stylesheets_loaded >= 1
    context.close()
    names = [path.name for path in shots.taken]
    assert names == [f"{name}.png" for name in SCREENSHOTS], names
    assert all(path.stat().st_size > 0 for path in shots.taken)


SCREENSHOTS = (
    "01-login",
    "02-login-phone",
    "03-register",
    "04-consent",
    "05-consent-phone",
    "06-account",
    "07-account-signed-out",
    "08-logout",
    "09-error",
)


def dpop_proof(key: ECKey, method: str, url: str, access_token: str | None = None) -> str:
    """A DPoP proof (RFC 9449 §4.2) for one request, signed with ``key`` (ES256), now."""
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
    }
    if access_token is not None:
        digest = hashlib.sha256(access_token.encode("ascii")).digest()
        claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return serialize(header, json.dumps(claims).encode(), key)


def jwk_thumbprint(key: ECKey) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC key, computed here (not by the library)."""
    public = key.as_dict(private=False)
    members = {name: public[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


@pytest.mark.feature("par", "dpop-code-binding", "hosted-pages")
@pytest.mark.usefixtures("chromium")  # first: no server is started when the browser is missing
def test_pushed_request_with_dpop_through_the_browser(
    server: RunningServer, browser: Browser, tmp_path: Path
) -> None:
    """PAR + DPoP: the client pushes its request with a proof, a person signs in and allows
    in Chromium, and the code is redeemed only with a proof of the pushed key."""
    issuer = server.url
    scope = "openid profile"
    client_id = server.new_client(
        "par-app",
        public=True,
        grants=["authorization_code"],
        scope=scope,
        redirect_uris=[REDIRECT_URI],
        name=CLIENT_NAME,
    ).client_id
    user = server.new_user("par-user")
    key, other_key = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    jkt = jwk_thumbprint(key)
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)

    with httpx.Client(base_url=issuer, timeout=10) as http:
        # -- the client pushes its request, with a proof of its key (RFC 9449 §10.1) --
        pushed = http.post(
            "/oauth2/par",
            data={
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": REDIRECT_URI,
                "scope": scope,
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
            headers={"DPoP": dpop_proof(key, "POST", issuer + "/oauth2/par")},
        )
        assert pushed.status_code == 201, f"{pushed.text}\n{server.log()}"
        assert pushed.headers["cache-control"] == "no-store"
        answer_push = pushed.json()
        assert answer_push["expires_in"] == 60
        request_uri = answer_push["request_uri"]
        assert request_uri.startswith("urn:ietf:params:oauth:request_uri:")

        shots = Screenshots(screenshot_dir(server.env, tmp_path))
        watch = Watch(issuer)
        context = browser.new_context(viewport=DESKTOP, base_url=issuer)
        context.set_default_timeout(15_000)
        page = context.new_page()
        watch.attach(page)
        arrivals: list[str] = []

        def client_callback(route: Route) -> None:
            arrivals.append(route.request.url)
            route.fulfill(
                status=200,
                content_type="text/html; charset=utf-8",
                body="<!doctype html><html lang='en'><title>Photo App</title><p>Hi</p></html>",
            )

        page.route("https://app.example/**", client_callback)

        # -- the browser opens the pushed request: only client_id and request_uri --
        authorize_url = "/oauth2/authorize?" + urlencode(
            {"client_id": client_id, "request_uri": request_uri}
        )
        page.goto(authorize_url)
        assert urlsplit(page.url).path == "/login"
        expect(page.get_by_text(f"to continue to {CLIENT_NAME}")).to_be_visible()
        watch.check(page)
        page.get_by_label("Username").fill(user.username)
        page.get_by_label("Password").fill(user.password)
        page.get_by_role("button", name="Sign in").click()

        # -- consent, for the pushed scope --
        page.wait_for_url(re.compile(r".*/oauth2/authorize\?"))
        assert query_of(page.url)["request_uri"] == request_uri
        expect(
            page.get_by_role("heading", level=1, name=f"{CLIENT_NAME} wants to access your account")
        ).to_be_visible()
        expect(page.locator(".subtitle")).to_contain_text(f"Signed in as {user.username}")
        expect(page.locator(".scopes .scope-name")).to_have_text(["openid", "profile"])
        assert_accessible(page)
        shots.take(page, "10-consent-par")
        watch.check(page)
        page.get_by_role("button", name="Allow").click()

        # -- back at the client: code, state and iss --
        page.wait_for_url(REDIRECT_URI + "?*")
        assert len(arrivals) == 1, arrivals
        answer = query_of(arrivals[0])
        assert answer["state"] == state
        assert answer["iss"] == issuer
        assert "error" not in answer
        code = answer["code"]
        watch.check(page)

        # -- the same pushed request again, after its code was issued: the error page --
        again = page.goto(authorize_url)
        assert again is not None and again.status == 400
        assert urlsplit(page.url).path == "/oauth2/authorize"
        expect(page.get_by_role("heading", level=1)).to_have_text(
            "This sign-in request is not valid"
        )
        expect(page.get_by_text("invalid_request_uri")).to_be_visible()
        assert len(arrivals) == 1, "a used pushed request must not reach the client again"
        assert_accessible(page)
        watch.check(page)
        context.close()

        token_url = issuer + "/oauth2/token"
        exchange = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": client_id,
            "code_verifier": verifier,
        }
        # -- a proof of another key is refused, and does not spend the code --
        stolen = http.post(
            "/oauth2/token",
            data=exchange,
            headers={"DPoP": dpop_proof(other_key, "POST", token_url)},
        )
        assert stolen.status_code == 400, stolen.text
        assert stolen.json()["error"] == "invalid_grant"

        # -- the proof of the pushed key redeems it --
        exchanged = http.post(
            "/oauth2/token", data=exchange, headers={"DPoP": dpop_proof(key, "POST", token_url)}
        )
        assert exchanged.status_code == 200, f"{exchanged.text}\n{server.log()}"
        tokens: dict[str, Any] = exchanged.json()
        assert tokens["token_type"] == "DPoP"
        assert set(tokens["scope"].split()) == set(scope.split())
        access_token = tokens["access_token"]
        jwks = jwt.PyJWKClient(issuer + "/.well-known/jwks.json")
        access_claims = jwt.decode(
            access_token,
            jwks.get_signing_key_from_jwt(access_token).key,
            algorithms=["RS256"],
            audience=issuer,
            issuer=issuer,
        )
        assert access_claims["cnf"] == {"jkt": jkt}
        assert access_claims["sub"] == user.id

        # -- /userinfo with the token and a proof of its key --
        userinfo_url = issuer + "/userinfo"
        info = http.get(
            "/userinfo",
            headers={
                "Authorization": f"DPoP {access_token}",
                "DPoP": dpop_proof(key, "GET", userinfo_url, access_token),
            },
        )
        assert info.status_code == 200, info.text
        assert info.json()["sub"] == user.id
