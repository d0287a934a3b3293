"""resource_server/keys.py: discovery, the cached JWK Set, the bounded refetch for unknown
``kid`` (the flood test), rotation, last known good, and the JWK Set entries it refuses."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest

from resource_server import keys as keys_module
from resource_server.errors import TokenError
from resource_server.keys import MAX_DOCUMENT_BYTES, MAX_TTL, RETRY_INTERVAL, KeysUnavailable
from resource_server.tokens import verify_access_token
from resource_server.verifier import TokenVerifier
from tests.resource_server.fake_issuer import (
    DISCOVERY,
    ISSUER,
    JWKS_URI,
    NOW,
    OIDC_DISCOVERY,
    FakeClock,
    FakeIssuer,
    claims,
    config,
    public_jwk,
    realtime_claims,
    rsa_key,
    sign,
)

pytestmark = pytest.mark.feature("rs-kit-keys")

INTERVAL = 30.0  # fake_issuer.config's jwks_refetch_interval
MAX_STALE = 3600.0  # and its jwks_max_stale


def issuer_with(*kids: str, **fields: Any) -> FakeIssuer:
    fake = FakeIssuer(**fields)
    fake.publish(*(rsa_key(kid) for kid in kids or ("k1",)))
    return fake


# -- discovery -----------------------------------------------------------------------------


async def test_discovery_then_the_jwks_it_names() -> None:
    fake = issuer_with("k1", "k2")
    cache = fake.cache(FakeClock())
    key = await cache.key("k1")
    assert key is not None and key.kid == "k1"
    assert [str(r.url) for r in fake.requests] == [DISCOVERY, JWKS_URI]
    assert all(r.headers["accept"] == "application/json" for r in fake.requests)
    assert (await cache.key("k2")) is not None
    assert cache.fetches == 1 and len(fake.requests) == 2


async def test_discovery_naming_another_issuer_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = issuer_with(claimed_issuer="https://evil.example")
    cache = fake.cache(FakeClock())
    with pytest.raises(KeysUnavailable), caplog.at_level("WARNING", "resource_server"):
        await cache.key("k1")
    # The operator learns why every request is a 503.
    assert [r.getMessage() for r in caplog.records] == [
        "token server keys: discovery: the document names another issuer (no keys yet)"
    ]
    assert fake.jwks_requests == []  # RFC 8414 §3.3: its jwks_uri is not believed
    with pytest.raises(KeysUnavailable):
        await cache.metadata()


async def test_discovery_issuer_must_match_exactly_not_modulo_a_slash() -> None:
    fake = issuer_with(claimed_issuer=ISSUER + "/")
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")
    assert fake.jwks_requests == []


async def test_rfc8414_well_known_goes_before_the_issuers_path() -> None:
    issuer = "https://auth.example/tenant/a"
    fake = issuer_with(issuer=issuer)
    assert (await fake.cache(FakeClock()).key("k1")) is not None
    assert str(fake.requests[0].url) == (
        "https://auth.example/.well-known/oauth-authorization-server/tenant/a"
    )


async def test_openid_configuration_is_the_fallback() -> None:
    fake = issuer_with(discovery_at=("oidc",))
    assert (await fake.cache(FakeClock()).key("k1")) is not None
    assert [str(r.url) for r in fake.requests] == [DISCOVERY, OIDC_DISCOVERY, JWKS_URI]


async def test_openid_fallback_for_an_issuer_with_a_path_appends_to_the_issuer() -> None:
    issuer = "https://auth.example/tenant"
    fake = issuer_with(issuer=issuer, discovery_at=("oidc",))
    assert (await fake.cache(FakeClock()).key("k1")) is not None
    assert str(fake.requests[1].url) == issuer + "/.well-known/openid-configuration"


async def test_rfc8414_document_wins_when_both_are_served() -> None:
    fake = issuer_with(discovery_at=("oauth", "oidc"))
    await fake.cache(FakeClock()).key("k1")
    assert OIDC_DISCOVERY not in [str(r.url) for r in fake.requests]


async def test_no_discovery_document_anywhere() -> None:
    fake = issuer_with(discovery_at=())
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")
    assert len(fake.discovery_requests) == 2 and fake.jwks_requests == []


@pytest.mark.parametrize("jwks_uri", [None, 42, ["https://auth.example/jwks.json"]])
async def test_discovery_without_a_string_jwks_uri(jwks_uri: object) -> None:
    fake = issuer_with(discovery_extra={"jwks_uri": jwks_uri})
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")
    assert fake.jwks_requests == []


async def test_an_unparseable_jwks_uri_is_a_failed_fetch_not_a_crash() -> None:
    # httpx.InvalidURL is not an httpx.HTTPError: it once escaped KeyCache.key (a 500).
    fake = issuer_with(jwks_uri="https://[::1/jwks")
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")


async def test_metadata_is_fetched_once_and_shared_with_the_keys() -> None:
    fake = issuer_with(discovery_extra={"introspection_endpoint": ISSUER + "/introspect"})
    cache = fake.cache(FakeClock())
    document = await cache.metadata()
    assert document["introspection_endpoint"] == ISSUER + "/introspect"
    assert await cache.metadata() is document
    await cache.key("k1")
    assert len(fake.discovery_requests) == 1


# -- HTTP caching -------------------------------------------------------------------------


async def test_no_refetch_while_fresh() -> None:
    fake, clock = issuer_with(cache_control="max-age=300"), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(299.9)
    assert (await cache.key("k1")) is not None
    assert len(fake.jwks_requests) == 1 and cache.fetches == 1


async def test_refetch_once_max_age_has_passed() -> None:
    fake, clock = issuer_with(cache_control="public, max-age=300"), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(300)
    await cache.key("k1")
    await cache.key("k1")
    assert len(fake.jwks_requests) == 2


async def test_revalidation_sends_if_none_match_and_a_304_keeps_the_keys() -> None:
    fake, clock = issuer_with(etag='"v1"'), FakeClock()
    cache = fake.cache(clock)
    first = await cache.key("k1")
    assert "if-none-match" not in fake.jwks_requests[0].headers
    fake.jwks = []  # a 200 now would have no keys: only the 304 can keep them
    clock.advance(300)
    assert (await cache.key("k1")) is first
    assert fake.jwks_requests[1].headers["if-none-match"] == '"v1"'
    # The 304 made the set fresh for another max-age.
    clock.advance(299)
    assert (await cache.key("k1")) is first
    assert len(fake.jwks_requests) == 2
    clock.advance(1)
    await cache.key("k1")
    assert fake.jwks_requests[2].headers["if-none-match"] == '"v1"'


async def test_a_304_extends_last_known_good() -> None:
    fake, clock = issuer_with(etag='"v1"'), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(MAX_STALE - 10)  # revalidated (304) just before jwks_max_stale
    await cache.key("k1")
    fake.fail = "connect"
    clock.advance(20)  # past the first fetch's max-stale, within the 304's
    assert (await cache.key("k1")) is not None


async def test_without_etag_no_conditional_request() -> None:
    fake, clock = issuer_with(etag=None), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(300)
    await cache.key("k1")
    assert all("if-none-match" not in r.headers for r in fake.jwks_requests)


async def test_a_304_without_cached_keys_is_a_failure() -> None:
    fake = issuer_with()
    fake.jwks_status = 304
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")


@pytest.mark.parametrize("cache_control", ["max-age=5", "max-age=0", "no-store", "no-cache"])
async def test_max_age_below_the_refetch_interval_is_clamped_up(cache_control: str) -> None:
    fake, clock = issuer_with(cache_control=cache_control), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(INTERVAL - 0.5)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 1
    clock.advance(0.5)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 2


async def test_max_age_above_a_day_is_clamped_down() -> None:
    fake, clock = issuer_with(cache_control="max-age=99999999"), FakeClock()
    cache = fake.cache(clock, config(jwks_max_stale=10 * MAX_TTL))
    await cache.key("k1")
    clock.advance(MAX_TTL - 1)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 1
    clock.advance(1)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 2


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        (None, keys_module.DEFAULT_TTL),
        ("", keys_module.DEFAULT_TTL),
        ("max-age=600", 600.0),
        ("private, max-age=600", 600.0),
        ("Max-Age=42, must-revalidate", 42.0),
        ('max-age="77"', 77.0),
        ("s-maxage=5", keys_module.DEFAULT_TTL),  # not max-age
        ("public", keys_module.DEFAULT_TTL),
        ("max-age=600, no-cache", 0.0),
        ("no-store", 0.0),
    ],
)
def test_max_age_parsing(cache_control: str | None, ttl: float) -> None:
    assert keys_module._max_age(cache_control) == ttl


async def test_no_cache_control_means_five_minutes() -> None:
    fake, clock = issuer_with(cache_control=None), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(keys_module.DEFAULT_TTL - 1)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 1
    clock.advance(1)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 2


# -- the flood: forged kids cannot make the API hammer the token server -------------------


def forged_tokens(count: int) -> list[str]:
    attacker = rsa_key("attacker")
    return [sign(attacker, realtime_claims(), kid=secrets.token_urlsafe(12)) for _ in range(count)]


async def test_flood_of_forged_kids_concurrently_one_fetch_per_interval() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    verifier = TokenVerifier(config(), fake.client(), clock=clock)
    await verifier.keys.key("k1")  # warm
    assert len(fake.jwks_requests) == 1

    async def attempt(token: str) -> TokenError:
        with pytest.raises(TokenError) as refused:
            await verifier.verify(f"Bearer {token}", [], "GET", "https://api.example/orders")
        return refused.value

    # Within the interval of the warming fetch: not one more fetch.
    results = await asyncio.gather(*(attempt(t) for t in forged_tokens(100)))
    assert all(e.error == "invalid_token" and e.status == 401 for e in results)
    assert len(fake.jwks_requests) == 1

    clock.advance(INTERVAL)  # still fresh (max-age 300): only unknown kids may refetch
    await asyncio.gather(*(attempt(t) for t in forged_tokens(100)))
    assert len(fake.jwks_requests) == 2 and verifier.keys.fetches == 2

    clock.advance(INTERVAL - 0.1)
    await asyncio.gather(*(attempt(t) for t in forged_tokens(100)))
    assert len(fake.jwks_requests) == 2

    clock.advance(0.1)
    await asyncio.gather(*(attempt(t) for t in forged_tokens(100)))
    assert len(fake.jwks_requests) == 3
    assert len(fake.discovery_requests) == 1


async def test_flood_of_forged_kids_sequentially_one_fetch_per_interval() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cfg = config()
    cache = fake.cache(clock, cfg)
    await cache.key("k1")
    clock.advance(INTERVAL + 1)
    for token in forged_tokens(100):
        with pytest.raises(TokenError):
            await verify_access_token(token, cfg, cache)
        clock.advance(0.05)  # 100 tokens over 5 s
    assert len(fake.jwks_requests) == 2
    clock.advance(INTERVAL)
    for token in forged_tokens(100):
        with pytest.raises(TokenError):
            await verify_access_token(token, cfg, cache)
    assert len(fake.jwks_requests) == 3


async def test_flood_on_a_cold_cache_shares_one_fetch() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cache = fake.cache(clock)
    found = await asyncio.gather(*(cache.key(secrets.token_hex(8)) for _ in range(100)))
    assert found == [None] * 100
    assert len(fake.jwks_requests) == 1 and len(fake.discovery_requests) == 1


async def test_the_flood_does_not_starve_the_real_key() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    clock.advance(INTERVAL)
    results = await asyncio.gather(
        *(cache.key(secrets.token_hex(8)) for _ in range(50)),
        cache.key("k1"),
        *(cache.key(secrets.token_hex(8)) for _ in range(50)),
    )
    assert results[50] is not None and results[50].kid == "k1"
    assert len(fake.jwks_requests) == 2


# -- rotation -----------------------------------------------------------------------------


async def test_a_rotated_in_key_is_found_once_the_interval_has_passed() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cfg = config()
    cache = fake.cache(clock, cfg)
    await cache.key("k1")
    fake.publish(rsa_key("k1"), rsa_key("k2"))
    token = sign(rsa_key("k2"), realtime_claims())
    clock.advance(INTERVAL - 1)
    with pytest.raises(TokenError, match="does not publish"):
        await verify_access_token(token, cfg, cache)
    assert len(fake.jwks_requests) == 1
    clock.advance(1)
    claims = await verify_access_token(token, cfg, cache)
    assert claims["iss"] == ISSUER
    assert len(fake.jwks_requests) == 2
    # Found once, kept: no more fetches while fresh.
    await verify_access_token(sign(rsa_key("k2"), realtime_claims()), cfg, cache)
    assert len(fake.jwks_requests) == 2


async def test_a_rotated_out_key_is_dropped_at_the_next_fetch() -> None:
    fake, clock = issuer_with("k1", "k2"), FakeClock()
    cache = fake.cache(clock)
    assert (await cache.key("k1")) is not None
    fake.publish(rsa_key("k2"))
    clock.advance(300)
    assert (await cache.key("k1")) is None
    assert (await cache.key("k2")) is not None


# -- last known good ----------------------------------------------------------------------

FAILURES: list[tuple[str, dict[str, Any]]] = [
    ("connect", {"fail": "connect"}),
    ("timeout", {"fail": "timeout"}),
    ("500", {"fail": "500"}),
    ("garbage", {"fail": "garbage"}),
    ("array", {"jwks_body": b"[]"}),
    ("no-keys-member", {"jwks_body": b'{"keys": {}}'}),
    ("no-usable-key", {"jwks_body": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}'}),
    ("deep", {"jwks_body": b"[" * 100_000 + b"]" * 100_000}),
]


def break_server(fake: FakeIssuer, how: dict[str, Any]) -> None:
    for name, value in how.items():
        setattr(fake, name, value)


@pytest.mark.parametrize("how", [h for _, h in FAILURES], ids=[i for i, _ in FAILURES])
async def test_last_known_good_until_max_stale(how: dict[str, Any]) -> None:
    fake, clock, cfg = issuer_with("k1"), FakeClock(), config()
    cache = fake.cache(clock, cfg)
    token = sign(rsa_key("k1"), claims())
    good = await cache.key("k1")
    break_server(fake, how)
    clock.advance(300)  # stale: a revalidation is tried, fails, the keys stay
    assert (await verify_access_token(token, cfg, cache, now=NOW))["sub"] == "user-1"
    assert len(fake.jwks_requests) == 2
    clock.advance(MAX_STALE - 300 - 0.5)
    assert (await cache.key("k1")) is good
    assert await verify_access_token(token, cfg, cache, now=NOW)
    clock.advance(0.5)
    with pytest.raises(KeysUnavailable):
        await verify_access_token(token, cfg, cache, now=NOW)
    with pytest.raises(KeysUnavailable):
        await cache.key("k1")


async def test_a_failed_fetch_is_retried_at_most_once_per_retry_interval() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    fake.fail = "connect"
    clock.advance(300)
    await cache.key("k1")
    assert len(fake.jwks_requests) == 2
    clock.advance(RETRY_INTERVAL - 0.1)
    await asyncio.gather(*(cache.key("k1") for _ in range(50)))
    assert len(fake.jwks_requests) == 2
    clock.advance(0.1)
    await asyncio.gather(*(cache.key("k1") for _ in range(50)))
    assert len(fake.jwks_requests) == 3
    # Forged kids during the outage: no more than the same cadence.
    await asyncio.gather(*(cache.key(secrets.token_hex(4)) for _ in range(50)))
    assert len(fake.jwks_requests) == 3


async def test_a_hanging_server_does_not_hold_requests_that_have_good_keys() -> None:
    # A stale set is revalidated, but requests wait at most STALE_WAIT for it (not the 5 s the
    # hanging server takes): they go on with the last good keys, sharing one fetch.
    fake = issuer_with("k1")
    clock = FakeClock()
    cache = fake.cache(clock)
    assert await cache.key("k1") is not None
    clock.advance(301)  # past max-age=300
    fake.fail = "hang"
    started = time.monotonic()
    found = await asyncio.gather(*(cache.key("k1") for _ in range(20)))
    elapsed = time.monotonic() - started
    assert all(key is not None for key in found)
    assert keys_module.STALE_WAIT <= elapsed < 1.5
    assert cache.fetches == 2
    await cache.aclose()  # cancels the revalidation still waiting on the server


async def test_a_revalidation_that_finishes_in_time_is_used_at_once() -> None:
    fake = issuer_with("k1")
    clock = FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    fake.publish(rsa_key("k2"))
    clock.advance(301)
    assert await cache.key("k1") is None  # the new set came within STALE_WAIT: k1 is gone
    assert cache.fetches == 2


async def test_recovery_after_an_outage_renews_last_known_good() -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    cache = fake.cache(clock)
    await cache.key("k1")
    fake.fail = "500"
    clock.advance(MAX_STALE - 1)
    await cache.key("k1")
    fake.fail = None
    fake.publish(rsa_key("k1"), rsa_key("k2"))
    clock.advance(RETRY_INTERVAL)  # past the first max-stale; the retry succeeds
    assert (await cache.key("k2")) is not None
    clock.advance(MAX_STALE - 1)
    fake.fail = "connect"
    assert (await cache.key("k1")) is not None


@pytest.mark.parametrize("how", [h for _, h in FAILURES], ids=[i for i, _ in FAILURES])
async def test_without_any_good_fetch_keys_are_unavailable(how: dict[str, Any]) -> None:
    fake, clock = issuer_with("k1"), FakeClock()
    break_server(fake, how)
    cache = fake.cache(clock)
    with pytest.raises(KeysUnavailable):
        await cache.key("k1")
    attempts = len(fake.requests)
    assert attempts >= 1
    clock.advance(RETRY_INTERVAL - 0.1)
    with pytest.raises(KeysUnavailable):
        await cache.key("k1")
    assert len(fake.requests) == attempts  # not retried before RETRY_INTERVAL


async def test_keys_unavailable_reaches_the_token_check() -> None:
    fake = issuer_with("k1", fail="connect")
    cfg = config()
    with pytest.raises(KeysUnavailable):
        await verify_access_token(
            sign(rsa_key("k1"), realtime_claims()), cfg, fake.cache(FakeClock(), cfg)
        )


# -- what a JWK Set may hold --------------------------------------------------------------


def _private(kid: str) -> dict[str, Any]:
    return dict(rsa_key("k1").as_dict(private=True), kid=kid)


BAD_ENTRIES: list[tuple[str, dict[str, Any] | str]] = [
    ("private-rsa", _private("bad")),
    ("oct", {"kty": "oct", "k": "c2VjcmV0LWJ5dGVz", "kid": "bad", "alg": "HS256"}),
    ("oct-no-k", {"kty": "oct", "kid": "bad"}),
    ("use-enc", dict(public_jwk(rsa_key("k1")), kid="bad", use="enc")),
    ("unknown-kty", {"kty": "XYZ", "kid": "bad"}),
    ("no-kty", dict({k: v for k, v in public_jwk(rsa_key("k1")).items() if k != "kty"}, kid="bad")),
    ("malformed-n", dict(public_jwk(rsa_key("k1")), kid="bad", n="!!not base64!!")),
    ("missing-e", {"kty": "RSA", "kid": "bad", "n": public_jwk(rsa_key("k1"))["n"]}),
    ("kid-number", dict(public_jwk(rsa_key("k1")), kid=7)),
    ("not-an-object", "bad"),
]


@pytest.mark.parametrize("entry", [e for _, e in BAD_ENTRIES], ids=[i for i, _ in BAD_ENTRIES])
async def test_unusable_entries_are_skipped_one_by_one(entry: dict[str, Any] | str) -> None:
    fake = FakeIssuer()
    fake.jwks = [entry, public_jwk(rsa_key("good"))]
    cache = fake.cache(FakeClock())
    assert (await cache.key("bad")) is None
    assert (await cache.key("7")) is None
    assert (await cache.key("good")) is not None


async def test_an_entry_without_kid_is_skipped() -> None:
    fake = FakeIssuer()
    no_kid = {k: v for k, v in public_jwk(rsa_key("nokid")).items() if k != "kid"}
    fake.jwks = [no_kid, dict(public_jwk(rsa_key("nokid")), kid="")]
    fake.jwks.append(public_jwk(rsa_key("good")))
    cache = fake.cache(FakeClock())
    assert (await cache.key("good")) is not None
    assert set(cache._keys) == {"good"}


async def test_a_duplicate_kid_keeps_the_first() -> None:
    fake = FakeIssuer()
    fake.jwks = [public_jwk(rsa_key("dup")), dict(public_jwk(rsa_key("other")), kid="dup")]
    key = await fake.cache(FakeClock()).key("dup")
    assert key is not None and key.as_dict()["n"] == public_jwk(rsa_key("dup"))["n"]


async def test_a_private_key_published_by_mistake_is_never_used() -> None:
    fake = FakeIssuer()
    fake.jwks = [_private("k1")]
    with pytest.raises(KeysUnavailable):  # nothing usable at all
        await fake.cache(FakeClock()).key("k1")


async def test_ec_and_okp_public_keys_are_taken() -> None:
    fake = FakeIssuer()
    fake.jwks = [
        {"kty": "EC", "crv": "P-256", "kid": "ec",
         "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
         "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "okp",
         "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
    ]  # fmt: skip
    cache = fake.cache(FakeClock())
    assert (await cache.key("ec")) is not None
    assert (await cache.key("okp")) is not None


def _padded_jwks(size: int) -> bytes:
    body = json.dumps({"keys": [public_jwk(rsa_key("k1"))]}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def test_a_jwks_body_of_max_document_bytes_is_taken() -> None:
    fake = FakeIssuer(jwks_body=_padded_jwks(MAX_DOCUMENT_BYTES))
    assert len(fake.jwks_body or b"") == MAX_DOCUMENT_BYTES
    assert (await fake.cache(FakeClock()).key("k1")) is not None


async def test_an_oversized_jwks_body_is_refused() -> None:
    fake = FakeIssuer(jwks_body=_padded_jwks(MAX_DOCUMENT_BYTES + 1))
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")


async def test_an_oversized_body_is_not_read_to_the_end() -> None:
    chunks_served = 0

    async def stream() -> Any:
        nonlocal chunks_served
        for _ in range(1000):  # 64 MiB if read to the end
            chunks_served += 1
            yield b" " * 65_536

    async def handle(request: httpx.Request) -> httpx.Response:
        if str(request.url) == DISCOVERY:
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": JWKS_URI})
        return httpx.Response(200, content=stream())

    cache = keys_module.KeyCache(
        config(), httpx.AsyncClient(transport=httpx.MockTransport(handle)), FakeClock()
    )
    with pytest.raises(KeysUnavailable):
        await cache.key("k1")
    assert chunks_served <= MAX_DOCUMENT_BYTES // 65_536 + 2


async def test_an_oversized_discovery_document_is_refused() -> None:
    fake = issuer_with(discovery_extra={"padding": "x" * MAX_DOCUMENT_BYTES})
    with pytest.raises(KeysUnavailable):
        await fake.cache(FakeClock()).key("k1")
    assert fake.jwks_requests == []
