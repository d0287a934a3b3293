"""Client authentication with a JWT: private_key_jwt and client_secret_jwt (RFC 7523 §2.2 and
§3, OpenID Connect Core §9), at the token, revocation and introspection endpoints."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, OctKey, RSAKey
from limits.aio.storage import MemoryStorage

from server.config import Settings
from server.deps import AppState
from server.fetch import FetchError
from server.main import create_app
from server.oauth.assertion import CLIENT_AUTH_FAILED, MAX_ASSERTION_LENGTH
from server.oauth.client_keys import ClientKeys, KeysUnavailable
from server.replay import ReplayGuard
from tests.conftest import ClientCreds, Events, MakeClient, MakeUser
from tests.test_ratelimit import redis_url

TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CC = {"grant_type": "client_credentials"}

#: One RSA and one EC key for the whole module (generating RSA keys is slow).
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
OTHER = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid, another key


def public_jwks(*keys: Key) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False) for key in keys]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(client_id: str, aud: Any, **overrides: Any) -> dict[str, Any]:
    issued = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "iat": issued,
        "exp": issued + 60,
        "jti": secrets.token_urlsafe(16),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(claims: dict[str, Any], key: Key, alg: str, **header: Any) -> str:
    return jwt.encode({"alg": alg, **header}, claims, key, algorithms=[alg])


def by_hand(
    header: dict[str, Any], claims: dict[str, Any], signature: Callable[[bytes], bytes]
) -> str:
    """A compact JWS built without a library: for what no library will sign."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(signature(signing_input.encode()))


def form(assertion: str, **extra: str) -> dict[str, str]:
    return {"client_assertion_type": TYPE, "client_assertion": assertion, **extra}


class Setup:
    """A private_key_jwt client ``pk`` (RSA and EC keys) and a client_secret_jwt client ``sj``."""

    def __init__(self, state: AppState, pk: ClientCreds, sj: ClientCreds) -> None:
        self.state = state
        self.issuer = state.settings.issuer
        self.token_url = self.issuer + "/oauth2/token"
        self.sj_key = OctKey.import_key(sj.secret or "")

    def pk(self, aud: Any = None, key: Key = RSA, alg: str = "RS256", **claims: Any) -> str:
        header = {"kid": key.kid} if key.kid else {}
        return sign(claims_for("pk", aud or self.token_url, **claims), key, alg, **header)

    def sj(self, aud: Any = None, alg: str = "HS256", **claims: Any) -> str:
        return sign(claims_for("sj", aud or self.token_url, **claims), self.sj_key, alg)


@pytest.fixture
async def setup(state: AppState, make_client: MakeClient) -> Setup:
    common: dict[str, Any] = {
        "grants": ["client_credentials", "password", "refresh_token"],
        "scope": "api",
        "settings": state.settings,
    }
    pk = await make_client("pk", auth_method="private_key_jwt", jwks=public_jwks(RSA, EC), **common)
    sj = await make_client("sj", auth_method="client_secret_jwt", **common)
    assert pk.secret is None and sj.secret
    return Setup(state, pk, sj)


def assert_refused(response: httpx.Response, description: str | None = None) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "invalid_client"
    if description is not None:
        assert body["error_description"] == description
    assert response.headers["www-authenticate"].startswith("Basic ")
    assert response.headers["cache-control"] == "no-store"


# -- success --------------------------------------------------------------------------------


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_private_key_jwt_client_credentials(
    client: httpx.AsyncClient, setup: Setup, events: Events
) -> None:
    response = await client.post("/oauth2/token", data={**CC, **form(setup.pk())})
    assert response.status_code == 200, response.text
    access = response.json()["access_token"]
    claims = json.loads(base64.urlsafe_b64decode(access.split(".")[1] + "=="))
    assert claims["client_id"] == "pk"
    issued = [f for e, f in events if e == "token.issued"]
    assert issued and issued[-1]["client_id"] == "pk"


