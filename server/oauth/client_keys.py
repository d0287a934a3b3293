"""The public keys of a ``private_key_jwt`` client (RFC 7523 §2.2, OpenID Connect Core §9), as a
joserfc ``KeySet``: from its registered ``jwks``, or fetched from its ``jwks_uri``.

Registered keys are parsed once per client row (and again only when the row's ``jwks`` text
changes). A ``jwks_uri`` is read through ``fetch(url, refresh)``, which the app supplies: the
SSRF-safe, size- and time-limited, caching fetcher; ``refresh=True`` asks it to read the
document again (it does so at most once per interval). When an assertion names a ``kid`` the
set does not hold, the set is fetched once more with ``refresh=True``: the client may have
rotated its keys since the cached copy was read (OpenID Connect Core §10.1.1).

Every key set, registered or fetched, passes ``client_metadata.check_jwks``: public signing
keys only, never a symmetric key (which could otherwise key an HMAC).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from joserfc.jwk import KeySet

from ..client_metadata import MetadataError, check_jwks
from ..fetch import FetchError
from ..models import Client
from ..observability import log

#: ``fetch(url, refresh)``: the JSON document at ``url``; raises when it cannot be had.
Fetch = Callable[[str, bool], Awaitable[Any]]
#: Parsed registered key sets kept (least recently used dropped first).
MAX_CACHED = 1024


class KeysUnavailable(Exception):
    """The client's keys cannot be had: its ``jwks_uri`` failed, or a key set is unusable."""


def _keyset(data: Any) -> KeySet:
    try:
        return KeySet.import_key_set(check_jwks(data))  # type: ignore[arg-type]
    except MetadataError as error:
        raise KeysUnavailable(error.description) from None


class ClientKeys:
    def __init__(self, fetch: Fetch, *, max_cached: int = MAX_CACHED) -> None:
        self.fetch = fetch
        self.max_cached = max_cached
        #: client id → (its ``jwks`` text, the parsed set).
        self._registered: OrderedDict[str, tuple[str, KeySet]] = OrderedDict()
        #: jwks_uri → (the document the fetcher returned, the parsed set): the fetcher serves
        #: its cached document as the same object, which is then not parsed again.
        self._fetched: OrderedDict[str, tuple[Any, KeySet]] = OrderedDict()

    async def keyset(self, client: Client, *, kid: str | None = None) -> KeySet:
        """The client's keys; ``kid``: the key an assertion names, looked for once more in a
        refetched ``jwks_uri`` document when the cached one lacks it."""
        if client.jwks is not None:
            return self._registered_keys(client.client_id, client.jwks)
        if client.jwks_uri is None:
            raise KeysUnavailable("the client has neither jwks nor jwks_uri")
        keys = await self._fetched_keys(client.jwks_uri, refresh=False)
        if kid is not None and not any(key.kid == kid for key in keys):
            keys = await self._fetched_keys(client.jwks_uri, refresh=True)
        return keys

    def _registered_keys(self, client_id: str, text: str) -> KeySet:
        entry = self._registered.get(client_id)
        if entry is not None and entry[0] == text:
            self._registered.move_to_end(client_id)
            return entry[1]
        try:
            data = json.loads(text)
        except ValueError:
            raise KeysUnavailable("the registered jwks is not JSON") from None
        keys = _keyset(data)
        self._remember(self._registered, client_id, (text, keys))
        return keys

    async def _fetched_keys(self, url: str, *, refresh: bool) -> KeySet:
        try:
            data = await self.fetch(url, refresh)
        except FetchError as error:
            # The client's keys are unavailable: its authentication fails, never the server.
            log.warning("client_keys.fetch_failed", jwks_uri=url, reason=error.reason)
            raise KeysUnavailable("jwks_uri could not be fetched") from error
        entry = self._fetched.get(url)
        if entry is not None and entry[0] is data:
            self._fetched.move_to_end(url)
            return entry[1]
        keys = _keyset(data)
        self._remember(self._fetched, url, (data, keys))
        return keys

    def _remember(self, cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.max_cached:
            cache.popitem(last=False)
