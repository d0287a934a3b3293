"""The resource servers' kit (``resource_server/``) against a real token server process.

One server (SQLite: the kit never sees the database) lists two APIs in ``AUTH_RESOURCES``;
client ``svc`` gets tokens for them with client_credentials and ``resource=`` (RFC 8707), and
a ``TokenVerifier`` made for the first API checks them as an API would: a good token, a key
rotation (``keys rotate``, the CLI) seen without a restart, a revocation seen through
introspection, forgeries, a token server gone (last known good keys; 503 without any) and a
DPoP-bound token with its proof. Time the kit waits on (JWKS freshness, introspection cache)
is a fake monotonic clock the test advances; waiting for the server to reload its keys is a
bounded loop polling the kid it signs with.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import JWSRegistry

from resource_server import Introspection, ResourceServerConfig, TokenError, TokenVerifier
from tests.resource_server.fake_issuer import FakeClock

from .conftest import (
    FAST_ARGON2_ENV,
    UNLIMITED_ENV,
    NewClient,
    RunningServer,
    cli,
    create_client,
    fresh_database,
    start_server,
)

pytestmark = pytest.mark.feature(
    "rs-kit-keys", "rs-kit-tokens", "rs-kit-introspection", "rs-kit-dpop"
)

#: The API the verifier protects (a resource with a path) and another one of the same server.
API = "https://orders.example.com/api"
OTHER_API = "https://billing.example.com"
REQUEST_URL = "https://orders.example.com/api/orders"
RELOAD_INTERVAL = "0.2"  # AUTH_KEY_RELOAD_INTERVAL: the server sees a rotation quickly
#: Headers joserfc would refuse to write (``typ`` at+jwt or dpop+jwt, a ``jwk``) are ours to set.
REGISTRY = JWSRegistry(strict_check_header=False)


@dataclass(frozen=True)
class TokenServer:
    running: RunningServer
    #: A confidential client with client_credentials and the scopes ``api read``.
    client: NewClient
    #: The API's own credentials for introspection (``clients create --resource-server``).
    api: NewClient

    @property
    def url(self) -> str:
        return self.running.url


def serve(tmp: Path, database_url: str) -> RunningServer:
    return start_server(
        database_url,
        tmp / "keys",
        tmp / "server.log",
        AUTH_RESOURCES=f"{API},{OTHER_API}",
        AUTH_KEY_RELOAD_INTERVAL=RELOAD_INTERVAL,
        **FAST_ARGON2_ENV,
        **UNLIMITED_ENV,
    )


def start(tmp: Path, database_url: str) -> TokenServer:
    client = create_client(database_url, "svc", scope="api read")
    api = create_client(database_url, "orders-api", resource_server=True)
    return TokenServer(serve(tmp, database_url), client, api)


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """The module's server: its tests make their own tokens and verifiers (the rotation test
    rotates its keys; every other test looks the kid up rather than assuming it)."""
    tmp = tmp_path_factory.mktemp("rs-kit")
    with fresh_database("sqlite", tmp) as database_url:
        server = start(tmp, database_url)
        try:
            yield server
        finally:
            server.running.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[TokenServer]:
    """A server of the test's own, for a test that stops it."""
    with fresh_database("sqlite", tmp_path) as database_url:
        server = start(tmp_path, database_url)
        try:
            yield server
        finally:
            server.running.stop()


@asynccontextmanager
async def kit(
    server: TokenServer, clock: Callable[[], float] = time.monotonic, **settings: Any
) -> AsyncIterator[TokenVerifier]:
    """A verifier for ``API`` trusting ``server``, closed afterwards."""
    config = ResourceServerConfig(issuer=server.url, resource=API, **settings)
    verifier = TokenVerifier(config, clock=clock)
    try:
        yield verifier
    finally:
        await verifier.aclose()


