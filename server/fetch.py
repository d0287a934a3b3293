"""Fetching a JSON document a client names: its metadata document (a ``client_id`` that is an
https URL, draft-ietf-oauth-client-id-metadata-document) or its ``jwks_uri`` (RFC 7591 §2).

The URL comes from whoever sends a request, so every fetch is treated as an attempt to reach
this server's own network (server-side request forgery, OWASP ASVS 4.0 V12.6):

- https only in production (``check_fetch_url``); plain http outside production (test servers).
- The host is resolved here, and the fetch is refused if *any* address it resolves to is
  private, loopback, link-local (169.254.169.254, the cloud metadata service), multicast,
  reserved, unspecified or otherwise not global, also when wrapped in IPv4-mapped, 6to4,
  Teredo or NAT64 form. Loopback is allowed only with ``AUTH_CLIENT_FETCH_ALLOW_LOOPBACK``
  (tests; production refuses the setting). The connection then goes to the checked address,
  never to the name again (a second lookup could answer differently: DNS rebinding), with the
  name in ``Host`` and as the TLS server name, so the certificate is still verified for it.
- No redirects (a 3xx is refused: its target would escape the checks above), only 200 (and 304
  to a revalidation), a JSON ``Content-Type``, at most ``AUTH_CLIENT_FETCH_MAX_BYTES`` (more is
  refused, never truncated), the whole fetch (lookup, connect, headers, body) within
  ``AUTH_CLIENT_FETCH_TIMEOUT``. No proxy from the environment, no connection reuse (a pooled
  connection is keyed by address, so it could carry another name's request past its TLS check).

Caching (RFC 9111, as a private cache): a document is fresh for its ``Cache-Control: max-age``
(less its ``Age``), held between ``AUTH_CLIENT_FETCH_MIN_TTL`` and ``AUTH_CLIENT_FETCH_TTL``;
without ``max-age``, for ``AUTH_CLIENT_FETCH_TTL``. ``no-cache`` and ``no-store`` make it
``AUTH_CLIENT_FETCH_MIN_TTL``: the remote is asked again, but never more often than that, since
anyone can make this server look a client up (and ``no-store`` is kept in memory only). A stale
document with an ``ETag`` is revalidated with ``If-None-Match``; a 304 keeps the body. A
failure is remembered for ``AUTH_CLIENT_FETCH_MIN_TTL`` too, so a dead or slow URL costs one
fetch per that interval, not one per request. Concurrent gets of one URL share one fetch.

Last known good: when a refetch fails *transiently* (no answer, a timeout, a 5xx or 429), the
last good body is served for up to ``AUTH_CLIENT_FETCH_TTL`` past its freshness (RFC 9111
§4.2.4 permits a cache configured so; RFC 5861 ``stale-if-error``), so a client does not vanish
while its host restarts. A definitive answer (a 4xx, a redirect, a body that is not JSON, an
address that is now refused) ends it at once: that is how a client is taken down or a key
withdrawn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .client_metadata import MetadataError, check_fetch_url
from .config import Env, Settings
from .observability import log

#: Host, port → the addresses it resolves to (strings). Injectable for tests.
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: URLs whose document (or failure) is remembered; the least recently used goes first.
MAX_ENTRIES = 1000
#: RFC 6052 §2.1: the well-known NAT64 prefix, whose last 32 bits are the IPv4 address reached
#: (DNS64 answers with it on IPv6-only networks). The local-use prefix (RFC 8215) embeds it in
#: ways a network chooses: it is judged as the IPv6 address it is.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: What a URL-shaped problem or a log line quotes of a URL at most.
QUOTED = 200


class FetchError(Exception):
    """Why a document could not be had, in one line that never quotes its body.

    ``transient``: the remote did not answer or failed (a timeout, a refused connection, a
    5xx): the last good copy may be served a while. Otherwise the answer was definitive."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


