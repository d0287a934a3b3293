"""Passkeys (WebAuthn Level 3) on the hosted pages, answered by a small software
authenticator written here (an EC P-256 key, attestation "none", §6.5.4; assertions signing
authenticatorData || SHA-256(clientDataJSON), §6.3.3), against an app whose issuer is
http://localhost:8000 (WebAuthn needs a domain RP id: an IP address is not one)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from sqlalchemy import select, update

import server.models
from server import manage
from server.config import Settings
from server.deps import AppState
from server.models import BrowserSession, TotpFactor, User, WebAuthnCredential
from tests.conftest import (
    Events,
    MakeUser,
    SharedApps,
    UserCreds,
    csrf_of,
    make_settings,
    reset_app,
    sign_in,
)

pytestmark = pytest.mark.feature("mfa-passkeys")

ISSUER = "http://localhost:8000"
RP_ID = "localhost"
OPTIONS_RE = re.compile(r'<script type="application/json" class="passkey-options">(.*?)</script>')
MESSAGE_RE = re.compile(r'role="alert">([^<]*)<')
UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Authenticator:
    """A platform authenticator holding one discoverable credential."""

    backup_eligible: bool = False
    counts: bool = False  # keeps a signature counter (most synced passkeys send 0)
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: os.urandom(16))
    sign_count: int = 0
    user_handle: str | None = None

    def _flags(self, uv: bool, be: bool | None) -> int:
        eligible = self.backup_eligible if be is None else be
        return UP | (UV if uv else 0) | ((BE | BS) if eligible else 0)

    def cose_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )

    def create(
        self,
        options: dict[str, Any],
        *,
        origin: str = ISSUER,
        rp_id: str = RP_ID,
        uv: bool = True,
    ) -> str:
        client_data = json.dumps(
            {"type": "webauthn.create", "challenge": options["challenge"], "origin": origin}
        ).encode()
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([self._flags(uv, None) | AT])
            + self.sign_count.to_bytes(4, "big")
            + bytes(16)  # aaguid
            + len(self.credential_id).to_bytes(2, "big")
            + self.credential_id
            + self.cose_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        self.user_handle = options["user"]["id"]
        return json.dumps(
            {
                "id": b64(self.credential_id),
                "rawId": b64(self.credential_id),
                "type": "public-key",
                "authenticatorAttachment": "platform",
                "clientExtensionResults": {},
                "response": {
                    "clientDataJSON": b64(client_data),
                    "attestationObject": b64(attestation),
                    "transports": ["internal", "bogus"],
                },
            }
        )

    def get(
        self,
        options: dict[str, Any],
        *,
        origin: str = ISSUER,
        rp_id: str = RP_ID,
        uv: bool = True,
        be: bool | None = None,
        count: int | None = None,
        user_handle: str | None = None,
    ) -> str:
        if count is not None:
            self.sign_count = count
        elif self.counts:
            self.sign_count += 1
        client_data = json.dumps(
            {"type": "webauthn.get", "challenge": options["challenge"], "origin": origin}
        ).encode()
        auth_data = (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([self._flags(uv, be)])
            + self.sign_count.to_bytes(4, "big")
        )
        signature = self.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return json.dumps(
            {
                "id": b64(self.credential_id),
                "rawId": b64(self.credential_id),
                "type": "public-key",
                "clientExtensionResults": {},
                "response": {
                    "clientDataJSON": b64(client_data),
                    "authenticatorData": b64(auth_data),
                    "signature": b64(signature),
                    "userHandle": user_handle or self.user_handle,
                },
            }
        )


def options_of(page: httpx.Response) -> dict[str, Any]:
    match = OPTIONS_RE.search(page.text)
    assert match is not None, page.text[:800]
    result: dict[str, Any] = json.loads(match.group(1))
    return result


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, issuer=ISSUER)


@pytest.fixture
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        yield http


@pytest.fixture
def new_browser(app: FastAPI) -> Any:
    """Another browser (its own cookies) on the same app."""

    def make() -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER)

    return make


async def register(
    http: httpx.AsyncClient, user: UserCreds, auth: Authenticator, name: str = "Laptop"
) -> httpx.Response:
    await sign_in(http, user)
    page = await http.get("/account/security/passkeys/new")
    assert page.status_code == 200, page.text
    return await http.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "name": name,
            "credential": auth.create(options_of(page)),
            "next": "",
        },
    )


async def passkey_sign_in(
    http: httpx.AsyncClient, auth: Authenticator, **answer: Any
) -> httpx.Response:
    page = await http.get("/login")
    return await http.post(
        "/login/passkey",
        data={"csrf_token": csrf_of(page), "credential": auth.get(options_of(page), **answer)},
    )


async def session_amrs(state: AppState, user_id: str) -> list[str]:
    """The ``amr`` of each of the person's live browser sessions."""
    async with state.db.session() as db:
        rows = await db.scalars(
            select(BrowserSession.amr).where(
                BrowserSession.user_id == user_id, BrowserSession.ended_at.is_(None)
            )
        )
        return sorted(rows)