@pytest.mark.feature("client-auth-private-key-jwt")
@pytest.mark.parametrize("key,alg", [(RSA, "RS256"), (RSA, "PS384"), (EC, "ES256")])
async def test_private_key_jwt_each_allowed_alg_and_key(
    client: httpx.AsyncClient, setup: Setup, key: Key, alg: str
) -> None:
    response = await client.post("/oauth2/token", data={**CC, **form(setup.pk(key=key, alg=alg))})
    assert response.status_code == 200, response.text


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_aud_may_be_the_issuer_or_an_array_holding_it(
    client: httpx.AsyncClient, setup: Setup
) -> None:
    for aud in (setup.issuer, [setup.issuer], ["https://elsewhere.example", setup.token_url]):
        response = await client.post("/oauth2/token", data={**CC, **form(setup.pk(aud))})
        assert response.status_code == 200, (aud, response.text)


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_without_kid_each_key_is_tried(client: httpx.AsyncClient, setup: Setup) -> None:
    assertion = sign(claims_for("pk", setup.token_url), EC, "ES256")  # no kid header
    response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
    assert response.status_code == 200, response.text


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_client_id_parameter_must_match_the_subject(
    client: httpx.AsyncClient, setup: Setup
) -> None:
    ok = await client.post("/oauth2/token", data={**CC, **form(setup.pk(), client_id="pk")})
    assert ok.status_code == 200, ok.text
    response = await client.post("/oauth2/token", data={**CC, **form(setup.pk(), client_id="sj")})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"


@pytest.mark.feature("client-auth-client-secret-jwt")
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_client_secret_jwt_client_credentials(
    client: httpx.AsyncClient, setup: Setup, alg: str
) -> None:
    response = await client.post("/oauth2/token", data={**CC, **form(setup.sj(alg=alg))})
    assert response.status_code == 200, response.text


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
@pytest.mark.parametrize("who", ["pk", "sj"])
async def test_password_then_refresh_with_assertions(
    client: httpx.AsyncClient, setup: Setup, make_user: MakeUser, who: str
) -> None:
    user = await make_user()
    assertion: Callable[[], str] = setup.pk if who == "pk" else setup.sj
    first = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "password",
            "username": user.username,
            "password": user.password,
            **form(assertion()),
        },
    )
    assert first.status_code == 200, first.text
    refresh = first.json()["refresh_token"]
    second = await client.post(
        "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh, **form(assertion())},
    )
    assert second.status_code == 200, second.text
    # Another client's assertion cannot use it.
    other = setup.sj if who == "pk" else setup.pk
    third = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": second.json()["refresh_token"],
            **form(other()),
        },
    )
    assert third.status_code == 400 and third.json()["error"] == "invalid_grant", third.text


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
@pytest.mark.parametrize("who", ["pk", "sj"])
async def test_introspection_and_revocation(
    client: httpx.AsyncClient, setup: Setup, who: str
) -> None:
    make: Callable[..., str] = setup.pk if who == "pk" else setup.sj
    token = await client.post("/oauth2/token", data={**CC, **form(make())})
    assert token.status_code == 200, token.text
    access = token.json()["access_token"]
    introspect = setup.issuer + "/oauth2/introspect"
    revoke = setup.issuer + "/oauth2/revoke"
    # aud: this endpoint's URL, or the issuer.
    seen = await client.post("/oauth2/introspect", data={"token": access, **form(make(introspect))})
    assert seen.status_code == 200, seen.text
    assert seen.json()["active"] is True and seen.json()["client_id"] == who
    gone = await client.post("/oauth2/revoke", data={"token": access, **form(make(revoke))})
    assert gone.status_code == 200, gone.text
    after = await client.post(
        "/oauth2/introspect", data={"token": access, **form(make(setup.issuer))}
    )
    assert after.status_code == 200 and after.json() == {"active": False}
    # The revocation endpoint's URL is not an audience at introspection.
    wrong = await client.post("/oauth2/introspect", data={"token": access, **form(make(revoke))})
    assert_refused(wrong)


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_discovery_lists_the_methods_and_algs(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/.well-known/openid-configuration")).json()
    for name in ("token", "revocation", "introspection"):
        methods = doc[f"{name}_endpoint_auth_methods_supported"]
        assert {"private_key_jwt", "client_secret_jwt"} <= set(methods)
        algs = doc[f"{name}_endpoint_auth_signing_alg_values_supported"]
        assert "RS256" in algs and "HS256" in algs and "none" not in algs


# -- refusals -------------------------------------------------------------------------------


def _refusals() -> list[Any]:
    now = int(time.time())
    return [
        pytest.param({"exp": now - 120}, id="expired"),
        pytest.param({"iat": now + 600, "exp": now + 660}, id="future-iat"),
        pytest.param({"nbf": now + 600}, id="future-nbf"),
        pytest.param({"exp": now + 3600}, id="exp-too-far-ahead"),
        pytest.param({"aud": "https://elsewhere.example/oauth2/token"}, id="wrong-aud"),
        pytest.param({"aud": ["https://a.example", "https://b.example"]}, id="wrong-aud-array"),
        pytest.param({"iss": "sj"}, id="iss-not-sub"),
        pytest.param({"jti": None}, id="no-jti"),
        pytest.param({"jti": 7}, id="jti-not-a-string"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"exp": "soon"}, id="exp-not-a-number"),
    ]