async def system_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why this server must not connect to ``address`` (a few words), or None if it may."""
    if isinstance(address, ipaddress.IPv6Address):
        # Forms that carry an IPv4 address the packets end up at: judge that one.
        embedded: list[IPAddress] = []
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        translated = address.ipv4_mapped is not None or address in NAT64
        if address in NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        for inner in embedded:
            problem = address_problem(inner, allow_loopback=allow_loopback)
            if problem is not None:
                return problem
        if translated:
            return None  # the prefix is "reserved" itself; the IPv4 address was fine
    if address.is_loopback:
        return None if allow_loopback else "loopback"
    for problem, flag in (
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return problem
    if not address.is_global:
        return "non-global"  # e.g. 100.64.0.0/10, carrier-grade NAT (RFC 6598)
    return None


@dataclass
class _Entry:
    """One URL's last outcome: a body, or the reason it failed (``error``)."""

    body: Any
    error: str | None
    etag: str | None
    #: Seconds the body is fresh for after a check (its ``max-age``, clamped).
    lifetime: float
    #: When the remote was last asked (monotonic).
    checked: float
    #: Served without asking the remote until then.
    fresh_until: float
    #: Until when the body may be served after a transient failure.
    good_until: float


@dataclass(frozen=True)
class _Answer:
    body: Any
    etag: str | None
    lifetime: float | None  # None: the 304 did not say; keep what was known
    not_modified: bool = False


def _cache_directives(headers: httpx.Headers) -> dict[str, str]:
    directives: dict[str, str] = {}
    for value in headers.get_list("cache-control", split_commas=True):
        name, _, argument = value.strip().partition("=")
        directives.setdefault(name.strip().lower(), argument.strip().strip('"'))
    return directives


