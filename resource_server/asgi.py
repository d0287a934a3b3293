"""A plain ASGI middleware for any framework: every request (WebSockets included) but the
exempt paths needs a token with ``scopes``; the handler finds it in ``scope["state"]["token"]``
(Starlette's ``request.state.token``). It also serves the RFC 9728 metadata document (§3.1).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .errors import TokenError
from .metadata import metadata_path, protected_resource_metadata
from .responses import refusal
from .verifier import TokenVerifier, request_path

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        *,
        scopes: Iterable[str] = (),
        exempt: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.scopes = tuple(scopes)
        self.metadata_path = metadata_path(verifier.config)
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # A WebSocket is an HTTP request too (its handshake is a GET, RFC 6455 §4.1): it needs
        # the token like any other, or a middleware-protected app would take it without one.
        websocket = scope["type"] == "websocket"
        method: str = "GET" if websocket else scope["method"]
        path: str = scope["path"]
        if not websocket and path == self.metadata_path and method in ("GET", "HEAD"):
            body = json.dumps(protected_resource_metadata(self.verifier.config)).encode()
            headers = [
                ("content-type", "application/json"),
                ("cache-control", "public, max-age=3600"),
            ]
            await _send(send, 200, body, headers, head=method == "HEAD")
            return
        if path in self.exempt:
            await self.app(scope, receive, send)
            return
        authorizations: list[str] = []
        dpop: list[str] = []
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            if key == "dpop":
                dpop.append(value.decode("latin-1"))
            elif key == "authorization":
                authorizations.append(value.decode("latin-1"))
        try:
            if len(authorizations) > 1:
                raise TokenError("invalid_request", "Send one Authorization header.", 400, None)
            verifier = self.verifier
            token = await verifier.verify(
                authorizations[0] if authorizations else None,
                dpop,
                method,
                verifier.url_for(request_path(scope)),
            )
            verifier.require(token, *self.scopes)
        except TokenError as error:
            status, body, headers = refusal(self.verifier, error)
            headers = [("content-type", "application/json"), *headers]
            if websocket:
                await _refuse_websocket(scope, receive, send, status, body, headers)
            else:
                await _send(send, status, body, headers)
            return
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]],
    kind: str = "http",
    *,
    head: bool = False,
) -> None:
    """One whole answer; to a HEAD, its headers only (RFC 9110 §9.3.2)."""
    encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    encoded.append((b"content-length", str(len(body)).encode()))
    await send({"type": f"{kind}.response.start", "status": status, "headers": encoded})
    await send({"type": f"{kind}.response.body", "body": b"" if head else body})


async def _refuse_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[str, str]],
) -> None:
    """Refuse a WebSocket before accepting it: the same HTTP answer where the server offers
    the ASGI ``websocket.http.response`` extension, else a close, which the server turns into
    a 403 (ASGI spec, ``websocket.close`` before ``websocket.accept``)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client went away
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await _send(send, status, body, headers, kind="websocket.http")
    else:
        await send({"type": "websocket.close", "code": 1008})
