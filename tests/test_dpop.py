"""The DPoP proof checker (RFC 9449 §4.3) and its nonces (§8, §9), as a unit: server/dpop.py is
not wired to the endpoints yet. Proofs are built with joserfc, or by hand where joserfc would
refuse to build them (``alg: none``, an HMAC, a wrong ``typ``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import warnings
from typing import Any

import pytest
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from limits.aio.storage import MemoryStorage
from limits.storage import storage_from_string

from server.config import Settings
from server.dpop import (
    MAX_PROOF_LENGTH,
    DpopBindingError,
    DpopError,
    DpopNonceError,
    DpopVerifier,
    Proof,
    _ProofRegistry,
    b64url_sha256,
    normalise_uri,
)
from server.names import DPOP_ALGS
from server.replay import ReplayGuard
from tests.test_ratelimit import redis_url

pytestmark = pytest.mark.feature("dpop-proofs")

EC = ECKey.generate_key("P-256")
EC_OTHER = ECKey.generate_key("P-256")
EC_384 = ECKey.generate_key("P-384")
RSA = RSAKey.generate_key(2048)
ED = OKPKey.generate_key("Ed25519")
NOW = 1_700_000_000
URL = "https://as.example.com/oauth2/token"
TOKEN = "an-access-token"
#: RFC 6749 §5.2: error_description is %x20-21 / %x23-5B / %x5D-7E.
DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")


class Clock:
    def __init__(self, value: float = NOW) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"secret_key": "k" * 16 + secrets.token_hex(16), **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def verifier(
    clock: Clock | None = None, replay: ReplayGuard | None = None, **overrides: Any
) -> DpopVerifier:
    return DpopVerifier(
        settings(**overrides), replay or ReplayGuard(MemoryStorage()), clock or Clock()
    )


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": "POST",
        "htu": URL,
        "iat": NOW,
        **changes,
    }
    return {name: value for name, value in values.items() if value is not ...}


#: joserfc as a client would use it, but with room for an RSA key in the header and for the
#: odd member the tests add.
REGISTRY = _ProofRegistry(algorithms=list(JWSRegistry.algorithms), strict_check_header=False)


def serialize(protected: dict[str, Any], payload: bytes, key: Key) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # EdDSA, deprecated by RFC 9864
        return jws.serialize_compact(protected, payload, key, registry=REGISTRY)  # type: ignore[arg-type]


def proof(key: Key = EC, alg: str = "ES256", header: dict[str, Any] | None = None, **c: Any) -> str:
    """A proof signed with ``key``; ``...`` as a value drops that claim or header member."""
    protected: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    protected.update(header or {})
    protected = {name: value for name, value in protected.items() if value is not ...}
    return serialize(protected, json.dumps(claims(**c)).encode(), key)


def raw_signed(header: dict[str, Any], body: dict[str, Any], key: Key, signing_alg: str) -> str:
    """Signed with ``signing_alg``'s primitive whatever ``header`` says: what joserfc would
    refuse to produce (a key that does not fit the alg, a private jwk)."""
    signing_input = f"{b64(json.dumps(header))}.{b64(json.dumps(body))}"
    signature = JWSRegistry.algorithms[signing_alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def hand_made(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"sig") -> str:
    return f"{b64(json.dumps(header))}.{b64(json.dumps(body))}.{b64(signature)}"


async def check(v: DpopVerifier, value: str, **kw: Any) -> Proof | None:
    options: dict[str, Any] = {"method": "POST", "url": URL, **kw}
    return await v.verify([value], **options)


async def refused(
    v: DpopVerifier, value: str, expected: type[DpopError] = DpopError, **kw: Any
) -> DpopError:
    with pytest.raises(expected) as info:
        await check(v, value, **kw)
    error = info.value
    assert type(error) is expected
    assert DESCRIPTION.fullmatch(error.description), error.description
    assert not value or value not in error.description
    return error


# -- accepted ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"),
    [(EC, "ES256"), (EC_384, "ES384"), (RSA, "RS256"), (RSA, "PS256"), (ED, "EdDSA")],
)
async def test_a_sound_proof_is_accepted(key: Key, alg: str) -> None:
    sent = claims()
    result = await check(verifier(), proof(key, alg, jti=sent["jti"]))
    assert result is not None
    assert result.jkt == key.thumbprint()
    assert (result.jti, result.iat, result.htm, result.htu) == (sent["jti"], NOW, "POST", URL)
    assert result.jwk["kty"] == key.key_type and "d" not in result.jwk


async def test_the_thumbprint_is_rfc_7638() -> None:
    """RFC 7638 §3.1: SHA-256 over the required members in lexicographic order, no spaces."""
    jwk = EC.as_dict(private=False)
    canonical = json.dumps({m: jwk[m] for m in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    result = await check(verifier(), proof())
    assert result is not None and result.jkt == b64(hashlib.sha256(canonical.encode()).digest())


async def test_no_header_is_no_proof() -> None:
    assert await verifier().verify([], method="POST", url=URL) is None


async def test_a_bound_credential_without_a_proof_is_refused() -> None:
    with pytest.raises(DpopBindingError):
        await verifier().verify([], method="POST", url=URL, required_jkt=EC.thumbprint())


async def test_one_string_is_not_a_list_of_headers() -> None:
    with pytest.raises(TypeError):
        await verifier().verify(proof(), method="POST", url=URL)


def test_the_algorithms_are_asymmetric() -> None:
    assert not {"none", "HS256", "HS384", "HS512"} & set(DPOP_ALGS)
    assert {"ES256", "RS256", "PS256", "EdDSA"} <= set(DPOP_ALGS)


# -- refused: the JWS and its header -------------------------------------------------------


async def test_two_dpop_headers_are_refused() -> None:
    with pytest.raises(DpopError, match="exactly one"):
        await verifier().verify([proof(), proof()], method="POST", url=URL)


async def test_two_proofs_folded_into_one_header_are_refused() -> None:
    await refused(verifier(), f"{proof()}, {proof()}")


@pytest.mark.parametrize(
    "value",
    ["", "a.b", "a.b.c.d", "not a jwt", "a..c", "eyJ.eyJ.", "é.b.c", "a.b.c\x00"],
)
async def test_malformed_proofs_are_refused(value: str) -> None:
    await refused(verifier(), value)


async def test_an_oversized_proof_is_refused_before_parsing() -> None:
    big = raw_signed(
        {"typ": "dpop+jwt", "alg": "ES256", "pad": "x" * MAX_PROOF_LENGTH}, {}, EC, "ES256"
    )
    error = await refused(verifier(), big)
    assert "at most" in error.description


@pytest.mark.parametrize(
    "header",
    [
        "not json",
        "[]",
        '"dpop+jwt"',
        "[" * 2000 + "]" * 2000,  # nesting deep enough to exhaust a recursive parser
    ],
)
async def test_an_unreadable_header_is_refused(header: str) -> None:
    await refused(verifier(), f"{b64(header)}.{b64('{}')}.{b64('s')}")


@pytest.mark.parametrize("typ", [..., "JWT", "DPOP+JWT", "dpop+jwt ", "application/dpop+jwt", 1])
async def test_typ_must_be_dpop_jwt(typ: Any) -> None:
    header = {"typ": typ, "alg": "ES256", "jwk": EC.as_dict(private=False)}
    header = {k: v for k, v in header.items() if v is not ...}
    error = await refused(verifier(), raw_signed(header, claims(), EC, "ES256"))
    assert "typ" in error.description


async def test_alg_none_is_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": EC.as_dict(private=False)}
    error = await refused(verifier(), hand_made(header, claims()))
    assert "alg" in error.description
    # With an empty signature too (the compact form of an unsecured JWS).
    unsecured = f"{b64(json.dumps(header))}.{b64(json.dumps(claims()))}."
    await refused(verifier(), unsecured)


async def test_an_hmac_proof_is_refused() -> None:
    """An HMAC keyed with the public key's bytes (the classic algorithm confusion)."""
    jwk = EC.as_dict(private=False)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}
    signing_input = f"{b64(json.dumps(header))}.{b64(json.dumps(claims()))}"
    mac = hmac.new(json.dumps(jwk).encode(), signing_input.encode(), "sha256").digest()
    error = await refused(verifier(), f"{signing_input}.{b64(mac)}")
    assert "alg" in error.description
    oct_header = {**header, "jwk": {"kty": "oct", "k": b64(b"secret")}}
    await refused(verifier(), hand_made(oct_header, claims()))


