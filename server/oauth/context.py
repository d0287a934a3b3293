"""What the grants and endpoints use of the authorization server (built once per app).

A ``Protocol``, so that ``grants/`` and ``endpoints.py`` type against it instead of importing
``server.py``, which imports them: the modules of ``server/oauth/`` depend one way
(server → endpoints → grants → store, context).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from authlib.oauth2.rfc6749 import OAuth2Request

    from ..config import Settings
    from ..deps import AppState
    from ..models import User
    from ..passwords import Verification
    from .store import Family


class OAuthServer(Protocol):
    state: AppState
    settings: Settings

    def find_user(self, request: OAuth2Request, username: str) -> User | None: ...

    def verify_password(
        self, request: OAuth2Request, user: User | None, password: str
    ) -> Verification: ...

    def rehash(self, request: OAuth2Request, user: User, password: str) -> None: ...

    def issue(
        self,
        request: OAuth2Request,
        *,
        scope: str,
        nonce: str | None = None,
        refresh_token: str | None = None,
    ) -> dict[str, Any]: ...

    def successor(self, presented: str, scope: str, resources: list[str]) -> str: ...

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None: ...

    def save_rotation(self, request: OAuth2Request, refresh_token: str) -> bool: ...

    def start_family(
        self,
        request: OAuth2Request,
        *,
        scope: str,
        auth_time: int,
        amr: str = "",
        resources: str = "",
        browser_session_id: str | None = None,
    ) -> Family: ...
