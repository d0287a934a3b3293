"""Hosted page templates (SPEC.md "Endpoints" > pages, "Security behaviour" > pages).

Renders every template in ``templates/`` with realistic context under ``StrictUndefined`` (a
missing or misspelt variable fails) and autoescaping, then checks the markup with the stdlib HTML
parser: document basics, nothing the Content-Security-Policy would block (scripts, inline styles),
labelled inputs with the right ``autocomplete``, a CSRF token in every POST form and hostile values
escaped. The server renders the same files with ``Environment(autoescape=True)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jinja2 import Environment, FileSystemLoader, StrictUndefined, UndefinedError

from server.web import browser

pytestmark = pytest.mark.feature("hosted-pages")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
STYLESHEET = ROOT / "static" / "style.css"

CSRF = "csrf-7Hq2-sample_token"
SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE_BREAKOUT = '"><img src=x onerror=alert(1)>'
HOSTILE = (SCRIPT, ATTRIBUTE_BREAKOUT)


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    form: int | None  # index of the enclosing <form> in Page.forms, if any
    text: str = ""


@dataclass
class Page:
    html: str
    elements: list[Element] = field(default_factory=list)
    forms: list[Element] = field(default_factory=list)
    title: str = ""
    chunks: list[str] = field(default_factory=list)  # all text, in document order

    def all(self, tag: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag]

    def inputs_of(self, form: Element) -> list[Element]:
        index = self.forms.index(form)
        return [e for e in self.elements if e.tag == "input" and e.form == index]

    def buttons_of(self, form: Element) -> list[Element]:
        index = self.forms.index(form)
        return [e for e in self.elements if e.tag == "button" and e.form == index]

    def by_id(self, element_id: str) -> Element:
        (found,) = [e for e in self.elements if e.attrs.get("id") == element_id]
        return found

    def input(self, element_id: str) -> Element:
        found = self.by_id(element_id)
        assert found.tag == "input"
        return found

    def text(self) -> str:
        """The visible text of the page, whitespace collapsed."""
        return " ".join("".join(self.chunks).split())


class Collector(HTMLParser):
    """Flat list of start tags with their attributes, enclosing form and own text."""

    VOID = frozenset({"input", "meta", "link", "br", "img", "hr", "source", "area", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page(html="")
        self.stack: list[Element] = []
        self.form: int | None = None
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = [name for name, _ in attrs]
        assert len(names) == len(set(names)), f"duplicate attribute on <{tag}>: {names}"
        element = Element(tag, dict(attrs), self.form)
        if tag == "form":
            assert self.form is None, "nested <form>"
            self.page.forms.append(element)
            self.form = len(self.page.forms) - 1
        self.page.elements.append(element)
        # The document's title, not an SVG's (the QR code's names the picture).
        self.in_title = tag == "title" and not any(e.tag == "svg" for e in self.stack)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.form = None
        self.in_title = False
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index].tag == tag:
                del self.stack[index:]
                break

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.page.title += data
        else:
            self.page.chunks.append(data)
        if self.stack:
            self.stack[-1].text += data


def parse(html: str) -> Page:
    collector = Collector()
    collector.feed(html)
    collector.close()
    collector.page.html = html
    return collector.page


@pytest.fixture(scope="module")
def env() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined
    )
    environment.filters.update(browser.templates.filters)  # ``when``, the server's own
    return environment


def render(env: Environment, template: str, /, **context: Any) -> Page:
    return parse(env.get_template(template).render(**context))


USER = SimpleNamespace(username="alice")

SESSIONS: list[dict[str, Any]] = [
    {
        "id": "3f2a9c",
        "client_name": "Token server",
        "created": "2026-11-26 11:05 UTC",
        "last_used": "2026-11-26 11:40 UTC",
        "current": True,
    },
    {
        "id": "b71e04",
        "client_name": "Acme Photos",
        "created": "2026-11-20 08:12 UTC",
        "last_used": "2026-11-25 19:03 UTC",
        "current": False,
    },
]

FACTORS = [
    {
        "id": "totp",
        "kind": "totp",
        "name": "Authenticator app",
        "created_at": 1_796_000_000,
        "last_used_at": None,
        "synced": None,
    },
    {
        "id": "9f1c2d3e4b5a69788796a5b4c3d2e1f0",
        "kind": "passkey",
        "name": "Work laptop",
        "created_at": 1_796_000_100,
        "last_used_at": 1_796_100_000,
        "synced": True,
    },
]
#: What the server puts in the passkey pages' ``<script type="application/json">`` (already
#: made safe for that element by ``server.passkeys``: tested in tests/web/test_passkeys.py).
PASSKEY_OPTIONS = (
    '{"challenge": "AAAA", "rpId": "login.example.com", "userVerification": "required"}'
)
QR_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8" class="qr-code">'
    '<title>QR code</title><path d="M0 0h1v1H0z"/></svg>'
)
#: Context values the server builds itself and renders ``|safe``: never poisoned below.
SERVER_MARKUP = {"passkey_options", "qr_svg"}

CONTEXTS: dict[str, dict[str, Any]] = {
    "login.html": {
        "title": "Sign in",
        "user": None,
        "csrf_token": CSRF,
        "username": "alice",
        "error": "Incorrect username or password.",
        "next": "/oauth2/authorize?client_id=acme&state=xyz",
        "client_name": "Acme Photos",
        "register_url": "/register",
        "notice": "You have been signed out.",
    },
    "register.html": {
        "title": "Create an account",
        "user": None,
        "csrf_token": CSRF,
        "next": "/account",
        "username": "bob",
        "email": "bob@example.com",
        "name": "Bob Example",
        "errors": ["That username is taken.", "The passwords do not match."],
        "login_url": "/login",
        "password_min_length": 12,
        "password_max_length": 128,
    },
    "consent.html": {
        "title": "Authorize Acme Photos",
        "user": USER,
        "csrf_token": CSRF,
        "client_name": "Acme Photos",
        "scopes": [
            {"name": "openid", "description": "Confirm who you are"},
            {"name": "email", "description": "See your email address"},
        ],
        "resources": [
            {"uri": "https://photos.example/api", "name": None},
            {"uri": "https://print.example.com/v2", "name": "Print API"},
        ],
        "provenance": "This application registered itself: its name has not been checked.",
        "params": [
            ("response_type", "code"),
            ("client_id", "acme"),
            ("redirect_uri", "https://acme.example/callback"),
            ("scope", "openid email"),
            ("state", "af0ifjsldkj"),
            ("code_challenge", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
            ("code_challenge_method", "S256"),
        ],
    },
    "logout.html": {
        "title": "Sign out",
        "user": USER,
        "csrf_token": CSRF,
        "client_name": "Acme Photos",
        "params": [
            ("post_logout_redirect_uri", "https://acme.example/bye"),
            ("state", "s1"),
        ],
    },
    "signed_out.html": {
        "title": "Signed out",
        "user": None,
        "message": "You have been signed out of this browser.",
        "login_url": "/login",
    },
    "account.html": {
        "title": "Your sessions",
        "user": USER,
        "csrf_token": CSRF,
        "sessions": SESSIONS,
        "notice": "You signed out of Acme CLI.",
    },
    "security.html": {
        "title": "Sign-in methods",
        "user": USER,
        "csrf_token": CSRF,
        "factors": FACTORS,
        "totp": True,
        "recovery_codes": 7,
        "passkeys_available": True,
        "mfa_policy": "required",
        "next": "/oauth2/authorize?client_id=acme&state=xyz",
        "notice": "Your passkey is saved.",
    },
    "verify.html": {
        "title": "Confirm it is you",
        "user": None,
        "csrf_token": CSRF,
        "next": "/account",
        "error": "That code is not right, or was already used.",
        "totp": True,
        "recovery_codes": 9,
        "passkey_options": None,
        "step_up": False,
    },
    "totp_setup.html": {
        "title": "Set up an authenticator app",
        "user": USER,
        "csrf_token": CSRF,
        "qr_svg": QR_SVG,
        "secret": "JBSW Y3DP EHPK 3PXP",
        "issuer": "login.example.com",
        "setup_id": "0123456789abcdef",
        "next": "/account",
        "error": "That code is not right.",
    },
    "recovery_codes.html": {
        "title": "Your recovery codes",
        "user": USER,
        "codes": ["abcde-fghjk", "mnpqr-stuvw"],
        "continue_url": "/account/security?notice=totp_added",
        "enrolled": True,
    },
    "passkey_new.html": {
        "title": "Add a passkey",
        "user": USER,
        "csrf_token": CSRF,
        "passkey_options": PASSKEY_OPTIONS,
        "next": "/account",
        "name": "Work laptop",
        "name_max": 64,
        "error": "That passkey request expired. Try again.",
    },
    "error.html": {
        "title": "Not found",
        "user": None,
        "status": 404,
        "heading": "Page not found",
        "message": "The link you followed may be broken.",
        "back_url": "/account",
    },
}

PAGES = sorted(CONTEXTS)

# Expected `autocomplete` of every visible input, per page and input id.
AUTOCOMPLETE: dict[str, dict[str, str]] = {
    "login.html": {"username": "username", "password": "current-password"},
    "register.html": {
        "username": "username",
        "email": "email",
        "name": "name",
        "password": "new-password",
        "password_confirm": "new-password",
    },
    "security.html": {f"rename-{FACTORS[1]['id']}": "off"},
    "verify.html": {"code": "one-time-code"},
    "totp_setup.html": {"code": "one-time-code"},
    "passkey_new.html": {"passkey-name": "off"},
}

# Form actions per page (every form is a POST).
ACTIONS: dict[str, list[str]] = {
    "login.html": ["/login"],
    "register.html": ["/register"],
    "consent.html": ["/consent"],
    "logout.html": ["/logout"],
    "signed_out.html": [],
    "account.html": [f"/account/sessions/{s['id']}/revoke" for s in SESSIONS],
    "security.html": [
        "/account/security/factors/totp/remove",
        f"/account/security/factors/{FACTORS[1]['id']}/remove",
        f"/account/security/passkeys/{FACTORS[1]['id']}/rename",
        "/account/security/recovery-codes",
    ],
    "verify.html": ["/login/verify/code"],
    "totp_setup.html": ["/account/security/totp"],
    "recovery_codes.html": [],
    "passkey_new.html": ["/account/security/passkeys"],
    "error.html": [],
}


def allowed_script(element: Element) -> bool:
    """The only scripts a page may hold: our one file, and JSON data (never executed)."""
    return element.attrs.get("src") == "/static/passkeys.js" or (
        element.attrs.get("type") == "application/json"
    )


def context_for(name: str, **overrides: Any) -> dict[str, Any]:
    return {**CONTEXTS[name], **overrides}


def hostile_context(name: str) -> dict[str, Any]:
    """The page's context with every string the server takes from users or clients hostile."""

    def poison(value: Any) -> Any:
        if isinstance(value, str):
            return value + SCRIPT + ATTRIBUTE_BREAKOUT
        if isinstance(value, list):
            return [poison(item) for item in value]
        if isinstance(value, tuple):
            return tuple(poison(item) for item in value)
        if isinstance(value, dict):
            return {key: poison(item) for key, item in value.items()}
        return value

    context = {
        key: value if key in SERVER_MARKUP else poison(value)
        for key, value in CONTEXTS[name].items()
    }
    context["user"] = SimpleNamespace(username=SCRIPT + ATTRIBUTE_BREAKOUT)
    return context