@pytest.mark.parametrize("alg", [..., 256, "ES256K", "es256", "RSA-OAEP", "Ed25519x"])
async def test_alg_outside_the_allow_list_is_refused(alg: Any) -> None:
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": EC.as_dict(private=False)}
    header = {k: v for k, v in header.items() if v is not ...}
    error = await refused(verifier(), hand_made(header, claims()))
    assert "alg" in error.description


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "https://attacker.example/jwks"},
        {"x5u": "https://attacker.example/cert"},
        {"x5c": ["MIIB"]},
        {"x5t": "abc"},
        {"crit": ["exp"]},
        {"b64": False},
    ],
)
async def test_key_references_and_crit_are_refused(extra: dict[str, Any]) -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": EC.as_dict(private=False), **extra}
    error = await refused(verifier(), hand_made(header, claims()))
    assert next(iter(extra)) in error.description


async def test_a_kid_without_a_jwk_is_refused() -> None:
    error = await refused(verifier(), proof(header={"jwk": ..., "kid": "k1"}))
    assert "jwk" in error.description
    # Next to a jwk, a kid is harmless.
    assert await check(verifier(), proof(header={"kid": "k1"})) is not None


async def test_a_private_key_in_jwk_is_refused() -> None:
    for key, alg in ((EC, "ES256"), (RSA, "RS256"), (ED, "EdDSA")):
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=True)}
        leaked = raw_signed(header, claims(), key, alg)
        error = await refused(verifier(), leaked)
        assert "private" in error.description


