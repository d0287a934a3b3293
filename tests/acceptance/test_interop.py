"""A real server driven by independent client libraries, never by Authlib.

requests-oauthlib / oauthlib obtain, refresh and revoke tokens and parse the error responses;
PyJWT verifies access tokens offline from the JWKS. Every endpoint is taken from the
discovery document, as a third-party client would.

oauthlib refuses ``http://`` unless ``OAUTHLIB_INSECURE_TRANSPORT`` is set (done per test
with monkeypatch). ``OAUTHLIB_RELAX_TOKEN_SCOPE`` stays unset: the tests ask for exactly the
scope they expect, so a server that silently changed the scope would fail them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest
import requests
from oauthlib.oauth2 import BackendApplicationClient, LegacyApplicationClient
from oauthlib.oauth2.rfc6749.errors import (
    InvalidClientError,
    InvalidGrantError,
    InvalidScopeError,
    OAuth2Error,
)
from requests.auth import HTTPBasicAuth
from requests_oauthlib import OAuth2Session

from .conftest import RunningServer

pytestmark = pytest.mark.feature("interop-clients")

SCOPES = ["profile", "api"]
PASSWORD = "correct horse battery staple"
TIMEOUT = 10


@dataclass(frozen=True)
class Deployment:
    """A running server (the shared one) with one confidential client and one user of this
    test's own, made in-process with ``server.manage``, as ``clients create`` and ``users
    create`` make them (test_real_server runs those commands themselves)."""

    issuer: str
    metadata: dict[str, Any]
    client_id: str
    client_secret: str
    user_id: str
    username: str

    @property
    def token_endpoint(self) -> str:
        value: str = self.metadata["token_endpoint"]
        return value

    @property
    def basic(self) -> HTTPBasicAuth:
        return HTTPBasicAuth(self.client_id, self.client_secret)


@pytest.fixture(autouse=True)
def oauthlib_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test servers listen on http://127.0.0.1; oauthlib insists on https otherwise.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    monkeypatch.delenv("OAUTHLIB_RELAX_TOKEN_SCOPE", raising=False)


@pytest.fixture
def deployment(server: RunningServer) -> Deployment:
    client = server.new_client("interop-web", scope=" ".join(SCOPES))
    assert client.secret is not None
    user = server.new_user("dana", PASSWORD)
    discovered = requests.get(server.url + "/.well-known/openid-configuration", timeout=TIMEOUT)
    assert discovered.status_code == 200, discovered.text
    return Deployment(
        issuer=server.url,
        metadata=discovered.json(),
        client_id=client.client_id,
        client_secret=client.secret,
        user_id=user.id,
        username=user.username,
    )


def user_session(deployment: Deployment, **kwargs: Any) -> OAuth2Session:
    return OAuth2Session(
        client=LegacyApplicationClient(client_id=deployment.client_id), scope=SCOPES, **kwargs
    )


def password_token(deployment: Deployment) -> dict[str, Any]:
    token: dict[str, Any] = user_session(deployment).fetch_token(
        deployment.token_endpoint,
        username=deployment.username,
        scope=SCOPES,
        password=PASSWORD,
        auth=deployment.basic,
        timeout=TIMEOUT,
    )
    return token


def record_responses(session: OAuth2Session) -> list[requests.Response]:
    """Keep every token-endpoint response the library sees, before it parses it."""
    seen: list[requests.Response] = []

    def hook(response: requests.Response) -> requests.Response:
        seen.append(response)
        return response

    session.register_compliance_hook("access_token_response", hook)
    session.register_compliance_hook("refresh_token_response", hook)
    return seen


def verify_access_token(deployment: Deployment, token: str) -> dict[str, Any]:
    """RFC 9068 verification with PyJWT alone: signature from the JWKS, typ, iss, aud, exp."""
    signing_key = jwt.PyJWKClient(deployment.metadata["jwks_uri"]).get_signing_key_from_jwt(token)
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "RS256"
    assert header["kid"] == signing_key.key_id
    claims: dict[str, Any] = jwt.decode(
        token,
        signing_key.key,
        algorithms=["RS256"],
        audience=deployment.issuer,
        issuer=deployment.issuer,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    return claims


def introspect(deployment: Deployment, token: str) -> requests.Response:
    return requests.post(
        deployment.metadata["introspection_endpoint"],
        data={"token": token},
        auth=deployment.basic,
        timeout=TIMEOUT,
    )


def test_discovery_names_every_endpoint(deployment: Deployment) -> None:
    issuer, metadata = deployment.issuer, deployment.metadata
    assert metadata["issuer"] == issuer
    assert metadata["token_endpoint"] == issuer + "/oauth2/token"
    assert metadata["jwks_uri"] == issuer + "/.well-known/jwks.json"
    assert metadata["revocation_endpoint"] == issuer + "/oauth2/revoke"
    assert metadata["introspection_endpoint"] == issuer + "/oauth2/introspect"
    assert {"password", "refresh_token", "client_credentials"} <= set(
        metadata["grant_types_supported"]
    )
    assert {"client_secret_basic", "client_secret_post"} <= set(
        metadata["token_endpoint_auth_methods_supported"]
    )
    rfc8414 = requests.get(issuer + "/.well-known/oauth-authorization-server", timeout=TIMEOUT)
    assert rfc8414.json() == metadata
    keys = requests.get(metadata["jwks_uri"], timeout=TIMEOUT).json()["keys"]
    assert keys
    assert all(key["kty"] == "RSA" and "d" not in key for key in keys)


# How a requests-oauthlib user authenticates the client at the token endpoint.
CLIENT_AUTH_STYLES: dict[str, Callable[[Deployment], dict[str, Any]]] = {
    # No ``auth``: the library builds HTTP Basic from the session's client_id and the secret.
    "basic-default": lambda d: {"client_secret": d.client_secret},
    "basic-explicit": lambda d: {"auth": HTTPBasicAuth(d.client_id, d.client_secret)},
    # client_secret_post: client_id and client_secret in the form body.
    "post": lambda d: {"include_client_id": True, "client_secret": d.client_secret},
}


@pytest.mark.feature("grant-password", "access-token-jwt")
@pytest.mark.parametrize("style", list(CLIENT_AUTH_STYLES))
def test_password_grant_verifies_with_pyjwt(deployment: Deployment, style: str) -> None:
    session = user_session(deployment)
    seen = record_responses(session)
    token = session.fetch_token(
        deployment.token_endpoint,
        username=deployment.username,
        scope=SCOPES,
        password=PASSWORD,
        timeout=TIMEOUT,
        **CLIENT_AUTH_STYLES[style](deployment),
    )

    sent = seen[0].request
    form = dict(parse_qsl(str(sent.body)))
    if style == "post":
        assert "Authorization" not in sent.headers
        assert form["client_id"] == deployment.client_id
        assert form["client_secret"] == deployment.client_secret
    else:
        authorization = sent.headers["Authorization"]
        assert isinstance(authorization, str)
        assert authorization.startswith("Basic ")
        assert "client_secret" not in form
    assert form["grant_type"] == "password"
    assert form["scope"] == " ".join(SCOPES)

    assert seen[0].status_code == 200
    assert seen[0].headers["Cache-Control"] == "no-store"
    assert token["token_type"] == "Bearer"
    assert sorted(token["scope"]) == sorted(SCOPES)
    assert token["expires_in"] > 0
    assert token["refresh_token"]
    assert session.authorized
    claims = verify_access_token(deployment, token["access_token"])
    assert claims["sub"] == deployment.user_id
    assert claims["client_id"] == deployment.client_id
    assert claims["scope"] == " ".join(SCOPES)


@pytest.mark.feature("grant-refresh", "access-token-jwt")
def test_refresh_token_rotates(deployment: Deployment) -> None:
    first = password_token(deployment)
    session = user_session(deployment)
    refreshed = session.refresh_token(
        deployment.token_endpoint,
        refresh_token=first["refresh_token"],
        auth=deployment.basic,
        timeout=TIMEOUT,
    )
    assert refreshed["refresh_token"] != first["refresh_token"]
    assert refreshed["access_token"] != first["access_token"]
    assert sorted(refreshed["scope"]) == sorted(SCOPES)
    claims = verify_access_token(deployment, refreshed["access_token"])
    assert claims["sub"] == deployment.user_id


@pytest.mark.feature("grant-refresh")
def test_session_refreshes_an_expired_token_by_itself(deployment: Deployment) -> None:
    updates: list[dict[str, Any]] = []
    session = user_session(
        deployment,
        auto_refresh_url=deployment.token_endpoint,
        token_updater=updates.append,
    )
    first = dict(
        session.fetch_token(
            deployment.token_endpoint,
            username=deployment.username,
            scope=SCOPES,
            password=PASSWORD,
            auth=deployment.basic,
            timeout=TIMEOUT,
        )
    )
    # Expired as far as oauthlib knows (a moment in 1970), whatever the server said.
    session.token = {**first, "expires_at": 1}

    response = session.get(
        deployment.issuer + "/healthz",
        client_id=deployment.client_id,
        client_secret=deployment.client_secret,
        timeout=TIMEOUT,
    )

    assert response.status_code == 200
    assert len(updates) == 1
    new = updates[0]
    assert new["refresh_token"] != first["refresh_token"]
    assert new["access_token"] != first["access_token"]
    assert response.request.headers["Authorization"] == "Bearer " + new["access_token"]
    assert verify_access_token(deployment, new["access_token"])["sub"] == deployment.user_id


@pytest.mark.feature("grant-client-credentials", "access-token-jwt")
def test_client_credentials_with_backend_application_client(deployment: Deployment) -> None:
    session = OAuth2Session(client=BackendApplicationClient(client_id=deployment.client_id))
    token = session.fetch_token(
        deployment.token_endpoint,
        client_secret=deployment.client_secret,
        scope=["api"],
        timeout=TIMEOUT,
    )
    # RFC 6749 §4.4.3: no refresh token, although this client may use the refresh grant.
    assert "refresh_token" not in token
    assert token["scope"] == ["api"]
    claims = verify_access_token(deployment, token["access_token"])
    assert claims["client_id"] == deployment.client_id
    assert claims["sub"] == deployment.client_id
    assert claims["scope"] == "api"


@pytest.mark.feature("introspection")
def test_introspection_of_a_live_token(deployment: Deployment) -> None:
    token = password_token(deployment)
    claims = verify_access_token(deployment, token["access_token"])
    answer = introspect(deployment, token["access_token"])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # RFC 7662 §2.2
    assert body["active"] is True
    assert body["token_type"] == "Bearer"
    for name in ("scope", "client_id", "sub", "exp", "iat", "iss", "aud", "jti"):
        assert body[name] == claims[name], name


@pytest.mark.feature("revocation", "introspection", "grant-refresh")
def test_revocation_with_oauthlib_kills_the_family(deployment: Deployment) -> None:
    token = password_token(deployment)
    client = LegacyApplicationClient(client_id=deployment.client_id)
    url, headers, body = client.prepare_token_revocation_request(
        deployment.metadata["revocation_endpoint"],
        token["refresh_token"],
        token_type_hint="refresh_token",
    )
    revoked = requests.post(url, headers=headers, data=body, auth=deployment.basic, timeout=TIMEOUT)
    # RFC 7009 §2.2
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {}

    with pytest.raises(InvalidGrantError):
        user_session(deployment).refresh_token(
            deployment.token_endpoint,
            refresh_token=token["refresh_token"],
            auth=deployment.basic,
            timeout=TIMEOUT,
        )

    answer = introspect(deployment, token["access_token"])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"active": False}


def wrong_secret(session: OAuth2Session, d: Deployment) -> dict[str, Any]:
    token: dict[str, Any] = session.fetch_token(
        d.token_endpoint,
        username=d.username,
        scope=SCOPES,
        password=PASSWORD,
        auth=HTTPBasicAuth(d.client_id, "not-the-secret"),
        timeout=TIMEOUT,
    )
    return token


def wrong_password(session: OAuth2Session, d: Deployment) -> dict[str, Any]:
    token: dict[str, Any] = session.fetch_token(
        d.token_endpoint,
        username=d.username,
        scope=SCOPES,
        password="not the password",
        auth=d.basic,
        timeout=TIMEOUT,
    )
    return token


def unknown_scope(session: OAuth2Session, d: Deployment) -> dict[str, Any]:
    session.scope = ["admin"]
    token: dict[str, Any] = session.fetch_token(
        d.token_endpoint,
        username=d.username,
        scope=["admin"],
        password=PASSWORD,
        auth=d.basic,
        timeout=TIMEOUT,
    )
    return token


@pytest.mark.feature("grant-password")
@pytest.mark.parametrize(
    ("attempt", "error", "status"),
    [
        (wrong_secret, InvalidClientError, 401),
        (wrong_password, InvalidGrantError, 400),
        (unknown_scope, InvalidScopeError, 400),
    ],
    ids=["wrong-secret", "wrong-password", "unknown-scope"],
)
def test_errors_as_oauthlib_sees_them(
    deployment: Deployment,
    attempt: Callable[[OAuth2Session, Deployment], dict[str, Any]],
    error: type[OAuth2Error],
    status: int,
) -> None:
    session = user_session(deployment)
    seen = record_responses(session)
    with pytest.raises(error) as raised:
        attempt(session, deployment)
    assert raised.value.description, "error_description reaches the library"
    assert seen[0].status_code == status
    if status == 401:
        # RFC 6749 §5.2: 401 with WWW-Authenticate for a client that used HTTP Basic.
        assert seen[0].headers["WWW-Authenticate"].startswith("Basic")