async def passkey_rows(state: AppState, user_id: str) -> list[WebAuthnCredential]:
    async with state.db.session() as db:
        return list(
            await db.scalars(
                select(WebAuthnCredential).where(WebAuthnCredential.user_id == user_id)
            )
        )


def reasons(events: Events) -> list[Any]:
    return [fields.get("reason") for name, fields in events if name == "signin.failed"]


# -- registration and sign-in -------------------------------------------------------------


@pytest.mark.feature("mfa-passkey-signin", "mfa-amr-acr")
@pytest.mark.parametrize(("synced", "method"), [(False, "hwk"), (True, "swk")])
async def test_register_then_sign_in_without_a_username(
    browser: httpx.AsyncClient,
    new_browser: Any,
    make_user: MakeUser,
    state: AppState,
    events: Events,
    synced: bool,
    method: str,
) -> None:
    alice = await make_user()
    auth = Authenticator(backup_eligible=synced)
    page_response = await sign_in(browser, alice)
    assert page_response.headers["location"] == "/account"
    page = await browser.get("/account/security/passkeys/new")
    options = options_of(page)
    # §5.4: discoverable, user verification required, no attestation, our RP id and user.
    assert options["rp"] == {"id": RP_ID, "name": ISSUER}
    assert unb64(options["user"]["id"]) == alice.id.encode()
    assert options["user"]["name"] == alice.username
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["attestation"] == "none"
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -8, -257]
    assert options["excludeCredentials"] == []
    added = await browser.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "name": "  My   laptop ",
            "credential": auth.create(options),
        },
    )
    assert added.status_code == 303, added.text
    assert added.headers["location"] == "/account/security?notice=passkey_added"
    (row,) = await passkey_rows(state, alice.id)
    assert ("factor.added", {"user_id": alice.id, "kind": "passkey", "factor": row.id}) in events
    # Enrolment upgrades the session: the passkey was just used with user verification.
    assert await session_amrs(state, alice.id) == [f"pwd {method} mfa"]
    (row,) = await passkey_rows(state, alice.id)
    assert (row.name, row.backup_eligible, row.backed_up, row.transports, row.sign_count) == (
        "My laptop",
        synced,
        synced,
        "internal",
        0,
    )
    listed = await browser.get("/account/security?notice=passkey_added")
    assert "My laptop" in listed.text and "Your passkey is saved." in listed.text
    again = await browser.get("/account/security/passkeys/new")
    assert options_of(again)["excludeCredentials"][0]["id"] == b64(auth.credential_id)

    async with new_browser() as other:
        login = await other.get("/login")
        request = options_of(login)
        assert request["allowCredentials"] == [] and request["userVerification"] == "required"
        assert 'data-passkey="get"' in login.text
        response = await other.post(
            "/login/passkey",
            data={
                "csrf_token": csrf_of(login),
                "credential": auth.get(request),
                "next": "/account",
            },
        )
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/account"
        account = await other.get("/account")
        assert account.status_code == 200 and alice.username in account.text
    assert await session_amrs(state, alice.id) == sorted([f"pwd {method} mfa", f"{method} mfa"])
    (row,) = await passkey_rows(state, alice.id)
    assert row.last_used_at is not None


