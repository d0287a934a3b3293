"""A tiny API protected by the resource servers' kit (examples/README.md).

    .venv/bin/uvicorn examples.orders_api:app --port 8001

It trusts the token server at ``TOKEN_SERVER`` (default http://127.0.0.1:8000) and is the
resource ``API_RESOURCE`` (default http://127.0.0.1:8001): a token is accepted only if that
server signed it for this API (``aud``) with the ``api`` scope.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from resource_server import ResourceServerConfig, TokenVerifier, VerifiedToken
from resource_server.fastapi import RequireToken, protect

config = ResourceServerConfig(
    issuer=os.environ.get("TOKEN_SERVER", "http://127.0.0.1:8000"),
    resource=os.environ.get("API_RESOURCE", "http://127.0.0.1:8001"),
    resource_name="Example orders API",
    scopes_supported=("api",),
)
verifier = TokenVerifier(config)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await verifier.aclose()


app = FastAPI(title="Example orders API", lifespan=lifespan)
protect(app, verifier)  # refusals as RFC 6750 / RFC 9449 say; the RFC 9728 document

ORDERS = [{"id": "o-1", "item": "tea", "quantity": 2}, {"id": "o-2", "item": "cake", "quantity": 1}]


@app.get("/orders")
async def orders(
    token: Annotated[VerifiedToken, Depends(RequireToken(verifier, "api"))],
) -> dict[str, Any]:
    """The orders, for any token with the ``api`` scope (Bearer, or DPoP with its proof)."""
    return {"orders": ORDERS, "subject": token.subject, "client_id": token.client_id}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