@pytest.mark.parametrize(
    "jwk",
    [
        "not an object",
        ["a", "list"],
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "unknown"},
        {},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},  # not a point on the curve
        {"kty": "EC", "crv": "P-256"},
        {"kty": "RSA", "e": "AQAB"},
        {"kty": "RSA", "n": 12345, "e": "AQAB"},
        {"kty": "OKP", "crv": "X25519", "x": b64(b"\x01" * 32)},  # a key-agreement key
        {**EC.as_dict(private=False), "use": "enc"},
    ],
)
async def test_unusable_jwks_are_refused(jwk: Any) -> None:
    alg = "EdDSA" if isinstance(jwk, dict) and jwk.get("kty") == "OKP" else "ES256"
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}
    await refused(verifier(), hand_made(header, claims()))


async def test_a_small_rsa_key_is_refused() -> None:
    with pytest.warns(SecurityWarning):  # joserfc warns of the key it was asked to make
        small = RSAKey.generate_key(1024)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": small.as_dict(private=False)}
    error = await refused(verifier(), hand_made(header, claims()))
    assert "2048" in error.description


async def test_a_signature_by_another_key_is_refused() -> None:
    forged = proof(EC_OTHER, header={"jwk": EC.as_dict(private=False)})
    error = await refused(verifier(), forged)
    assert "signature" in error.description


async def test_an_alg_that_does_not_fit_the_key_is_refused() -> None:
    # A P-384 key under ES256, an RSA key under ES256 and PS256, an EC key under ES384.
    for key, alg, signing_alg in (
        (EC_384, "ES256", "ES384"),
        (RSA, "ES256", "RS256"),
        (RSA, "PS256", "RS256"),
        (EC, "ES384", "ES256"),
    ):
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
        error = await refused(verifier(), raw_signed(header, claims(), key, signing_alg))
        assert "signature" in error.description


async def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = proof().split(".")
    await refused(verifier(), f"{header}.{b64(json.dumps(claims(htm='GET')))}.{signature}")


