"""Pushed authorization requests (RFC 9126).

``POST /oauth2/par``: the client authenticates exactly as at the token endpoint (every method,
``private_key_jwt`` included, through the same prelude), its parameters are checked as
/oauth2/authorize would check them (``authorize.check_request``) and refused there and then
(§2.3, as a token endpoint error), and it gets a ``request_uri`` (§2.2): 256 random bits, of
which only the hash is stored, good for ``PUSHED_REQUEST_TTL`` (60 s) to be opened. The checks
are ``authorization_request.check_request``, shared with /oauth2/authorize.

``/oauth2/authorize?client_id=…&request_uri=…`` then uses the pushed parameters only (§4). A
browser sign-in takes longer than a minute, and its pages come back to the endpoint (after the
sign-in, after consent), so "single use" (§4: SHOULD be one-time, MAY allow a reload) is kept
this way: the first browser to open the request holds it (the hash of its ``par`` cookie is
stored) for ``SIGN_IN_TTL``; no other browser can open it, and it ends with the first answer
sent to the client (a code or an error), in the transaction that writes the code.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from sqlalchemy import update
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response

from .. import documents
from ..deps import AppState
from ..dpop import DpopError, DpopNonceError
from ..models import PushedRequest, now, sha256_hex
from ..names import USER_AUTH_METHODS
from ..observability import audit
from ..web.browser import cookie_name, error_page, set_cookie
from .authorization_request import check_request
from .requests import FormRequest, form_request
from .routes import PlainRoute, _rate_limited, _too_many, token_response
from .server import TokenServer

#: RFC 9126 §2.2: the ``request_uri`` prefix, and the lifetime of a pushed request until it is
#: opened at /oauth2/authorize (SPEC.md: 60 s; FAPI 2.0 §5.3.2.2: under 600).
URN_PREFIX = "urn:ietf:params:oauth:request_uri:"
PUSHED_REQUEST_TTL = 60
#: How long the browser that opened a pushed request has to sign in and consent.
SIGN_IN_TTL = 600
#: Parameters that authenticate the client: not part of the authorization request.
CLIENT_AUTH_PARAMS = frozenset({"client_secret", "client_assertion", "client_assertion_type"})
REQUEST_URI = re.compile(re.escape(URN_PREFIX) + r"[A-Za-z0-9_-]{43}")
BROWSER_COOKIE = re.compile(r"[A-Za-z0-9_-]{43}")


def required(server: TokenServer, client: Any) -> bool:
    """Whether plain (unpushed) authorization requests of ``client`` are refused (§5, §6)."""
    settings = server.settings
    return settings.require_par or settings.fapi2 or bool(getattr(client, "require_par", False))


def _error(error: OAuth2Error, headers: list[tuple[str, str]] | None = None) -> Response:
    # §2.3: errors as at the token endpoint (RFC 6749 §5.2), never a redirect: the client
    # called us, not a browser.
    body = {"error": error.error, "error_description": error.description}
    status = error.status_code or 400  # 401 invalid_client, 413 for an oversized body
    extra = list(headers or [])
    if status == 401:
        extra.append(("WWW-Authenticate", 'Basic realm="token"'))
    return token_response(status, body, extra)


async def push(request: Request) -> Response:
    """``POST /oauth2/par`` (RFC 9126 §2)."""
    state: AppState = request.app.state.auth
    server: TokenServer = request.app.state.oauth
    settings = state.settings
    limiter = state.limiter
    ip = limiter.client_ip(request)
    verdict = await limiter.hit([(limiter.token_ip, "par-ip", ip)])
    if not verdict.allowed:
        return _too_many(verdict, "par")
    uri = settings.issuer + "/oauth2/par"
    try:
        oauth_request = await form_request(request, uri=uri, limit=settings.max_body_bytes)
    except OAuth2Error as error:
        return _error(error)
    form = oauth_request.form
    if "request_uri" in form:
        # §2.1: a pushed request cannot point to another one.
        return _error(InvalidRequestError("request_uri is not allowed in a pushed request."))
    if "request" in form:
        # RFC 9101 request objects are not supported (discovery: request_parameter_supported).
        return _error(
            OAuth2Error(
                error="request_not_supported", description="Request objects are not supported."
            )
        )
    try:
        # RFC 9449 §10.1: a proof sent with the push binds the code to its key.
        oauth_request.dpop = await server.dpop.verify(
            request.headers.getlist("dpop"), method="POST", url=uri
        )
    except DpopNonceError as error:
        return _error(
            OAuth2Error(error=error.error, description=error.description),
            [("DPoP-Nonce", error.nonce)],
        )
    except DpopError as error:
        return _error(OAuth2Error(error=error.error, description=error.description))
    if oauth_request.assertion is not None:
        try:
            await server.assertions.verify(oauth_request, oauth_request.assertion)
        except OAuth2Error as error:
            return _error(error)
    elif oauth_request.claimed_client_id:
        admitted = await documents.admit(state, request, oauth_request.claimed_client_id)
        if not admitted.allowed:
            return token_response(*_rate_limited(admitted))
        await state.clients.get(oauth_request.claimed_client_id)
    try:
        client = server.authenticate_client(oauth_request, list(USER_AUTH_METHODS), "par")
    except OAuth2Error as error:
        audit("par.refused", client_id=None, error=error.error)
        return _error(error)
    # Each push is a row: an authenticated client counts against its own limit too (a
    # public client's id is enough to push for it, so the per-address limit comes first).
    verdict = await limiter.hit([(limiter.token_client, "par-client", client.client_id)])
    if not verdict.allowed:
        return _too_many(verdict, "par")
    params = {k: v for k, v in form.items() if k not in CLIENT_AUTH_PARAMS}
    if params.get("client_id", client.client_id) != client.client_id:
        # §2.1: the client_id of the request is the authenticated client's.
        return _error(InvalidRequestError("client_id is not the authenticated client's."))
    params["client_id"] = client.client_id
    proof = oauth_request.dpop
    if proof is not None:
        if params.get("dpop_jkt", proof.jkt) != proof.jkt:
            # RFC 9449 §10.1: both given, they must name the same key.
            return _error(
                OAuth2Error(
                    error="invalid_dpop_proof",
                    description="dpop_jkt is not the thumbprint of the proof's key.",
                )
            )
        params["dpop_jkt"] = proof.jkt
    if settings.fapi2 and "redirect_uri" not in params:
        # FAPI 2.0 Security Profile §5.3.2.2 item 4 (and §5.3.2.1: private_key_jwt).
        return _error(InvalidRequestError("redirect_uri is required in pushed requests."))
    checked = FormRequest("GET", settings.issuer + "/oauth2/authorize", {}, params)
    try:
        check_request(server, checked)
    except OAuth2Error as error:
        audit("par.refused", client_id=client.client_id, error=error.error)
        return _error(error)
    request_uri = URN_PREFIX + secrets.token_urlsafe(32)
    issued = oauth_request.issued_at
    async with state.db.session() as db:
        db.add(
            PushedRequest(
                request_uri_hash=sha256_hex(request_uri),
                client_id=client.client_id,
                params=json.dumps(params, separators=(",", ":")),
                created_at=issued,
                expires_at=issued + PUSHED_REQUEST_TTL,
            )
        )
        await db.commit()
    audit("par.pushed", client_id=client.client_id, dpop_bound="dpop_jkt" in params)
    headers: list[tuple[str, str]] = []
    if proof is not None and settings.dpop_require_nonce:
        headers.append(("DPoP-Nonce", server.dpop.current_nonce()))
    # §2.2: 201 Created, not cacheable.
    return token_response(
        201, {"request_uri": request_uri, "expires_in": PUSHED_REQUEST_TTL}, headers
    )


# -- at the authorization endpoint ---------------------------------------------------------


@dataclass
class Opened:
    """A pushed request opened by this browser: its parameters, and the cookie to set."""

    request_uri_hash: str
    params: dict[str, str]
    new_cookie: str | None

    def attach(self, response: Response, state: AppState) -> Response:
        if self.new_cookie is not None:
            set_cookie(response, state.settings, "par", self.new_cookie, None)
        return response


def _refused(detail: str) -> Response:
    return error_page(
        400,
        "This sign-in request is not valid",
        f"{detail} Go back to the application and start again. "
        "Tell the application's developers: invalid_request_uri.",
    )


async def open_pushed(
    request: Request, state: AppState, params: dict[str, str]
) -> Opened | Response:
    """The pushed request ``params`` name (§4), if this browser may use it; else the error
    page. Never redirected: until the request is found, its redirect URI is unknown."""
    client_id = params.get("client_id")
    request_uri = params["request_uri"]
    if not client_id:
        return _refused("The request names no application.")
    if not REQUEST_URI.fullmatch(request_uri):
        return _refused("The request's link is malformed.")
    cookie = request.cookies.get(cookie_name(state.settings, "par"), "")
    new_cookie = None
    if not BROWSER_COOKIE.fullmatch(cookie):
        cookie = new_cookie = secrets.token_urlsafe(32)
    browser = sha256_hex(cookie)
    key = sha256_hex(request_uri)
    stamp = now()
    async with state.db.session() as db:
        row = await db.get(PushedRequest, key)
        if (
            row is None
            or row.client_id != client_id
            or row.used_at is not None
            or row.expires_at <= stamp
        ):
            audit("par.refused_at_authorize", client_id=client_id[:100])
            return _refused("The request has expired or was already used.")
        if row.browser_hash is None:
            # The first browser to open it holds it: one conditional UPDATE, so of two
            # browsers opening it at once exactly one does.
            claimed = await db.execute(
                update(PushedRequest)
                .where(
                    PushedRequest.request_uri_hash == key,
                    PushedRequest.browser_hash.is_(None),
                    PushedRequest.used_at.is_(None),
                    PushedRequest.expires_at > stamp,
                )
                .values(browser_hash=browser, expires_at=stamp + SIGN_IN_TTL)
            )
            await db.commit()
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return _refused("The request has expired or was already used.")
        elif not hmac.compare_digest(row.browser_hash, browser):
            audit("par.refused_at_authorize", client_id=client_id[:100])
            return _refused("The request has expired or was already used.")
        pushed = json.loads(row.params)
    return Opened(request_uri_hash=key, params=pushed, new_cookie=new_cookie)


def effective(pushed: dict[str, str], query: dict[str, str]) -> dict[str, str]:
    """The parameters of a pushed request as the endpoint uses them (§4: the pushed ones
    only). One exception: a sign-in made on the way satisfies ``prompt=login`` and
    ``max_age``, so the endpoint, sending the browser back after it, narrows ``prompt`` in
    the URL (``authorize.handle``); a URL ``prompt`` is honoured only as a subset of the
    pushed one, and then ``max_age`` is dropped. That is what a person could do to a plain
    request by editing its URL, and the ID token's ``auth_time`` tells the client the truth."""
    params = dict(pushed)
    if "prompt" in query:
        narrowed = query["prompt"].split()
        if set(narrowed) <= set(pushed.get("prompt", "").split()):
            params.pop("max_age", None)
            if narrowed:
                params["prompt"] = " ".join(narrowed)
            else:
                params.pop("prompt", None)
    return params


def spend(db: Session, request_uri_hash: str, stamp: int) -> bool:
    """End the pushed request as its answer goes to the client: True for exactly one of
    simultaneous answers (the transaction of the code it issues)."""
    result = db.execute(
        update(PushedRequest)
        .where(PushedRequest.request_uri_hash == request_uri_hash, PushedRequest.used_at.is_(None))
        .values(used_at=stamp)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


ROUTES = [PlainRoute("/oauth2/par", push, methods=["POST"], include_in_schema=False)]
