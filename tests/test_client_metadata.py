"""Client metadata (RFC 7591 §2) as registration, RFC 7592 updates and metadata documents check
it, and the sealing of client_secret_jwt secrets."""

from __future__ import annotations

import re
from typing import Any

import pytest
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OctKey, RSAKey

from server import secretbox
from server.client_metadata import MetadataError, check_jwks, parse_client_metadata
from server.config import Env, Settings

pytestmark = pytest.mark.feature("client-registration")

SETTINGS = Settings(resources=["https://api.example.com"])
WEB = {"redirect_uris": ["https://app.example.com/cb"]}


def public_jwks(key: Any) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False)]}


def refused(data: Any, error: str = "invalid_client_metadata", **kw: Any) -> str:
    with pytest.raises(MetadataError) as caught:
        parse_client_metadata(data, kw.pop("settings", SETTINGS), **kw)
    assert caught.value.error == error
    # RFC 6749 §5.2: an error_description holds only these characters (Authlib refuses others).
    assert re.fullmatch(r"[\x20\x21\x23-\x5B\x5D-\x7E]+", caught.value.description)
    return caught.value.description


def test_defaults_follow_rfc_7591() -> None:
    meta = parse_client_metadata(WEB, SETTINGS)
    assert meta.grant_types == ["authorization_code"]
    assert meta.response_types == ["code"]
    assert meta.auth_method == "client_secret_basic"  # RFC 7591 §2
    assert meta.scope == "openid profile email"
    assert meta.resources is None
    # A metadata document's client has no secret: ``none`` by default.
    assert parse_client_metadata(WEB, SETTINGS, document=True).auth_method == "none"


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example.com/cb?x=1",
        "http://127.0.0.1:53123/cb",
        "http://[::1]/cb",
        "com.example.app:/oauth2redirect",
    ],
)
def test_redirect_uris_accepted(uri: str) -> None:
    assert parse_client_metadata({"redirect_uris": [uri]}, SETTINGS).redirect_uris == [uri]


@pytest.mark.parametrize(
    "uri",
    [
        "http://app.example.com/cb",  # plain http to a network host
        "http://localhost/cb",  # RFC 8252 §8.3: a loopback IP literal, not localhost
        "https://app.example.com/cb#frag",
        "https://*.example.com/cb",
        "https://user@app.example.com/cb",
        "https:///cb",
        "javascript:alert(1)",
        "data:text/html,hi",
        "/relative",
        "https://app.example.com/c b",
        "https://app.example.com:99999/cb",
        "https://app.example.com/" + "a" * 2000,
        "https://app.example.com/\x00",
    ],
)
def test_redirect_uris_refused(uri: str) -> None:
    refused({"redirect_uris": [uri]}, "invalid_redirect_uri")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({**WEB, "grant_types": ["password"]}, "password grant"),
        ({**WEB, "grant_types": ["implicit"]}, "grant_types may hold only"),
        ({**WEB, "grant_types": "authorization_code"}, "array of strings"),
        ({**WEB, "response_types": ["token"]}, "may hold only 'code'"),
        ({**WEB, "grant_types": ["client_credentials"], "response_types": ["code"]}, "together"),
        ({"grant_types": ["client_credentials"], "token_endpoint_auth_method": "none"}, "conf"),
        ({**WEB, "token_endpoint_auth_method": "tls_client_auth"}, "must be one of"),
        ({**WEB, "token_endpoint_auth_method": "private_key_jwt"}, "needs jwks or jwks_uri"),
        ({**WEB, "jwks_uri": "https://app.example.com/jwks"}, "only with private_key_jwt"),
        ({**WEB, "scope": "openid admin"}, "admin scope"),
        ({**WEB, "scope": "openid orders:write"}, "scope may hold only"),
        ({**WEB, "scope": 7}, "must be a string"),
        ({**WEB, "client_name": "x" * 201}, "at most 200"),
        ({**WEB, "resources": ["https://other.example.com"]}, "resources"),
        ({**WEB, "dpop_bound_access_tokens": "true"}, "boolean"),
        ({**WEB, "dpop_bound_access_tokens": 1}, "boolean"),
        ({**WEB, "require_pushed_authorization_requests": "yes"}, "boolean"),
        ({**WEB, "require_pushed_authorization_requests": 1}, "boolean"),
        ({**WEB, "require_pushed_authorization_requests": "true"}, "boolean"),
        ({"redirect_uris": ["https://a.example/" + str(i) for i in range(21)]}, "at most 20"),
        ([], "JSON object"),
    ],
)
def test_invalid_metadata_refused(data: Any, words: str) -> None:
    assert words in refused(data)


def test_unknown_metadata_is_ignored() -> None:
    meta = parse_client_metadata({**WEB, "logo_uri": 5, "x-vendor": {"a": 1}}, SETTINGS)
    assert meta.redirect_uris == WEB["redirect_uris"]


