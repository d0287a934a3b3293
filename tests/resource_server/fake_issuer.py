"""A fake token server for the kit's unit tests: discovery and a JWK Set behind
``httpx.MockTransport`` (every request recorded), a fake monotonic clock, keys and tokens.

RSA keys are made once per process (``rsa_key`` is cached): generation is the slow part.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jws
from joserfc.jwk import RSAKey
from joserfc.jws import JWSRegistry

from resource_server.config import ResourceServerConfig
from resource_server.keys import KeyCache

ISSUER = "https://auth.example"
RESOURCE = "https://api.example/orders"
JWKS_URI = "https://auth.example/jwks.json"
DISCOVERY = "https://auth.example/.well-known/oauth-authorization-server"
OIDC_DISCOVERY = "https://auth.example/.well-known/openid-configuration"
#: The wall-clock time the tokens are checked at (``now=`` of ``verify_access_token``).
NOW = 1_700_000_000
_SIGNER = JWSRegistry(  # any alg, any header: the tests forge freely
    algorithms=["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"], strict_check_header=False
)


def config(**overrides: Any) -> ResourceServerConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "resource": RESOURCE,
        "jwks_refetch_interval": 30.0,
        "jwks_max_stale": 3600.0,
    }
    values.update(overrides)
    return ResourceServerConfig(**values)


@cache
def rsa_key(kid: str, alg: str | None = "RS256") -> RSAKey:
    parameters: dict[str, Any] = {"kid": kid, "use": "sig"}
    if alg is not None:
        parameters["alg"] = alg
    return RSAKey.generate_key(2048, parameters=parameters)  # type: ignore[arg-type]


def public_jwk(key: RSAKey) -> dict[str, Any]:
    return dict(key.as_dict(private=False))


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeIssuer:
    """The token server as the kit sees it. ``fail`` makes every request fail:
    ``"connect"`` (httpx.ConnectError), ``"timeout"``, ``"hang"`` (5 s, then a timeout),
    ``"500"``, ``"garbage"`` (not JSON)."""

    issuer: str = ISSUER
    jwks: list[Any] = field(default_factory=list)
    jwks_uri: str = JWKS_URI
    cache_control: str | None = "max-age=300"
    etag: str | None = None
    #: The discovery document's ``issuer`` (``None``: the real one).
    claimed_issuer: str | None = None
    #: Where discovery is served: RFC 8414's URL, OIDC's, or both.
    discovery_at: tuple[str, ...] = ("oauth",)
    discovery_extra: dict[str, Any] = field(default_factory=dict)
    #: Replaces the JWK Set's body when set (raw bytes).
    jwks_body: bytes | None = None
    jwks_status: int = 200
    fail: str | None = None
    requests: list[httpx.Request] = field(default_factory=list)

    def _origin_and_path(self) -> tuple[str, str]:
        split = self.issuer.split("/", 3)
        return "/".join(split[:3]), ("/" + split[3] if len(split) > 3 else "")

    @property
    def discovery_urls(self) -> dict[str, str]:
        origin, path = self._origin_and_path()
        return {
            "oauth": f"{origin}/.well-known/oauth-authorization-server{path}",
            "oidc": f"{self.issuer}/.well-known/openid-configuration",
        }

    @property
    def jwks_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url) == self.jwks_uri]

    @property
    def discovery_requests(self) -> list[httpx.Request]:
        urls = set(self.discovery_urls.values())
        return [r for r in self.requests if str(r.url) in urls]

    def publish(self, *keys: RSAKey) -> None:
        self.jwks = [public_jwk(key) for key in keys]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        # Yield to the loop: concurrent verifications really interleave with the fetch.
        for _ in range(3):
            await asyncio.sleep(0)
        if self.fail == "hang":  # answers nothing for 5 s, then times out
            await asyncio.sleep(5)
            raise httpx.ReadTimeout("timed out", request=request)
        if self.fail == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if self.fail == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.fail == "500":
            return httpx.Response(500, text="oops")
        if self.fail == "garbage":
            return httpx.Response(200, content=b"<html>not json</html>")
        url = str(request.url)
        served = {self.discovery_urls[name] for name in self.discovery_at}
        if url in served:
            document = {
                "issuer": self.claimed_issuer or self.issuer,
                "jwks_uri": self.jwks_uri,
                **self.discovery_extra,
            }
            return httpx.Response(200, json=document)
        if url == self.jwks_uri:
            headers: dict[str, str] = {}
            if self.cache_control is not None:
                headers["cache-control"] = self.cache_control
            if self.etag is not None:
                headers["etag"] = self.etag
                if request.headers.get("if-none-match") == self.etag:
                    return httpx.Response(304, headers=headers)
            if self.jwks_body is not None:
                return httpx.Response(self.jwks_status, content=self.jwks_body, headers=headers)
            return httpx.Response(self.jwks_status, json={"keys": self.jwks}, headers=headers)
        return httpx.Response(404, json={"error": "not_found"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def cache(self, clock: FakeClock, cfg: ResourceServerConfig | None = None) -> KeyCache:
        return KeyCache(cfg or config(issuer=self.issuer), self.client(), clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """A good access token's claims at ``NOW`` (``None`` removes a claim)."""
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": RESOURCE,
        "sub": "user-1",
        "client_id": "client-1",
        "iat": NOW,
        "exp": NOW + 300,
        "jti": uuid.uuid4().hex,
        "scope": "orders:read orders:write",
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def realtime_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return claims(iat=now, exp=now + 300, **overrides)


def sign(
    key: RSAKey,
    payload: dict[str, Any] | bytes | None = None,
    *,
    alg: str = "RS256",
    kid: str | None = "",
    typ: str | None = "at+jwt",
    **header: Any,
) -> str:
    """A compact JWS of ``payload`` (default ``claims()``) signed by ``key``. ``kid=""``: the
    key's own; ``None``: no ``kid``; ``typ=None``: no ``typ``; ``header`` adds members."""
    protected: dict[str, Any] = {"alg": alg}
    if typ is not None:
        protected["typ"] = typ
    if kid is not None:
        protected["kid"] = kid or key.kid
    protected.update(header)
    if payload is None:
        payload = claims()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return jws.serialize_compact(protected, body, key, registry=_SIGNER)


def sign_raw(key: RSAKey, header: dict[str, Any], payload: dict[str, Any] | bytes) -> str:
    """RS256/PS256 by hand (cryptography): for headers joserfc would not write (a non-string
    ``typ``, ``crit``, an alg its key does not declare)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}".encode()
    private: Any = key.get_op_key("sign")
    if header.get("alg") == "PS256":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        signature = private.sign(signing_input, pss, hashes.SHA256())
    else:
        signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64(signature)}"


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token put together by hand (any header, any signature bytes)."""
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature))
    )
