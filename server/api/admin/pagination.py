"""Keyset pagination of the admin API's lists: ``limit`` (1-200, default 50) and the opaque
``cursor`` from the previous page's ``next_cursor``, which is ``null`` on the last page."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Annotated, Any

from fastapi import Query

from ...boundary import NO_NUL, text_problem
from ..auth import ApiError

Limit = Annotated[int, Query(ge=1, le=200, description="Items per page")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, pattern=NO_NUL, description="`next_cursor` of the previous page"),
]
CURSOR_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "A cursor this listing did not make (`invalid_cursor`)"},
}


def _mac(secret_key: str, payload: str) -> str:
    mac = hmac.new(secret_key.encode(), b"cursor|" + payload.encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def sign_cursor(secret_key: str, kind: str, key: str) -> str:
    """``payload.mac``: the listing and the last key, HMAC-SHA256 signed with the secret key
    (as the CSRF tokens are, ``web.browser``), so only a cursor this server made is read."""
    raw = json.dumps([kind, key], separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{payload}.{_mac(secret_key, payload)}"


def cursor_key(secret_key: str, kind: str, cursor: str | None) -> str | None:
    """The key a cursor continues after; 400 ``invalid_cursor`` for anything we did not make
    for this listing (forged, altered, signed with another key, or another listing's)."""
    if cursor is None:
        return None
    payload, _, mac = cursor.partition(".")
    decoded: Any = None
    # As bytes: compare_digest raises TypeError on a str with non-ASCII characters.
    expected = _mac(secret_key, payload).encode()
    if mac and hmac.compare_digest(expected, mac.encode("utf-8", "surrogatepass")):
        try:
            decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error, UnicodeError):
            decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or decoded[0] != kind
        or not isinstance(decoded[1], str)
        or text_problem(decoded[1]) is not None
    ):
        raise ApiError(400, "invalid_cursor", "The cursor is not one this listing made.")
    return decoded[1]


def page(
    secret_key: str, kind: str, rows: list[Any], limit: int, key: str
) -> tuple[list[Any], str | None]:
    """``rows`` was fetched with ``limit + 1``: the extra row only says a next page exists."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, sign_cursor(secret_key, kind, getattr(rows[-1], key))
