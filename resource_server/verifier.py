"""One request's credentials → a verified token, or the ``TokenError`` to answer with.

The order follows the request's own: the ``Authorization`` header (``challenges``), the JWT
(``tokens``, keys from ``keys``), the binding (RFC 9449 §7: a token with ``cnf.jkt`` only with
the ``DPoP`` scheme and a proof of that key, ``dpop``; a token without it only as ``Bearer``),
then, when configured, introspection (``introspection``) for an API that must see a revocation
at once. Each refusal challenges in the scheme the token needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from . import errors
from .challenges import parse_authorization
from .config import ResourceServerConfig
from .dpop import ReplayCache, verify_proof
from .errors import BEARER, DPOP, TokenError
from .introspection import IntrospectionUnavailable, Introspector
from .keys import KeyCache, KeysUnavailable
from .metadata import metadata_url
from .tokens import scopes_of, verify_access_token

logger = logging.getLogger("resource_server")
#: How long a client is asked to wait when the token server cannot be reached (seconds).
RETRY_AFTER = 5


def unavailable(description: str) -> TokenError:
    """503: nothing could be checked (no keys yet, introspection down). Not the client's
    fault, so no challenge: ``challenges`` sends none for it."""
    return TokenError("temporarily_unavailable", description, 503, None)


@dataclass(frozen=True)
class VerifiedToken:
    """What a handler needs of a token that passed: its claims, and the usual ones named."""

    claims: dict[str, Any]
    scopes: frozenset[str]
    client_id: str
    subject: str
    #: The RFC 7638 thumbprint of the key the token is bound to (DPoP), else ``None``.
    jkt: str | None
    #: The scheme it came with: ``Bearer`` or ``DPoP``.
    scheme: str


class TokenVerifier:
    """One per API (it keeps the JWKS cache, the proof replay cache and an HTTP client)."""

    def __init__(
        self,
        config: ResourceServerConfig,
        http: httpx.AsyncClient | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=config.http_timeout)
        self.keys = KeyCache(config, self.http, clock)
        self.replay = ReplayCache()
        self.metadata_url = metadata_url(config)
        self._introspector: Introspector | None = None
        self._clock = clock
        split = urlsplit(config.resource)
        #: The origin clients address (``htu`` of their proofs): the resource's own.
        self.origin = f"{split.scheme}://{split.netloc}"

    async def aclose(self) -> None:
        await self.keys.aclose()
        if self._own_http:
            await self.http.aclose()

    def url_for(self, path: str) -> str:
        """The URL a client addressed for ``path``, from the configured resource, never from
        the request's Host header (RFC 9449 §4.3 check 9: htu is this URL)."""
        return self.origin + path

    async def verify(
        self, authorization: str | None, dpop: list[str], method: str, url: str
    ) -> VerifiedToken:
        config = self.config
        credential = parse_authorization(authorization)
        if credential is None or (credential[0] == DPOP and not config.dpop):
            raise errors.missing()
        scheme, token = credential
        if scheme == BEARER and config.dpop_required:
            raise errors.invalid_token("This API accepts DPoP-bound tokens only.", scheme=DPOP)
        try:
            claims = await verify_access_token(token, config, self.keys)
        except KeysUnavailable:
            raise unavailable("The token server's keys cannot be had now.") from None
        except TokenError as error:
            error.scheme = scheme  # challenged in the scheme it came with
            raise
        jkt = _bound_key(claims)
        if scheme == BEARER and jkt is not None:
            # RFC 9449 §7.1: a bound token is worth nothing without its proof.
            raise errors.invalid_token(
                "This access token is DPoP-bound: send it with the DPoP scheme and a proof.",
                scheme=DPOP,
            )
        if scheme == DPOP:
            if jkt is None:
                if config.dpop_required:
                    raise errors.invalid_token(
                        "This API accepts DPoP-bound tokens only.", scheme=DPOP
                    )
                raise errors.invalid_token(
                    "This access token is not DPoP-bound: send it with the Bearer scheme.",
                    scheme=BEARER,
                )
            verify_proof(
                dpop,
                method=method,
                url=url,
                access_token=token,
                jkt=jkt,
                config=config,
                replay=self.replay,
            )
        if config.introspection is not None:
            await self._still_active(token, scheme)
        return VerifiedToken(
            claims=claims,
            scopes=scopes_of(claims),
            client_id=str(claims["client_id"]),
            subject=str(claims["sub"]),
            jkt=jkt,
            scheme=scheme,
        )

    def require(self, token: VerifiedToken, *scopes: str) -> None:
        """RFC 6750 §3.1: 403 ``insufficient_scope`` naming every scope needed."""
        if not set(scopes) <= token.scopes:
            raise errors.insufficient_scope(" ".join(scopes), scheme=token.scheme)

    async def _still_active(self, token: str, scheme: str) -> None:
        try:
            if self._introspector is None:
                document = await self.keys.metadata()
                endpoint = document.get("introspection_endpoint")
                if not isinstance(endpoint, str):
                    raise unavailable("The token server offers no introspection.")
                self._introspector = Introspector(self.config, self.http, endpoint, self._clock)
            answer = await self._introspector.active(token)
        except (KeysUnavailable, IntrospectionUnavailable) as error:
            logger.warning("introspection unavailable: %s", error)
            raise unavailable("The token server cannot be asked about this token now.") from None
        if answer is None:
            raise errors.invalid_token("The access token was revoked.", scheme=scheme)


def request_path(scope: Mapping[str, Any]) -> str:
    """The path of an ASGI request as the client sent it, percent-escapes kept: RFC 9449 §4.3
    check 9 compares ``htu`` with the request's URI, and the decoded ``path`` (``/caf\u00e9``,
    ``/a b``, ``/a/b`` for ``/a%2Fb``) is not that URI. ``raw_path`` when the server gives it
    (without the query), else ``path`` re-escaped."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.decode("latin-1").partition("?")[0]
    return quote(scope["path"], safe="/!$&'()*+,;=:@")


def _bound_key(claims: dict[str, Any]) -> str | None:
    """RFC 9449 §6.1: ``cnf.jkt``; a ``cnf`` of any other shape binds to nothing we know, so
    the token is refused rather than taken as unbound."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    if not isinstance(jkt, str) or not jkt:
        raise errors.invalid_token("The access token's cnf claim is not understood.")
    return jkt
