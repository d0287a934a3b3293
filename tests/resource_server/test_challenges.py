"""resource_server/challenges.py: the Authorization header in (RFC 6750 §2.1, RFC 9449 §7.1),
WWW-Authenticate challenges (RFC 6750 §3, RFC 9449 §7.1, RFC 9728 §5.1) and JSON bodies out."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from resource_server import errors
from resource_server.challenges import (
    MAX_TOKEN_LENGTH,
    error_body,
    parse_authorization,
    www_authenticate,
)
from resource_server.config import DPOP_ALGORITHMS
from resource_server.errors import BEARER, DPOP, TokenError
from tests.resource_server.fake_issuer import config
from tests.seeds import run_seeded

pytestmark = pytest.mark.feature("rs-kit-challenges")

METADATA = "https://api.example/.well-known/oauth-protected-resource/orders"
#: RFC 6750 §2.1.
B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: One challenge as written here: scheme SP auth-param *( ", " auth-param ), every value a
#: quoted-string without quoted-pairs (RFC 9110 §11.2, RFC 6750 §3's value syntax).
_PARAM = r'([a-z_]+)="([\x20\x21\x23-\x5b\x5d-\x7e]*)"'
_CHALLENGE = re.compile(rf"(Bearer|DPoP) {_PARAM}(?:, {_PARAM})*")


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """The scheme and parameters of a challenge; AssertionError unless it parses whole."""
    assert _CHALLENGE.fullmatch(value), value
    scheme, params = value.split(" ", 1)
    pairs = re.findall(_PARAM, params)
    assert ", ".join(f'{k}="{v}"' for k, v in pairs) == params
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), value
    return scheme, dict(pairs)


def challenges(error: TokenError, **overrides: object) -> list[tuple[str, dict[str, str]]]:
    return [parse_challenge(v) for v in www_authenticate(error, config(**overrides), METADATA)]


# -- parse_authorization -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", (BEARER, "abc")),
        ("bearer abc", (BEARER, "abc")),
        ("BEARER abc", (BEARER, "abc")),
        ("BeArEr abc", (BEARER, "abc")),
        ("DPoP abc", (DPOP, "abc")),
        ("dpop abc", (DPOP, "abc")),
        ("DPOP abc", (DPOP, "abc")),
        ("Bearer   abc", (BEARER, "abc")),  # 1*SP
        ("  Bearer abc \t", (BEARER, "abc")),
        ("Bearer AZaz09-._~+/==", (BEARER, "AZaz09-._~+/==")),
        ("Bearer eyJ.eyJ.sig", (BEARER, "eyJ.eyJ.sig")),
    ],
)
def test_bearer_and_dpop_in_any_case(header: str, expected: tuple[str, str]) -> None:
    assert parse_authorization(header) == expected


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "Basic dXNlcjpwYXNz", "Negotiate abc", "Bearerabc", "Token abc",
     "Bearer-x abc", "Bearer\tabc", "MAC id=1", "xBearer abc"],
)  # fmt: skip
def test_no_token_of_ours(header: str | None) -> None:
    assert parse_authorization(header) is None


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ("Bearer", "needs a token"),
        ("Bearer ", "needs a token"),
        ("bearer     ", "needs a token"),
        ("DPoP", "needs a token"),
        ("Bearer a b", "malformed"),
        ("Bearer a,b", "malformed"),
        ("Bearer ab=c", "malformed"),  # '=' only at the end
        ("Bearer =abc", "malformed"),
        ("Bearer abc\n", "malformed"),
        ("Bearer a\tb", "malformed"),
        ('Bearer "abc"', "malformed"),
        ("Bearer abc;", "malformed"),
        ("DPoP é", "malformed"),
        ("Bearer ａｂｃ", "malformed"),  # fullwidth letters are not ALPHA
        ("Bearer abc\x00", "malformed"),
    ],
)
def test_a_malformed_token_is_invalid_request(header: str, match: str) -> None:
    with pytest.raises(TokenError) as refused:
        parse_authorization(header)
    assert refused.value.error == "invalid_request"
    assert refused.value.status == 400 and refused.value.scheme is None
    assert match in refused.value.description


def test_token_length_bound() -> None:
    assert parse_authorization("Bearer " + "a" * MAX_TOKEN_LENGTH) == (
        BEARER,
        "a" * MAX_TOKEN_LENGTH,
    )
    with pytest.raises(TokenError, match="at most") as refused:
        parse_authorization("Bearer " + "a" * (MAX_TOKEN_LENGTH + 1))
    assert refused.value.status == 400


# -- www_authenticate --------------------------------------------------------------------


def test_no_credentials_both_challenges_without_error() -> None:
    assert challenges(errors.missing()) == [
        (BEARER, {"realm": "api", "resource_metadata": METADATA}),
        (DPOP, {"realm": "api", "algs": " ".join(DPOP_ALGORITHMS), "resource_metadata": METADATA}),
    ]


def test_the_exact_bearer_challenge() -> None:
    value = www_authenticate(errors.invalid_token("Expired."), config(), METADATA)
    assert value == [
        f'Bearer realm="api", error="invalid_token", error_description="Expired.", '
        f'resource_metadata="{METADATA}"'
    ]


def test_invalid_token_in_its_scheme_only() -> None:
    [(scheme, params)] = challenges(errors.invalid_token("Gone.", scheme=DPOP))
    assert scheme == DPOP
    assert params["error"] == "invalid_token" and params["error_description"] == "Gone."
    assert params["algs"].split() == list(DPOP_ALGORITHMS)
    assert params["resource_metadata"] == METADATA


def test_insufficient_scope_names_the_scope() -> None:
    [(scheme, params)] = challenges(errors.insufficient_scope("orders:write orders:read"))
    assert scheme == BEARER
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "orders:write orders:read"
    assert "orders:write" in params["error_description"]
    assert "algs" not in params


def test_invalid_request_challenges_every_scheme() -> None:
    found = challenges(errors.invalid_request("The Bearer token is malformed."))
    assert [s for s, _ in found] == [BEARER, DPOP]
    assert all(p["error"] == "invalid_request" for _, p in found)


def test_no_error_description_when_empty() -> None:
    [(_, params)] = challenges(TokenError("invalid_token", "", 401, BEARER))
    assert "error_description" not in params and params["error"] == "invalid_token"


def test_dpop_required_only_dpop() -> None:
    assert [s for s, _ in challenges(errors.missing(), dpop_required=True)] == [DPOP]
    # A refusal of a Bearer token: the scheme it came in is not accepted, so DPoP.
    found = challenges(errors.invalid_token(), dpop_required=True)
    assert [s for s, _ in found] == [DPOP]


def test_dpop_disabled_only_bearer() -> None:
    assert [s for s, _ in challenges(errors.missing(), dpop=False)] == [BEARER]
    found = challenges(errors.invalid_dpop_proof("Bad proof."), dpop=False)
    assert [s for s, _ in found] == [BEARER]
    assert all("algs" not in p for _, p in found)


def test_dpop_required_without_dpop_is_refused_by_the_configuration() -> None:
    with pytest.raises(ValueError, match="dpop_required"):
        challenges(errors.missing(), dpop=False, dpop_required=True)


def test_algs_follow_the_configuration_and_realm_too() -> None:
    [_, (_, params)] = challenges(
        errors.missing(), dpop_algorithms=("ES256", "EdDSA"), realm="orders"
    )
    assert params["algs"] == "ES256 EdDSA" and params["realm"] == "orders"


@pytest.mark.parametrize(
    ("description", "shown"),
    [
        ('Say "hi"', "Say ?hi?"),
        ("back\\slash", "back?slash"),
        ("café", "caf?"),
        ("line\r\nSet-Cookie: x=1", "line??Set-Cookie: x=1"),
        ("tab\there", "tab?here"),
        ("\x7f\x00", "??"),
        ('", error="forged', "?, error=?forged"),
    ],
)
def test_descriptions_are_sanitised(description: str, shown: str) -> None:
    error = TokenError("invalid_token", description, 401, BEARER, scope='a"b')
    [(_, params)] = challenges(error)
    assert params["error_description"] == shown
    assert params["error"] == "invalid_token" and params["scope"] == "a?b"


def test_configured_values_are_sanitised_too() -> None:
    found = www_authenticate(errors.missing(), config(realm='my "api"'), 'https://x/"\\')
    assert [scheme for scheme, _ in map(parse_challenge, found)] == [BEARER, DPOP]
    for _, params in map(parse_challenge, found):
        assert params["realm"] == "my ?api?" and params["resource_metadata"] == "https://x/??"


# -- error_body --------------------------------------------------------------------------


def test_error_body_without_credentials_has_no_error_code() -> None:
    assert error_body(errors.missing()) == {"error_description": "An access token is required."}


def test_error_body_invalid_token() -> None:
    assert error_body(errors.invalid_token("Expired.")) == {
        "error": "invalid_token",
        "error_description": "Expired.",
    }


def test_error_body_insufficient_scope() -> None:
    assert error_body(errors.insufficient_scope("orders:write")) == {
        "error": "insufficient_scope",
        "error_description": "This needs the scope: orders:write.",
        "scope": "orders:write",
    }


# -- property tests ----------------------------------------------------------------------

PREFIXES = ["", "Bearer ", "bearer ", "BEARER  ", "DPoP ", "dpop ", "Bearer", "Basic ", " Bearer "]
headers = st.one_of(
    st.text(),
    st.builds(str.__add__, st.sampled_from(PREFIXES), st.text()),
    st.builds(
        str.__add__,
        st.sampled_from(PREFIXES),
        st.text(alphabet="AZaz09-._~+/= \t\"',;\x00é", max_size=40),
    ),
)


def test_parse_authorization_never_breaks(request: pytest.FixtureRequest) -> None:
    @hsettings(max_examples=300, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(header=headers)
    def check(header: str) -> None:
        try:
            parsed = parse_authorization(header)
        except TokenError as error:
            assert error.status == 400 and error.error == "invalid_request", error
            return
        if parsed is not None:
            scheme, token = parsed
            assert scheme in (BEARER, DPOP)
            assert B64TOKEN.fullmatch(token) and len(token) <= MAX_TOKEN_LENGTH
            assert header.strip(" \t").lower().startswith(scheme.lower() + " ")
            assert header.rstrip(" \t").endswith(token)

    run_seeded(request, check)


def test_good_tokens_round_trip(request: pytest.FixtureRequest) -> None:
    @hsettings(max_examples=200, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(
        scheme=st.sampled_from(["Bearer", "bearer", "DPoP", "dpop"]),
        token=st.from_regex(B64TOKEN, fullmatch=True).filter(lambda t: len(t) < 1000),
    )
    def check(scheme: str, token: str) -> None:
        parsed = parse_authorization(f"{scheme} {token}")
        assert parsed is not None and parsed[1] == token

    run_seeded(request, check)


def test_challenges_stay_parseable_whatever_the_description(
    request: pytest.FixtureRequest,
) -> None:
    @hsettings(max_examples=300, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(
        description=st.text(),
        scope=st.text(),
        code=st.sampled_from([None, "invalid_token", "invalid_request", "insufficient_scope"]),
        scheme=st.sampled_from([None, BEARER, DPOP]),
        dpop=st.booleans(),
        dpop_required=st.booleans(),
    )
    def check(
        description: str,
        scope: str,
        code: str | None,
        scheme: str | None,
        dpop: bool,
        dpop_required: bool,
    ) -> None:
        error = TokenError(code, description, 401, scheme, scope)
        cfg = config(dpop=dpop, dpop_required=dpop and dpop_required)
        values = www_authenticate(error, cfg, METADATA)
        accepted = {DPOP} if dpop and dpop_required else {BEARER, DPOP} if dpop else {BEARER}
        assert len(values) == (1 if scheme in accepted else len(accepted))
        for value in values:
            assert all(" " <= c <= "~" for c in value), value
            assert value.count('"') % 2 == 0
            parsed_scheme, params = parse_challenge(value)
            assert parsed_scheme in accepted
            assert parsed_scheme == scheme or scheme not in accepted
            assert ("algs" in params) == (parsed_scheme == DPOP)
            assert params["resource_metadata"] == METADATA
            assert ("error" in params) == (code is not None)

    run_seeded(request, check)
