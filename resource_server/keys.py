"""The token server's signing keys, found through discovery and cached.

- **Discovery** (RFC 8414 §3, OIDC Discovery §4): the document at the issuer's well-known URL
  names ``jwks_uri``; its ``issuer`` must be exactly the configured one (RFC 8414 §3.3).
- **HTTP caching** (RFC 9111): a JWK Set is fresh for its ``Cache-Control: max-age`` (clamped
  to [``jwks_refetch_interval``, 1 day]; no ``max-age``: 5 minutes) and then revalidated with
  ``If-None-Match`` when it carried an ``ETag`` (a 304 keeps the keys).
- **An unknown ``kid``** (a key rotated in) refetches the set, at most once per
  ``jwks_refetch_interval`` whatever the number of tokens that name unknown keys: forged
  tokens cannot make the API hammer the token server. Concurrent requests share one fetch.
- **Last known good**: when the token server cannot be reached, or answers nonsense, the keys
  it last published stay in use for ``jwks_max_stale`` seconds after the last good fetch; a
  failed fetch is retried no more than once per ``RETRY_INTERVAL``, and a request waits at
  most ``STALE_WAIT`` for the revalidation of a stale set. Without any good set,
  ``KeysUnavailable`` (the API answers 503, not 401: the token may well be good).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key

from .config import ResourceServerConfig

#: Seconds a JWK Set stays fresh without ``Cache-Control: max-age``, and the longest honoured.
DEFAULT_TTL = 300.0
MAX_TTL = 86_400.0
#: A failed fetch is not retried sooner than this (seconds).
RETRY_INTERVAL = 2.0
#: How long a request waits for the revalidation of a stale set before it goes on with the
#: last good keys (seconds).
STALE_WAIT = 0.25
#: Bodies larger than this are refused (a JWK Set of a dozen RSA keys is about 6 KiB).
MAX_DOCUMENT_BYTES = 256 * 1024
PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
logger = logging.getLogger("resource_server")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


class KeysUnavailable(Exception):
    """No usable keys: the token server has not been reached, or not for too long."""


class _FetchFailed(Exception):
    pass


class KeyCache:
    def __init__(
        self,
        config: ResourceServerConfig,
        http: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.http = http
        self.clock = clock
        #: JWK Set requests made (a test counts them).
        self.fetches = 0
        self._keys: dict[str, Key] = {}
        self._metadata: dict[str, Any] | None = None
        self._etag: str | None = None
        self._fresh_until = -math.inf
        self._good_until = -math.inf  # last good fetch + jwks_max_stale
        self._last_attempt = -math.inf
        self._last_failure = -math.inf
        self._generation = 0  # bumped by each attempt: waiters need not fetch again
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> Key | None:
        """The published key named ``kid``; ``None`` when the token server does not publish
        it (after at most one refetch per interval). ``KeysUnavailable`` without good keys."""
        if self.clock() >= self._fresh_until:
            await self._revalidate()
        key = self._keys.get(kid)
        if key is None and self.clock() - self._last_attempt >= self.config.jwks_refetch_interval:
            await self._refresh(stale=False)
            key = self._keys.get(kid)
        if self.clock() >= self._good_until:
            raise KeysUnavailable("no JWK Set from the token server")
        return key

    async def metadata(self) -> dict[str, Any]:
        """The token server's discovery document (fetched once, then kept)."""
        if self._metadata is None:
            async with self._lock:
                if self._metadata is None:
                    try:
                        self._metadata = await self._discover()
                    except _FetchFailed as error:
                        raise KeysUnavailable(str(error)) from None
        return self._metadata

    async def _revalidate(self) -> None:
        """A stale set is fetched again; with good keys in hand a request waits at most
        ``STALE_WAIT`` for it and then goes on with them (stale-while-revalidate, RFC 5861
        §3), so a token server that hangs does not hold every request for ``http_timeout``."""
        if self.clock() >= self._good_until:
            await self._refresh(stale=True)  # nothing to serve meanwhile
            return
        task = self._background
        if task is None or task.done():
            task = self._background = asyncio.create_task(self._refresh(stale=True))
            task.add_done_callback(_retrieve)
        # On timeout the fetch goes on; its outcome serves the next requests.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), STALE_WAIT)

    async def aclose(self) -> None:
        """Stop a revalidation still running (before the HTTP client is closed)."""
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh(self, *, stale: bool) -> None:
        generation = self._generation
        async with self._lock:
            if self._generation != generation:
                return  # another request fetched while this one waited
            now = self.clock()
            if stale and now < self._fresh_until:
                return
            if not stale and now - self._last_attempt < self.config.jwks_refetch_interval:
                return
            if now - self._last_failure < RETRY_INTERVAL:
                return
            self._generation += 1
            self._last_attempt = now
            try:
                await self._fetch()
            except _FetchFailed as error:
                # What an operator needs to see (at most once per RETRY_INTERVAL): a wrong
                # issuer, an unreachable server. Never a token.
                state = "keeping the last good keys" if self._keys else "no keys yet"
                logger.warning("token server keys: %s (%s)", error, state)
                self._last_failure = self.clock()
                # Keep the last good keys; look again after RETRY_INTERVAL, not at every request.
                self._fresh_until = self._last_failure + RETRY_INTERVAL

    async def _fetch(self) -> None:
        if self._metadata is None:
            self._metadata = await self._discover()
        headers = {"accept": "application/json"}
        if self._etag and self._keys:
            headers["if-none-match"] = self._etag
        self.fetches += 1
        response, body = await self._get(self._metadata["jwks_uri"], headers)
        now = self.clock()
        if response.status_code == 304 and self._keys:
            self._accept(response, now)
            return
        if response.status_code != 200:
            raise _FetchFailed(f"JWK Set: HTTP {response.status_code}")
        keys = _parse_jwks(body)
        if not keys:
            raise _FetchFailed("JWK Set: no usable signing key")
        self._keys = keys
        self._etag = response.headers.get("etag")
        self._accept(response, now)

    def _accept(self, response: httpx.Response, now: float) -> None:
        ttl = _max_age(response.headers.get("cache-control"))
        self._fresh_until = now + min(max(ttl, self.config.jwks_refetch_interval), MAX_TTL)
        self._good_until = now + self.config.jwks_max_stale

    async def _discover(self) -> dict[str, Any]:
        issuer = self.config.issuer.rstrip("/")
        split = issuer.split("/", 3)
        origin, path = "/".join(split[:3]), ("/" + split[3] if len(split) > 3 else "")
        # RFC 8414 §3.1 (the suffix before the issuer's path), then OIDC Discovery §4 (after).
        last = "discovery: nothing found"
        for url in (
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{issuer}/.well-known/openid-configuration",
        ):
            response, body = await self._get(url, {"accept": "application/json"})
            if response.status_code != 200:
                last = f"discovery: HTTP {response.status_code}"
                continue
            document = _json_object(body)
            if document.get("issuer") != self.config.issuer:
                raise _FetchFailed("discovery: the document names another issuer")
            if not isinstance(document.get("jwks_uri"), str):
                raise _FetchFailed("discovery: no jwks_uri")
            return document
        raise _FetchFailed(last)

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[httpx.Response, bytes]:
        try:
            async with self.http.stream(
                "GET", url, headers=headers, timeout=self.config.http_timeout
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_DOCUMENT_BYTES:
                        raise _FetchFailed(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
                    chunks.append(chunk)
                return response, b"".join(chunks)
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            # InvalidURL is not an HTTPError: a discovery document's unparseable jwks_uri
            # (RFC 8414 §2) must be a failed fetch (last known good, 503), not an exception.
            raise _FetchFailed(f"{url}: {type(error).__name__}") from None


def _retrieve(task: asyncio.Task[None]) -> None:
    """A revalidation nobody awaited any more: its error (a bug; fetch failures are caught)
    is retrieved, so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _max_age(cache_control: str | None) -> float:
    if not cache_control:
        return DEFAULT_TTL
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else DEFAULT_TTL


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _FetchFailed("not JSON") from None
    if not isinstance(document, dict):
        raise _FetchFailed("not a JSON object")
    return document


def _parse_jwks(body: bytes) -> dict[str, Key]:
    """The public signing keys with a ``kid`` (others are skipped, one by one: a key of a type
    this library does not know must not hide the rest)."""
    document = _json_object(body)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise _FetchFailed("JWK Set: no keys array")
    keys: dict[str, Key] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            continue
        if entry.get("kty") not in PUBLIC_KEY_TYPES or PRIVATE_MEMBERS & set(entry):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            keys[kid] = JWKRegistry.import_key(entry)
        except (JoseError, ValueError, TypeError, KeyError):
            continue
    return keys
