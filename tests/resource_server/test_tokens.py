"""resource_server/tokens.py: every RFC 9068 §4 check, each refused on its own."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from resource_server.config import ResourceServerConfig
from resource_server.errors import BEARER, TokenError
from resource_server.keys import KeyCache, KeysUnavailable
from resource_server.tokens import (
    MAX_TOKEN_LENGTH,
    REQUIRED_CLAIMS,
    scopes_of,
    unverified_header,
    verify_access_token,
)
from tests.resource_server.fake_issuer import (
    ISSUER,
    NOW,
    RESOURCE,
    FakeClock,
    FakeIssuer,
    b64,
    claims,
    config,
    public_jwk,
    rsa_key,
    sign,
    sign_raw,
    unsigned,
)

pytestmark = pytest.mark.feature("rs-kit-tokens")

CONFIG = config()
LEEWAY = CONFIG.leeway


@pytest.fixture
async def cache() -> AsyncIterator[KeyCache]:
    """The issuer publishes k1 (alg RS256), ps (alg PS256) and noalg (no alg member)."""
    fake = FakeIssuer()
    fake.publish(rsa_key("k1"), rsa_key("ps", "PS256"), rsa_key("noalg", None))
    keys = fake.cache(FakeClock())
    await keys.key("k1")
    yield keys
    await keys.http.aclose()


async def verify(
    token: str, keys: KeyCache, cfg: ResourceServerConfig = CONFIG, now: float = NOW
) -> dict[str, Any]:
    return await verify_access_token(token, cfg, keys, now=now)


async def refused(
    token: str, keys: KeyCache, match: str, cfg: ResourceServerConfig = CONFIG, now: float = NOW
) -> TokenError:
    with pytest.raises(TokenError) as error:
        await verify(token, keys, cfg, now)
    assert error.value.error == "invalid_token"
    assert error.value.status == 401 and error.value.scheme == BEARER
    assert match in error.value.description, error.value.description
    assert not token or token not in error.value.description
    return error.value


K1 = rsa_key("k1")


async def test_a_good_token_gives_its_claims(cache: KeyCache) -> None:
    payload = claims(extra="kept")
    assert await verify(sign(K1, payload), cache) == payload


# -- the form ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",  # a JWE
        "a..c",
        "a.b.",  # no signature
        "a+b.c.d",
        "a.b.c=",
        " a.b.c",
        "a.b.c\n",
    ],
)
async def test_not_a_compact_jws(token: str, cache: KeyCache) -> None:
    await refused(token, cache, "not a signed JWT")


async def test_an_oversize_token_is_refused_before_anything_else(cache: KeyCache) -> None:
    big = sign(K1, claims(padding="x" * MAX_TOKEN_LENGTH))
    assert len(big) > MAX_TOKEN_LENGTH
    await refused(big, cache, "not a signed JWT")


async def test_a_large_token_under_the_bound_is_fine(cache: KeyCache) -> None:
    token = sign(K1, claims(padding="x" * (MAX_TOKEN_LENGTH * 3 // 4 - 700)))
    assert MAX_TOKEN_LENGTH - 1000 < len(token) <= MAX_TOKEN_LENGTH
    assert (await verify(token, cache))["padding"]


@pytest.mark.parametrize(
    ("segment", "match"),
    [
        (b64(b"not json"), "header is not JSON"),
        (b64(b"\xff\xfe{}"), "header is not JSON"),  # not UTF-8
        ("A", "header is not JSON"),  # not base64 (length 1 mod 4)
        (b64(b"[" * 5_000), "header is not JSON"),  # RecursionError
        (b64(b'["alg", "RS256"]'), "not a JSON object"),
        (b64(b'"at+jwt"'), "not a JSON object"),
        (b64(b"null"), "not a JSON object"),
    ],
)
async def test_a_header_that_is_not_a_json_object(
    segment: str, match: str, cache: KeyCache
) -> None:
    payload = sign(K1).split(".", 1)[1]
    await refused(f"{segment}.{payload}", cache, match)


def test_unverified_header_reads_the_header() -> None:
    assert unverified_header(sign(K1)) == {"alg": "RS256", "typ": "at+jwt", "kid": "k1"}


# -- the header --------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+JWT"])
async def test_typ_at_jwt_in_any_case(typ: str, cache: KeyCache) -> None:
    assert (await verify(sign(K1, typ=typ), cache))["sub"] == "user-1"


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "dpop+jwt", "at+jwt ", "at", 1, ["at+jwt"]])
async def test_any_other_typ_is_refused(typ: Any, cache: KeyCache) -> None:
    header = {"alg": "RS256", "kid": "k1"} | ({} if typ is None else {"typ": typ})
    await refused(sign_raw(K1, header, claims()), cache, "not an access token")


async def test_an_id_token_shape_is_refused(cache: KeyCache) -> None:
    # A validly signed JWT of the issuer's, with every claim right, but typ JWT (an ID token).
    await refused(sign(K1, typ="JWT"), cache, "typ at+jwt")


@pytest.mark.parametrize("signature", [b"", b"\x00"])
async def test_alg_none_is_refused(signature: bytes, cache: KeyCache) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": "k1"}
    match = "not a signed JWT" if not signature else "algorithm not allowed"
    await refused(unsigned(header, claims(), signature), cache, match)


@pytest.mark.parametrize("alg", ["None", "NONE", "HS256", "RS512", "rs256", "ES256", "", None, 1])
async def test_alg_off_the_allow_list_is_refused(alg: Any, cache: KeyCache) -> None:
    header = {"typ": "at+jwt", "kid": "k1"} | ({} if alg is None else {"alg": alg})
    await refused(unsigned(header, claims(), b"sig"), cache, "algorithm not allowed")


async def test_rs512_properly_signed_is_still_refused(cache: KeyCache) -> None:
    await refused(sign(rsa_key("noalg", None), alg="RS512"), cache, "algorithm not allowed")


def _hs256_with_public_key(public: bytes, kid: str) -> str:
    """The classic confusion: HMAC keyed with the RSA public key, which anyone has."""
    header = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    payload = b64(json.dumps(claims()).encode())
    mac = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(mac)}"


def _public_pem(kid: str, alg: str | None) -> bytes:
    public = rsa_key(kid, alg).get_op_key("verify")
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("kid", ["k1", "noalg"])
async def test_hs256_keyed_with_the_public_key_is_refused(kid: str, cache: KeyCache) -> None:
    pem = _public_pem(kid, "RS256" if kid == "k1" else None)
    await refused(_hs256_with_public_key(pem, kid), cache, "algorithm not allowed")
    jwk_json = json.dumps(public_jwk(rsa_key(kid, "RS256" if kid == "k1" else None))).encode()
    await refused(_hs256_with_public_key(jwk_json, kid), cache, "algorithm not allowed")


async def test_hs256_confusion_fails_even_if_hs256_were_allowed(cache: KeyCache) -> None:
    # The configuration refuses HS256 (test_config.py); were it let through anyway, the
    # key published is RSA, so still no.
    cfg = config()
    object.__setattr__(cfg, "algorithms", ("RS256", "HS256"))
    await refused(
        _hs256_with_public_key(_public_pem("noalg", None), "noalg"),
        cache,
        "does not verify",
        cfg,
    )
    await refused(_hs256_with_public_key(_public_pem("k1", "RS256"), "k1"), cache, "alg", cfg)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jku", "https://evil.example/jwks"),
        ("x5u", "https://evil.example/cert.pem"),
        ("x5c", ["MIIB"]),
        ("jwk", {"kty": "RSA", "n": "AQAB", "e": "AQAB"}),
        ("crit", ["exp"]),
        ("b64", False),
    ],
)
async def test_forbidden_header_members(name: str, value: Any, cache: KeyCache) -> None:
    header = {"alg": "RS256", "typ": "at+jwt", "kid": "k1", name: value}
    await refused(sign_raw(K1, header, claims()), cache, "names keys or extensions")


async def test_sign_raw_makes_tokens_that_verify(cache: KeyCache) -> None:
    # The forged-header tests above are refused for their header, not for sign_raw.
    header = {"alg": "RS256", "typ": "at+jwt", "kid": "k1"}
    assert await verify(sign_raw(K1, header, claims()), cache)
    header = {"alg": "PS256", "typ": "at+jwt", "kid": "noalg"}
    assert await verify(sign_raw(rsa_key("noalg", None), header, claims()), cache)


@pytest.mark.parametrize("kid", [None, "", 7, ["k1"]])
async def test_no_usable_kid(kid: Any, cache: KeyCache) -> None:
    token = sign(K1, kid=None) if kid is None else unsigned(
        {"alg": "RS256", "typ": "at+jwt", "kid": kid}, claims(), b"sig"
    )  # fmt: skip
    await refused(token, cache, "names no key")


async def test_an_unknown_kid_is_refused(cache: KeyCache) -> None:
    await refused(sign(rsa_key("attacker"), kid="not-published"), cache, "does not publish")


async def test_the_keys_alg_must_be_the_tokens(cache: KeyCache) -> None:
    # k1 says alg RS256: a PS256 signature by that very key is refused, and the reverse.
    ps = rsa_key("ps", "PS256")
    await refused(sign_raw(K1, {"alg": "PS256", "typ": "at+jwt", "kid": "k1"}, claims()),
                  cache, "not its key's")  # fmt: skip
    await refused(sign_raw(ps, {"alg": "RS256", "typ": "at+jwt", "kid": "ps"}, claims()),
                  cache, "not its key's")  # fmt: skip
    assert await verify(sign(rsa_key("ps", "PS256"), alg="PS256"), cache)


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
async def test_a_key_without_alg_takes_any_allowed_alg(alg: str, cache: KeyCache) -> None:
    assert await verify(sign(rsa_key("noalg", None), alg=alg), cache)


async def test_a_bad_signature_is_refused(cache: KeyCache) -> None:
    header, payload, signature = sign(K1).split(".")
    flipped = ("B" if signature[10] == "A" else "A").join((signature[:10], signature[11:]))
    await refused(f"{header}.{payload}.{flipped}", cache, "does not verify")


async def test_a_signature_by_another_key_under_a_published_kid(cache: KeyCache) -> None:
    await refused(sign(rsa_key("attacker"), kid="k1"), cache, "does not verify")


async def test_claims_changed_after_signing_are_refused(cache: KeyCache) -> None:
    header, _, signature = sign(K1).split(".")
    forged = b64(json.dumps(claims(scope="admin")).encode())
    await refused(f"{header}.{forged}.{signature}", cache, "does not verify")


async def test_a_signed_payload_that_is_not_json(cache: KeyCache) -> None:
    await refused(sign(K1, b"not json"), cache, "does not verify")


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"claims"', b"null", b"3"])
async def test_signed_claims_that_are_not_an_object(payload: bytes, cache: KeyCache) -> None:
    await refused(sign(K1, payload), cache, "claims are not a JSON object")


async def test_keys_unavailable_is_not_a_token_error() -> None:
    fake = FakeIssuer(fail="connect")
    with pytest.raises(KeysUnavailable):
        await verify(sign(K1), fake.cache(FakeClock()))


# -- the claims --------------------------------------------------------------------------


@pytest.mark.parametrize("iss", [ISSUER + "/", "https://evil.example", ISSUER.upper(), ""])
async def test_iss_must_be_the_issuer_exactly(iss: str, cache: KeyCache) -> None:
    await refused(sign(K1, claims(iss=iss)), cache, "issued by another server")


@pytest.mark.parametrize("iss", [[ISSUER], {"iss": ISSUER}, 1])
async def test_iss_of_another_type(iss: Any, cache: KeyCache) -> None:
    await refused(sign(K1, claims(iss=iss)), cache, "another server")


@pytest.mark.parametrize("aud", [RESOURCE, [RESOURCE], ["https://other.example", RESOURCE]])
async def test_aud_naming_this_api(aud: Any, cache: KeyCache) -> None:
    assert (await verify(sign(K1, claims(aud=aud)), cache))["aud"] == aud


@pytest.mark.parametrize(
    "aud",
    [
        "https://other.example",
        RESOURCE + "/",
        ["https://other.example"],
        [],
        [[RESOURCE]],
        {"aud": RESOURCE},
        7,
        RESOURCE + " https://other.example",
    ],
)
async def test_aud_not_naming_this_api(aud: Any, cache: KeyCache) -> None:
    await refused(sign(K1, claims(aud=aud)), cache, "another audience")


async def test_exp_boundary_with_leeway(cache: KeyCache) -> None:
    token = sign(K1, claims(exp=NOW))
    assert await verify(token, cache, now=NOW + LEEWAY - 1)
    assert await verify(token, cache, now=NOW + LEEWAY - 0.001)
    await refused(token, cache, "expired", now=NOW + LEEWAY)
    await refused(token, cache, "expired", now=NOW + LEEWAY + 1)


async def test_leeway_zero(cache: KeyCache) -> None:
    cfg = config(leeway=0)
    token = sign(K1, claims(exp=NOW + 1))
    assert await verify(token, cache, cfg, now=NOW)
    await refused(token, cache, "expired", cfg, now=NOW + 1)


async def test_nbf_boundary_with_leeway(cache: KeyCache) -> None:
    token = sign(K1, claims(nbf=NOW + 100))
    assert await verify(token, cache, now=NOW + 100 - LEEWAY)
    await refused(token, cache, "not valid yet", now=NOW + 100 - LEEWAY - 1)


async def test_iat_boundary_with_leeway(cache: KeyCache) -> None:
    token = sign(K1, claims(iat=NOW + LEEWAY, exp=NOW + 600))
    assert await verify(token, cache)
    later = sign(K1, claims(iat=NOW + LEEWAY + 1, exp=NOW + 600))
    await refused(later, cache, "issued in the future")


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("exp", True, "expired"),
        ("exp", False, "expired"),
        ("exp", str(NOW + 300), "expired"),
        ("exp", [NOW + 300], "expired"),
        ("iat", True, "in the future"),
        ("iat", "now", "in the future"),
        ("nbf", True, "not valid yet"),
        ("nbf", str(NOW), "not valid yet"),
        ("nbf", {}, "not valid yet"),
    ],
)
async def test_times_that_are_not_numbers(
    name: str, value: Any, match: str, cache: KeyCache
) -> None:
    await refused(sign(K1, claims(**{name: value})), cache, match)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_exp_that_is_not_finite(literal: str, cache: KeyCache) -> None:
    body = json.dumps(claims(exp=0)).replace('"exp": 0', f'"exp": {literal}').encode()
    await refused(sign(K1, body), cache, "expired")


async def test_a_huge_integer_time_is_a_number_not_a_crash(cache: KeyCache) -> None:
    # math.isfinite(10**400) raises OverflowError: it once escaped as a 500.
    huge = 10**400
    assert (await verify(sign(K1, claims(exp=huge)), cache))["exp"] == huge
    await refused(sign(K1, claims(nbf=huge)), cache, "not valid yet")
    await refused(sign(K1, claims(iat=huge)), cache, "in the future")
    await refused(sign(K1, claims(exp=-huge)), cache, "expired")


async def test_float_times_are_numbers(cache: KeyCache) -> None:
    assert await verify(sign(K1, claims(exp=NOW + 0.5, iat=NOW - 0.5, nbf=NOW - 0.5)), cache)


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
async def test_each_required_claim_missing(name: str, cache: KeyCache) -> None:
    await refused(sign(K1, claims(**{name: None})), cache, f"lacks claims: {name}.")


@pytest.mark.parametrize("name", REQUIRED_CLAIMS)
async def test_each_required_claim_null(name: str, cache: KeyCache) -> None:
    body = json.dumps(claims() | {name: None}).encode()
    await refused(sign(K1, body), cache, name)


async def test_every_missing_claim_is_named(cache: KeyCache) -> None:
    await refused(sign(K1, {"scope": "x"}), cache, "lacks claims: " + ", ".join(REQUIRED_CLAIMS))


async def test_extra_required_claims(cache: KeyCache) -> None:
    cfg = config(extra_claims_required=("tenant",))
    await refused(sign(K1), cache, "lacks claims: tenant.", cfg)
    assert await verify(sign(K1, claims(tenant="t1")), cache, cfg)


@pytest.mark.parametrize("name", ["sub", "client_id", "jti"])
@pytest.mark.parametrize("value", [1, True, ["x"], {"id": "x"}])
async def test_sub_client_id_jti_must_be_strings(name: str, value: Any, cache: KeyCache) -> None:
    await refused(sign(K1, claims(**{name: value})), cache, f"{name} is not a string")


@pytest.mark.parametrize("scope", [["orders:read"], 1, True, {"orders:read": True}])
async def test_scope_must_be_a_string(scope: Any, cache: KeyCache) -> None:
    await refused(sign(K1, claims(scope=scope)), cache, "scope is not a string")


async def test_scope_may_be_absent(cache: KeyCache) -> None:
    assert "scope" not in await verify(sign(K1, claims(scope=None)), cache)


async def test_now_defaults_to_the_wall_clock(cache: KeyCache) -> None:
    now = int(time.time())
    fresh = sign(K1, claims(iat=now, exp=now + 300))
    assert await verify_access_token(fresh, CONFIG, cache)
    stale = sign(K1, claims(iat=now - 900, exp=now - 600))
    with pytest.raises(TokenError, match="expired"):
        await verify_access_token(stale, CONFIG, cache)


# -- scopes_of ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("orders:read orders:write", {"orders:read", "orders:write"}),
        ("  a   b  a ", {"a", "b"}),
        ("a\tb", {"a", "b"}),
        ("", set()),
        (None, set()),
        (["a", "b"], set()),
        (7, set()),
    ],
)
def test_scopes_of(scope: Any, expected: set[str]) -> None:
    assert scopes_of({} if scope is None else {"scope": scope}) == frozenset(expected)
