"""CORS in a real Chromium: a single-page app on a configured origin calls the server; an app
on any other origin cannot read a thing.

The app's page comes from a little HTTP server of its own at ``http://localhost:PORT_A`` (the
allowed origin) or ``:PORT_B`` (another); the token server is a real process on
``http://127.0.0.1:PORT``, another origin. (A page conjured by request interception has no
address, so Chromium's Private Network Access rules would block its calls to loopback.)
The browser enforces CORS itself, preflights included, so this is the check that the headers
the unit tests assert are the ones a browser needs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from .conftest import (
    FAST_ARGON2_ENV,
    RunningServer,
    create_client,
    create_user,
    fresh_database,
    start_server,
)
from .test_browser import REQUIRE_BROWSER, chromium_path

pytestmark = pytest.mark.feature("cors")
PASSWORD = "correct horse battery staple"

#: What the app does: the JWKS and discovery (simple GETs), a token request (a simple POST:
#: a form body needs no preflight), then the account API with a bearer token (preflighted).
APP_SCRIPT = """
async ([base, password]) => {
  const out = {};
  try {
    out.jwks = (await (await fetch(base + "/.well-known/jwks.json")).json()).keys.length;
    out.issuer = (await (await fetch(base + "/.well-known/openid-configuration")).json()).issuer;
    const token = await fetch(base + "/oauth2/token", {
      method: "POST",
      headers: {"Content-Type": "application/x-www-form-urlencoded"},
      body: new URLSearchParams(
        {grant_type: "password", client_id: "spa", username: "sam", password: password}),
    });
    out.tokenStatus = token.status;
    out.requestId = token.headers.get("x-request-id");
    const access = (await token.json()).access_token;
    const me = await fetch(base + "/api/v1/me", {headers: {Authorization: "Bearer " + access}});
    out.me = (await me.json()).username;
    const bad = await fetch(base + "/api/v1/me", {headers: {Authorization: "Bearer nope"}});
    out.challenge = bad.headers.get("www-authenticate");
  } catch (error) {
    out.blocked = String(error);
  }
  return out;
}
"""


class AppPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>app</title><p>app"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def apps() -> Iterator[tuple[str, str]]:
    """Two app origins: (allowed, other)."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), AppPage) for _ in range(2)]
    for http in servers:
        threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        allowed, other = (f"http://localhost:{http.server_address[1]}" for http in servers)
        yield allowed, other
    finally:
        for http in servers:
            http.shutdown()
            http.server_close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, apps: tuple[str, str]
) -> Iterator[RunningServer]:
    """One server for the module's two tests (neither changes what the other sees), allowing
    the first app's origin; its client ``spa`` and user ``sam`` are made in-process."""
    executable = chromium_path()
    if executable is None:
        reason = "Chromium not found: install it with `apt-get install chromium`"
        if REQUIRE_BROWSER:
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("cors")
    with fresh_database("sqlite", tmp) as database_url:
        create_client(database_url, "spa", public=True, first_party=True, scope="account")
        create_user(database_url, "sam", PASSWORD)
        running = start_server(
            database_url,
            tmp / "keys",
            tmp / "server.log",
            AUTH_CORS_ORIGINS=apps[0],
            **FAST_ARGON2_ENV,
        )
        try:
            yield running
        finally:
            running.stop()


def run_app(server: RunningServer, origin: str) -> dict[str, Any]:
    executable = chromium_path()
    assert executable is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{origin}/")
            result: dict[str, Any] = page.evaluate(APP_SCRIPT, [server.url, PASSWORD])
            return result
        finally:
            browser.close()


def test_a_configured_origins_app_signs_in_and_calls_the_api(
    server: RunningServer, apps: tuple[str, str]
) -> None:
    result = run_app(server, apps[0])
    assert "blocked" not in result, result
    assert result["jwks"] >= 2
    assert result["issuer"] == server.url
    assert result["tokenStatus"] == 200
    assert result["requestId"]  # an exposed header the app can read
    assert result["me"] == "sam"
    assert result["challenge"].startswith("Bearer ")  # RFC 6750's challenge is readable too


def test_any_other_origins_app_reads_nothing(server: RunningServer, apps: tuple[str, str]) -> None:
    result = run_app(server, apps[1])
    assert result.get("blocked", "").startswith("TypeError"), json.dumps(result)
    assert "jwks" not in result  # the very first read failed
