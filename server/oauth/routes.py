"""HTTP routes of the OAuth layer: /oauth2/token and the /.well-known documents."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..deps import AppState, StateDep
from ..observability import audit
from .requests import form_request
from .server import Response as ServerResponse
from .server import TokenServer

router = APIRouter()

GRANT_TYPES = ["password", "refresh_token", "client_credentials"]
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
CONFIDENTIAL_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(
    status: int,
    body: dict[str, Any],
    headers: list[tuple[str, str]] | dict[str, str] = (),  # type: ignore[assignment]
) -> Response:
    response = Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )
    for key, value in dict(headers).items():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response


def token_response(status: int, body: dict[str, Any], headers: list[tuple[str, str]]) -> Response:
    response = json_response(status, body, headers)
    # RFC 6749 §5.1: no caching of token responses, success or error.
    response.headers.update(NO_STORE)
    return response


@router.post("/oauth2/token")
async def token(request: Request, state: StateDep) -> Response:
    settings = state.settings
    try:
        oauth_request = await form_request(
            request, uri=settings.issuer + "/oauth2/token", limit=settings.max_body_bytes
        )
        grant_type = oauth_request.form.get("grant_type")
        if grant_type is None:
            raise InvalidRequestError("Missing 'grant_type' parameter.")
        if grant_type not in GRANT_TYPES:
            # Authlib's own error carries no description; never echo the value back.
            raise OAuth2Error(
                error="unsupported_grant_type",
                description=f"Supported grant types: {', '.join(GRANT_TYPES)}.",
            )
    except OAuth2Error as error:
        return token_response(*error())
    status, body, headers = await _run(
        state, lambda server: server.create_token_response(oauth_request)
    )
    client_id = getattr(oauth_request.client, "client_id", None)
    if status == 200:
        user_id = getattr(oauth_request.user, "id", None)
        audit("token.issued", grant_type=grant_type, client_id=client_id, user_id=user_id)
    else:
        audit("token.refused", grant_type=grant_type, client_id=client_id, error=body.get("error"))
    return token_response(status, body, headers)


@router.post("/oauth2/revoke")
async def revoke(request: Request, state: StateDep) -> Response:
    """RFC 7009: 200 for a revoked, unknown or already-dead token alike (§2.2)."""
    return await _endpoint(request, state, "revocation", "/oauth2/revoke")


@router.post("/oauth2/introspect")
async def introspect(request: Request, state: StateDep) -> Response:
    """RFC 7662: the token's metadata if live and the caller may see it, else active false."""
    return await _endpoint(request, state, "introspection", "/oauth2/introspect")


async def _endpoint(request: Request, state: StateDep, name: str, path: str) -> Response:
    settings = state.settings
    try:
        oauth_request = await form_request(
            request, uri=settings.issuer + path, limit=settings.max_body_bytes
        )
    except OAuth2Error as error:
        return token_response(*error())
    status, body, headers = await _run(
        state, lambda server: server.create_endpoint_response(name, oauth_request)
    )
    return token_response(status, body, headers)


async def _run(state: AppState, call: Callable[[TokenServer], ServerResponse]) -> ServerResponse:
    """Run Authlib's synchronous server on one database transaction (see server.py)."""
    async with state.sessions() as db:
        result = await db.run_sync(lambda session: call(TokenServer(state, session)))
        await db.commit()
    return result


@router.get("/.well-known/jwks.json")
async def jwks(request: Request, state: StateDep) -> Response:
    keyset = state.keys.keyset()
    headers = {
        "Cache-Control": f"public, max-age={state.settings.jwks_max_age}",
        "ETag": keyset.etag,
    }
    if keyset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(keyset.jwks_bytes, media_type="application/json", headers=headers)


def discovery_document(issuer: str) -> dict[str, Any]:
    """RFC 8414 metadata: only what this server really supports."""
    return {
        "issuer": issuer,
        "token_endpoint": issuer + "/oauth2/token",
        "jwks_uri": issuer + "/.well-known/jwks.json",
        "grant_types_supported": GRANT_TYPES,
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "revocation_endpoint": issuer + "/oauth2/revoke",
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "introspection_endpoint": issuer + "/oauth2/introspect",
        # RFC 7662 §2.1: introspection needs a confidential client.
        "introspection_endpoint_auth_methods_supported": CONFIDENTIAL_AUTH_METHODS,
        "response_types_supported": [],
    }


@router.get("/.well-known/openid-configuration")
@router.get("/.well-known/oauth-authorization-server")
async def discovery(state: StateDep) -> Response:
    return json_response(
        200,
        discovery_document(state.settings.issuer),
        {"Cache-Control": "public, max-age=300"},
    )
