"""What the grants and endpoints use of the authorization server of a request.

A ``Protocol``, so that ``grants.py`` and ``endpoints.py`` type against it instead of
importing ``server.py``, which imports them: the modules of ``server/oauth/`` depend one way
(server → endpoints → grants → context).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from authlib.oauth2.rfc6749 import OAuth2Request
    from sqlalchemy.orm import Session

    from ..config import Settings
    from ..deps import AppState
    from ..models import User
    from ..passwords import Verification


class OAuthServer(Protocol):
    state: AppState
    settings: Settings
    db: Session
    #: One clock reading per request: every expiry decision within it agrees.
    now: int

    def find_user(self, username: str) -> User | None: ...

    def verify_password(self, user: User | None, password: str) -> Verification: ...

    def rehash(self, user: User, password: str) -> None: ...

    def issue(
        self, request: OAuth2Request, *, scope: str, nonce: str | None = None
    ) -> dict[str, Any]: ...

    def start_family(
        self,
        request: OAuth2Request,
        *,
        scope: str,
        auth_time: int,
        resources: str = "",
        browser_session_id: str | None = None,
    ) -> None: ...
