"""Rate limits and brute-force throttling, on the ``limits`` library.

Two mechanisms, one storage (``AUTH_RATE_LIMIT_STORAGE``: in-process memory by default,
Redis to share counts between replicas):

- **Rate limits** count *requests*, per client IP, per client and per account, on the token
  endpoint (every grant), on the sign-in and sign-up pages, and the authorization codes
  issued per browser session. Over a limit: 429 with ``Retry-After``.
- **Throttling** counts *failed passwords*, per (account, IP) with tight tiers and per
  account with looser ones. While any tier is exhausted every attempt for that account, the
  correct password included, gets the ordinary "invalid credentials" answer: the throttle
  reveals nothing, and unknown usernames are throttled exactly the same way. Tiers of
  growing windows (a minute, then an hour) make the delays grow with persistence; because an
  attacker from one address exhausts the (account, IP) tiers long before the account's own,
  they cannot lock the owner (at another address) out.

Client IPs come from ``client_ip``: forwarding headers are believed only from
``AUTH_TRUSTED_PROXIES``.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.requests import Request

from .config import Settings

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _async_url(url: str) -> str:
    return url if url.startswith("async+") else "async+" + url


def _storage(settings: Settings) -> Storage:
    """The storage of ``AUTH_RATE_LIMIT_STORAGE``; Redis (and Valkey) keys start with
    ``AUTH_RATE_LIMIT_PREFIX``, so deployments sharing one server never share counts."""
    url = _async_url(settings.rate_limit_storage)
    scheme = url.partition("://")[0]
    shared = "redis" in scheme or "valkey" in scheme
    store = storage_from_string(
        url, **({"key_prefix": settings.rate_limit_prefix} if shared else {})
    )
    assert isinstance(store, Storage)
    return store


@dataclass
class Verdict:
    allowed: bool
    retry_after: int = 0
    #: The scope of the exhausted limit (e.g. "token-ip").
    scope: str = ""


class Limiter:
    """The limits of SPEC.md (Security behaviour), checked against one shared storage."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.enabled = settings.rate_limits_enabled
        store = storage or _storage(settings)
        self.storage = store
        self.strategy = MovingWindowRateLimiter(store)
        self.token_ip = parse_many(settings.rate_limit_token_ip)
        self.token_client = parse_many(settings.rate_limit_token_client)
        self.token_account = parse_many(settings.rate_limit_token_account)
        self.login_ip = parse_many(settings.rate_limit_login_ip)
        self.login_account = parse_many(settings.rate_limit_login_account)
        self.authorize_session = parse_many(settings.rate_limit_authorize)
        #: Dynamic client registrations (RFC 7591) per client IP.
        self.registration_ip = parse_many(settings.rate_limit_registration_ip)
        self.failures_account_ip = parse_many(settings.throttle_account_ip)
        self.failures_account = parse_many(settings.throttle_account)
        self.failures_second_factor = parse_many(settings.throttle_second_factor)
        self.proxies: list[IpNetwork] = [
            ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies
        ]

    def close(self) -> None:
        """Drop the connections of a Redis storage (memory storage has none)."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    # -- request rate -------------------------------------------------------------------

    async def hit(self, checks: list[tuple[list[RateLimitItem], str, str]]) -> Verdict:
        """Count one request against each (limits, scope, key), in one pass: the moving
        window's ``hit`` only counts a request that fits, and reports whether it did."""
        if not self.enabled:
            return Verdict(True)
        for items, scope, key in checks:
            for item in items:
                if not await self.strategy.hit(item, scope, key):
                    return Verdict(False, await self._retry_after(item, scope, key), scope)
        return Verdict(True)

    async def check(self, checks: list[tuple[list[RateLimitItem], str, str]]) -> Verdict:
        """Whether one more request fits every (limits, scope, key); counts nothing."""
        if not self.enabled:
            return Verdict(True)
        for items, scope, key in checks:
            for item in items:
                if not await self.strategy.test(item, scope, key):
                    return Verdict(False, await self._retry_after(item, scope, key), scope)
        return Verdict(True)

    async def count(self, checks: list[tuple[list[RateLimitItem], str, str]]) -> None:
        if not self.enabled:
            return
        for items, scope, key in checks:
            for item in items:
                await self.strategy.hit(item, scope, key)

    async def _retry_after(self, item: RateLimitItem, *identifiers: str) -> int:
        stats = await self.strategy.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))

    # -- failed passwords ---------------------------------------------------------------

    def _failure_checks(
        self, account: str, ip: str, second_factor: bool
    ) -> list[tuple[list[RateLimitItem], str, str]]:
        checks = [
            (self.failures_account_ip, "failures", f"{account}\x00{ip}"),
            (self.failures_account, "failures", account),
        ]
        if second_factor:
            checks.append((self.failures_second_factor, "second-factor-failures", account))
        return checks

    def _failures(
        self, account: str, ip: str, second_factor: bool
    ) -> list[tuple[list[RateLimitItem], str, str]]:
        """The checks that apply: all of them, or with limits off (``AUTH_RATE_LIMITS_ENABLED``:
        benchmarks, trusted use) only the second-factor cap, which stays: without it a
        six-digit code falls to an online guesser."""
        checks = self._failure_checks(account, ip, second_factor)
        return checks if self.enabled else [c for c in checks if c[1] == "second-factor-failures"]

    async def throttled(self, account: str, ip: str, *, second_factor: bool = False) -> bool:
        """Whether password attempts (``second_factor``: second-factor attempts, which also
        have their own cap) for ``account`` from ``ip`` must be refused unchecked."""
        for items, scope, key in self._failures(account, ip, second_factor):
            for item in items:
                if not await self.strategy.test(item, scope, key):
                    return True
        return False

    async def failed(self, account: str, ip: str, *, second_factor: bool = False) -> None:
        for items, scope, key in self._failures(account, ip, second_factor):
            for item in items:
                await self.strategy.hit(item, scope, key)

    # -- the client's address -------------------------------------------------------------

    def client_ip(self, request: Request) -> str:
        """The address of the client: the TCP peer, unless the peer is a trusted proxy.

        Behind trusted proxies, walk ``X-Forwarded-For`` (or RFC 7239 ``Forwarded``) from the
        right, skipping trusted hops: the first untrusted address is the client. Anything a
        client writes into the header beyond that is ignored, so rotating it escapes nothing.
        """
        peer = request.client.host if request.client else "unknown"
        if not self._trusted(peer):
            return peer
        hops = _forwarded_for(request)
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)


def _forwarded_for(request: Request) -> list[str]:
    forwarded = request.headers.get("forwarded")
    if forwarded:
        hops: list[str] = []
        for element in forwarded.split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    hops.append(_strip_forwarded_node(value.strip().strip('"')))
        return [h for h in hops if h]
    header = request.headers.get("x-forwarded-for", "")
    return [part.strip() for part in header.split(",") if part.strip()]


def _strip_forwarded_node(node: str) -> str:
    # RFC 7239 §6: "[2001:db8::1]:4711" or "192.0.2.1:80".
    if node.startswith("["):
        return node[1:].split("]", 1)[0]
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node
