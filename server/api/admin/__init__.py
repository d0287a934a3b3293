"""The admin API for operators' automation (/admin/v1): clients, users and signing keys, as
the CLI does.

Callers are clients, not people: a client_credentials token carrying the ``admin`` scope,
which only a client created as admin can receive (``AdminDep``). Every action, reads included,
is an audit event with ``actor_client_id`` naming that client. Lists are keyset-paginated:
``limit`` (1-200, default 50) and the opaque ``cursor`` from the previous page's
``next_cursor``, which is ``null`` on the last page.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..auth import no_store
from . import clients, keys, users
from .pagination import sign_cursor as _cursor  # tests forge cursors with it

__all__ = ["ERRORS", "_cursor", "router"]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No token, or an invalid, expired or revoked one (`invalid_token`)"},
    403: {"description": "Not a client token with the `admin` scope (`insufficient_scope`)"},
}
router = APIRouter(
    prefix="/admin/v1", tags=["admin"], dependencies=[Depends(no_store)], responses=ERRORS
)
# In this order: the paths (and the OpenAPI schema) list clients, then users, then keys.
router.include_router(clients.router)
router.include_router(users.router)
router.include_router(keys.router)