@pytest.mark.feature("client-auth-private-key-jwt")
@pytest.mark.parametrize("overrides", _refusals())
async def test_private_key_jwt_claim_refusals(
    client: httpx.AsyncClient, setup: Setup, overrides: dict[str, Any]
) -> None:
    overrides = dict(overrides)  # the parameter is shared by both backends' runs
    aud = overrides.pop("aud", None)
    response = await client.post("/oauth2/token", data={**CC, **form(setup.pk(aud, **overrides))})
    assert_refused(response)
    # Signed by the client: the description may say what was wrong.
    assert response.json()["error_description"] != CLIENT_AUTH_FAILED


@pytest.mark.feature("client-auth-client-secret-jwt")
@pytest.mark.parametrize("overrides", _refusals())
async def test_client_secret_jwt_claim_refusals(
    client: httpx.AsyncClient, setup: Setup, overrides: dict[str, Any]
) -> None:
    overrides = dict(overrides)  # the parameter is shared by both backends' runs
    aud = overrides.pop("aud", None)
    if overrides.get("iss") == "sj":
        overrides["iss"] = "pk"
    response = await client.post("/oauth2/token", data={**CC, **form(setup.sj(aud, **overrides))})
    assert_refused(response)


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
@pytest.mark.parametrize("who", ["pk", "sj"])
async def test_a_jti_is_accepted_once(client: httpx.AsyncClient, setup: Setup, who: str) -> None:
    assertion = setup.pk() if who == "pk" else setup.sj()
    first = await client.post("/oauth2/token", data={**CC, **form(assertion)})
    assert first.status_code == 200, first.text
    again = await client.post("/oauth2/token", data={**CC, **form(assertion)})
    assert_refused(again)
    assert "jti" in again.json()["error_description"]
    # The same jti in a fresh assertion is the same replay.
    jti = jwt.decode(assertion, setup.sj_key if who == "sj" else RSA).claims["jti"]
    fresh = setup.pk(jti=jti) if who == "pk" else setup.sj(jti=jti)
    assert_refused(await client.post("/oauth2/token", data={**CC, **form(fresh)}))


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_one_jti_per_client_not_global(client: httpx.AsyncClient, setup: Setup) -> None:
    jti = secrets.token_urlsafe(8)
    for assertion in (setup.pk(jti=jti), setup.sj(jti=jti)):
        response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
        assert response.status_code == 200, response.text


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_simultaneous_replays_one_wins(client: httpx.AsyncClient, setup: Setup) -> None:
    import asyncio

    assertion = setup.pk()
    answers = await asyncio.gather(
        *[client.post("/oauth2/token", data={**CC, **form(assertion)}) for _ in range(8)]
    )
    assert sorted(a.status_code for a in answers) == [200] + [401] * 7


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_a_jti_is_accepted_once_across_replicas(
    settings: Settings, make_client: MakeClient, state: AppState
) -> None:
    """Two apps (replicas) on one database and one Redis: a jti used on one is refused on the
    other."""
    overrides = {
        "rate_limit_storage": redis_url(),
        "rate_limit_prefix": f"replay-{secrets.token_hex(4)}",
    }
    await make_client(
        "pk",
        auth_method="private_key_jwt",
        jwks=public_jwks(RSA),
        grants=["client_credentials"],
        settings=state.settings,
    )
    first, second = (
        create_app(settings.model_copy(update=overrides)),
        create_app(settings.model_copy(update=overrides)),
    )
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        url = settings.issuer + "/oauth2/token"
        assertion = sign(claims_for("pk", url), RSA, "RS256", kid="rsa-1")
        answers = []
        for application in (first, second):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                answers.append(await http.post("/oauth2/token", data={**CC, **form(assertion)}))
        assert answers[0].status_code == 200, answers[0].text
        assert_refused(answers[1])


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_unknown_kid_wrong_key_and_foreign_algs(
    client: httpx.AsyncClient, setup: Setup
) -> None:
    claims = claims_for("pk", setup.token_url)
    public_pem = RSA.as_pem(private=False)
    bad = {
        "unknown-kid": sign(claims, RSA, "RS256", kid="nope"),
        "wrong-key": sign(claims, OTHER, "RS256", kid="rsa-1"),
        "wrong-key-no-kid": sign(claims, OTHER, "RS256"),
        "alg-none": by_hand({"alg": "none"}, claims, lambda _: b""),
        "alg-none-kid": by_hand({"alg": "none", "kid": "rsa-1"}, claims, lambda _: b""),
        # The classic confusion: HMAC keyed with the client's public key (PEM or JWK).
        "hs256-public-pem": by_hand(
            {"alg": "HS256", "kid": "rsa-1"},
            claims,
            lambda data: hmac.new(public_pem, data, hashlib.sha256).digest(),
        ),
        "hs256-public-jwk": by_hand(
            {"alg": "HS256"},
            claims,
            lambda data: hmac.new(
                json.dumps(RSA.as_dict(private=False)).encode(), data, hashlib.sha256
            ).digest(),
        ),
        "alg-mismatch-with-key": sign(claims, EC, "ES256", kid="rsa-1"),
        "unsigned-garbage": "a.b.c",
        "not-a-jws": "nonsense",
        "five-parts": "a.b.c.d.e",
        "sub-not-a-string": sign({**claims, "sub": 5}, RSA, "RS256", kid="rsa-1"),
        "kid-not-a-string": by_hand({"alg": "RS256", "kid": 5}, claims, lambda _: b"x"),
        "alg-not-a-string": by_hand({"alg": ["RS256"]}, claims, lambda _: b"x"),
        "payload-array": by_hand({"alg": "RS256"}, [1], lambda _: b"x"),  # type: ignore[arg-type]
        "oversized": sign({**claims, "pad": "x" * MAX_ASSERTION_LENGTH}, RSA, "RS256", kid="rsa-1"),
    }
    for name, assertion in bad.items():
        response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
        assert response.status_code == 401, (name, response.text)
        # Not verified: nothing more than the one description.
        assert response.json()["error_description"] == CLIENT_AUTH_FAILED, name