def hidden_values(page: Page, form: Element) -> list[tuple[str | None, str | None]]:
    return [
        (i.attrs.get("name"), i.attrs.get("value"))
        for i in page.inputs_of(form)
        if i.attrs.get("type") == "hidden"
    ]


# ---------- Every page ----------


@pytest.mark.parametrize("name", PAGES)
def test_document_basics(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    assert page.html.lstrip().lower().startswith("<!doctype html>")
    (html,) = page.all("html")
    assert html.attrs.get("lang") == "en"
    assert {"charset": "utf-8"} in [m.attrs for m in page.all("meta")]
    viewport = [m for m in page.all("meta") if m.attrs.get("name") == "viewport"]
    assert [m.attrs.get("content") for m in viewport] == ["width=device-width, initial-scale=1"]
    assert page.title == f"{CONTEXTS[name]['title']} · Token server"
    assert len(page.all("main")) == 1
    stylesheets = [link for link in page.all("link") if link.attrs.get("rel") == "stylesheet"]
    assert [link.attrs.get("href") for link in stylesheets] == ["/static/style.css"]


@pytest.mark.parametrize("name", PAGES)
def test_nothing_the_csp_would_block(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    html = page.html.lower()
    assert all(allowed_script(script) for script in page.all("script"))
    assert html.count("<script") == len(page.all("script"))
    assert "<style" not in html
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler"
    assert "javascript:" not in html


@pytest.mark.parametrize("name", PAGES)
def test_headings_are_in_order(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    levels = [int(e.tag[1]) for e in page.elements if re.fullmatch(r"h[1-6]", e.tag)]
    assert levels[0] == 1
    assert levels.count(1) == 1
    for previous, current in pairwise(levels):
        assert current <= previous + 1, f"heading jumps from h{previous} to h{current}"


@pytest.mark.parametrize("name", PAGES)
def test_inputs_are_labelled_and_ids_are_unique(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    ids = [e.attrs["id"] for e in page.elements if e.attrs.get("id")]
    assert len(ids) == len(set(ids)), f"duplicate ids: {ids}"
    labelled = {label.attrs.get("for") for label in page.all("label")}
    for element in page.all("input"):
        if element.attrs.get("type") == "hidden":
            continue
        assert element.attrs.get("id"), f"input without id: {element.attrs}"
        assert element.attrs["id"] in labelled, f"input #{element.attrs['id']} has no label"
        assert element.form is not None, "input outside a form"
    for element in page.elements:
        for described in (element.attrs.get("aria-describedby") or "").split():
            page.by_id(described)  # exists exactly once


@pytest.mark.parametrize("name", PAGES)
def test_autocomplete_values(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    visible = {
        e.attrs["id"]: e.attrs.get("autocomplete")
        for e in page.all("input")
        if e.attrs.get("type") != "hidden" and e.attrs.get("id")
    }
    assert visible == AUTOCOMPLETE.get(name, {})


@pytest.mark.parametrize("name", PAGES)
def test_every_post_form_carries_the_csrf_token(env: Environment, name: str) -> None:
    page = render(env, name, **CONTEXTS[name])
    assert [f.attrs.get("action") for f in page.forms] == ACTIONS[name]
    for form in page.forms:
        assert (form.attrs.get("method") or "").lower() == "post"
        tokens = [value for key, value in hidden_values(page, form) if key == "csrf_token"]
        assert tokens == [CSRF], f"form {form.attrs.get('action')} lacks the CSRF token"
        buttons = page.buttons_of(form)
        assert buttons
        assert all(b.attrs.get("type", "submit") == "submit" for b in buttons)


@pytest.mark.parametrize("name", PAGES)
def test_hostile_values_are_escaped(env: Environment, name: str) -> None:
    page = render(env, name, **hostile_context(name))
    lowered = page.html.lower()
    assert "<script>" not in lowered
    assert "<img" not in lowered
    assert all(allowed_script(script) for script in page.all("script"))
    assert not page.all("img")
    for element in page.elements:
        assert not [a for a in element.attrs if a.startswith("on")], element.attrs
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page.html


@pytest.mark.parametrize("name", PAGES)
def test_missing_variables_fail_loudly(env: Environment, name: str) -> None:
    """Guards the contract with the server: every documented variable is actually used."""
    template = env.get_template(name)
    for variable in sorted(set(CONTEXTS[name]) - {"back_url"}):  # back_url is optional
        context = {k: v for k, v in CONTEXTS[name].items() if k != variable}
        with pytest.raises(UndefinedError):
            template.render(**context)


# ---------- The signed-in header ----------


@pytest.mark.parametrize("user", [USER, {"username": "alice"}], ids=["object", "dict"])
def test_signed_in_header(env: Environment, user: Any) -> None:
    page = render(env, "account.html", **context_for("account.html", user=user))
    (nav,) = page.all("nav")
    assert nav.attrs.get("aria-label")
    assert "Signed in as alice" in page.text()
    hrefs = {a.text.strip(): a.attrs.get("href") for a in page.all("a")}
    assert hrefs["Your sessions"] == "/account"
    assert hrefs["Sign out"] == "/logout"


def test_no_header_links_when_signed_out(env: Environment) -> None:
    page = render(env, "login.html", **CONTEXTS["login.html"])
    assert not page.all("nav")
    assert "Signed in as" not in page.text()
    assert "/logout" not in page.html


# ---------- Sign in ----------


def test_login_form(env: Environment) -> None:
    page = render(env, "login.html", **CONTEXTS["login.html"])
    (form,) = page.forms
    assert hidden_values(page, form) == [
        ("csrf_token", CSRF),
        ("next", "/oauth2/authorize?client_id=acme&state=xyz"),
    ]
    username = page.input("username")
    assert username.attrs.get("name") == "username"
    assert username.attrs.get("value") == "alice"
    assert "required" in username.attrs
    assert username.attrs.get("autocapitalize") == "none"
    assert username.attrs.get("spellcheck") == "false"
    password = page.input("password")
    assert password.attrs.get("type") == "password"
    assert password.attrs.get("name") == "password"
    assert "required" in password.attrs
    assert "value" not in password.attrs  # a password is never echoed back
    assert [b.text.strip() for b in page.buttons_of(form)] == ["Sign in"]


def test_login_messages_and_links(env: Environment) -> None:
    page = render(env, "login.html", **CONTEXTS["login.html"])
    (alert,) = [e for e in page.elements if e.attrs.get("role") == "alert"]
    assert alert.text.strip() == "Incorrect username or password."
    (status,) = [e for e in page.elements if e.attrs.get("role") == "status"]
    assert status.text.strip() == "You have been signed out."
    assert "to continue to Acme Photos" in page.text()
    (register,) = [a for a in page.all("a") if a.text.strip() == "Create an account"]
    assert register.attrs.get("href") == "/register"


def test_login_without_optional_parts(env: Environment) -> None:
    context = context_for(
        "login.html", username="", error=None, client_name=None, register_url=None, notice=None
    )
    page = render(env, "login.html", **context)
    assert not [e for e in page.elements if e.attrs.get("role") in {"alert", "status"}]
    assert "continue to" not in page.text()
    assert "Create an account" not in page.text()
    assert page.input("username").attrs.get("value") == ""
    assert "aria-invalid" not in page.input("password").attrs


# ---------- Sign up ----------


def test_register_form(env: Environment) -> None:
    page = render(env, "register.html", **CONTEXTS["register.html"])
    (form,) = page.forms
    assert hidden_values(page, form) == [("csrf_token", CSRF), ("next", "/account")]
    names = [i.attrs.get("name") for i in page.inputs_of(form) if i.attrs.get("type") != "hidden"]
    assert names == ["username", "email", "name", "password", "password_confirm"]
    assert page.input("email").attrs.get("type") == "email"
    assert "required" not in page.input("email").attrs
    assert "required" not in page.input("name").attrs
    assert page.input("username").attrs.get("value") == "bob"
    assert page.input("email").attrs.get("value") == "bob@example.com"
    assert page.input("name").attrs.get("value") == "Bob Example"
    for element_id in ("password", "password_confirm"):
        password = page.input(element_id)
        assert password.attrs.get("type") == "password"
        assert "required" in password.attrs
        assert "value" not in password.attrs
        assert password.attrs.get("minlength") == "12"
        assert password.attrs.get("maxlength") == "128"
    hint = page.by_id(page.input("password").attrs.get("aria-describedby") or "")
    assert "12" in hint.text and "128" in hint.text
    assert [b.text.strip() for b in page.buttons_of(form)] == ["Create account"]
    (login,) = [a for a in page.all("a") if a.attrs.get("href") == "/login"]
    assert login.text.strip() == "Already have an account? Sign in"


def test_register_errors(env: Environment) -> None:
    page = render(env, "register.html", **CONTEXTS["register.html"])
    (alert,) = [e for e in page.elements if e.attrs.get("role") == "alert"]
    assert [li.text.strip() for li in page.all("li")] == [
        "That username is taken.",
        "The passwords do not match.",
    ]
    assert alert.tag == "div"
    clean = render(env, "register.html", **context_for("register.html", errors=[]))
    assert not [e for e in clean.elements if e.attrs.get("role") == "alert"]
    assert not clean.all("li")


# ---------- Consent ----------


def test_consent_form_carries_the_request(env: Environment) -> None:
    context = CONTEXTS["consent.html"]
    page = render(env, "consent.html", **context)
    (form,) = page.forms
    assert hidden_values(page, form) == [("csrf_token", CSRF), *context["params"]]
    buttons = [
        (b.attrs.get("name"), b.attrs.get("value"), b.text.strip()) for b in page.buttons_of(form)
    ]
    assert buttons == [("decision", "allow", "Allow"), ("decision", "deny", "Deny")]
    (allow, deny) = page.buttons_of(form)
    assert "button-primary" in (allow.attrs.get("class") or "")
    assert "button-secondary" in (deny.attrs.get("class") or "")


def test_consent_explains_what_and_who(env: Environment) -> None:
    page = render(env, "consent.html", **CONTEXTS["consent.html"])
    (h1,) = page.all("h1")
    assert h1.text.strip() == "Acme Photos wants to access your account"
    text = page.text()
    for scope in CONTEXTS["consent.html"]["scopes"]:
        assert scope["description"] in text
        assert scope["name"] in text
    assert "Signed in as alice" in text
    assert "Your sessions" in text
    assert any(a.attrs.get("href") == "/account" for a in page.all("a"))


def test_consent_without_client_name_or_user(env: Environment) -> None:
    page = render(env, "consent.html", **context_for("consent.html", client_name="", user=None))
    (h1,) = page.all("h1")
    assert h1.text.strip() == "An application wants to access your account"
    assert "This will allow it to:" in page.text()
    assert "Signed in as" not in page.text()
    assert len(page.forms) == 1


def test_consent_without_scopes(env: Environment) -> None:
    page = render(env, "consent.html", **context_for("consent.html", scopes=[]))
    assert "no extra permissions" in page.text()
    assert len(page.forms) == 1


@pytest.mark.feature("client-resources")
def test_consent_names_the_resources_asked_for(env: Environment) -> None:
    """RFC 8707: the services the access is for, each listed as the request named it."""
    page = render(env, "consent.html", **CONTEXTS["consent.html"])
    (section,) = [h for h in page.all("h2") if "services" in h.text]
    assert section.text.strip() == "Acme Photos can use this access at these services:"
    listed = [e.text for e in page.elements if "resource" in (e.attrs.get("class") or "").split()]
    assert listed == [r["uri"] for r in CONTEXTS["consent.html"]["resources"]]
    # A named resource (issue 21): its name, with the URI beside it in the same item.
    (name,) = [e for e in page.elements if "resource-name" in (e.attrs.get("class") or "")]
    assert name.text == "Print API"
    assert page.html.index(listed[0]) < page.html.index("Print API") < page.html.index(listed[1])
    # After the scopes, before the form: read in the order the decision needs them.
    assert page.html.index("Confirm who you are") < page.html.index(listed[0])
    assert page.html.index(listed[-1]) < page.html.index("<form")
    anonymous = render(env, "consent.html", **context_for("consent.html", client_name=""))
    assert "It can use this access at these services:" in anonymous.text()


@pytest.mark.feature("client-resources")
def test_consent_without_resources_says_nothing_of_them(env: Environment) -> None:
    page = render(env, "consent.html", **context_for("consent.html", resources=[]))
    assert "services" not in page.text()
    assert not [e for e in page.elements if "resource" in (e.attrs.get("class") or "")]
    assert [h.text.strip() for h in page.all("h2")] == ["This will allow Acme Photos to:"]


# ---------- Sign out ----------


def test_logout_confirmation(env: Environment) -> None:
    context = CONTEXTS["logout.html"]
    page = render(env, "logout.html", **context)
    (form,) = page.forms
    assert hidden_values(page, form) == [("csrf_token", CSRF), *context["params"]]
    assert [b.text.strip() for b in page.buttons_of(form)] == ["Sign out"]
    assert "Acme Photos asks you to sign out" in page.text()
    (cancel,) = [a for a in page.all("a") if a.text.strip() == "Cancel"]
    assert cancel.attrs.get("href") == "/account"


def test_logout_without_client(env: Environment) -> None:
    page = render(env, "logout.html", **context_for("logout.html", client_name=None, params=[]))
    assert "asks you to sign out" not in page.text()
    assert hidden_values(page, page.forms[0]) == [("csrf_token", CSRF)]


def test_signed_out(env: Environment) -> None:
    page = render(env, "signed_out.html", **CONTEXTS["signed_out.html"])
    assert "You have been signed out of this browser." in page.text()
    (again,) = [a for a in page.all("a") if a.text.strip() == "Sign in again"]
    assert again.attrs.get("href") == "/login"
    assert not page.forms


# ---------- Sessions ----------


def test_account_lists_sessions_with_a_revoke_form_each(env: Environment) -> None:
    page = render(env, "account.html", **CONTEXTS["account.html"])
    (h1,) = page.all("h1")
    assert h1.text.strip() == "Your sessions"
    assert len(page.forms) == len(SESSIONS)
    for form, session in zip(page.forms, SESSIONS, strict=True):
        assert form.attrs.get("action") == f"/account/sessions/{session['id']}/revoke"
        assert hidden_values(page, form) == [("csrf_token", CSRF)]
        (button,) = page.buttons_of(form)
        assert button.text.strip() == "Sign out"
        assert button.attrs.get("aria-label") == f"Sign out of {session['client_name']}"
    text = page.text()
    for session in SESSIONS:
        assert session["client_name"] in text
        assert f"Signed in {session['created']}" in text
        assert f"Last used {session['last_used']}" in text
    badges = [e for e in page.elements if "badge" in (e.attrs.get("class") or "").split()]
    assert [b.text.strip() for b in badges] == ["This browser"]
    (status,) = [e for e in page.elements if e.attrs.get("role") == "status"]
    assert status.text.strip() == "You signed out of Acme CLI."
    assert "No active sessions." not in text
    (logout,) = [a for a in page.all("a") if a.text.strip() == "Sign out of this browser"]
    assert logout.attrs.get("href") == "/logout"


def test_account_session_of_an_unnamed_client(env: Environment) -> None:
    session = {**SESSIONS[1], "client_name": ""}
    page = render(env, "account.html", **context_for("account.html", sessions=[session]))
    (h2,) = page.all("h2")
    assert h2.text.strip() == "Unnamed application"
    (button,) = page.buttons_of(page.forms[0])
    assert button.attrs.get("aria-label") == "Sign out of Unnamed application"


def test_account_empty_state(env: Environment) -> None:
    page = render(env, "account.html", **context_for("account.html", sessions=[], notice=None))
    assert "No active sessions." in page.text()
    assert not page.forms
    assert not [e for e in page.elements if e.attrs.get("role") == "status"]


def test_account_session_id_cannot_change_the_form_target(env: Environment) -> None:
    session = {**SESSIONS[1], "id": '1"/../../x?a=<b>'}
    page = render(env, "account.html", **context_for("account.html", sessions=[session]))
    (form,) = page.forms
    action = form.attrs.get("action") or ""
    match = re.fullmatch(r"/account/sessions/([^/]+)/revoke", action)
    assert match, action
    assert re.fullmatch(r"[A-Za-z0-9%._~-]+", match.group(1)), action


# ---------- Errors ----------


def test_error_page(env: Environment) -> None:
    page = render(env, "error.html", **CONTEXTS["error.html"])
    (h1,) = page.all("h1")
    assert h1.text.strip() == "Page not found"
    assert "404" in page.text()
    assert "The link you followed may be broken." in page.text()
    (back,) = [a for a in page.all("a") if a.text.strip() == "Go back"]
    assert back.attrs.get("href") == "/account"


@pytest.mark.parametrize("omit", [True, False], ids=["absent", "none"])
def test_error_page_without_back_link(env: Environment, omit: bool) -> None:
    context = context_for("error.html", back_url=None)
    if omit:
        del context["back_url"]
    page = render(env, "error.html", **context)
    assert "Go back" not in page.text()


# ---------- Stylesheet ----------


def test_stylesheet() -> None:
    css = STYLESHEET.read_text(encoding="utf-8")
    assert re.search(r"@media\s*\(\s*max-width:\s*[\d.]+(rem|em|px)\s*\)", css)
    assert ":focus-visible" in css
    assert "prefers-color-scheme: dark" in css
    assert "@import" not in css  # the CSP allows only this one file
    assert not re.search(r"url\((?![\"']?data:)", css), "external resource in the stylesheet"
    assert css.count("{") == css.count("}")


@pytest.mark.feature("client-registration")
def test_consent_says_when_nobody_checked_the_clients_name(env: Environment) -> None:
    page = render(env, "consent.html", **CONTEXTS["consent.html"])
    (note,) = [e for e in page.elements if "provenance" in (e.attrs.get("class") or "").split()]
    assert note.text == CONTEXTS["consent.html"]["provenance"]
    operator = render(env, "consent.html", **context_for("consent.html", provenance=None))
    assert "has not been checked" not in operator.text()