@pytest.mark.parametrize("payload", ["not json", "[1]", '"text"', "[" * 2000 + "]" * 2000])
async def test_signed_claims_that_are_not_an_object_are_refused(payload: str) -> None:
    protected = {"typ": "dpop+jwt", "alg": "ES256", "jwk": EC.as_dict(private=False)}
    value = serialize(protected, payload.encode(), EC)
    error = await refused(verifier(), value)
    assert "claims" in error.description or "at most" in error.description


# -- refused: the claims -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"jti": ...}, "jti"),
        ({"jti": ""}, "jti"),
        ({"jti": 12}, "jti"),
        ({"jti": "j" * 257}, "jti"),
        ({"jti": "a\x00b"}, "jti"),
        ({"jti": "\ud800"}, "jti"),
        ({"htm": ...}, "htm"),
        ({"htm": "GET"}, "htm"),
        ({"htm": "post"}, "htm"),
        ({"htm": ["POST"]}, "htm"),
        ({"htu": ...}, "htu"),
        ({"htu": 1}, "htu"),
        ({"htu": "https://as.example.com/oauth2/other"}, "htu"),
        ({"htu": "https://evil.example.com/oauth2/token"}, "htu"),
        ({"htu": "http://as.example.com/oauth2/token"}, "htu"),
        ({"htu": "https://as.example.com:8443/oauth2/token"}, "htu"),
        ({"htu": "https://as.example.com/OAUTH2/token"}, "htu"),
        ({"htu": "https://user@as.example.com/oauth2/token"}, "htu"),
        ({"htu": "/oauth2/token"}, "htu"),
        ({"htu": "https://as.example.com/oauth2/to ken"}, "htu"),
        ({"htu": "https://as.example.com:99999/oauth2/token"}, "htu"),
        ({"htu": "ftp://as.example.com/oauth2/token"}, "htu"),
        ({"iat": ...}, "iat"),
        ({"iat": str(NOW)}, "iat"),
        ({"iat": True}, "iat"),
        ({"iat": None}, "iat"),
        ({"iat": NOW - 61}, "iat"),
        ({"iat": NOW + 6}, "iat"),
    ],
)
async def test_each_claim_wrong_in_turn_is_refused(changes: dict[str, Any], named: str) -> None:
    error = await refused(verifier(), proof(**changes))
    assert named in error.description


async def test_an_infinite_iat_is_refused() -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": EC.as_dict(private=False)}
    body = json.dumps(claims(iat=0)).replace('"iat": 0', '"iat": 1e999').encode()
    await refused(verifier(), serialize(header, body, EC))


async def test_the_iat_window_edges() -> None:
    clock = Clock()
    v = verifier(clock, dpop_iat_leeway=60, dpop_iat_future_leeway=5)
    assert await check(v, proof(iat=NOW - 60)) is not None
    assert await check(v, proof(iat=NOW + 5)) is not None
    assert await check(v, proof(iat=NOW - 30.5)) is not None  # NumericDate may be fractional
    await refused(v, proof(iat=NOW - 60.001))
    await refused(v, proof(iat=NOW + 5.001))
    sent = proof()
    clock.value = NOW + 61  # the same proof a minute later
    await refused(v, sent)


async def test_the_method_is_compared_exactly() -> None:
    assert await check(verifier(), proof(htm="GET"), method="GET") is not None
    await refused(verifier(), proof(htm="GET"), method="POST")


