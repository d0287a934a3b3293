"""Shared helpers of the resource servers' kit tests: a fake token server (``httpx.MockTransport``)
that serves discovery, a JWK Set and introspection and counts requests; access tokens signed
with RSA keys made once; DPoP proofs signed with EC P-256 keys; a fake clock; a parser of
``WWW-Authenticate`` values.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from resource_server.config import Introspection, ResourceServerConfig
from resource_server.dpop import b64url_sha256

ISSUER = "https://as.example"
RESOURCE = "https://api.example"
DISCOVERY_URL = f"{ISSUER}/.well-known/oauth-authorization-server"
JWKS_URL = f"{ISSUER}/jwks"
INTROSPECTION_URL = f"{ISSUER}/introspect"
KID = "k1"

#: Made once for the whole run (RSA generation is the slow part).
SIGNING_KEY = RSAKey.generate_key(2048, parameters={"kid": KID, "alg": "RS256", "use": "sig"})
#: A key the token server does not publish.
FOREIGN_KEY = RSAKey.generate_key(2048, parameters={"kid": KID})
#: Proof keys (EC P-256).
PROOF_KEY = ECKey.generate_key("P-256")
OTHER_PROOF_KEY = ECKey.generate_key("P-256")
#: RSA keys for proofs: one of 2048 bits (accepted), and a 1024-bit public JWK (refused).
RSA_PROOF_KEY = RSAKey.generate_key(2048)
_weak = (
    rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused)
    .public_key()
    .public_numbers()
)


def _b64_int(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


RSA_1024_JWK = {"kty": "RSA", "n": _b64_int(_weak.n), "e": _b64_int(_weak.e)}


def b64(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(dict(data), separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"sig") -> str:
    """A compact JWS whose signature is whatever is given (not a real one)."""
    return f"{b64(header)}.{b64(claims)}.{b64(signature)}"


def sign(header: dict[str, Any], claims: Mapping[str, Any], key: Any) -> str:
    registry = JWSRegistry(algorithms=[header["alg"]], strict_check_header=False)
    payload = json.dumps(dict(claims), separators=(",", ":"))
    return jws.serialize_compact(header, payload, key, registry=registry)


def thumbprint(key: ECKey | RSAKey | OKPKey) -> str:
    return key.thumbprint()


def token_claims(
    *,
    scope: str | None = "orders:read",
    jkt: str | None = None,
    aud: str | list[str] = RESOURCE,
    exp_in: float = 300,
    **extra: Any,
) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": aud,
        "exp": now + exp_in,
        "iat": now,
        "sub": "alice",
        "client_id": "app",
        "jti": uuid.uuid4().hex,
    }
    if scope is not None:
        claims["scope"] = scope
    if jkt is not None:
        claims["cnf"] = {"jkt": jkt}
    claims.update(extra)
    return claims


def make_token(
    *,
    key: RSAKey = SIGNING_KEY,
    kid: str = KID,
    typ: str = "at+jwt",
    alg: str = "RS256",
    **claims: Any,
) -> str:
    """An RFC 9068 access token the fake token server signed (``claims`` go to ``token_claims``)."""
    return sign({"alg": alg, "typ": typ, "kid": kid}, token_claims(**claims), key)


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def make_proof(
    key: ECKey | RSAKey | OKPKey = PROOF_KEY,
    *,
    htm: str = "GET",
    htu: str = f"{RESOURCE}/orders",
    token: str | None = None,
    iat: float | None = None,
    jti: str | None = None,
    alg: str = "ES256",
    typ: str = "dpop+jwt",
    jwk: dict[str, Any] | None = None,
    header: Mapping[str, Any] | None = None,
    claims: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """A DPoP proof (RFC 9449 §4.2) signed with ``key``; ``jwk`` replaces the public key in the
    header, ``header``/``claims`` add or override members, ``drop`` removes claims."""
    protected: dict[str, Any] = {
        "typ": typ,
        "alg": alg,
        "jwk": jwk if jwk is not None else key.as_dict(private=False),
    }
    protected.update(header or {})
    body: dict[str, Any] = {
        "jti": jti if jti is not None else uuid.uuid4().hex,
        "htm": htm,
        "htu": htu,
        "iat": int(time.time()) if iat is None else iat,
    }
    if token is not None:
        body["ath"] = b64url_sha256(token)
    body.update(claims or {})
    for name in drop:
        body.pop(name, None)
    return sign(protected, body, key)


Handler = Callable[[httpx.Request], httpx.Response]


class FakeTokenServer:
    """Discovery, the JWK Set and introspection of a token server, counting requests by URL.

    ``down``: every request fails with a connection error. ``introspection``: replaces the
    default introspection answer (active unless the token's ``jti`` is in ``revoked``)."""

    def __init__(self, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.keys: list[dict[str, Any]] = [SIGNING_KEY.as_dict(private=False)]
        self.requests: Counter[str] = Counter()
        self.down = False
        self.revoked: set[str] = set()
        self.introspection: Handler | None = None
        self.introspection_requests: list[httpx.Request] = []
        self.with_introspection = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url.copy_with(query=None))
        self.requests[url] += 1
        if self.down:
            raise httpx.ConnectError("the token server is down", request=request)
        if url == DISCOVERY_URL and request.method == "GET":
            document: dict[str, Any] = {"issuer": self.issuer, "jwks_uri": JWKS_URL}
            if self.with_introspection:
                document["introspection_endpoint"] = INTROSPECTION_URL
            return httpx.Response(200, json=document)
        if url == JWKS_URL and request.method == "GET":
            return httpx.Response(
                200, json={"keys": self.keys}, headers={"cache-control": "max-age=300"}
            )
        if url == INTROSPECTION_URL and request.method == "POST":
            self.introspection_requests.append(request)
            if self.introspection is not None:
                return self.introspection(request)
            token = dict(httpx.QueryParams(request.content.decode()))["token"]
            claims = claims_of(token)
            if claims["jti"] in self.revoked:
                return httpx.Response(200, json={"active": False})
            return httpx.Response(200, json={"active": True, **claims})
        return httpx.Response(404, json={"error": "not_found"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))

    @property
    def introspections(self) -> int:
        return self.requests[INTROSPECTION_URL]

    @property
    def jwks_fetches(self) -> int:
        return self.requests[JWKS_URL]


def config(**overrides: Any) -> ResourceServerConfig:
    values: dict[str, Any] = {"issuer": ISSUER, "resource": RESOURCE}
    values.update(overrides)
    return ResourceServerConfig(**values)


def with_introspection(cache_ttl: float = 5.0, **overrides: Any) -> ResourceServerConfig:
    return config(
        introspection=Introspection(
            client_id="orders-api", client_secret="s3cret", cache_ttl=cache_ttl
        ),
        **overrides,
    )


# -- WWW-Authenticate (RFC 9110 §11.6.1) ------------------------------------------------------

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))')
_SCHEME = re.compile(rf"({_TOKEN})(?=[ \t]|,|$)")
_SEPARATORS = re.compile(r"[ \t,]*")