def _json_media_type(value: str | None) -> bool:
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class Fetcher:
    """One per app (``AppState.fetcher``), built from the settings; ``aclose`` on shutdown."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.max_entries = max_entries
        # Loopback only where the setting is on and never in production (which also refuses
        # to start with it, Settings.insecure_reasons).
        self.allow_loopback = (
            settings.client_fetch_allow_loopback and settings.env is not Env.production
        )
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._http = httpx.AsyncClient(
            verify=verify,
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(settings.client_fetch_timeout),
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"Accept": "application/json", "User-Agent": "token-server"},
        )

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._http.aclose()

    def answers_from_cache(self, url: str) -> bool:
        """Whether ``get_json(url)`` would answer now without asking the remote."""
        entry = self._entries.get(url)
        return entry is not None and self.clock() < entry.fresh_until

    async def get_json(self, url: str, *, refresh: bool = False) -> Any:
        """The JSON document at ``url``, from the cache while it is fresh. ``refresh``: ask the
        remote even so (an unknown ``kid`` in a ``jwks_uri`` client's assertion), but at most
        once per ``AUTH_CLIENT_FETCH_MIN_TTL``. Raises ``FetchError``."""
        entry = self._entries.get(url)
        if entry is not None:
            self._entries.move_to_end(url)
            now = self.clock()
            if entry.error is not None:
                if now < entry.fresh_until:
                    raise FetchError(entry.error)
            elif now < (
                entry.checked + self.settings.client_fetch_min_ttl if refresh else entry.fresh_until
            ):
                return entry.body
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.create_task(self._refetch(url))
            self._inflight[url] = task
            task.add_done_callback(lambda done: self._settled(url, done))
        # Shielded: a caller that gives up (its request was cancelled) does not cancel the
        # fetch the others are waiting for.
        return await asyncio.shield(task)

    def _settled(self, url: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(url) is task:
            del self._inflight[url]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    def _store(self, url: str, entry: _Entry) -> None:
        self._entries[url] = entry
        self._entries.move_to_end(url)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def _refetch(self, url: str) -> Any:
        settings = self.settings
        old = self._entries.get(url)
        good = old if old is not None and old.error is None else None
        try:
            try:
                async with asyncio.timeout(settings.client_fetch_timeout):
                    answer = await self._fetch(url, good.etag if good is not None else None)
            except TimeoutError:
                raise FetchError(
                    f"no complete answer within {settings.client_fetch_timeout:g} s",
                    transient=True,
                ) from None
        except FetchError as error:
            now = self.clock()
            if error.transient and good is not None and now < good.good_until:
                # Last known good (module docstring): asked again after the minimum interval.
                log.warning("fetch.stale_served", url=url[:QUOTED], reason=error.reason)
                good.checked = now
                good.fresh_until = now + settings.client_fetch_min_ttl
                return good.body
            remembered = now + settings.client_fetch_min_ttl
            self._store(url, _Entry(None, error.reason, None, 0, now, remembered, now))
            raise
        now = self.clock()
        if answer.not_modified:
            assert good is not None  # a 304 is accepted only to our If-None-Match
            lifetime = good.lifetime if answer.lifetime is None else answer.lifetime
            body, etag = good.body, answer.etag or good.etag
        else:
            lifetime = settings.client_fetch_ttl if answer.lifetime is None else answer.lifetime
            lifetime = max(settings.client_fetch_min_ttl, lifetime)
            body, etag = answer.body, answer.etag
        fresh_until = now + lifetime
        good_until = fresh_until + settings.client_fetch_ttl
        self._store(url, _Entry(body, None, etag, lifetime, now, fresh_until, good_until))
        return body

    def _lifetime(self, headers: httpx.Headers) -> float | None:
        """RFC 9111 §4.2.1: the freshness lifetime the response gives, clamped; None when it
        gives none (no ``Cache-Control`` member this cache reads)."""
        settings = self.settings
        directives = _cache_directives(headers)
        if "no-store" in directives or "no-cache" in directives:
            return float(settings.client_fetch_min_ttl)
        max_age = directives.get("max-age", "")
        if not max_age.isascii() or not max_age.isdigit():
            return None
        age = headers.get("age", "")
        current_age = int(age) if age.isascii() and age.isdigit() else 0  # RFC 9111 §4.2.3
        lifetime = min(int(max_age) - current_age, settings.client_fetch_ttl)
        return float(max(settings.client_fetch_min_ttl, lifetime))

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            found = await self.resolver(host, port)
        except (OSError, UnicodeError):
            raise FetchError(f"{host[:QUOTED]} does not resolve", transient=True) from None
        addresses: list[IPAddress] = []
        for each in found:
            try:
                addresses.append(ipaddress.ip_address(each))
            except ValueError:
                raise FetchError(f"{host[:QUOTED]} resolves to something not an address") from None
        if not addresses:
            raise FetchError(f"{host[:QUOTED]} does not resolve", transient=True)
        return addresses

    async def _fetch(self, url: str, etag: str | None) -> _Answer:
        settings = self.settings
        try:
            check_fetch_url(url, settings, "the URL")
            target = httpx.URL(url)
            host = target.raw_host.decode("ascii")
            port = target.port or (443 if target.scheme == "https" else 80)
            if not 0 < port < 65536:
                raise ValueError(port)
        except (MetadataError, httpx.InvalidURL, UnicodeError, ValueError):
            raise FetchError("the URL must be an absolute https URL without a fragment") from None
        addresses = await self._addresses(host, port)
        for address in addresses:
            # Every address, not only the one connected to: the name's owner chooses the
            # order, and a lookup elsewhere may pick another.
            problem = address_problem(address, allow_loopback=self.allow_loopback)
            if problem is not None:
                raise FetchError(
                    f"{host[:QUOTED]} resolves to an address that is not fetched ({problem})"
                )
        headers = {"Host": target.netloc.decode("ascii")}
        if etag is not None:
            headers["If-None-Match"] = etag
        request = self._http.build_request(
            "GET",
            target.copy_with(host=str(addresses[0])),
            headers=headers,
            # TLS: the name as the server name (SNI) and for the certificate check.
            extensions={"sni_hostname": host},
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as error:
            raise FetchError(f"no answer ({type(error).__name__})", transient=True) from None
        try:
            return await self._read(response, etag)
        except httpx.HTTPError as error:
            raise FetchError(
                f"the answer broke off ({type(error).__name__})", transient=True
            ) from None
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response, etag: str | None) -> _Answer:
        status = response.status_code
        if status == 304 and etag is not None:
            return _Answer(
                None, response.headers.get("etag"), self._lifetime(response.headers), True
            )
        if 300 <= status < 400:
            raise FetchError(f"answered {status}, a redirect, which is not followed")
        if status != 200:
            raise FetchError(f"answered {status}", transient=status >= 500 or status == 429)
        if not _json_media_type(response.headers.get("content-type")):
            raise FetchError("answered with a Content-Type other than JSON")
        limit = self.settings.client_fetch_max_bytes
        length = response.headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > limit:
            raise FetchError(f"the document is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)  # decoded bytes: a compressed bomb is cut off too
            if size > limit:
                raise FetchError(f"the document is larger than {limit} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise FetchError("the document is not valid JSON in UTF-8") from None
        return _Answer(body, response.headers.get("etag"), self._lifetime(response.headers))


def _no_constant(name: str) -> Any:
    # RFC 8259 §6: NaN and Infinity are not JSON.
    raise ValueError(name)