@pytest.mark.feature("mfa-policy", "mfa-amr-acr")
async def test_second_step_answered_with_a_passkey(
    browser: httpx.AsyncClient,
    new_browser: Any,
    make_user: MakeUser,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
    events: Events,
) -> None:
    alice, bob = await make_user(), await make_user("bob")
    mine, bobs = Authenticator(counts=True), Authenticator()
    assert (await register(browser, alice, mine)).status_code == 303
    async with new_browser() as other:
        assert (await register(other, bob, bobs)).status_code == 303
    monkeypatch.setattr(state, "settings", state.settings.model_copy(update={"mfa": "required"}))
    async with new_browser() as http:
        response = await sign_in(http, alice, "/account")
        assert response.headers["location"].startswith("/login/verify")
        page = await http.get(response.headers["location"])
        options = options_of(page)
        assert [c["id"] for c in options["allowCredentials"]] == [b64(mine.credential_id)]
        # Another person's passkey cannot finish Alice's sign-in.
        refused = await http.post(
            "/login/verify/passkey",
            data={"csrf_token": csrf_of(page), "credential": bobs.get(options), "next": "/account"},
        )
        assert refused.status_code == 400
        assert "may have been removed" in refused.text
        page = await http.get(response.headers["location"])
        done = await http.post(
            "/login/verify/passkey",
            data={
                "csrf_token": csrf_of(page),
                "credential": mine.get(options_of(page)),
                "next": "/account",
            },
        )
        assert done.status_code == 303, done.text
        assert done.headers["location"] == "/account"
    assert "pwd hwk mfa" in await session_amrs(state, alice.id)
    assert reasons(events) == ["unknown_credential"]


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkey-signin")
async def test_a_disabled_person_cannot_sign_in_with_a_passkey(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, state: AppState
) -> None:
    alice = await make_user()
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    async with state.db.session() as db:
        user = await db.get(User, alice.id)
        assert user is not None
        user.disabled = True
        await db.commit()
    async with new_browser() as http:
        response = await passkey_sign_in(http, auth)
        assert response.status_code == 400
        assert "Incorrect username or password" in response.text


# -- the challenge ------------------------------------------------------------------------


@pytest.mark.feature("mfa-webauthn-challenges")
async def test_a_replayed_assertion_is_refused(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, events: Events
) -> None:
    alice = await make_user()
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    async with new_browser() as http:
        page = await http.get("/login")
        form = {"csrf_token": csrf_of(page), "credential": auth.get(options_of(page))}
        csrf_cookie = http.cookies["csrf"]
        assert (await http.post("/login/passkey", data=form)).status_code == 303
    # The same answer again, from a browser with the same CSRF cookie (so the binding holds).
    async with new_browser() as thief:
        thief.cookies.set("csrf", csrf_cookie)
        again = await thief.post("/login/passkey", data=form)
        assert again.status_code == 400
        assert "already used" in again.text
        # The same challenge signed anew (a counter of 0 is allowed to stay 0) is spent too.
        form["credential"] = auth.get(json.loads(json.dumps({"challenge": _challenge(form)})))
        assert (await thief.post("/login/passkey", data=form)).status_code == 400
    assert reasons(events) == ["replayed", "replayed"]


def _challenge(form: dict[str, str]) -> str:
    client_data = json.loads(unb64(json.loads(form["credential"])["response"]["clientDataJSON"]))
    challenge: str = client_data["challenge"]
    return challenge


@pytest.mark.one_backend
@pytest.mark.feature("mfa-webauthn-challenges")
async def test_an_expired_challenge_is_refused(
    browser: httpx.AsyncClient,
    new_browser: Any,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
    events: Events,
) -> None:
    alice = await make_user()
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    async with new_browser() as http:
        page = await http.get("/login")
        start = server.models.now()
        monkeypatch.setattr(server.models, "clock", lambda: start + 301)
        response = await http.post(
            "/login/passkey",
            data={"csrf_token": csrf_of(page), "credential": auth.get(options_of(page))},
        )
        assert response.status_code == 400
        assert "expired" in response.text
    assert reasons(events) == ["challenge"]


