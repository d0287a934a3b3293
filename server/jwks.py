"""``GET /.well-known/jwks.json``, answered before FastAPI's routing (pure ASGI).

Resource servers fetch the JWKS often; it is bytes prepared once per key change (keys.py) with
an ETag. Two ways in:
- ``fast``, called by the app itself before any middleware (``server.main.App``): a plain GET or
  HEAD with no ``Origin`` header (a resource server, not a browser) is answered at once, with
  everything the middlewares would have added (the security headers, ``X-Request-ID``, the
  request counted and timed in the metrics) written here, since none of them runs;
- ``JwksMiddleware``, inside the metrics, request-id, security-headers and CORS middlewares,
  for everything else (a browser's cross-origin fetch, other methods, a failing key store).

In process, one request after another: 0.25 ms through FastAPI's router, 0.02 ms inside the
middlewares; the middlewares themselves cost more than the answer (bench/notes.md).
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .deps import AppState
from .metrics import HTTP_DURATION, HTTP_REQUESTS
from .observability import request_id_from
from .web.browser import SECURITY_HEADERS

PATH = "/.well-known/jwks.json"
#: What the metrics middleware reads from ``scope["route"]`` for its label.
ROUTE = SimpleNamespace(path_format=PATH)
NOT_ALLOWED = json.dumps(
    {"detail": "Method Not Allowed", "error_code": "method_not_allowed"}
).encode()


def _answer(state: AppState, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a GET or HEAD (304 when the ETag matches)."""
    keyset = state.keys.keyset()
    etag = keyset.etag.encode()
    headers = [
        (b"cache-control", b"public, max-age=%d" % state.settings.jwks_max_age),
        (b"etag", etag),
    ]
    if_none_match = next((v for k, v in scope["headers"] if k == b"if-none-match"), b"")
    if etag in if_none_match:
        return 304, headers, b""
    body = keyset.jwks_bytes
    headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", b"%d" % len(body)))
    return 200, headers, b"" if scope["method"] == "HEAD" else body


#: The metric series ``fast`` adds to, by (method, status): looked up once, not per request.
_SERIES: dict[tuple[str, int], tuple[Any, Any]] = {}


def _series(method: str, status: int) -> tuple[Any, Any]:
    series = _SERIES.get((method, status))
    if series is None:
        series = _SERIES[(method, status)] = (
            HTTP_REQUESTS.labels(method, PATH, str(status)),
            HTTP_DURATION.labels(method, PATH),
        )
    return series


async def fast(app: Any, scope: Scope, send: Send) -> bool:
    """Answer a resource server's JWKS fetch before the middlewares; False: not one of those,
    or something went wrong (the middlewares then answer, 500 included)."""
    started = time.perf_counter()
    method = scope["method"]
    if method not in ("GET", "HEAD") or any(k == b"origin" for k, _ in scope["headers"]):
        return False
    state: AppState | None = getattr(app.state, "auth", None)
    if state is None:
        return False
    try:
        status, headers, body = _answer(state, scope)
    except Exception:
        return False
    request_id = request_id_from(scope["headers"])
    headers += [*SECURITY_HEADERS, (b"x-request-id", request_id.encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    requests, duration = _series(method, status)
    requests.inc()
    duration.observe(time.perf_counter() - started)
    return True


class JwksMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        scope["route"] = ROUTE
        if scope["method"] not in ("GET", "HEAD"):
            headers = [
                (b"content-type", b"application/json"),
                (b"allow", b"GET, HEAD"),
                (b"content-length", b"%d" % len(NOT_ALLOWED)),
            ]
            status, body = 405, NOT_ALLOWED
        else:
            status, headers, body = _answer(scope["app"].state.auth, scope)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