@pytest.mark.feature("client-auth-client-secret-jwt")
async def test_client_secret_jwt_refuses_other_keys_and_algs(
    client: httpx.AsyncClient, setup: Setup
) -> None:
    claims = claims_for("sj", setup.token_url)
    for name, assertion in {
        "wrong-secret": sign(claims, OctKey.import_key("x" * 43), "HS256"),
        "rs256": sign(claims, RSA, "RS256"),
        "alg-none": by_hand({"alg": "none"}, claims, lambda _: b""),
    }.items():
        response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
        assert_refused(response, CLIENT_AUTH_FAILED)
        assert name


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_nothing_tells_whether_a_client_exists(
    client: httpx.AsyncClient, setup: Setup, make_client: MakeClient
) -> None:
    secret_client = await make_client("basic", grants=["client_credentials"])
    answers = [
        # An unknown client, and a secret client signing with its secret.
        await client.post(
            "/oauth2/token",
            data={**CC, **form(sign(claims_for("ghost", setup.token_url), RSA, "RS256"))},
        ),
        await client.post(
            "/oauth2/token",
            data={
                **CC,
                **form(
                    sign(
                        claims_for("basic", setup.token_url),
                        OctKey.import_key(secret_client.secret or ""),
                        "HS256",
                    )
                ),
            },
        ),
        # A wrong secret for a secret client, for comparison.
        await client.post("/oauth2/token", data=CC, headers=ClientCreds("basic", "wrong").basic),
    ]
    for response in answers:
        assert_refused(response, CLIENT_AUTH_FAILED)


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_one_method_per_request(
    client: httpx.AsyncClient, setup: Setup, make_client: MakeClient
) -> None:
    basic = ClientCreds("pk", "anything").basic
    for data, headers in (
        ({**CC, **form(setup.pk())}, basic),
        ({**CC, **form(setup.pk()), "client_secret": "anything"}, {}),
        ({**CC, **form(setup.sj()), "client_id": "sj", "client_secret": "x"}, {}),
    ):
        response = await client.post("/oauth2/token", data=data, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_request"
        assert "one client authentication method" in response.json()["error_description"]


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_bad_assertion_parameters(client: httpx.AsyncClient, setup: Setup) -> None:
    for data in (
        {"client_assertion_type": "urn:example:other", "client_assertion": setup.pk()},
        {"client_assertion": setup.pk()},
        {"client_assertion_type": TYPE},
        {"client_assertion_type": TYPE, "client_assertion": ""},
    ):
        response = await client.post("/oauth2/token", data={**CC, **data})
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_request"


@pytest.mark.feature("client-auth-private-key-jwt", "client-auth-client-secret-jwt")
async def test_a_jwt_client_cannot_use_a_secret_or_none(
    client: httpx.AsyncClient, setup: Setup, make_user: MakeUser
) -> None:
    user = await make_user()
    password = {"grant_type": "password", "username": user.username, "password": user.password}
    async with setup.state.db.sessions() as db:
        from server.models import Client

        sj = await db.get(Client, "sj")
        assert sj is not None
    sj_secret = setup.sj_key.raw_value.decode()
    for data, headers in (
        (CC, ClientCreds("pk", "whatever").basic),
        ({**CC, "client_id": "pk", "client_secret": "whatever"}, {}),
        ({**password, "client_id": "pk"}, {}),  # none
        # client_secret_jwt's secret keys its assertions only: sent as such, refused.
        (CC, ClientCreds("sj", sj_secret).basic),
        ({**CC, "client_id": "sj", "client_secret": sj_secret}, {}),
        ({**password, "client_id": "sj"}, {}),
    ):
        response = await client.post("/oauth2/token", data=data, headers=headers)
        assert_refused(response, CLIENT_AUTH_FAILED)
    for path in ("/oauth2/introspect", "/oauth2/revoke"):
        response = await client.post(path, data={"token": "x", "client_id": "pk"})
        assert_refused(response, CLIENT_AUTH_FAILED)


# -- jwks_uri (a fake fetcher) and the parts ------------------------------------------------


class FakeFetch:
    def __init__(self, *documents: Any) -> None:
        self.documents = list(documents)
        self.calls: list[tuple[str, bool]] = []

    async def __call__(self, url: str, refresh: bool) -> Any:
        """The current document; ``refresh`` moves to the next one, if there is one."""
        self.calls.append((url, refresh))
        if refresh and len(self.documents) > 1:
            self.documents.pop(0)
        document = self.documents[0]
        if isinstance(document, Exception):
            raise document
        return document


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_jwks_uri_keys_with_refetch_on_unknown_kid(
    app: FastAPI,
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = "https://client.example/jwks.json"
    await make_client(
        "remote",
        auth_method="private_key_jwt",
        jwks_uri=uri,
        grants=["client_credentials"],
        settings=state.settings,
    )
    new = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
    # The cached document has the old key; the client has since rotated to the new one.
    fetch = FakeFetch(public_jwks(RSA), public_jwks(new))
    monkeypatch.setattr(app.state.oauth.assertions, "keys", ClientKeys(fetch))
    url = state.settings.issuer + "/oauth2/token"
    old = await client.post(
        "/oauth2/token",
        data={**CC, **form(sign(claims_for("remote", url), RSA, "RS256", kid="rsa-1"))},
    )
    assert old.status_code == 200, old.text
    assert fetch.calls == [(uri, False)]
    rotated = await client.post(
        "/oauth2/token",
        data={**CC, **form(sign(claims_for("remote", url), new, "RS256", kid="rsa-2"))},
    )
    assert rotated.status_code == 200, rotated.text
    assert fetch.calls[1:] == [(uri, False), (uri, True)]
    # A kid nobody has: one refetch, then refused.
    ghost = RSAKey.generate_key(2048, parameters={"kid": "ghost"})
    refused = await client.post(
        "/oauth2/token",
        data={**CC, **form(sign(claims_for("remote", url), ghost, "RS256", kid="ghost"))},
    )
    assert_refused(refused, CLIENT_AUTH_FAILED)
    assert fetch.calls[-1] == (uri, True)


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_jwks_uri_failures_are_invalid_client(
    app: FastAPI,
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_client(
        "remote",
        auth_method="private_key_jwt",
        jwks_uri="https://client.example/jwks",
        grants=["client_credentials"],
        settings=state.settings,
    )
    url = state.settings.issuer + "/oauth2/token"
    for document in (
        FetchError("refused", transient=True),
        {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},  # a symmetric key: never
        {"keys": [RSA.as_dict(private=True)]},  # private members
        ["not", "a", "set"],
    ):
        monkeypatch.setattr(app.state.oauth.assertions, "keys", ClientKeys(FakeFetch(document)))
        assertion = sign(claims_for("remote", url), RSA, "RS256", kid="rsa-1")
        response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
        assert_refused(response, CLIENT_AUTH_FAILED)


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_client_keys_parse_registered_jwks_once_per_row() -> None:
    from server.models import Client

    keys = ClientKeys(FakeFetch(KeysUnavailable("unused")))
    row = Client(client_id="c", jwks=json.dumps(public_jwks(RSA)))
    first = await keys.keyset(row)
    assert await keys.keyset(row) is first
    row.jwks = json.dumps(public_jwks(EC))
    changed = await keys.keyset(row)
    assert changed is not first and [k.kid for k in changed] == ["ec-1"]
    with pytest.raises(KeysUnavailable):
        await keys.keyset(Client(client_id="d", jwks="{not json"))
    with pytest.raises(KeysUnavailable):
        await keys.keyset(Client(client_id="e"))
    assert isinstance(first, KeySet)


@pytest.mark.feature("client-auth-private-key-jwt")
async def test_replay_guard_first_use_only() -> None:
    guard = ReplayGuard(MemoryStorage())
    assert await guard.first_use("ns", "a", 10)
    assert not await guard.first_use("ns", "a", 10)
    assert await guard.first_use("other", "a", 10)
    assert await guard.first_use("ns", "b" * 100_000, 0)  # long values hash; ttl at least 1 s