@pytest.mark.parametrize(
    ("htu", "request_url"),
    [
        (URL, URL + "?grant_type=x"),  # the request's query is ignored
        (URL + "?a=b", URL),  # and the proof's
        (URL + "#frag", URL),
        ("HTTPS://AS.Example.COM/oauth2/token", URL),  # scheme and host case
        ("https://as.example.com:443/oauth2/token", URL),  # default port
        (URL, "https://as.example.com:443/oauth2/token"),
        ("http://as.example.com:80/a", "http://as.example.com/a"),
        ("https://as.example.com", "https://as.example.com/"),  # empty path
        ("https://as.example.com/oauth2/%74oken", URL),  # unreserved escape decoded
        ("https://as.example.com/a%2fb", "https://as.example.com/a%2Fb"),  # escape case
        ("https://as.example.com/oauth2/./x/../token", URL),  # dot segments
        ("https://[::1]:8443/t", "https://[::1]:8443/t"),
        ("http://127.0.0.1:8000/oauth2/token", "http://127.0.0.1:8000/oauth2/token?x"),
    ],
)
async def test_htu_is_compared_after_normalisation(htu: str, request_url: str) -> None:
    assert await check(verifier(), proof(htu=htu), url=request_url) is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://as.example.com/a%2Fb", "https://as.example.com/a/b"),  # %2F is not /
        ("https://as.example.com/a/", "https://as.example.com/a"),
        ("https://as.example.com:8443/t", "https://as.example.com/t"),
        ("https://as.example.com/Token", "https://as.example.com/token"),
    ],
)
def test_different_uris_stay_different(a: str, b: str) -> None:
    assert normalise_uri(a) is not None and normalise_uri(a) != normalise_uri(b)


async def test_a_request_url_that_is_not_an_http_uri_matches_nothing() -> None:
    """A hostile ``Host`` header could make the caller's URL unusable: a refusal, never a 500."""
    await refused(verifier(), proof(), url="https://exa mple/oauth2/token")
    await refused(verifier(), proof(htu="https:///oauth2/token"), url="https:///oauth2/token")


# -- ath ------------------------------------------------------------------------------------


async def test_ath_right_wrong_missing() -> None:
    ath = b64(hashlib.sha256(TOKEN.encode()).digest())
    assert b64url_sha256(TOKEN) == ath
    assert await check(verifier(), proof(ath=ath), access_token=TOKEN) is not None
    for wrong in (b64url_sha256("another"), ath.upper(), 1, "", "\ud800"):
        error = await refused(verifier(), proof(ath=wrong), access_token=TOKEN)
        assert "ath" in error.description
    error = await refused(verifier(), proof(), access_token=TOKEN)
    assert "must carry ath" in error.description
    # Where no access token is presented (the token endpoint), ath is not looked at.
    assert await check(verifier(), proof(ath="whatever")) is not None


async def test_ath_of_a_token_that_is_not_ascii_is_a_refusal_not_a_crash() -> None:
    await refused(verifier(), proof(ath=b64url_sha256(TOKEN)), access_token="tok\udcffen")


# -- replay ---------------------------------------------------------------------------------


async def test_a_replayed_proof_is_refused_and_another_keys_jti_is_not() -> None:
    v = verifier()
    jti = secrets.token_urlsafe(16)
    assert await check(v, proof(jti=jti)) is not None
    error = await refused(v, proof(jti=jti))
    assert "already used" in error.description
    assert await check(v, proof(EC_OTHER, jti=jti)) is not None


async def test_a_refused_proof_does_not_use_up_its_jti() -> None:
    v = verifier()
    jti = secrets.token_urlsafe(16)
    await refused(v, proof(jti=jti), DpopBindingError, required_jkt=EC_OTHER.thumbprint())
    assert await check(v, proof(jti=jti)) is not None


async def test_a_jti_is_remembered_as_long_as_its_proof_lives() -> None:
    """The TTL given to the storage: from now until ``iat`` + the window (plus a second)."""

    class Recording(ReplayGuard):
        def __init__(self, storage: MemoryStorage) -> None:
            super().__init__(storage)
            self.ttls: list[float] = []

        async def first_use(self, namespace: str, value: str, ttl: float) -> bool:
            self.ttls.append(ttl)
            return await super().first_use(namespace, value, ttl)

    guard = Recording(MemoryStorage())
    v = verifier(replay=guard, dpop_iat_leeway=60)
    await check(v, proof(iat=NOW - 20))
    await check(v, proof(iat=NOW + 5))
    assert guard.ttls == [41, 66]


