"""/.well-known/jwks.json and the discovery documents (RFC 8414, OIDC Discovery)."""

from __future__ import annotations

import httpx
import pytest

from server import metrics
from server.deps import AppState

JWKS = "/.well-known/jwks.json"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}


@pytest.mark.feature("jwks-endpoint", "signing-keys")
async def test_jwks_publishes_public_keys_with_cache_headers(
    client: httpx.AsyncClient, state: AppState
) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 2  # current and next
    assert keys[0]["kid"] == state.keys.keyset().kid  # the signing key first
    for key in keys:
        assert key["kty"] == "RSA"
        assert key["use"] == "sig"
        assert key["alg"] == "RS256"
        assert not PRIVATE_MEMBERS & set(key)
    max_age = int(response.headers["cache-control"].split("max-age=")[1])
    assert 0 < max_age < state.settings.key_rotation_interval
    assert response.headers["etag"].startswith('"')


@pytest.mark.feature("jwks-endpoint")
async def test_jwks_etag_gives_304(client: httpx.AsyncClient) -> None:
    first = await client.get("/.well-known/jwks.json")
    etag = first.headers["etag"]
    again = await client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    other = await client.get("/.well-known/jwks.json", headers={"If-None-Match": '"stale"'})
    assert other.status_code == 200


@pytest.mark.feature("jwks-endpoint", "browser-security-headers", "metrics")
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_resource_servers_jwks_fetch_gets_every_header_and_is_counted(
    client: httpx.AsyncClient, method: str
) -> None:
    """A fetch without ``Origin`` is answered before the middlewares (server/jwks.py: fast):
    it still carries what they add, and is counted and timed like every other request."""
    counted = ("http_requests_total", {"method": method, "route": JWKS, "status": "200"})
    before = metrics.REGISTRY.get_sample_value(*counted) or 0
    response = await client.request(method, JWKS, headers={"X-Request-ID": "rs-fetch-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "rs-fetch-1"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert response.headers["x-frame-options"] == "DENY"
    assert int(response.headers["content-length"]) > 100
    assert (response.content == b"") is (method == "HEAD")
    assert metrics.REGISTRY.get_sample_value(*counted) == before + 1
    forged = await client.get(JWKS, headers={"X-Request-ID": "no spaces\tallowed"})
    assert forged.headers["x-request-id"] != "no spaces\tallowed"
    assert len(forged.headers["x-request-id"]) == 32


@pytest.mark.feature("discovery", "id-tokens")
@pytest.mark.parametrize(
    "path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
)
async def test_discovery_lists_what_is_supported(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    doc = response.json()
    assert doc["issuer"] == "http://127.0.0.1:8000"
    assert doc["token_endpoint"] == "http://127.0.0.1:8000/oauth2/token"
    assert doc["jwks_uri"] == "http://127.0.0.1:8000/.well-known/jwks.json"
    assert sorted(doc["grant_types_supported"]) == [
        "authorization_code",
        "client_credentials",
        "password",
        "refresh_token",
    ]
    assert sorted(doc["token_endpoint_auth_methods_supported"]) == [
        "client_secret_basic",
        "client_secret_jwt",
        "client_secret_post",
        "none",
        "private_key_jwt",
    ]
    assert doc["revocation_endpoint"] == "http://127.0.0.1:8000/oauth2/revoke"
    assert doc["introspection_endpoint"] == "http://127.0.0.1:8000/oauth2/introspect"
    assert sorted(doc["revocation_endpoint_auth_methods_supported"]) == [
        "client_secret_basic",
        "client_secret_jwt",
        "client_secret_post",
        "none",
        "private_key_jwt",
    ]
    # RFC 7662 §2.1: introspection is for authenticated (confidential) clients only.
    assert sorted(doc["introspection_endpoint_auth_methods_supported"]) == [
        "client_secret_basic",
        "client_secret_jwt",
        "client_secret_post",
        "private_key_jwt",
    ]
    # OpenID Connect Discovery 1.0 §3 and RFC 8414 §2.
    assert doc["authorization_endpoint"] == "http://127.0.0.1:8000/oauth2/authorize"
    assert doc["userinfo_endpoint"] == "http://127.0.0.1:8000/userinfo"
    assert doc["end_session_endpoint"] == "http://127.0.0.1:8000/logout"
    assert doc["response_types_supported"] == ["code"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["subject_types_supported"] == ["public"]
    assert {"openid", "profile", "email"} <= set(doc["scopes_supported"])
    assert {"sub", "email", "preferred_username", "name", "email_verified"} <= set(
        doc["claims_supported"]
    )
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert "public" in response.headers["cache-control"]


@pytest.mark.feature("jwks-endpoint")
async def test_jwks_answers_head_and_refuses_other_methods(client: httpx.AsyncClient) -> None:
    """The JWKS is served before FastAPI's router (server/jwks.py): HEAD and 405 too."""
    full = await client.get("/.well-known/jwks.json")
    head = await client.head("/.well-known/jwks.json")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(full.content))
    assert head.headers["etag"] == full.headers["etag"]
    posted = await client.post("/.well-known/jwks.json")
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"
    assert posted.json() == {"detail": "Method Not Allowed", "error_code": "method_not_allowed"}
    # Like every route: security headers and a request id are added on the way out.
    assert head.headers["x-content-type-options"] == "nosniff"
    assert "x-request-id" in posted.headers
    scraped = (await client.get("/metrics")).text
    assert 'route="/.well-known/jwks.json"' in scraped  # counted under its template


@pytest.mark.feature("jwks-endpoint", "json-errors")
async def test_a_resource_servers_jwks_fetch_while_the_key_store_fails_is_a_plain_500(
    client: httpx.AsyncClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path gives up on any error and lets the middlewares answer: a redacted 500
    with a request id, never a traceback or a half-sent answer."""

    def broken() -> None:
        raise RuntimeError("/secret/path/keys.json unreadable")

    monkeypatch.setattr(state.keys, "keyset", broken)
    response = await client.get(JWKS, headers={"X-Request-ID": "rs-fetch-2"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "rs-fetch-2"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "secret" not in response.text and "Traceback" not in response.text
