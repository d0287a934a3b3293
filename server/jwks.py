"""``GET /.well-known/jwks.json``, answered before FastAPI's routing (pure ASGI).

Resource servers fetch the JWKS often; it is bytes prepared once per key change (keys.py) with
an ETag. Answering it here skips the router, the dependency solver and the response class: in
process (one request after another), 0.25 ms per request through FastAPI against 0.02 ms here
(bench/notes.md). It sits
inside the metrics, request-id and security-headers middlewares, so it is counted, traced and
hardened like every other route.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from starlette.types import ASGIApp, Receive, Scope, Send

from .deps import AppState

PATH = "/.well-known/jwks.json"
#: What the metrics middleware reads from ``scope["route"]`` for its label.
ROUTE = SimpleNamespace(path_format=PATH)
NOT_ALLOWED = json.dumps(
    {"detail": "Method Not Allowed", "error_code": "method_not_allowed"}
).encode()


class JwksMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        scope["route"] = ROUTE
        if scope["method"] not in ("GET", "HEAD"):
            headers = [(b"content-type", b"application/json"), (b"allow", b"GET, HEAD")]
            await _respond(send, 405, headers, NOT_ALLOWED)
            return
        state: AppState = scope["app"].state.auth
        keyset = state.keys.keyset()
        etag = keyset.etag.encode()
        headers = [
            (b"cache-control", b"public, max-age=%d" % state.settings.jwks_max_age),
            (b"etag", etag),
        ]
        if_none_match = next((v for k, v in scope["headers"] if k == b"if-none-match"), b"")
        if etag in if_none_match:
            await _respond(send, 304, headers, b"")
            return
        body = keyset.jwks_bytes
        headers.append((b"content-type", b"application/json"))
        await _respond(send, 200, headers, b"" if scope["method"] == "HEAD" else body, len(body))


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, length: int = -1
) -> None:
    size = len(body) if length < 0 else length
    if status != 304:
        headers = [*headers, (b"content-length", b"%d" % size)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