async def test_a_replay_is_refused_across_two_replicas_sharing_redis() -> None:
    url = redis_url()
    prefix = f"dpop-test-{secrets.token_hex(4)}"  # other runs may share this Redis
    storages = [
        storage_from_string("async+" + url, key_prefix=prefix),
        storage_from_string("async+" + url, key_prefix=prefix),
    ]
    secret = "s" * 8 + secrets.token_hex(16)
    replicas = [
        DpopVerifier(settings(secret_key=secret), ReplayGuard(s), Clock())  # type: ignore[arg-type]
        for s in storages
    ]
    jti = secrets.token_urlsafe(16)
    assert await check(replicas[0], proof(jti=jti)) is not None
    error = await refused(replicas[1], proof(jti=jti))
    assert "already used" in error.description
    assert await check(replicas[1], proof(EC_OTHER, jti=jti)) is not None


# -- binding --------------------------------------------------------------------------------


async def test_a_bound_credential_needs_the_same_key() -> None:
    v = verifier()
    assert await check(v, proof(), required_jkt=EC.thumbprint()) is not None
    error = await refused(v, proof(EC_OTHER), DpopBindingError, required_jkt=EC.thumbprint())
    assert error.error == "invalid_dpop_proof" and "another key" in error.description
    await refused(v, proof(), DpopBindingError, required_jkt="\ud800")


# -- nonces ---------------------------------------------------------------------------------


async def test_a_required_nonce_missing_is_use_dpop_nonce() -> None:
    v = verifier(dpop_require_nonce=True)
    error = await refused(v, proof(), DpopNonceError)
    assert isinstance(error, DpopNonceError)
    assert error.error == "use_dpop_nonce" and error.nonce == v.current_nonce()
    assert await check(v, proof(nonce=error.nonce)) is not None


async def test_nonces_rotate_and_the_previous_and_next_slots_are_accepted() -> None:
    clock = Clock(NOW)
    v = verifier(clock, dpop_require_nonce=True, dpop_nonce_lifetime=300)
    first = v.current_nonce()
    clock.value = NOW + 300
    second = v.current_nonce()
    assert second != first
    # Previous slot: still good.
    assert await check(v, proof(nonce=first, iat=clock.value)) is not None
    clock.value = NOW + 600
    # Two slots on: stale, and the refusal carries the current one.
    error = await refused(v, proof(nonce=first, iat=clock.value), DpopNonceError)
    assert isinstance(error, DpopNonceError) and error.nonce == v.current_nonce() != first


async def test_a_replica_a_little_behind_accepts_the_next_slots_nonce() -> None:
    secret = "b" * 8 + secrets.token_hex(16)
    behind = verifier(Clock(NOW), dpop_require_nonce=True, secret_key=secret)
    ahead = verifier(Clock(NOW + 300), secret_key=secret)
    far_ahead = verifier(Clock(NOW + 600), secret_key=secret)
    assert await check(behind, proof(nonce=ahead.current_nonce())) is not None
    await refused(behind, proof(nonce=far_ahead.current_nonce()), DpopNonceError)


async def test_replicas_with_one_secret_agree_on_nonces_and_others_do_not() -> None:
    secret = "n" * 8 + secrets.token_hex(16)
    one = verifier(secret_key=secret, dpop_require_nonce=True)
    two = verifier(secret_key=secret, dpop_require_nonce=True)
    other = verifier(dpop_require_nonce=True)
    assert one.current_nonce() == two.current_nonce() != other.current_nonce()
    assert await check(two, proof(nonce=one.current_nonce())) is not None
    await refused(other, proof(nonce=one.current_nonce()), DpopNonceError)


@pytest.mark.parametrize("nonce", ["made-up", "", "é" * 10, "n" * 300, "\ud800"])
async def test_an_unknown_nonce_is_use_dpop_nonce(nonce: str) -> None:
    await refused(verifier(dpop_require_nonce=True), proof(nonce=nonce), DpopNonceError)
    # Even where nonces are not required, a nonce that is not ours is not accepted.
    await refused(verifier(), proof(nonce=nonce), DpopNonceError)


async def test_a_nonce_of_the_wrong_type_is_an_invalid_proof() -> None:
    await refused(verifier(dpop_require_nonce=True), proof(nonce=12))


async def test_without_the_setting_no_nonce_is_needed() -> None:
    assert await check(verifier(), proof()) is not None