def test_private_key_jwt_with_keys_or_a_uri() -> None:
    jwks = public_jwks(RSAKey.generate_key(2048))
    meta = parse_client_metadata(
        {**WEB, "token_endpoint_auth_method": "private_key_jwt", "jwks": jwks}, SETTINGS
    )
    assert meta.jwks == jwks and meta.jwks_json is not None
    both = {**WEB, "token_endpoint_auth_method": "private_key_jwt", "jwks": jwks}
    assert "not both" in refused({**both, "jwks_uri": "https://app.example.com/jwks"})
    by_uri = {**WEB, "token_endpoint_auth_method": "private_key_jwt"}
    uri = parse_client_metadata({**by_uri, "jwks_uri": "https://a.example/k"}, SETTINGS)
    assert uri.jwks_uri == "https://a.example/k"
    production = Settings(env=Env.production)
    refused({**by_uri, "jwks_uri": "http://a.example/k"}, settings=production)
    refused({**by_uri, "jwks_uri": "https://a.example/k#x"})
    refused({**by_uri, "jwks_uri": "https://a.example:99999/k"})
    # A document's client is an app people sign in to, never a service on its own.
    assert "authorization_code and refresh_token only" in refused(
        {**by_uri, "jwks_uri": "https://a.example/k", "grant_types": ["client_credentials"]},
        document=True,
    )
    # A document's client never holds a shared secret.
    assert "no shared secret" in refused(
        {**WEB, "token_endpoint_auth_method": "client_secret_basic"}, document=True
    )


def test_jwks_must_be_public_signing_keys() -> None:
    rsa = RSAKey.generate_key(2048)
    assert check_jwks(public_jwks(ECKey.generate_key("P-256")))["keys"][0]["kty"] == "EC"
    with pytest.raises(MetadataError, match="private member"):
        check_jwks({"keys": [rsa.as_dict(private=True)]})
    with pytest.raises(MetadataError, match="public RSA, EC or OKP"):
        check_jwks({"keys": [OctKey.generate_key(256).as_dict()]})
    with pytest.warns(SecurityWarning):
        small = RSAKey.generate_key(1024)
    with pytest.raises(MetadataError, match="at least 2048"):
        check_jwks(public_jwks(small))
    with pytest.raises(MetadataError, match="signing keys"):
        check_jwks({"keys": [{**rsa.as_dict(private=False), "use": "enc"}]})
    with pytest.raises(MetadataError, match="cannot be read"):
        check_jwks({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]})
    with pytest.raises(MetadataError, match="1 to 10"):
        check_jwks({"keys": []})
    with pytest.raises(MetadataError, match="JWK Set"):
        check_jwks([])


def test_sealed_secrets_open_only_with_their_key_and_client() -> None:
    sealed = secretbox.seal("k" * 40, "s3cret", context="client-a")
    assert "s3cret" not in sealed
    assert secretbox.unseal("k" * 40, sealed, context="client-a") == "s3cret"
    for key, context, value in [
        ("j" * 40, "client-a", sealed),  # another AUTH_SECRET_KEY
        ("k" * 40, "client-b", sealed),  # copied to another client's row
        ("k" * 40, "client-a", sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]),
        ("k" * 40, "client-a", "v0." + sealed[3:]),
        ("k" * 40, "client-a", "v1.!!"),
    ]:
        with pytest.raises(secretbox.UnsealError):
            secretbox.unseal(key, value, context=context)


def test_dpop_bound_access_tokens_is_accepted() -> None:
    """RFC 9449 §5.2: a boolean, false when absent or null."""
    assert parse_client_metadata({**WEB, "dpop_bound_access_tokens": True}, SETTINGS).dpop_bound
    assert not parse_client_metadata(
        {**WEB, "dpop_bound_access_tokens": False}, SETTINGS
    ).dpop_bound
    assert not parse_client_metadata(WEB, SETTINGS).dpop_bound
    assert parse_client_metadata(
        {**WEB, "dpop_bound_access_tokens": True}, SETTINGS, document=True
    ).dpop_bound


def test_require_pushed_authorization_requests_is_accepted() -> None:
    """RFC 9126 §6: a boolean, false when absent or null; independent of the DPoP flag."""
    flag = "require_pushed_authorization_requests"
    meta = parse_client_metadata({**WEB, flag: True}, SETTINGS)
    assert meta.require_par and not meta.dpop_bound
    assert not parse_client_metadata({**WEB, flag: False}, SETTINGS).require_par
    assert not parse_client_metadata({**WEB, flag: None}, SETTINGS).require_par
    assert not parse_client_metadata(WEB, SETTINGS).require_par
    both = parse_client_metadata({**WEB, flag: True, "dpop_bound_access_tokens": True}, SETTINGS)
    assert both.require_par and both.dpop_bound
    assert parse_client_metadata({**WEB, flag: True}, SETTINGS, document=True).require_par