@pytest.mark.one_backend
@pytest.mark.feature("mfa-webauthn-challenges")
async def test_a_challenge_for_another_purpose_or_browser_is_refused(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, events: Events
) -> None:
    alice = await make_user()
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    # A registration challenge answered as a sign-in.
    add_page = await browser.get("/account/security/passkeys/new")
    registering = options_of(add_page)
    async with new_browser() as http:
        page = await http.get("/login")
        wrong_purpose = await http.post(
            "/login/passkey",
            data={"csrf_token": csrf_of(page), "credential": auth.get(registering)},
        )
        assert wrong_purpose.status_code == 400
        # Another browser's sign-in challenge (bound to its CSRF cookie).
        async with new_browser() as victim:
            theirs = options_of(await victim.get("/login"))
        wrong_browser = await http.post(
            "/login/passkey",
            data={"csrf_token": csrf_of(page), "credential": auth.get(theirs)},
        )
        assert wrong_browser.status_code == 400
    assert reasons(events) == ["challenge", "challenge"]


# -- what the authenticator says ------------------------------------------------------------


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkey-signin")
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"uv": False}, "invalid"),  # user verification required (§7.2 step 17)
        ({"be": True}, "backup_eligibility"),  # BE never changes (§6.1.3)
        ({"origin": "http://localhost:9999"}, "invalid"),  # §7.2 step 13
        ({"origin": "https://evil.example"}, "invalid"),
        ({"rp_id": "evil.example"}, "invalid"),  # §7.2 step 15
        ({"user_handle": b64(b"someone-else")}, "user_handle"),  # §7.2 step 6
    ],
)
async def test_what_the_authenticator_says_is_checked(
    browser: httpx.AsyncClient,
    new_browser: Any,
    make_user: MakeUser,
    state: AppState,
    events: Events,
    answer: dict[str, Any],
    reason: str,
) -> None:
    alice = await make_user()
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    async with new_browser() as http:
        response = await passkey_sign_in(http, auth, **answer)
        assert response.status_code == 400
        assert "<h1>Sign in</h1>" in response.text  # the password form is still there
        assert (await http.get("/account")).status_code == 303  # not signed in
    assert reasons(events) == [reason]
    (row,) = await passkey_rows(state, alice.id)
    assert row.last_used_at is None


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkeys")
@pytest.mark.parametrize(
    "answer", [{"uv": False}, {"origin": "https://evil.example"}, {"rp_id": "evil.example"}]
)
async def test_registration_checks_user_verification_origin_and_rp_id(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState, answer: dict[str, Any]
) -> None:
    alice = await make_user()
    await sign_in(browser, alice)
    page = await browser.get("/account/security/passkeys/new")
    response = await browser.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "credential": Authenticator().create(options_of(page), **answer),
        },
    )
    assert response.status_code == 400
    assert "could not be checked" in response.text
    assert await passkey_rows(state, alice.id) == []


