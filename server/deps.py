"""What a request handler needs, built once per app and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .config import Settings
from .keys import KeyStore
from .passwords import Passwords
from .ratelimit import Limiter


@dataclass
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    keys: KeyStore
    passwords: Passwords
    limiter: Limiter


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.auth
    return state


StateDep = Annotated[AppState, Depends(get_state)]
