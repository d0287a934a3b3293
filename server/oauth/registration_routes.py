"""HTTP side of dynamic client registration (RFC 7591) and client configuration (RFC 7592):
the routes, the rate limit, the credentials checked before Authlib runs, the unit of work and
the audit events. The protocol is in ``registration.py``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc7591.errors import InvalidClientMetadataError
from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .. import clients
from ..bearer import Realm, Refusal
from ..boundary import text_problem
from ..clients import CLIENT_ID_LENGTH
from ..deps import AppState
from ..forms import FormError, read_body
from ..models import Client, RegistrationToken, now, sha256_hex
from ..observability import audit
from .registration import REGISTRATION_PATH, Credential, RegistrationRequest
from .routes import PlainRoute, _too_many, json_response
from .server import TokenServer

REALM = Realm(
    name="registration",
    body="oauth",
    invalid="The access token is not valid for this registration request.",
)
NOT_FOUND = {"error": "not_found", "error_description": "Client registration is off."}
Answer = tuple[int, Any, list[tuple[str, str]]]


def _bearer(request: Request) -> str | None:
    """The RFC 6750 §2.1 token of ``Authorization: Bearer``, or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise InvalidClientMetadataError(
            description="Send the client metadata as a JSON object (application/json)."
        )
    try:
        raw = await read_body(request, limit)
    except FormError as error:
        refused = InvalidRequestError(str(error))
        refused.status_code = error.status
        raise refused from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidClientMetadataError(description="The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidClientMetadataError(description="The body must be a JSON object.")
    return data


def _answer(status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
    if status == 204:
        return Response(status_code=204, headers={"Cache-Control": "no-store"})
    if isinstance(body, dict) and body.get("client_secret", "") is None:
        # Authlib answers ``client_secret: null`` for a client without one.
        body = {k: v for k, v in body.items() if k not in ("client_secret",)}
        body.pop("client_secret_expires_at", None)
    # RFC 7591 §3.2.1: the answer carries credentials; never cached.
    return json_response(status, body, headers, no_store=True)


async def _run(
    request: Request,
    endpoint: str,
    data: dict[str, Any],
    prepare: Callable[[AsyncSession], Awaitable[Credential]],
) -> tuple[int, Any, list[tuple[str, str]], RegistrationRequest]:
    state: AppState = request.app.state.auth
    server: TokenServer = request.app.state.oauth

    async def unit(db: AsyncSession) -> Answer:
        credential = await prepare(db)
        registration = RegistrationRequest(request, data, credential)
        units.append(registration)

        def on(session: Session) -> Answer:
            registration.session = session
            answer: Answer = server.create_endpoint_response(endpoint, registration)
            return answer

        result = await db.run_sync(on)
        if registration.changed:
            await clients.announce(db, registration.changed)
        return result

    units: list[RegistrationRequest] = []
    status, body, headers = await state.db.run(unit)
    return status, body, headers, units[-1]


async def register(request: Request) -> Response:
    """RFC 7591 §3.1: register a client; 201 with its credentials and metadata."""
    state: AppState = request.app.state.auth
    settings = state.settings
    if settings.client_registration == "off":
        return json_response(404, NOT_FOUND)
    limiter = state.limiter
    ip = limiter.client_ip(request)
    verdict = await limiter.hit([(limiter.registration_ip, "register-ip", ip)])
    if not verdict.allowed:
        return _too_many(verdict, "registration")
    token = _bearer(request)
    try:
        data = await _json_body(request, settings.max_body_bytes)
    except OAuth2Error as error:
        audit("client.registration_refused", error=error.error, ip=ip)
        return _answer(*error())

    async def prepare(db: AsyncSession) -> Credential:
        if settings.client_registration == "open":
            return Credential()
        # RFC 7591 §3: an initial access token, checked as an RFC 6750 bearer token.
        if token is None:
            raise REALM.missing_token()
        found = await db.scalar(
            select(RegistrationToken.token_hash).where(
                RegistrationToken.token_hash == sha256_hex(token),
                RegistrationToken.expires_at > now(),
            )
        )
        if found is None:
            raise REALM.invalid_token()
        return Credential()

    try:
        status, body, headers, done = await _run(request, "client_registration", data, prepare)
    except Refusal as refusal:
        audit("client.registration_refused", error=refusal.error or "missing_token", ip=ip)
        return refusal.response()
    if status == 201:
        meta = done.metadata
        audit(
            "client.registered",
            client_id=body.get("client_id"),
            auth_method=meta.auth_method if meta is not None else None,
            ip=ip,
        )
    else:
        audit("client.registration_refused", error=body.get("error"), ip=ip)
    return _answer(status, body, headers)


async def configure(request: Request) -> Response:
    """RFC 7592 §2: read, replace or delete a registered client with its registration access
    token."""
    state: AppState = request.app.state.auth
    settings = state.settings
    if settings.client_registration == "off":
        return json_response(404, NOT_FOUND)
    client_id = request.path_params["client_id"]
    token = _bearer(request)
    data: dict[str, Any] = {}
    if request.method == "PUT":
        try:
            data = await _json_body(request, settings.max_body_bytes)
        except OAuth2Error as error:
            return _answer(*error())

    async def prepare(db: AsyncSession) -> Credential:
        if token is None:
            raise REALM.missing_token()
        client = None
        if text_problem(client_id, CLIENT_ID_LENGTH) is None:
            client = await db.get(Client, client_id)
        stored = client.registration_token_hash if client is not None else None
        # Compared in constant time; a deleted client has no row, so its token is invalid.
        if stored is None or not secrets.compare_digest(stored, sha256_hex(token)):
            raise REALM.invalid_token()
        return Credential(client)

    try:
        status, body, headers, _ = await _run(request, "client_configuration", data, prepare)
    except Refusal as refusal:
        return refusal.response()
    if request.method != "GET" and status in (200, 204):
        event = "client.deleted" if request.method == "DELETE" else "client.updated"
        audit(event, client_id=client_id, via="registration")
    return _answer(status, body, headers)


ROUTES = [
    PlainRoute(REGISTRATION_PATH, register, methods=["POST"], include_in_schema=False),
    PlainRoute(
        REGISTRATION_PATH + "/{client_id}",
        configure,
        methods=["GET", "PUT", "DELETE"],
        include_in_schema=False,
    ),
]