@pytest.mark.feature("mfa-passkey-signin")
async def test_a_signature_counter_that_does_not_grow_is_refused(
    browser: httpx.AsyncClient,
    new_browser: Any,
    make_user: MakeUser,
    state: AppState,
    events: Events,
) -> None:
    alice = await make_user()
    auth = Authenticator(counts=True)
    assert (await register(browser, alice, auth)).status_code == 303
    async with new_browser() as http:
        assert (await passkey_sign_in(http, auth, count=5)).status_code == 303
    for count in (5, 3):  # the same value, then a smaller one: a clone's (§6.1.1)
        async with new_browser() as http:
            response = await passkey_sign_in(http, auth, count=count)
            assert response.status_code == 400
            assert "copied" in response.text
    regressed = [f for name, f in events if name == "passkey.counter_regressed"]
    assert [(f["stored"], f["received"]) for f in regressed] == [(5, 5), (5, 3)]
    (row,) = await passkey_rows(state, alice.id)
    assert row.sign_count == 5
    async with new_browser() as http:
        assert (await passkey_sign_in(http, auth, count=6)).status_code == 303


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkey-signin")
@pytest.mark.parametrize(
    "credential",
    [
        "",
        "not json",
        "[]",
        '{"id": 1, "response": {}}',
        '{"id": "x", "response": []}',
        '{"id": "x", "response": {"clientDataJSON": 5}}',
        '{"id": "x", "response": {"clientDataJSON": "!!!"}}',
        json.dumps({"id": "x", "response": {"clientDataJSON": b64(b"[1]")}}),
        json.dumps({"id": "x", "response": {"clientDataJSON": b64(b'{"challenge": 7}')}}),
        json.dumps({"id": "x" * 2000, "response": {}}),
        "[" * 5000 + "]" * 5000,
        json.dumps({"id": "x", "response": {"clientDataJSON": "A" * 20000}}),
        json.dumps({"id": "x", "response": {"clientDataJSON": "é"}}),
    ],
)
async def test_a_malformed_credential_is_a_400(
    browser: httpx.AsyncClient, make_user: MakeUser, credential: str
) -> None:
    page = await browser.get("/login")
    response = await browser.post(
        "/login/passkey", data={"csrf_token": csrf_of(page), "credential": credential}
    )
    # The largest ones stop at the form's body limit (413), the others at the checks.
    assert response.status_code in (400, 413), response.text
    alice = await make_user()
    await sign_in(browser, alice)
    add_page = await browser.get("/account/security/passkeys/new")
    added = await browser.post(
        "/account/security/passkeys",
        data={"csrf_token": csrf_of(add_page), "credential": credential},
    )
    assert added.status_code in (400, 413), added.text


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkey-signin")
async def test_a_well_formed_answer_with_garbage_inside_is_a_400(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    """Past the challenge check, the library's parsers meet hostile values."""
    page = await browser.get("/login")
    valid = json.loads(Authenticator().get(options_of(page)))
    for broken in (
        {**valid, "rawId": "different"},
        {**valid, "type": "other"},
        {**valid, "response": {**valid["response"], "authenticatorData": "AA"}},
        {**valid, "response": {**valid["response"], "signature": 5}},
        {**valid, "response": {**valid["response"], "userHandle": ["x"]}},
        # Ids no base64url id can be: refused before the lookup (a 500 on either database
        # before: a lone surrogate cannot be encoded, PostgreSQL refuses a NUL).
        {**valid, "id": "\ud800abc"},
        {**valid, "id": "ab\x00cd"},
        {**valid, "id": "ab+/="},
    ):
        page = await browser.get("/login")
        response = await browser.post(
            "/login/passkey",
            data={"csrf_token": csrf_of(page), "credential": json.dumps(broken)},
        )
        assert response.status_code == 400, response.text


# -- managing passkeys --------------------------------------------------------------------


@pytest.mark.feature("mfa-factor-management")
async def test_rename_and_remove_own_passkeys_only(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, state: AppState
) -> None:
    alice, bob = await make_user(), await make_user("bob")
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    (row,) = await passkey_rows(state, alice.id)
    security = await browser.get("/account/security")
    renamed = await browser.post(
        f"/account/security/passkeys/{row.id}/rename",
        data={"csrf_token": csrf_of(security), "name": " Phone "},
    )
    assert renamed.status_code == 303
    assert renamed.headers["location"] == "/account/security?notice=passkey_renamed"
    for bad_name in ("", "   ", "x" * 65, "a\x00b"):
        refused = await browser.post(
            f"/account/security/passkeys/{row.id}/rename",
            data={"csrf_token": csrf_of(security), "name": bad_name},
        )
        assert refused.status_code == 400
    async with new_browser() as other:
        await sign_in(other, bob)
        page = await other.get("/login")  # bob's security page has no form yet
        for path in (
            f"/account/security/passkeys/{row.id}/rename",
            "/account/security/passkeys/nope/rename",
            "/account/security/passkeys/" + "x" * 40 + "/rename",
            f"/account/security/factors/{row.id}/remove",
        ):
            response = await other.post(path, data={"csrf_token": csrf_of(page), "name": "Mine"})
            assert response.status_code == 404, path
    (row,) = await passkey_rows(state, alice.id)
    assert row.name == "Phone"
    removed = await browser.post(
        f"/account/security/factors/{row.id}/remove",
        data={"csrf_token": csrf_of(security), "password": alice.password},
    )
    assert removed.status_code == 303
    assert await passkey_rows(state, alice.id) == []
    async with new_browser() as http:
        response = await passkey_sign_in(http, auth)
        assert response.status_code == 400 and "may have been removed" in response.text


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_adding_a_passkey_needs_a_recent_sign_in(
    browser: httpx.AsyncClient,
    make_user: MakeUser,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice = await make_user()
    await sign_in(browser, alice)
    page = await browser.get("/account/security/passkeys/new?next=/account")
    assert 'name="next" value="/account"' in page.text
    options = options_of(page)
    start = server.models.now()
    monkeypatch.setattr(server.models, "clock", lambda: start + 601)
    again = await browser.get("/account/security/passkeys/new")
    assert again.status_code == 303
    assert again.headers["location"].startswith(
        "/login?next=%2Faccount%2Fsecurity%2Fpasskeys%2Fnew"
    )
    assert "notice=reauth" in again.headers["location"]
    posted = await browser.post(
        "/account/security/passkeys",
        data={"csrf_token": csrf_of(page), "credential": Authenticator().create(options)},
    )
    assert posted.status_code == 303 and "notice=reauth" in posted.headers["location"]
    assert await passkey_rows(state, alice.id) == []
    monkeypatch.undo()
    # Signed out: to the sign-in page.
    async with httpx.AsyncClient(transport=browser._transport, base_url=ISSUER) as anonymous:
        response = await anonymous.get("/account/security/passkeys/new")
        assert response.status_code == 303 and response.headers["location"].startswith("/login")


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_the_enrolment_flow_keeps_next(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState
) -> None:
    alice = await make_user()
    await sign_in(browser, alice)
    page = await browser.get("/account/security/passkeys/new?next=/oauth2/authorize%3Fx%3D1")
    response = await browser.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "name": "",
            "next": "/oauth2/authorize?x=1",
            "credential": Authenticator().create(options_of(page)),
        },
    )
    assert response.status_code == 303
    assert response.headers["location"] == (
        "/account/security?next=%2Foauth2%2Fauthorize%3Fx%3D1&notice=passkey_added"
    )
    (row,) = await passkey_rows(state, alice.id)
    assert row.name == "Passkey"


