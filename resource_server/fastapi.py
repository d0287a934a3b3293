"""FastAPI: a dependency that yields the verified token, and ``protect`` to install the answer
for refusals and the RFC 9728 metadata route.

    verifier = TokenVerifier(ResourceServerConfig(issuer=..., resource=...))
    app = FastAPI()
    protect(app, verifier)

    ReadOrders = Annotated[VerifiedToken, Depends(RequireToken(verifier, "orders:read"))]

    @app.get("/orders")
    async def orders(token: ReadOrders) -> ...:
        ...
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .errors import TokenError
from .metadata import metadata_path, protected_resource_metadata
from .responses import refusal
from .verifier import TokenVerifier, VerifiedToken, request_path


class RequireToken:
    """``Depends(RequireToken(verifier, *scopes))``: the request's token, with every scope
    in ``scopes``; otherwise ``TokenError``, which ``protect`` turns into the answer."""

    def __init__(self, verifier: TokenVerifier, *scopes: str) -> None:
        self.verifier = verifier
        self.scopes = scopes

    async def __call__(self, request: Request) -> VerifiedToken:
        verifier = self.verifier
        authorizations = request.headers.getlist("authorization")
        if len(authorizations) > 1:
            # RFC 6750 §3.1 invalid_request (as TokenMiddleware answers): which one counts
            # would otherwise depend on the layer reading it.
            raise TokenError("invalid_request", "Send one Authorization header.", 400, None)
        token = await verifier.verify(
            authorizations[0] if authorizations else None,
            request.headers.getlist("dpop"),
            request.method,
            verifier.url_for(request_path(request.scope)),
        )
        verifier.require(token, *self.scopes)
        return token


def protect(app: FastAPI, verifier: TokenVerifier) -> None:
    """Answer ``TokenError`` as RFC 6750 / RFC 9449 say, and serve this API's RFC 9728
    document at its well-known path (§3.1)."""

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TokenError)
        status, body, headers = refusal(verifier, exc)
        return Response(body, status, headers=dict(_merge(headers)), media_type="application/json")

    app.add_exception_handler(TokenError, refused)

    async def metadata() -> JSONResponse:
        return JSONResponse(
            protected_resource_metadata(verifier.config),
            headers={"cache-control": "public, max-age=3600"},
        )

    app.add_api_route(metadata_path(verifier.config), metadata, methods=["GET", "HEAD"])


def _merge(headers: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """Several challenges in one ``WWW-Authenticate`` (RFC 9110 §11.6.1 allows a list)."""
    merged: dict[str, str] = {}
    for name, value in headers:
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return list(merged.items())
