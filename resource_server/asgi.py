"""A plain ASGI middleware for any framework: every request but the exempt paths needs a
token with ``scopes``; the handler finds it in ``scope["state"]["token"]`` (Starlette's
``request.state.token``). It also serves the RFC 9728 metadata document (§3.1).
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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == self.metadata_path and scope["method"] in ("GET", "HEAD"):
            body = json.dumps(protected_resource_metadata(self.verifier.config)).encode()
            headers = [
                ("content-type", "application/json"),
                ("cache-control", "public, max-age=3600"),
            ]
            await _send(send, 200, body, headers)
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
                scope["method"],
                verifier.url_for(request_path(scope)),
            )
            verifier.require(token, *self.scopes)
        except TokenError as error:
            status, body, headers = refusal(self.verifier, error)
            await _send(send, status, body, [("content-type", "application/json"), *headers])
            return
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    encoded.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})
