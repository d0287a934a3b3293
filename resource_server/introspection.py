"""Online checks (RFC 7662) for an API that must see a revocation at once.

After a token passed the offline checks, ``Introspector.active`` asks the token server's
introspection endpoint whether it is still active, authenticating as the API's own client
(``client_secret_basic``, RFC 7662 §2.1). Answers are kept for ``cache_ttl`` seconds (never
past the token's ``exp``), keyed by the token's SHA-256, in a bounded cache: a revocation is
seen within ``cache_ttl``. A token server that cannot be asked is ``IntrospectionUnavailable``
(the API answers 503: it must not accept a token it was told to check and could not).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from .config import Introspection, ResourceServerConfig
from .tokens import is_numeric_date


class IntrospectionUnavailable(Exception):
    pass


class Introspector:
    def __init__(
        self,
        config: ResourceServerConfig,
        http: httpx.AsyncClient,
        endpoint: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = 10_000,
    ) -> None:
        assert config.introspection is not None
        self.settings: Introspection = config.introspection
        self.config = config
        self.http = http
        self.endpoint = endpoint
        self.clock = clock
        self.max_entries = max_entries
        #: Introspection requests made (a test counts them).
        self.requests = 0
        self._cache: OrderedDict[bytes, tuple[float, dict[str, Any] | None]] = OrderedDict()

    async def active(self, token: str) -> dict[str, Any] | None:
        """The introspection answer if the token is active (and for this API), else ``None``."""
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self.clock()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        self.requests += 1
        try:
            response = await self.http.post(
                self.endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                # RFC 6749 §2.3.1: the id and secret are form-encoded before Basic encoding
                # (the token server percent-decodes them); a no-op for unreserved ones.
                auth=(
                    quote(self.settings.client_id, safe=""),
                    quote(self.settings.client_secret, safe=""),
                ),
                headers={"accept": "application/json"},
                timeout=self.config.http_timeout,
            )
        except httpx.HTTPError as error:
            raise IntrospectionUnavailable(type(error).__name__) from None
        if response.status_code != 200:
            # 401: this API's credentials are wrong; 5xx: the server is unwell. Either way
            # nothing is known of the token.
            raise IntrospectionUnavailable(f"HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise IntrospectionUnavailable("not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise IntrospectionUnavailable("no active member")
        result = answer if answer["active"] and self._for_us(answer) else None
        ttl = self.settings.cache_ttl
        exp = answer.get("exp")
        if result is not None and is_numeric_date(exp) and exp < time.time() + ttl:
            ttl = exp - time.time()  # compared first: exp may be an int past float's range
        self._remember(digest, now + ttl, result)
        return result

    def _for_us(self, answer: dict[str, Any]) -> bool:
        """RFC 7662 §4: an active answer with an ``aud`` that does not name this API is not a
        yes for this API."""
        aud = answer.get("aud")
        if aud is None:
            return True
        audiences = [aud] if isinstance(aud, str) else aud
        return isinstance(audiences, list) and self.config.resource in audiences

    def _remember(self, digest: bytes, expiry: float, result: dict[str, Any] | None) -> None:
        cache = self._cache
        cache[digest] = (expiry, result)
        cache.move_to_end(digest)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)
