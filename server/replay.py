"""Single use across replicas: "has this value been seen before?" for assertion ``jti`` values
(RFC 7523 §3 item 7) and, later, DPoP proofs (RFC 9449 §11.1).

The answer lives in the rate-limit storage (``AUTH_RATE_LIMIT_STORAGE``): in-process memory by
default, Redis (with its key prefix) when replicas share one, so a value used on one replica is
refused on every other. ``incr`` is atomic in both: of any number of simultaneous uses exactly
one sees 1. A value is remembered only as long as it could still be accepted (its ``ttl``:
until the assertion or proof expires), so the storage holds no more than the live ones.

An error of the storage propagates: a replay check that cannot be made fails the request
rather than letting a possible replay through.
"""

from __future__ import annotations

import hashlib
import math

from limits.aio.storage import Storage

#: Keys are ``replay/<namespace>/<sha256 of the value>``: bounded in length whatever was sent.
PREFIX = "replay"


class ReplayGuard:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def first_use(self, namespace: str, value: str, ttl: float) -> bool:
        """True exactly once per (``namespace``, ``value``) within ``ttl`` seconds (at least
        one: a value is always remembered for some time)."""
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        key = f"{PREFIX}/{namespace}/{digest}"
        count = await self.storage.incr(key, max(1, math.ceil(ttl)))
        return count == 1
