"""DPoP proofs at the resource (RFC 9449 §4.3, §7.1, §11.1): ``verify_proof``, ``ReplayCache``."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from resource_server.config import ResourceServerConfig
from resource_server.dpop import ReplayCache, normalised_uri, verify_proof
from resource_server.errors import DPOP, TokenError
from tests.resource_server.fake_issuer import FakeClock
from tests.resource_server.kit_helpers import (
    OTHER_PROOF_KEY,
    PROOF_KEY,
    RESOURCE,
    RSA_1024_JWK,
    RSA_PROOF_KEY,
    b64,
    config,
    forge,
    make_proof,
    make_token,
    sign,
)

pytestmark = pytest.mark.feature("rs-kit-dpop")

CONFIG = config()
URL = f"{RESOURCE}/orders"
JKT = PROOF_KEY.thumbprint()
TOKEN = make_token(jkt=JKT)


def check(
    proofs: Sequence[str],
    *,
    method: str = "GET",
    url: str = URL,
    token: str = TOKEN,
    jkt: str = JKT,
    settings: ResourceServerConfig = CONFIG,
    replay: ReplayCache | None = None,
    now: float | None = None,
) -> None:
    verify_proof(
        list(proofs),
        method=method,
        url=url,
        access_token=token,
        jkt=jkt,
        config=settings,
        replay=replay if replay is not None else ReplayCache(),
        now=now,
    )


def refused(proofs: Sequence[str], match: str, **options: Any) -> TokenError:
    with pytest.raises(TokenError, match=match) as info:
        check(proofs, **options)
    error = info.value
    assert (error.error, error.status, error.scheme) == ("invalid_dpop_proof", 401, DPOP)
    return error


def proof(**options: Any) -> str:
    options.setdefault("token", TOKEN)
    return make_proof(**options)


# -- accepted ----------------------------------------------------------------------------------


def test_a_good_proof_is_accepted() -> None:
    check([proof()])


def test_an_rsa_2048_proof_is_accepted() -> None:
    token = make_token(jkt=RSA_PROOF_KEY.thumbprint())
    good = make_proof(RSA_PROOF_KEY, alg="PS256", token=token)
    check([good], token=token, jkt=RSA_PROOF_KEY.thumbprint())


# joserfc warns that "EdDSA" is deprecated (RFC 9864), signing and verifying.
@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")
def test_an_ed25519_proof_is_accepted() -> None:
    key = OKPKey.generate_key("Ed25519")
    token = make_token(jkt=key.thumbprint())
    check([make_proof(key, alg="EdDSA", token=token)], token=token, jkt=key.thumbprint())


def test_a_proof_with_a_nonce_is_accepted_unchecked() -> None:
    check([proof(claims={"nonce": "whatever"})])


# -- check 1: one DPoP header; check 2: a JWS of bounded length --------------------------------


def test_no_proof_is_refused() -> None:
    refused([], "proof is required")


def test_two_proofs_are_refused() -> None:
    refused([proof(), proof()], "exactly one")


def test_a_string_instead_of_the_list_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        verify_proof(
            proof(),
            method="GET",
            url=URL,
            access_token=TOKEN,
            jkt=JKT,
            config=CONFIG,
            replay=ReplayCache(),
        )


@pytest.mark.parametrize(
    "value",
    ["", "not-a-jwt", "a.b", "a.b.c.d", "a.b.", ".b.c", "a b.c.d", "eyJ=.eyJ.c2ln"],
)
def test_not_a_jws_is_refused(value: str) -> None:
    refused([value], "signed JWT")


def test_a_proof_over_8192_characters_is_refused() -> None:
    big = proof(claims={"padding": "x" * 8200})
    assert len(big) > 8192
    refused([big], "at most 8192")


def test_a_proof_just_under_the_bound_is_read() -> None:
    padded = proof(claims={"padding": "x" * 5000})
    assert 5000 < len(padded) <= 8192
    check([padded])


def test_a_header_that_is_not_json_is_refused() -> None:
    refused([f"{b64('not json')}.{b64({})}.{b64(b'x')}"], "not JSON")


def test_a_header_that_is_not_an_object_is_refused() -> None:
    refused([f"{b64('[1]')}.{b64({})}.{b64(b'x')}"], "not a JSON object")


# -- check 4: typ; check 5: alg --------------------------------------------------------------


@pytest.mark.parametrize("typ", ["jwt", "at+jwt", "JWT", "dpop"])
def test_a_wrong_typ_is_refused(typ: str) -> None:
    refused([proof(typ=typ)], "typ must be dpop")


def test_a_missing_typ_is_refused() -> None:
    header = {"alg": "ES256", "jwk": PROOF_KEY.as_dict(private=False)}
    refused([sign(header, {"jti": "j", "htm": "GET", "htu": URL, "iat": 1}, PROOF_KEY)], "typ")


def test_an_algorithm_off_the_allow_list_is_refused() -> None:
    refused([proof()], "alg is not allowed", settings=config(dpop_algorithms=("RS256",)))


def test_alg_none_is_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": PROOF_KEY.as_dict(private=False)}
    refused([forge(header, {"jti": "j", "htm": "GET", "htu": URL, "iat": 1})], "alg is not allowed")


def test_hs256_is_refused_whatever_the_key() -> None:
    for jwk in ({"kty": "oct", "k": b64(b"secret")}, PROOF_KEY.as_dict(private=False)):
        header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}
        refused([forge(header, {"jti": "j", "htm": "GET", "htu": URL})], "alg is not allowed")


def test_hs256_is_refused_even_if_configured_because_the_key_is_symmetric() -> None:
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"secret")}}
    settings = config()  # the configuration refuses HS256 (test_config.py): forced here
    object.__setattr__(settings, "dpop_algorithms", ("HS256", "ES256"))
    refused([forge(header, {"jti": "j"})], "public RSA, EC or OKP", settings=settings)


# -- check 7: the key is the header's jwk, public, strong enough --------------------------------


@pytest.mark.parametrize(
    "member",
    [
        {"kid": "k1"},
        {"jku": "https://evil.example/jwks"},
        {"x5u": "https://evil.example/cert"},
        {"x5c": ["MIIB"]},
        {"x5t#S256": "abc"},
    ],
)
def test_key_references_other_than_jwk_are_refused(member: dict[str, Any]) -> None:
    refused([proof(header=member)], "must be its jwk")


def test_a_crit_header_is_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": PROOF_KEY.as_dict(), "crit": ["exp"]}
    refused([forge(header, {"jti": "j", "htm": "GET", "htu": URL})], "must be its jwk")


def test_a_missing_jwk_is_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256"}
    body = {"jti": "j", "htm": "GET", "htu": URL, "iat": int(time.time())}
    refused([sign(header, body, PROOF_KEY)], "jwk must be a public")


def test_a_jwk_with_its_private_part_is_refused() -> None:
    refused([proof(jwk=PROOF_KEY.as_dict(private=True))], "private members")


def test_a_symmetric_jwk_is_refused() -> None:
    refused([proof(jwk={"kty": "oct", "k": b64(b"0123456789abcdef")})], "public RSA, EC or OKP")


def test_an_rsa_1024_jwk_is_refused_without_a_warning() -> None:
    # Warnings are errors here: joserfc's SecurityWarning on importing it would escape.
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": RSA_1024_JWK}
    refused([forge(header, {"jti": "j", "htm": "GET", "htu": URL})], "2048 bits")


@pytest.mark.parametrize("n", [None, 42, "", "not base64!"])
def test_an_rsa_jwk_without_a_readable_modulus_is_refused(n: Any) -> None:
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": {"kty": "RSA", "e": "AQAB", "n": n}}
    refused([forge(header, {"jti": "j"})], "2048 bits")


def test_an_invalid_jwk_is_refused() -> None:
    jwk = {**PROOF_KEY.as_dict(private=False), "x": b64(b"not a point")}
    refused([proof(jwk=jwk)], "not a valid key")


def test_a_signature_of_another_key_is_refused() -> None:
    other = make_proof(OTHER_PROOF_KEY, token=TOKEN, jwk=PROOF_KEY.as_dict(private=False))
    refused([other], "signature does not verify")


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = proof().split(".")
    body = {"jti": "x", "htm": "GET", "htu": URL, "iat": int(time.time()), "ath": "a"}
    refused([f"{header}.{b64(body)}.{signature}"], "signature does not verify")


def test_an_alg_that_does_not_fit_the_key_is_refused() -> None:
    # An RSA jwk with ES256: the EC signature cannot verify with it.
    signed = make_proof(PROOF_KEY, token=TOKEN, jwk=RSA_PROOF_KEY.as_dict(private=False))
    refused([signed], "signature does not verify")


def test_claims_that_are_not_an_object_are_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": PROOF_KEY.as_dict(private=False)}
    registry = JWSRegistry(algorithms=["ES256"], strict_check_header=False)
    signed = jws.serialize_compact(header, json.dumps([1, 2]), PROOF_KEY, registry=registry)
    refused([signed], "claims are not a JSON object")


# -- jti, htm, htu -------------------------------------------------------------------------


def test_a_missing_jti_is_refused() -> None:
    refused([proof(drop=("jti",))], "jti")


@pytest.mark.parametrize("jti", ["", "x" * 257, 42, None, ["a"]])
def test_a_bad_jti_is_refused(jti: Any) -> None:
    refused([proof(claims={"jti": jti})], "jti")


def test_a_jti_of_256_characters_is_accepted() -> None:
    check([proof(jti="x" * 256)])


@pytest.mark.parametrize("htm", ["POST", "get", "", None])
def test_htm_not_the_method_is_refused(htm: Any) -> None:
    refused([proof(claims={"htm": htm})], "htm")


def test_htm_post_for_a_post_is_accepted() -> None:
    check([proof(htm="POST")], method="POST")


@pytest.mark.parametrize(
    "htu",
    [
        "https://evil.example/orders",
        "https://api.example/other",
        "https://api.example/Orders",
        "https://api.example/orders/",
        "https://api.example:8443/orders",
        "http://api.example/orders",
        "https://user@api.example/orders",
        "/orders",
        "api.example/orders",
        "ftp://api.example/orders",
        "https://api.example/ord ers",
        "https://api.example:99999/orders",
        42,
        None,
    ],
)
def test_htu_not_the_uri_is_refused(htu: Any) -> None:
    refused([proof(claims={"htu": htu})], "htu")


def test_a_missing_htu_is_refused() -> None:
    refused([proof(drop=("htu",))], "htu")


@pytest.mark.parametrize(
    ("htu", "url"),
    [
        ("https://api.example:443/orders", URL),
        ("HTTPS://API.Example/orders", URL),
        ("https://api.example/%6F%72ders", URL),
        ("https://api.example/a%2fb", "https://api.example/a%2Fb"),
        ("https://api.example/x/../orders", URL),
        ("https://api.example/./a/./b/../../orders", URL),
        ("https://api.example/../orders", URL),
        ("https://api.example/orders?page=2", URL),
        ("https://api.example/orders#top", "https://api.example/orders?page=3"),
        ("https://api.example", "https://api.example/"),
        ("http://api.example:80/orders", "http://api.example/orders"),
        ("https://api.example:8443/orders", "https://API.example:8443/orders"),
        ("https://[::1]:443/orders", "https://[::1]/orders"),
    ],
)
def test_htu_is_compared_after_normalisation(htu: str, url: str) -> None:
    check([proof(htu=htu)], url=url)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("https://api.example/a%2Fb", "https://api.example/a/b"),
        ("https://api.example:443/x", "https://api.example:444/x"),
        ("https://api.example/a/.", "https://api.example/a"),
        ("http://api.example:443/x", "http://api.example/x"),
    ],
)
def test_normalisation_keeps_what_differs(left: str, right: str) -> None:
    assert normalised_uri(left) != normalised_uri(right)


def test_normalised_uri_of_dot_segments() -> None:
    assert normalised_uri("https://a.example/a/b/..") == "https://a.example/a/"
    assert normalised_uri("https://a.example/a/./") == "https://a.example/a/"
    assert normalised_uri("https://a.example/%7euser") == "https://a.example/~user"


# -- iat (check 11) -----------------------------------------------------------------------


def test_iat_at_the_edges_of_the_leeways_is_accepted() -> None:
    now = 2_000_000_000.0
    check([proof(iat=now - 60)], now=now)
    check([proof(iat=now + 5)], now=now)


def test_an_old_proof_is_refused() -> None:
    now = 2_000_000_000.0
    refused([proof(iat=now - 61)], "too old", now=now)


def test_a_proof_from_the_future_is_refused() -> None:
    now = 2_000_000_000.0
    refused([proof(iat=now + 6)], "in the future", now=now)


@pytest.mark.parametrize("iat", [10**400, -(10**400)], ids=["huge", "huge-negative"])
def test_an_iat_past_a_floats_range_is_refused_not_a_crash(iat: int) -> None:
    # math.isfinite(10**400) raises OverflowError: it was a 500 for any holder of a bound token.
    refused([proof(claims={"iat": iat})], "iat")


def test_the_leeways_are_configurable() -> None:
    now = 2_000_000_000.0
    settings = config(dpop_iat_leeway=10, dpop_iat_future_leeway=0)
    refused([proof(iat=now - 11)], "too old", now=now, settings=settings)
    refused([proof(iat=now + 1)], "future", now=now, settings=settings)


@pytest.mark.parametrize("iat", ["2000000000", True, None, [1]])
def test_an_iat_that_is_not_a_number_is_refused(iat: Any) -> None:
    refused([proof(claims={"iat": iat})], "iat must be a number")


def test_a_missing_iat_is_refused() -> None:
    refused([proof(drop=("iat",))], "iat")


# -- ath (check 10, §7.1) ---------------------------------------------------------------------


def test_a_missing_ath_is_refused() -> None:
    refused([make_proof()], "ath")


def test_the_ath_of_another_token_is_refused() -> None:
    refused([make_proof(token=make_token(jkt=JKT))], "ath")


@pytest.mark.parametrize("ath", [42, "", "\u00e9"])
def test_a_malformed_ath_is_refused(ath: Any) -> None:
    refused([proof(claims={"ath": ath})], "ath")


# -- the proof's key is the token's (§7.1) -------------------------------------------------


def test_a_proof_of_another_key_is_invalid_token() -> None:
    other = make_proof(OTHER_PROOF_KEY, token=TOKEN)
    with pytest.raises(TokenError) as info:
        check([other])
    assert (info.value.error, info.value.status, info.value.scheme) == ("invalid_token", 401, DPOP)


# -- replay (§11.1) ------------------------------------------------------------------------


def test_a_replayed_proof_is_refused() -> None:
    replay = ReplayCache()
    once = proof()
    check([once], replay=replay)
    refused([once], "already used", replay=replay)


def test_a_new_proof_reusing_a_jti_is_refused() -> None:
    replay = ReplayCache()
    check([proof(jti="same")], replay=replay)
    refused([proof(jti="same", htm="POST")], "already used", replay=replay, method="POST")


def test_a_jti_seen_with_another_key_does_not_block() -> None:
    replay = ReplayCache()
    check([proof(jti="same")], replay=replay)
    token = make_token(jkt=OTHER_PROOF_KEY.thumbprint())
    other = make_proof(OTHER_PROOF_KEY, jti="same", token=token)
    check([other], replay=replay, token=token, jkt=OTHER_PROOF_KEY.thumbprint())


def test_a_refused_proof_does_not_burn_its_jti() -> None:
    replay = ReplayCache()
    refused([proof(jti="j1", htm="POST")], "htm", replay=replay)
    check([proof(jti="j1")], replay=replay)


def test_a_jti_is_remembered_while_its_proof_could_be_accepted() -> None:
    clock = FakeClock()
    replay = ReplayCache(clock=clock)
    now = 2_000_000_000.0
    once = proof(iat=now)
    check([once], replay=replay, now=now)
    clock.advance(60)
    refused([once], "already used", replay=replay, now=now)
    clock.advance(2)  # past iat + dpop_iat_leeway (+1): the entry is gone
    check([once], replay=replay, now=now)


def test_the_replay_cache_forgets_after_the_ttl() -> None:
    clock = FakeClock()
    cache = ReplayCache(clock=clock)
    assert cache.first_use("a", 10)
    assert not cache.first_use("a", 10)
    clock.advance(9.9)
    assert not cache.first_use("a", 10)
    clock.advance(0.2)
    assert cache.first_use("a", 10)


def test_the_replay_cache_drops_expired_entries() -> None:
    clock = FakeClock()
    cache = ReplayCache(clock=clock)
    cache.first_use("short", 1)
    cache.first_use("long", 100)
    clock.advance(2)
    cache.first_use("new", 100)
    assert len(cache) == 2
    assert not cache.first_use("long", 100)


def test_the_replay_cache_is_bounded() -> None:
    clock = FakeClock()
    cache = ReplayCache(max_entries=3, clock=clock)
    for index in range(5):
        assert cache.first_use(f"k{index}", 100)
        assert len(cache) <= 3
    assert len(cache) == 3
    assert not cache.first_use("k4", 100)  # the newest are kept
    assert not cache.first_use("k3", 100)
    assert cache.first_use("k0", 100)  # the oldest were forgotten