@pytest.mark.feature("mfa-passkeys")
async def test_the_same_passkey_cannot_be_registered_twice(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, state: AppState
) -> None:
    alice, bob = await make_user(), await make_user("bob")
    auth = Authenticator()
    assert (await register(browser, alice, auth)).status_code == 303
    async with new_browser() as other:
        response = await register(other, bob, auth)
        assert response.status_code == 400 and "already registered" in response.text
    assert await passkey_rows(state, bob.id) == []


# -- where passkeys cannot work -------------------------------------------------------------


@pytest.fixture
async def ip_app(database_url: str, keys_dir: Path, shared_apps: SharedApps) -> FastAPI:
    """The app with the default issuer, http://127.0.0.1:8000 (not the module's)."""
    application = await shared_apps.get(make_settings(database_url, keys_dir))
    await reset_app(application)
    return application


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkeys")
async def test_an_ip_address_issuer_has_no_passkeys(ip_app: FastAPI) -> None:
    state: AppState = ip_app.state.auth
    async with state.db.session() as db:
        user = await manage.create_user(
            db, state.passwords, username="carol", password="correct horse battery"
        )
        carol = UserCreds(user.id, "carol", "correct horse battery")
        await db.commit()
    transport = httpx.ASGITransport(app=ip_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        login = await http.get("/login")
        assert login.status_code == 200 and "passkey-options" not in login.text
        for path in ("/login/passkey", "/login/verify/passkey", "/account/security/passkeys"):
            refused = await http.post(path, data={"csrf_token": csrf_of(login), "credential": "{}"})
            assert refused.status_code in (303, 404), path
            if refused.status_code == 404:
                assert "not available" in refused.text
        await sign_in(http, carol)
        security = await http.get("/account/security")
        assert "Passkeys are not available" in security.text
        token = csrf_of(await http.get("/login"))
        assert "/account/security/passkeys/new" not in security.text
        new = await http.get("/account/security/passkeys/new")
        assert new.status_code == 404 and "not available" in new.text
        refused = await http.post(
            "/account/security/passkeys", data={"csrf_token": token, "credential": "{}"}
        )
        assert refused.status_code == 404


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkeys")
@pytest.mark.parametrize("transports", [[{}], [[1]], [None, 5], "internal"])
async def test_hostile_transports_are_dropped_not_a_crash(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState, transports: Any
) -> None:
    """``response.transports`` is whatever the poster sent: only known strings are kept (an
    unhashable item was a 500 after the registration had been verified)."""
    alice = await make_user()
    await sign_in(browser, alice)
    page = await browser.get("/account/security/passkeys/new")
    answer = json.loads(Authenticator().create(options_of(page)))
    answer["response"]["transports"] = transports
    response = await browser.post(
        "/account/security/passkeys",
        data={"csrf_token": csrf_of(page), "name": "Key", "credential": json.dumps(answer)},
    )
    assert response.status_code == 303, response.text
    (row,) = await passkey_rows(state, alice.id)
    assert row.transports == ""


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_a_password_alone_cannot_add_a_passkey_for_a_person_who_has_one(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, state: AppState
) -> None:
    """The attack a review found: knowing only the password of someone with a passkey
    (``optional``: the password alone signs in), add one's own passkey, be upgraded to
    ``phrh``, then sign in with it for ever. Adding needs a second factor first."""
    alice = await make_user()
    assert (await register(browser, alice, Authenticator())).status_code == 303
    async with new_browser() as attacker:
        await sign_in(attacker, alice)  # the password only
        page = await attacker.get("/account/security/passkeys/new")
        assert page.status_code == 303
        assert page.headers["location"].startswith("/login/step-up?next=")
        form = csrf_of(await attacker.get("/logout"))
        theirs = Authenticator()
        posted = await attacker.post(
            "/account/security/passkeys",
            data={"csrf_token": form, "name": "Mine", "credential": "{}"},
        )
        assert posted.headers["location"].startswith("/login/step-up?next=")
        assert len(await passkey_rows(state, alice.id)) == 1
        # The step-up asks for alice's passkey, which the attacker's authenticator is not.
        stepped = await attacker.get(page.headers["location"])
        assert stepped.headers["location"].startswith("/login/verify")
        verify = await attacker.get(stepped.headers["location"])
        answered = await attacker.post(
            "/login/verify/passkey",
            data={
                "csrf_token": csrf_of(verify),
                "next": "/account/security/passkeys/new",
                "credential": theirs.get(options_of(verify)),
            },
        )
        assert answered.status_code == 400


@pytest.mark.feature("mfa-passkeys")
async def test_a_second_passkey_leaves_the_session_as_it_was(
    browser: httpx.AsyncClient,
    make_user: MakeUser,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first passkey upgrades the session (the account had nothing more to prove); a second
    one, added from a session that already proved a factor, changes nothing: neither its
    methods nor its ``auth_time`` (else an open browser could keep "recently signed in", and
    clients' ``max_age``, alive for ever by adding factors)."""
    alice = await make_user()
    assert (await register(browser, alice, Authenticator())).status_code == 303
    async with state.db.sessions() as db:
        first = await db.scalar(select(BrowserSession).where(BrowserSession.ended_at.is_(None)))
    assert first is not None and first.amr == "pwd hwk mfa"
    later = float(first.auth_time + 300)
    monkeypatch.setattr(server.models, "clock", lambda: later)
    page = await browser.get("/account/security/passkeys/new")
    added = await browser.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "name": "Synced",
            "credential": Authenticator(backup_eligible=True).create(options_of(page)),
        },
    )
    assert added.status_code == 303
    async with state.db.sessions() as db:
        live = (
            await db.scalars(select(BrowserSession).where(BrowserSession.ended_at.is_(None)))
        ).all()
    assert [row.amr for row in live] == ["pwd hwk mfa"]  # not "pwd hwk swk mfa"
    assert live[0].id != first.id  # a new cookie…
    assert live[0].auth_time == first.auth_time  # …but not a new sign-in


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkeys")
async def test_a_username_cannot_break_out_of_the_options_script(
    browser: httpx.AsyncClient, make_user: MakeUser
) -> None:
    """The registration options carry the person's display name (their free-text name) inside
    a ``<script type="application/json">``: a ``</script>`` in it must not end that element
    (HTML would then parse the rest as markup)."""
    hostile = 'Ev</script><b id="x">il & co'
    user = await make_user(name=hostile)
    await sign_in(browser, user)
    page = await browser.get("/account/security/passkeys/new")
    assert page.status_code == 200
    assert '<b id="x">' not in page.text
    assert page.text.count("</script>") == 2  # the options' own end, the script tag's
    assert options_of(page)["user"]["displayName"] == hostile


@pytest.mark.one_backend
@pytest.mark.feature("mfa-passkey-signin")
async def test_sign_in_does_not_tell_which_credential_ids_are_registered(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser
) -> None:
    """A forged answer naming a registered credential (wrong key) and one naming an unknown
    credential get the same answer: /login/passkey is no oracle for credential ids."""
    alice = await make_user()
    real = Authenticator()
    assert (await register(browser, alice, real)).status_code == 303
    answers = []
    for forger in (Authenticator(credential_id=real.credential_id), Authenticator()):
        async with new_browser() as http:
            response = await passkey_sign_in(http, forger)
            answers.append((response.status_code, MESSAGE_RE.search(response.text)))
    assert answers[0][0] == answers[1][0] == 400
    assert answers[0][1] is not None and answers[1][1] is not None
    assert answers[0][1].group(1) == answers[1][1].group(1)


@pytest.mark.one_backend
@pytest.mark.feature("mfa-factor-management")
async def test_a_password_alone_cannot_rename_a_persons_passkeys(
    browser: httpx.AsyncClient, new_browser: Any, make_user: MakeUser, state: AppState
) -> None:
    alice = await make_user()
    assert (await register(browser, alice, Authenticator(), name="Phone")).status_code == 303
    (row,) = await passkey_rows(state, alice.id)
    async with new_browser() as thief:
        await sign_in(thief, alice)  # the password only
        form = csrf_of(await thief.get("/logout"))
        response = await thief.post(
            f"/account/security/passkeys/{row.id}/rename",
            data={"csrf_token": form, "name": "DO NOT USE"},
        )
    assert response.headers["location"].startswith("/login/step-up?next=")
    (row,) = await passkey_rows(state, alice.id)
    assert row.name == "Phone"


@pytest.mark.one_backend
@pytest.mark.feature("mfa-step-up")
async def test_a_step_up_for_a_passkey_level_offers_and_takes_only_passkeys_that_reach_it(
    browser: httpx.AsyncClient, make_user: MakeUser, state: AppState
) -> None:
    """Asked for ``phrh`` (a device-bound passkey), the step-up page offers only such a
    passkey and refuses a one-time code or a synced passkey: either would reach a weaker
    level, and the authorization request would send the browser round again (a loop that
    spent a code each time)."""
    alice = await make_user()
    bound, synced = Authenticator(), Authenticator(backup_eligible=True)
    assert (await register(browser, alice, bound)).status_code == 303
    page = await browser.get("/account/security/passkeys/new")
    added = await browser.post(
        "/account/security/passkeys",
        data={
            "csrf_token": csrf_of(page),
            "name": "Synced",
            "credential": synced.create(options_of(page)),
        },
    )
    assert added.status_code == 303
    async with state.db.sessions() as db:  # a confirmed app too (its code is never checked)
        db.add(TotpFactor(user_id=alice.id, secret_sealed="x", confirmed_at=1, last_step=0))
        await db.execute(update(BrowserSession).values(amr="pwd"))
        await db.commit()
    step_up = await browser.get("/login/step-up", params={"next": "/account", "acr": "phrh"})
    page = await browser.get(step_up.headers["location"])
    assert 'action="/login/verify/code"' not in page.text
    allowed = [c["id"] for c in options_of(page)["allowCredentials"]]
    assert allowed == [b64(bound.credential_id)]
    code = await browser.post(
        "/login/verify/code",
        data={"csrf_token": csrf_of(page), "code": "123456", "next": "/account"},
    )
    assert code.status_code == 400
    weaker = await browser.post(
        "/login/verify/passkey",
        data={
            "csrf_token": csrf_of(page),
            "credential": synced.get(options_of(page)),
            "next": "/account",
        },
    )
    assert weaker.status_code == 400 and "stays on its device" in weaker.text
    page = await browser.get(step_up.headers["location"])
    done = await browser.post(
        "/login/verify/passkey",
        data={
            "csrf_token": csrf_of(page),
            "credential": bound.get(options_of(page)),
            "next": "/account",
        },
    )
    assert done.headers["location"] == "/account"
    async with state.db.sessions() as db:
        live = (
            await db.scalars(select(BrowserSession.amr).where(BrowserSession.ended_at.is_(None)))
        ).all()
    assert live == ["pwd hwk mfa"]
