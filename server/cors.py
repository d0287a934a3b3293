"""CORS for the endpoints a browser app calls across origins, and only for configured origins.

A single-page app on ``https://app.example`` signs people in with the authorization code flow
and PKCE (pushing its request to /oauth2/par first, if it likes), then calls the token,
revocation and userinfo endpoints, the JWKS and discovery, and the account API, all from its
own origin: those answer CORS (Fetch standard §3.2) for the exact origins in
``AUTH_CORS_ORIGINS``, and nothing else does. Never with credentials: these
endpoints take a bearer token or a client id, never a cookie, so a browser sends no cookie
cross-origin and a page on another origin cannot ride the hosted pages' session. The pages,
introspection (resource servers call it, not browsers), the admin API (client_credentials,
server-side) and the operational endpoints never answer CORS.
"""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

#: Path prefixes a browser app may call cross-origin.
CORS_PATHS = (
    "/oauth2/token",
    "/oauth2/par",  # RFC 9126: a public client in the browser pushes its request
    "/oauth2/revoke",
    "/userinfo",
    "/.well-known/",
    "/api/v1/",
)


def is_cors_path(path: str) -> bool:
    return path.startswith(CORS_PATHS)


class Cors:
    """Starlette's ``CORSMiddleware`` on ``CORS_PATHS`` only; other paths pass straight by."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            # ``DPoP``: RFC 9449 proofs, sent by browser apps that hold their key in WebCrypto.
            allow_headers=["Authorization", "Content-Type", "DPoP", "X-Request-ID"],
            allow_credentials=False,
            # Readable by the app: the request id for support, RFC 6750's and RFC 9449's
            # challenges, and the nonce its next DPoP proof must carry (RFC 9449 §8).
            expose_headers=["X-Request-ID", "WWW-Authenticate", "Retry-After", "DPoP-Nonce"],
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_cors_path(scope["path"]):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