def issue(
    server: TokenServer,
    resource: str = API,
    scope: str = "api read",
    dpop: str | None = None,
) -> dict[str, Any]:
    """A client_credentials token response for ``resource`` (RFC 8707)."""
    assert server.client.secret is not None
    response = httpx.post(
        server.url + "/oauth2/token",
        data={"grant_type": "client_credentials", "scope": scope, "resource": resource},
        auth=(server.client.client_id, server.client.secret),
        headers={"DPoP": dpop} if dpop else {},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def access_token(server: TokenServer, resource: str = API) -> str:
    token: str = issue(server, resource)["access_token"]
    return token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def header_of(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(unb64(token.split(".")[0]))
    return header


def kid_of(token: str) -> str:
    kid: str = header_of(token)["kid"]
    return kid


async def refused(
    verifier: TokenVerifier,
    authorization: str,
    dpop: list[str] | None = None,
    method: str = "GET",
    url: str = REQUEST_URL,
) -> TokenError:
    with pytest.raises(TokenError) as info:
        await verifier.verify(authorization, dpop or [], method, url)
    return info.value


def assert_invalid_token(error: TokenError, words: str) -> None:
    assert (error.error, error.status) == ("invalid_token", 401), error
    assert words in error.description, error.description


# -- a good token ------------------------------------------------------------------------


async def test_a_token_for_this_api_verifies_with_its_scopes_as_a_set(
    token_server: TokenServer,
) -> None:
    answer = issue(token_server, scope="read api")
    assert answer["token_type"] == "Bearer"
    async with kit(token_server) as verifier:
        token = await verifier.verify(f"Bearer {answer['access_token']}", [], "GET", REQUEST_URL)
        # The same token again: the keys are cached (one JWKS fetch for both).
        again = await verifier.verify(f"bearer {answer['access_token']}", [], "GET", REQUEST_URL)
        assert verifier.keys.fetches == 1
    assert token.scopes == frozenset({"api", "read"}) == again.scopes
    assert token.client_id == "svc" and token.subject == "svc"
    assert token.scheme == "Bearer" and token.jkt is None
    assert token.claims["aud"] in (API, [API])
    assert token.claims["iss"] == token_server.url


# -- key rotation ----------------------------------------------------------------------------


def rotate(server: TokenServer) -> str:
    """``keys rotate --force`` with the CLI, then the kid the server signs with once it has
    reloaded its keys (a bounded wait: a server that never switches fails the test)."""
    before = kid_of(access_token(server))
    rotated = cli(server.running.env, "keys", "rotate", "--force")
    assert rotated.returncode == 0, rotated.stderr
    manifest = json.loads((Path(server.running.env["AUTH_KEYS_DIR"]) / "keys.json").read_text())
    new_kid: str = next(k["kid"] for k in manifest["keys"] if k["state"] == "current")
    assert new_kid != before
    deadline = time.monotonic() + 20
    while kid_of(access_token(server)) != new_kid:
        assert time.monotonic() < deadline, "the server kept signing with the old key"
        time.sleep(0.1)
    return new_kid


def jwks_kids(server: TokenServer) -> set[str]:
    keys = httpx.get(server.url + "/.well-known/jwks.json", timeout=10).json()["keys"]
    return {key["kid"] for key in keys}


async def test_a_rotation_is_picked_up_by_the_same_verifier_without_a_restart(
    token_server: TokenServer,
) -> None:
    async with kit(token_server, jwks_refetch_interval=0.2) as verifier:
        old = access_token(token_server)
        await verifier.verify(f"Bearer {old}", [], "GET", REQUEST_URL)
        assert verifier.keys.fetches == 1
        published = jwks_kids(token_server)

        # A planned rotation: the key that signs now was published (as next) before, so the
        # JWK Set the verifier holds already has it: accepted without a fetch.
        planned = rotate(token_server)
        assert planned in published
        after_planned = access_token(token_server)
        assert kid_of(after_planned) == planned
        token = await verifier.verify(f"Bearer {after_planned}", [], "GET", REQUEST_URL)
        assert token.client_id == "svc"
        assert verifier.keys.fetches == 1

        # Forced again at once: this key was never in the verifier's JWK Set. The unknown kid
        # makes it fetch the set again (the CLI took longer than jwks_refetch_interval).
        emergency = rotate(token_server)
        assert emergency not in published
        after_emergency = access_token(token_server)
        token = await verifier.verify(f"Bearer {after_emergency}", [], "GET", REQUEST_URL)
        assert token.client_id == "svc"
        assert verifier.keys.fetches == 2

        # Tokens signed with the retired keys still verify: they are still published.
        for earlier in (old, after_planned):
            token = await verifier.verify(f"Bearer {earlier}", [], "GET", REQUEST_URL)
            assert token.client_id == "svc"
        assert verifier.keys.fetches == 2


# -- revocation, online ------------------------------------------------------------------


async def test_a_revoked_token_is_refused_once_the_introspection_cache_expires(
    token_server: TokenServer,
) -> None:
    assert token_server.api.secret is not None
    online = Introspection(token_server.api.client_id, token_server.api.secret, cache_ttl=0.1)
    clock = FakeClock()
    token = access_token(token_server)
    other = access_token(token_server)
    async with kit(token_server, clock, introspection=online) as verifier:
        verified = await verifier.verify(f"Bearer {token}", [], "GET", REQUEST_URL)
        assert verified.client_id == "svc"
        await verifier.verify(f"Bearer {other}", [], "GET", REQUEST_URL)

        assert token_server.client.secret is not None
        revoked = httpx.post(
            token_server.url + "/oauth2/revoke",
            data={"token": token, "token_type_hint": "access_token"},
            auth=(token_server.client.client_id, token_server.client.secret),
            timeout=10,
        )
        assert revoked.status_code == 200, revoked.text
        # Within cache_ttl the answer is reused (no request to the server)...
        assert verifier._introspector is not None
        asked = verifier._introspector.requests
        await verifier.verify(f"Bearer {token}", [], "GET", REQUEST_URL)
        assert verifier._introspector.requests == asked
        # ... and past it the server is asked again, and says no.
        clock.advance(1)
        error = await refused(verifier, f"Bearer {token}")
        assert_invalid_token(error, "revoked")
        assert verifier._introspector.requests == asked + 1
        # Another token of the same client is not affected.
        still = await verifier.verify(f"Bearer {other}", [], "GET", REQUEST_URL)
        assert still.client_id == "svc"


async def test_introspection_with_wrong_api_credentials_is_unavailable_not_accepted(
    token_server: TokenServer,
) -> None:
    wrong = Introspection(token_server.api.client_id, "not-the-secret", cache_ttl=0.1)
    async with kit(token_server, introspection=wrong) as verifier:
        error = await refused(verifier, f"Bearer {access_token(token_server)}")
    assert (error.error, error.status) == ("temporarily_unavailable", 503), error


# -- forgeries ---------------------------------------------------------------------------


def forged(header: dict[str, Any], claims: dict[str, Any], key: RSAKey) -> str:
    payload = json.dumps(claims).encode()
    return jws.serialize_compact(header, payload, key, registry=REGISTRY)


async def test_forged_tokens_and_tokens_for_another_api_are_refused(
    token_server: TokenServer,
) -> None:
    real = access_token(token_server)
    header = header_of(real)
    claims: dict[str, Any] = json.loads(unb64(real.split(".")[1]))
    signing_input, signature = real.rsplit(".", 1)
    real_header, real_payload = signing_input.split(".")
    attacker = RSAKey.generate_key(2048)
    server_key = next(
        key
        for key in httpx.get(token_server.url + "/.well-known/jwks.json", timeout=10).json()["keys"]
        if key["kid"] == header["kid"]
    )
    # The classic confusion: the server's public key (its JWK) as an HMAC secret.
    hs_header = b64(json.dumps({**header, "alg": "HS256"}).encode())
    hs_input = f"{hs_header}.{real_payload}"
    hs_mac = hmac.new(json.dumps(server_key).encode(), hs_input.encode(), hashlib.sha256)
    none_header = b64(json.dumps({**header, "alg": "none"}).encode())
    altered = bytearray(unb64(signature))
    altered[len(altered) // 2] ^= 0x01
    cases = {
        "another key, the server's kid": (
            forged(header, {**claims, "scope": "api admin"}, attacker),
            "signature does not verify",
        ),
        "alg none, no signature": (f"{none_header}.{real_payload}.", "not a signed"),
        "alg none, the real signature": (
            f"{none_header}.{real_payload}.{signature}",
            "algorithm not allowed",
        ),
        "HS256 keyed with the public key": (
            f"{hs_input}.{b64(hs_mac.digest())}",
            "algorithm not allowed",
        ),
        "one bit of the signature flipped": (
            f"{signing_input}.{b64(bytes(altered))}",
            "signature does not verify",
        ),
        "the real claims with another scope": (
            f"{real_header}.{b64(json.dumps({**claims, 'scope': 'admin'}).encode())}.{signature}",
            "signature does not verify",
        ),
        "a real token for another API": (
            access_token(token_server, OTHER_API),
            "another audience",
        ),
    }
    async with kit(token_server) as verifier:
        # The real one passes: each refusal below is the forgery's doing.
        assert (await verifier.verify(f"Bearer {real}", [], "GET", REQUEST_URL)).client_id == "svc"
        for name, (token, words) in cases.items():
            error = await refused(verifier, f"Bearer {token}")
            assert error.error == "invalid_token", name
            assert_invalid_token(error, words)
        # Forged kids cost the server nothing: one JWK Set fetch in all.
        unknown = forged({**header, "kid": "no-such-key"}, claims, attacker)
        for _ in range(3):
            assert_invalid_token(await refused(verifier, f"Bearer {unknown}"), "does not publish")
        assert verifier.keys.fetches == 1


# -- the token server unreachable ---------------------------------------------------------


async def test_cached_keys_outlive_the_server_and_a_verifier_without_keys_answers_503(
    own_server: TokenServer,
) -> None:
    token = access_token(own_server)
    cache_control = httpx.get(own_server.url + "/.well-known/jwks.json", timeout=10).headers[
        "cache-control"
    ]
    seconds = int(cache_control.split("max-age=")[1].split(",")[0])
    clock = FakeClock()
    max_stale = seconds + 600.0
    async with kit(own_server, clock, jwks_max_stale=max_stale) as warm:
        assert (await warm.verify(f"Bearer {token}", [], "GET", REQUEST_URL)).client_id == "svc"
        own_server.running.stop()
        # Past the JWK Set's max-age: the kit tries the server, cannot reach it, and keeps the
        # keys it had (last known good).
        clock.advance(seconds + 1)
        verified = await warm.verify(f"Bearer {token}", [], "GET", REQUEST_URL)
        assert verified.client_id == "svc"
        assert warm.keys.fetches == 2  # the revalidation was attempted, and failed
        # jwks_max_stale after the last good fetch: nothing is trusted any more.
        clock.advance(max_stale - (seconds + 1))
        error = await refused(warm, f"Bearer {token}")
        assert (error.error, error.status) == ("temporarily_unavailable", 503), error
    async with kit(own_server) as cold:
        error = await refused(cold, f"Bearer {token}")
    assert (error.error, error.status) == ("temporarily_unavailable", 503), error


# -- DPoP ----------------------------------------------------------------------------------


def dpop_proof(key: ECKey, method: str, url: str, access_token: str | None = None) -> str:
    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
    }
    if access_token is not None:
        claims["ath"] = b64(hashlib.sha256(access_token.encode()).digest())
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    payload = json.dumps(claims).encode()
    return jws.serialize_compact(header, payload, key, registry=REGISTRY)


async def test_a_dpop_bound_token_verifies_with_its_proof_and_never_as_bearer(
    token_server: TokenServer,
) -> None:
    key = ECKey.generate_key("P-256")
    answer = issue(token_server, dpop=dpop_proof(key, "POST", token_server.url + "/oauth2/token"))
    assert answer["token_type"] == "DPoP"
    token: str = answer["access_token"]
    async with kit(token_server) as verifier:
        proof = dpop_proof(key, "GET", REQUEST_URL, token)
        verified = await verifier.verify(f"DPoP {token}", [proof], "GET", REQUEST_URL)
        assert verified.scheme == "DPoP"
        assert verified.jkt == key.thumbprint()
        assert verified.scopes == frozenset({"api", "read"})

        as_bearer = await refused(verifier, f"Bearer {token}")
        assert_invalid_token(as_bearer, "DPoP-bound")
        assert as_bearer.scheme == "DPoP"
        # The same proof again is a replay.
        replayed = await refused(verifier, f"DPoP {token}", [proof])
        assert replayed.error == "invalid_dpop_proof"
        # A proof for another request, or by another key, is refused.
        elsewhere = dpop_proof(key, "GET", "https://orders.example.com/api/other", token)
        wrong_url = await refused(verifier, f"DPoP {token}", [elsewhere])
        assert wrong_url.error == "invalid_dpop_proof" and "htu" in wrong_url.description
        as_post = await refused(
            verifier, f"DPoP {token}", [dpop_proof(key, "GET", REQUEST_URL, token)], "POST"
        )
        assert as_post.error == "invalid_dpop_proof" and "htm" in as_post.description
        thief = dpop_proof(ECKey.generate_key("P-256"), "GET", REQUEST_URL, token)
        assert_invalid_token(await refused(verifier, f"DPoP {token}", [thief]), "bound")
        # A fresh proof of the right key still works.
        again = dpop_proof(key, "GET", REQUEST_URL, token)
        assert (await verifier.verify(f"DPoP {token}", [again], "GET", REQUEST_URL)).jkt