def parse_challenges(*values: str) -> list[tuple[str, dict[str, str]]]:
    """Every challenge of the given ``WWW-Authenticate`` values: ``(scheme, params)``, the
    parameter names lower-cased. Fails (AssertionError) on anything else than the grammar."""
    challenges: list[tuple[str, dict[str, str]]] = []
    for value in values:
        position = 0
        while True:
            position = _SEPARATORS.match(value, position).end()  # type: ignore[union-attr]
            if position >= len(value):
                break
            param = _PARAM.match(value, position)
            if param is not None and challenges:
                name = param.group(1).lower()
                assert name not in challenges[-1][1], f"duplicate parameter {name}"
                quoted = param.group(2)
                challenges[-1][1][name] = (
                    re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else param.group(3)
                )
                position = param.end()
                continue
            scheme = _SCHEME.match(value, position)
            assert scheme is not None, f"not a challenge at {position}: {value!r}"
            challenges.append((scheme.group(1), {}))
            position = scheme.end()
    return challenges


def challenges_of(response: httpx.Response) -> dict[str, dict[str, str]]:
    """The response's challenges by scheme (each scheme at most once)."""
    parsed = parse_challenges(*response.headers.get_list("www-authenticate"))
    schemes = [scheme for scheme, _ in parsed]
    assert len(schemes) == len(set(schemes)), schemes
    return dict(parsed)
