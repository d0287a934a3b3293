"""The check registry (``@check``) and the ``Context`` the checks share: credentials, HTTP."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from joserfc.jwk import ECKey, RSAKey

from .outcome import CheckFailed, CheckSkipped, Status
from .parse import describe, error_code, json_object, parse_json, printable, short

TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path, not a password)
REVOKE_PATH = "/oauth2/revoke"
INTROSPECT_PATH = "/oauth2/introspect"
JWKS_PATH = "/.well-known/jwks.json"
INACTIVE = {"active": False}
MIN_REDACTED_LENGTH = 4

CheckFn = Callable[["Context"], Awaitable[None]]


@dataclass(frozen=True)
class Check:
    name: str
    run: CheckFn


CHECKS: list[Check] = []


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn`` as the check ``name``; checks run in the order they are registered."""

    def register(fn: CheckFn) -> CheckFn:
        assert all(c.name != name for c in CHECKS), name
        CHECKS.append(Check(name, fn))
        return fn

    return register


@dataclass
class Family:
    """One password-grant sign-in: its newest access token and refresh token."""

    access_token: str
    refresh_token: str | None
    scope: str


@dataclass
class Context:
    http: httpx.AsyncClient
    base_url: str
    client_id: str | None
    client_secret: str | None
    username: str | None
    password: str | None
    outcomes: dict[str, tuple[Status, str]] = field(default_factory=dict)
    #: Set when the server cannot be reached at all: the remaining checks fail at once.
    unreachable: str | None = None
    #: kid -> public key, from a JWKS that passed ``jwks-hygiene``.
    keys: dict[str, RSAKey] = field(default_factory=dict)
    #: The access token of ``client-credentials``.
    client_token: str | None = None
    #: The sign-in of ``password-grant``; ``refresh-rotation`` advances it.
    family: Family | None = None
    #: The ``registration_endpoint`` of a discovery document that passed ``discovery``.
    registration_endpoint: str | None = None
    #: path -> the discovery documents that passed ``discovery``.
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The DPoP key of this run (``dpop``): ephemeral, made on first use, never sent whole.
    dpop_key: ECKey | None = None
    #: The newest ``DPoP-Nonce`` the server sent (RFC 9449 §8), for the next proof.
    dpop_nonce: str | None = None
    #: The claims of the proof ``dpop-bound-token`` was granted for, and that proof.
    dpop_claims: dict[str, Any] | None = None
    dpop_proof: str | None = None
    #: (request, Cache-Control) of every response that must carry ``no-store``.
    cache_log: list[tuple[str, str]] = field(default_factory=list)
    #: Values that must never appear in the output.
    sensitive: set[str] = field(default_factory=set)

    @property
    def signing_alg(self) -> str:
        """The algorithm tokens must be signed with: RS256 (SPEC.md), or PS256 where discovery
        says so (a server with ``AUTH_FAPI2``: the FAPI 2.0 Security Profile §5.4.1)."""
        for document in self.documents.values():
            if document.get("id_token_signing_alg_values_supported") == ["PS256"]:
                return "PS256"
        return "RS256"

    # -- prerequisites ------------------------------------------------------------

    def need(self, name: str) -> None:
        """Go on only if the check ``name`` passed; skip if it skipped (same reason)."""
        status, reason = self.outcomes.get(name, ("FAIL", ""))
        if status == "SKIP":
            raise CheckSkipped(reason)
        if status != "PASS":
            raise CheckFailed(f"needs {name}, which failed")

    def need_any(self, *names: str) -> None:
        """Go on if at least one of ``names`` passed."""
        statuses = [self.outcomes.get(name, ("FAIL", ""))[0] for name in names]
        if "PASS" in statuses:
            return
        if all(status == "SKIP" for status in statuses):
            raise CheckSkipped(f"needs {' or '.join(names)}, which were skipped")
        raise CheckFailed(f"needs {' or '.join(names)}, which failed")

    def need_client(self) -> str:
        if self.client_id is None:
            raise CheckSkipped("no client given (--client-id, AUTH_CHECK_CLIENT_ID)")
        return self.client_id

    def need_confidential_client(self) -> str:
        client_id = self.need_client()
        if self.client_secret is None:
            raise CheckSkipped("needs a confidential client (--client-secret not given)")
        return client_id

    def need_user(self) -> tuple[str, str]:
        self.need_client()
        if self.username is None or self.password is None:
            raise CheckSkipped("no user given (--username, AUTH_CHECK_USERNAME)")
        return self.username, self.password

    # -- HTTP ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    async def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.get(self.url(path), headers=headers)

    async def post(
        self,
        path: str,
        data: Mapping[str, str | list[str]],
        *,
        auth: bool | tuple[str, str] = True,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST a form with ``headers``; ``auth=True`` authenticates as the configured client
        (if any): HTTP Basic for a confidential client, ``client_id`` in the form for a
        public one."""
        form: dict[str, str | list[str]] = dict(data)
        sent: dict[str, str] = dict(headers or {})
        if isinstance(auth, tuple):
            sent["Authorization"] = basic_auth(*auth)
        elif auth and self.client_id is not None:
            if self.client_secret is not None:
                sent["Authorization"] = basic_auth(self.client_id, self.client_secret)
            else:
                form["client_id"] = self.client_id
        response = await self.http.post(self.url(path), data=form, headers=sent)
        # SPEC.md: no-store on every token response, success or error, and on introspection.
        if path in (TOKEN_PATH, INTROSPECT_PATH):
            grant = form.get("grant_type")
            what = f"grant_type={printable(str(grant), 40)}" if grant is not None else "form"
            label = f"POST {path} ({what}) -> {response.status_code}"
            self.cache_log.append((label, response.headers.get("cache-control", "")))
        return response

    async def token(self, data: dict[str, str], what: str) -> dict[str, Any]:
        """A successful token response (RFC 6749 §5.1), or ``CheckFailed``."""
        response = await self.post(TOKEN_PATH, data)
        return self.token_body(response, what)

    def token_body(
        self, response: httpx.Response, what: str, scheme: str = "Bearer"
    ) -> dict[str, Any]:
        """The body of a successful token response whose ``token_type`` is ``scheme``
        (compared case-insensitively, RFC 6749 §7.1), or ``CheckFailed``."""
        if response.status_code == 400 and error_code(response) == "unauthorized_client":
            raise CheckSkipped(f"the client is not allowed the grant ({what})")
        if response.status_code != 200:
            raise CheckFailed(f"{what}: {describe(response)}")
        body = json_object(response, what)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise CheckFailed(f"{what}: no access_token in the response")
        self.sensitive.add(access_token)
        refresh_token = body.get("refresh_token")
        if isinstance(refresh_token, str) and refresh_token:
            self.sensitive.add(refresh_token)
        seen = body.get("token_type")
        if not isinstance(seen, str) or seen.lower() != scheme.lower():
            raise CheckFailed(f"{what}: token_type is {short(seen)}, expected {scheme}")
        expires_in = body.get("expires_in")
        if type(expires_in) is not int or expires_in <= 0:
            raise CheckFailed(f"{what}: expires_in is {short(expires_in)}, expected seconds > 0")
        return body

    async def introspect(self, token: str, hint: str | None = None) -> httpx.Response:
        data = {"token": token} if hint is None else {"token": token, "token_type_hint": hint}
        return await self.post(INTROSPECT_PATH, data)

    async def expect_inactive(self, token: str, what: str) -> None:
        response = await self.introspect(token)
        if response.status_code != 200:
            raise CheckFailed(f"introspecting {what}: {describe(response)}, expected 200")
        body = json_object(response, f"introspecting {what}")
        if body != INACTIVE:
            seen = "active" if body.get("active") is True else "not exactly {active: false}"
            raise CheckFailed(f"introspecting {what}: {seen}, expected {{active: false}}")

    async def sign_in(self) -> dict[str, Any]:
        username, password = self.need_user()
        data = {"grant_type": "password", "username": username, "password": password}
        response = await self.post(TOKEN_PATH, data)
        if response.status_code == 400 and error_code(response) == "invalid_grant":
            body = parse_json(response)
            described = body.get("error_description") if isinstance(body, dict) else None
            if isinstance(described, str) and "second factor" in described:
                # The account is right, but signs in with a second factor, which the password
                # grant cannot ask for (AUTH_MFA=required, or the person set one up).
                raise CheckSkipped(
                    "the account signs in with a second factor, which the password grant "
                    "cannot ask for (give an account without one, or leave out --username)"
                )
        return self.token_body(response, "password grant")

    def redact(self, text: str) -> str:
        # Values too short to be real secrets would mangle every message; none is printed anyway.
        for value in sorted(self.sensitive, key=len, reverse=True):
            if len(value) >= MIN_REDACTED_LENGTH:
                text = text.replace(value, "***")
        return text


def basic_auth(client_id: str, secret: str) -> str:
    # RFC 6749 §2.3.1: both parts form-urlencoded before Base64.
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")
