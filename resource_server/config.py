"""What a resource server says about itself: one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: RFC 9068 §4 / RFC 8725 §3.1: the algorithms an access token may be signed with. The token
#: server signs RS256 (PS256 under its FAPI 2.0 mode); never ``none``, never HMAC.
DEFAULT_ALGORITHMS = ("RS256", "PS256")
#: RFC 9449 §5.1: asymmetric algorithms a DPoP proof may use.
DPOP_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
#: Every algorithm either list may hold: asymmetric signatures (RFC 8725 §3.1, §3.2). ``none``
#: and the HMACs are never accepted, whatever an operator writes.
ASYMMETRIC_ALGORITHMS = frozenset({*DPOP_ALGORITHMS, "Ed25519", "Ed448"})


@dataclass(frozen=True)
class Introspection:
    """RFC 7662 online checks: the API's own client credentials at the token server (a client
    created with ``--resource-server``), and how long an answer is reused (seconds)."""

    client_id: str
    client_secret: str
    cache_ttl: float = 5.0


@dataclass(frozen=True)
class ResourceServerConfig:
    #: The token server's issuer (``iss`` of its tokens; discovery is read from it).
    issuer: str
    #: This API's identifier (RFC 8707 / RFC 9728 ``resource``): the ``aud`` its tokens carry.
    resource: str
    #: RFC 9728 metadata: what the API calls itself, the scopes it knows, its documentation.
    resource_name: str | None = None
    scopes_supported: tuple[str, ...] = ()
    resource_documentation: str | None = None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    #: Seconds of clock difference allowed on ``exp``, ``nbf``, ``iat`` (RFC 9068 §4).
    leeway: int = 30
    #: JWKS: at most one fetch for unknown ``kid`` per this many seconds (forged tokens cannot
    #: make the API hammer the token server); a cached JWKS is revalidated after its
    #: ``Cache-Control: max-age``, and kept (last known good) while the server cannot be reached
    #: for up to ``jwks_max_stale`` seconds.
    jwks_refetch_interval: float = 30.0
    jwks_max_stale: float = 86_400.0
    http_timeout: float = 5.0
    #: DPoP (RFC 9449): accept ``Authorization: DPoP`` with a proof; require it of every token.
    dpop: bool = True
    dpop_required: bool = False
    dpop_algorithms: tuple[str, ...] = DPOP_ALGORITHMS
    #: How old (seconds) a proof's ``iat`` may be, and how far ahead.
    dpop_iat_leeway: int = 60
    dpop_iat_future_leeway: int = 5
    #: Online checks through introspection (``None``: offline only).
    introspection: Introspection | None = None
    #: Where this API serves its RFC 9728 document (the challenges' ``resource_metadata``):
    #: by default ``/.well-known/oauth-protected-resource`` + the resource's path (§3.1).
    metadata_url: str | None = None
    #: ``realm`` of the challenges.
    realm: str = "api"
    extra_claims_required: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        """A careless configuration is refused when the API starts, not met at the first
        token (``ValueError`` naming the field)."""
        issuer = urlsplit(self.issuer)
        if issuer.scheme not in ("http", "https") or not issuer.netloc:
            raise ValueError(f"issuer must be the token server's http(s) URL: {self.issuer!r}")
        if not urlsplit(self.resource).scheme:  # RFC 8707 §2: an absolute URI
            raise ValueError(f"resource must be an absolute URI: {self.resource!r}")
        for name in ("algorithms", "dpop_algorithms"):
            values = getattr(self, name)
            if isinstance(values, str) or not values:
                raise ValueError(f"{name} must be a non-empty tuple of algorithm names")
            unsafe = sorted(set(values) - ASYMMETRIC_ALGORITHMS)
            if unsafe:
                raise ValueError(f"{name}: not asymmetric signature algorithms: {unsafe}")
        for name in ("leeway", "jwks_max_stale", "dpop_iat_leeway", "dpop_iat_future_leeway"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("jwks_refetch_interval", "http_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.dpop_required and not self.dpop:
            raise ValueError("dpop_required needs dpop")
        if self.introspection is not None and self.introspection.cache_ttl < 0:
            raise ValueError("introspection.cache_ttl must not be negative")
