"""What a request handler needs, built once per app and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .clients import ClientCache
from .config import Settings
from .db import Database
from .fetch import Fetcher
from .keys import KeySource
from .passwords import Passwords
from .ratelimit import Limiter


@dataclass
class AppState:
    settings: Settings
    db: Database
    keys: KeySource
    passwords: Passwords
    limiter: Limiter
    clients: ClientCache
    #: Client metadata documents and ``jwks_uri`` (server/fetch.py): SSRF-safe, cached.
    fetcher: Fetcher


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain ``def`` dependency on a worker thread, a thread hop per request.
    state: AppState = request.app.state.auth
    return state


StateDep = Annotated[AppState, Depends(get_state)]
