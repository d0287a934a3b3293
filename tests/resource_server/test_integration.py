"""The kit end to end against a fake token server: ``TokenVerifier``, then the FastAPI
integration (``protect``, ``RequireToken``) and the ASGI ``TokenMiddleware`` over HTTP
(``httpx.ASGITransport``): status codes, bodies, challenges (RFC 6750 §3, RFC 9449 §7.1,
RFC 9728 §5.1) and ``Cache-Control: no-store`` on refusals."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, which
# name dependencies local to ``fastapi_app``.
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from resource_server import TokenMiddleware, TokenVerifier, VerifiedToken
from resource_server.config import ResourceServerConfig
from resource_server.errors import BEARER, DPOP, TokenError
from resource_server.fastapi import RequireToken, protect
from resource_server.metadata import protected_resource_metadata
from resource_server.verifier import request_path
from tests.resource_server.fake_issuer import FakeClock
from tests.resource_server.kit_helpers import (
    OTHER_PROOF_KEY,
    PROOF_KEY,
    RESOURCE,
    FakeTokenServer,
    challenges_of,
    claims_of,
    config,
    make_proof,
    make_token,
    with_introspection,
)

pytestmark = pytest.mark.feature("rs-kit-integration")
challenges = pytest.mark.feature("rs-kit-challenges")

METADATA_URL = f"{RESOURCE}/.well-known/oauth-protected-resource"
JKT = PROOF_KEY.thumbprint()
ORDERS = f"{RESOURCE}/orders"


@pytest.fixture
def server() -> FakeTokenServer:
    return FakeTokenServer()


@pytest.fixture
async def http(server: FakeTokenServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as client:
        yield client


def make_verifier(
    http: httpx.AsyncClient, settings: ResourceServerConfig | None = None
) -> TokenVerifier:
    return TokenVerifier(settings or config(), http, clock=FakeClock())


@pytest.fixture
def verifier(http: httpx.AsyncClient) -> TokenVerifier:
    return make_verifier(http)


def dpop_request(
    token: str, *, htm: str = "GET", htu: str = ORDERS, **options: Any
) -> dict[str, str]:
    return {
        "authorization": f"DPoP {token}",
        "dpop": make_proof(htm=htm, htu=htu, token=token, **options),
    }


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def refused(
    verifier: TokenVerifier,
    authorization: str | None,
    dpop: list[str] | None = None,
    method: str = "GET",
    url: str = ORDERS,
) -> TokenError:
    with pytest.raises(TokenError) as info:
        await verifier.verify(authorization, dpop or [], method, url)
    return info.value


# -- TokenVerifier ---------------------------------------------------------------------------


async def test_a_bearer_token(verifier: TokenVerifier) -> None:
    token = make_token(scope="orders:read orders:write")
    verified = await verifier.verify(f"Bearer {token}", [], "GET", ORDERS)
    assert verified.scheme == BEARER
    assert verified.scopes == {"orders:read", "orders:write"}
    assert (verified.subject, verified.client_id, verified.jkt) == ("alice", "app", None)
    assert verified.claims["jti"] == claims_of(token)["jti"]


async def test_the_scheme_is_case_insensitive(verifier: TokenVerifier) -> None:
    assert (await verifier.verify(f"bearer {make_token()}", [], "GET", ORDERS)).scheme == BEARER


async def test_a_dpop_bound_token_as_bearer_is_challenged_in_dpop(verifier: TokenVerifier) -> None:
    error = await refused(verifier, f"Bearer {make_token(jkt=JKT)}")
    assert (error.error, error.status, error.scheme) == ("invalid_token", 401, DPOP)


async def test_an_unbound_token_as_dpop_is_challenged_in_bearer(verifier: TokenVerifier) -> None:
    token = make_token()
    headers = dpop_request(token)
    error = await refused(verifier, headers["authorization"], [headers["dpop"]])
    assert (error.error, error.status, error.scheme) == ("invalid_token", 401, BEARER)


async def test_a_dpop_token_with_its_proof(verifier: TokenVerifier) -> None:
    token = make_token(jkt=JKT)
    proof = make_proof(htm="POST", htu=verifier.url_for("/orders"), token=token)
    verified = await verifier.verify(f"DPoP {token}", [proof], "POST", verifier.url_for("/orders"))
    assert (verified.scheme, verified.jkt) == (DPOP, JKT)


async def test_url_for_is_the_configured_origin(http: httpx.AsyncClient) -> None:
    verifier = make_verifier(http, config(resource="https://api.example:8443/v1"))
    assert verifier.url_for("/v1/orders") == "https://api.example:8443/v1/orders"


async def test_a_dpop_token_without_its_proof(verifier: TokenVerifier) -> None:
    error = await refused(verifier, f"DPoP {make_token(jkt=JKT)}")
    assert (error.error, error.scheme) == ("invalid_dpop_proof", DPOP)


async def test_a_dpop_token_with_a_proof_of_another_key(verifier: TokenVerifier) -> None:
    token = make_token(jkt=JKT)
    proof = make_proof(OTHER_PROOF_KEY, token=token)
    error = await refused(verifier, f"DPoP {token}", [proof])
    assert (error.error, error.scheme) == ("invalid_token", DPOP)


async def test_a_cnf_without_jkt_is_refused(verifier: TokenVerifier) -> None:
    error = await refused(verifier, f"Bearer {make_token(cnf={'x5t#S256': 'abc'})}")
    assert error.error == "invalid_token"


async def test_an_invalid_token_is_challenged_in_the_scheme_it_came_with(
    verifier: TokenVerifier,
) -> None:
    token = make_token(jkt=JKT, exp_in=-3600)
    error = await refused(verifier, f"DPoP {token}", [make_proof(token=token)])
    assert (error.error, error.scheme) == ("invalid_token", DPOP)


async def test_dpop_required_refuses_bearer(http: httpx.AsyncClient) -> None:
    verifier = make_verifier(http, config(dpop_required=True))
    error = await refused(verifier, f"Bearer {make_token()}")
    assert (error.error, error.scheme) == ("invalid_token", DPOP)
    token = make_token(jkt=JKT)
    verified = await verifier.verify(f"DPoP {token}", [make_proof(token=token)], "GET", ORDERS)
    assert verified.scheme == DPOP


async def test_dpop_required_refuses_an_unbound_token_in_dpop(http: httpx.AsyncClient) -> None:
    # The advice is the DPoP scheme's, not "send it as Bearer", which this API refuses.
    verifier = make_verifier(http, config(dpop_required=True))
    token = make_token()
    error = await refused(verifier, f"DPoP {token}", [make_proof(token=token)])
    assert (error.error, error.scheme) == ("invalid_token", DPOP)
    assert "Bearer" not in error.description


async def test_without_dpop_the_dpop_scheme_is_no_credential(http: httpx.AsyncClient) -> None:
    verifier = make_verifier(http, config(dpop=False))
    token = make_token(jkt=JKT)
    error = await refused(verifier, f"DPoP {token}", [make_proof(token=token)])
    assert (error.error, error.status) == (None, 401)


@pytest.mark.parametrize("authorization", [None, "", "Basic YTpi", "Negotiate abc"])
async def test_no_token_of_ours_is_no_error_code(
    verifier: TokenVerifier, authorization: str | None
) -> None:
    error = await refused(verifier, authorization)
    assert (error.error, error.status, error.scheme) == (None, 401, None)


async def test_require_names_every_scope_needed(verifier: TokenVerifier) -> None:
    verified = await verifier.verify(f"Bearer {make_token(scope='orders:read')}", [], "GET", ORDERS)
    verifier.require(verified, "orders:read")
    with pytest.raises(TokenError) as info:
        verifier.require(verified, "orders:read", "orders:write")
    error = info.value
    assert (error.error, error.status, error.scheme) == ("insufficient_scope", 403, BEARER)
    assert error.scope == "orders:read orders:write"


async def test_keys_unavailable_is_503(server: FakeTokenServer, verifier: TokenVerifier) -> None:
    server.down = True
    error = await refused(verifier, f"Bearer {make_token()}")
    assert (error.status, error.scheme) == (503, None)


async def test_introspection_active(server: FakeTokenServer, http: httpx.AsyncClient) -> None:
    verifier = make_verifier(http, with_introspection())
    await verifier.verify(f"Bearer {make_token()}", [], "GET", ORDERS)
    assert server.introspections == 1


async def test_introspection_revoked_is_401(
    server: FakeTokenServer, http: httpx.AsyncClient
) -> None:
    verifier = make_verifier(http, with_introspection())
    token = make_token(jkt=JKT)
    server.revoked.add(claims_of(token)["jti"])
    error = await refused(verifier, f"DPoP {token}", [make_proof(token=token)])
    assert (error.error, error.status, error.scheme) == ("invalid_token", 401, DPOP)


async def test_introspection_down_is_503(
    server: FakeTokenServer, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = make_verifier(http, with_introspection())
    await verifier.verify(f"Bearer {make_token()}", [], "GET", ORDERS)  # keys fetched
    server.introspection = lambda request: httpx.Response(500)
    token = make_token()
    with caplog.at_level("WARNING", "resource_server"):
        error = await refused(verifier, f"Bearer {token}")
    assert (error.status, error.error, error.scheme) == (503, "temporarily_unavailable", None)
    assert [r.getMessage() for r in caplog.records] == ["introspection unavailable: HTTP 500"]


async def test_no_introspection_endpoint_is_503(
    server: FakeTokenServer, http: httpx.AsyncClient
) -> None:
    server.with_introspection = False
    verifier = make_verifier(http, with_introspection())
    assert (await refused(verifier, f"Bearer {make_token()}")).status == 503


async def test_a_token_refused_offline_is_not_introspected(
    server: FakeTokenServer, http: httpx.AsyncClient
) -> None:
    verifier = make_verifier(http, with_introspection())
    await refused(verifier, f"Bearer {make_token(aud='https://other.example')}")
    assert server.introspections == 0


# -- over HTTP -------------------------------------------------------------------------------


def describe(
    response: httpx.Response,
    status: int,
    error: str | None,
    schemes: set[str],
    settings: ResourceServerConfig | None = None,
) -> dict[str, dict[str, str]]:
    """Check a refusal: status, no-store, JSON body, and one challenge per scheme in
    ``schemes`` naming the error, the realm, the metadata URL (and ``algs`` for DPoP)."""
    settings = settings or config()
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body.get("error") == error
    found = challenges_of(response)
    assert set(found) == schemes
    for scheme, params in found.items():
        assert params["realm"] == settings.realm
        assert params["resource_metadata"] == METADATA_URL
        if error is None:
            assert "error" not in params
        else:
            assert params["error"] == error
            safe = re.sub(r"[^\x20\x21\x23-\x5b\x5d-\x7e]", "?", body["error_description"])
            assert params["error_description"] == safe
        assert ("algs" in params) == (scheme == DPOP)
        if scheme == DPOP:
            assert params["algs"].split() == list(settings.dpop_algorithms)
    return found


def fastapi_app(verifier: TokenVerifier) -> FastAPI:
    app = FastAPI()
    protect(app, verifier)
    Read = Annotated[VerifiedToken, Depends(RequireToken(verifier, "orders:read"))]
    Write = Annotated[VerifiedToken, Depends(RequireToken(verifier, "orders:write"))]
    Any_ = Annotated[VerifiedToken, Depends(RequireToken(verifier))]

    @app.get("/orders")
    async def orders(token: Read) -> dict[str, Any]:
        return {"subject": token.subject, "scheme": token.scheme}

    @app.post("/orders")
    async def order(token: Write) -> dict[str, Any]:
        return {"created": True}

    @app.get("/items/{name:path}")
    async def item(name: str, token: Any_) -> dict[str, Any]:
        return {"name": name}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def starlette_app(verifier: TokenVerifier, **options: Any) -> TokenMiddleware:
    async def orders(request: Request) -> JSONResponse:
        token: VerifiedToken = request.state.token
        return JSONResponse({"subject": token.subject, "scopes": sorted(token.scopes)})

    async def public(request: Request) -> JSONResponse:
        return JSONResponse({"public": True, "token": "token" in request.scope.get("state", {})})

    app = Starlette(
        routes=[
            Route("/orders", orders, methods=["GET", "POST"]),
            Route("/items/{name:path}", orders),
            Route("/public", public),
        ]
    )
    options.setdefault("scopes", ["orders:read"])
    options.setdefault("exempt", ["/public"])
    return TokenMiddleware(app, verifier, **options)


@pytest.fixture
async def api(verifier: TokenVerifier) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=fastapi_app(verifier))
    async with httpx.AsyncClient(transport=transport, base_url=RESOURCE) as client:
        yield client


@pytest.fixture
async def asgi(verifier: TokenVerifier) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=starlette_app(verifier))
    async with httpx.AsyncClient(transport=transport, base_url=RESOURCE) as client:
        yield client


@pytest.fixture(params=["fastapi", "asgi"])
async def client(
    request: pytest.FixtureRequest, verifier: TokenVerifier
) -> AsyncIterator[httpx.AsyncClient]:
    """Each integration in turn (the tests below hold for both)."""
    app: Any = fastapi_app(verifier) if request.param == "fastapi" else starlette_app(verifier)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=RESOURCE) as http:
        yield http


@challenges
async def test_http_no_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders")
    describe(response, 401, None, {BEARER, DPOP})
    assert response.json() == {"error_description": "An access token is required."}


@challenges
async def test_http_no_token_with_dpop_required(http: httpx.AsyncClient) -> None:
    settings = config(dpop_required=True)
    app = fastapi_app(make_verifier(http, settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=RESOURCE) as api:
        describe(await api.get("/orders"), 401, None, {DPOP}, settings)
        response = await api.get("/orders", headers=bearer(make_token()))
        describe(response, 401, "invalid_token", {DPOP}, settings)


@challenges
async def test_http_no_token_without_dpop(http: httpx.AsyncClient) -> None:
    settings = config(dpop=False)
    app = starlette_app(make_verifier(http, settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=RESOURCE) as api:
        describe(await api.get("/orders"), 401, None, {BEARER}, settings)


async def test_http_bearer(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders", headers=bearer(make_token()))
    assert response.status_code == 200
    assert response.json()["subject"] == "alice"


@challenges
async def test_http_an_expired_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders", headers=bearer(make_token(exp_in=-3600)))
    describe(response, 401, "invalid_token", {BEARER})
    assert "expired" in response.json()["error_description"]


@challenges
async def test_http_a_bound_token_as_bearer(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders", headers=bearer(make_token(jkt=JKT)))
    describe(response, 401, "invalid_token", {DPOP})


@challenges
async def test_http_an_unbound_token_as_dpop(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders", headers=dpop_request(make_token()))
    describe(response, 401, "invalid_token", {BEARER})


async def test_http_dpop(client: httpx.AsyncClient) -> None:
    token = make_token(jkt=JKT, scope="orders:read orders:write")
    response = await client.get("/orders", headers=dpop_request(token))
    assert response.status_code == 200, response.text
    response = await client.post("/orders", headers=dpop_request(token, htm="POST"))
    assert response.status_code == 200, response.text


async def test_http_a_hostile_host_header_does_not_move_htu(client: httpx.AsyncClient) -> None:
    token = make_token(jkt=JKT)
    headers = {**dpop_request(token), "host": "evil.example"}
    assert (await client.get("/orders", headers=headers)).status_code == 200
    hostile = {**dpop_request(token, htu="https://evil.example/orders"), "host": "evil.example"}
    response = await client.get("/orders", headers=hostile)
    describe(response, 401, "invalid_dpop_proof", {DPOP})


@challenges
async def test_http_a_proof_for_another_path(client: httpx.AsyncClient) -> None:
    token = make_token(jkt=JKT)
    response = await client.get("/orders", headers=dpop_request(token, htu=f"{RESOURCE}/admin"))
    describe(response, 401, "invalid_dpop_proof", {DPOP})


async def test_http_a_replayed_proof(client: httpx.AsyncClient) -> None:
    headers = dpop_request(make_token(jkt=JKT))
    assert (await client.get("/orders", headers=headers)).status_code == 200
    describe(await client.get("/orders", headers=headers), 401, "invalid_dpop_proof", {DPOP})


@pytest.mark.parametrize("path", ["/items/caf%C3%A9", "/items/a%20b", "/items/a%2Fb"])
async def test_http_dpop_on_a_percent_encoded_path(client: httpx.AsyncClient, path: str) -> None:
    # htu is the URI as the client sent it (RFC 9449 §4.3 check 9), escapes included.
    token = make_token(jkt=JKT)
    response = await client.get(path, headers=dpop_request(token, htu=RESOURCE + path))
    assert response.status_code == 200, response.text


def test_request_path_keeps_the_escapes() -> None:
    assert request_path({"path": "/a/b", "raw_path": b"/a%2Fb?x=1"}) == "/a%2Fb"
    # Without raw_path (optional in ASGI): the decoded path escaped again.
    assert request_path({"path": "/caf\u00e9 x/%"}) == "/caf%C3%A9%20x/%25"
    assert request_path({"path": "/a:b@c;d=e", "raw_path": b""}) == "/a:b@c;d=e"


async def test_http_the_query_is_not_part_of_htu(client: httpx.AsyncClient) -> None:
    token = make_token(jkt=JKT)
    response = await client.get("/orders?page=2", headers=dpop_request(token))
    assert response.status_code == 200, response.text


@challenges
async def test_http_dpop_required_with_dpop(http: httpx.AsyncClient) -> None:
    settings = config(dpop_required=True)
    app = starlette_app(make_verifier(http, settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=RESOURCE) as api:
        token = make_token(jkt=JKT)
        assert (await api.get("/orders", headers=dpop_request(token))).status_code == 200
        response = await api.get("/orders", headers=bearer(token))
        describe(response, 401, "invalid_token", {DPOP}, settings)


@challenges
async def test_http_insufficient_scope_fastapi(api: httpx.AsyncClient) -> None:
    response = await api.post("/orders", headers=bearer(make_token(scope="orders:read")))
    found = describe(response, 403, "insufficient_scope", {BEARER})
    assert found[BEARER]["scope"] == "orders:write"
    assert response.json()["scope"] == "orders:write"


@challenges
async def test_http_insufficient_scope_in_dpop(api: httpx.AsyncClient) -> None:
    token = make_token(jkt=JKT, scope="orders:read")
    response = await api.post("/orders", headers=dpop_request(token, htm="POST"))
    found = describe(response, 403, "insufficient_scope", {DPOP})
    assert found[DPOP]["scope"] == "orders:write"


@challenges
async def test_http_insufficient_scope_asgi(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/orders", headers=bearer(make_token(scope="profile")))
    found = describe(response, 403, "insufficient_scope", {BEARER})
    assert found[BEARER]["scope"] == "orders:read"


@challenges
@pytest.mark.parametrize("authorization", ["Bearer", "Bearer a b", "Bearer tok\u00e9n", "DPoP ,,"])
async def test_http_a_malformed_authorization_is_400(
    client: httpx.AsyncClient, authorization: str
) -> None:
    response = await client.get("/orders", headers={b"authorization": authorization.encode()})
    describe(response, 400, "invalid_request", {BEARER, DPOP})


@challenges
async def test_http_keys_unavailable_is_503(
    server: FakeTokenServer, client: httpx.AsyncClient
) -> None:
    server.down = True
    response = await client.get("/orders", headers=bearer(make_token()))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.headers["cache-control"] == "no-store"
    assert "www-authenticate" not in response.headers
    assert response.json()["error"] == "temporarily_unavailable"


@pytest.mark.feature("rs-kit-introspection")
@pytest.mark.parametrize("kind", ["fastapi", "asgi"])
@pytest.mark.parametrize("outage", ["http-502", "network"])
async def test_http_introspection(
    server: FakeTokenServer, http: httpx.AsyncClient, kind: str, outage: str
) -> None:
    verifier = make_verifier(http, with_introspection())
    app: Any = fastapi_app(verifier) if kind == "fastapi" else starlette_app(verifier)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=RESOURCE) as api:
        assert (await api.get("/orders", headers=bearer(make_token()))).status_code == 200
        server.revoked.add("gone")
        revoked = bearer(make_token(jti="gone"))
        describe(await api.get("/orders", headers=revoked), 401, "invalid_token", {BEARER})
        if outage == "network":
            server.down = True  # the keys stay cached: only introspection fails
        else:
            server.introspection = lambda request: httpx.Response(502)
        response = await api.get("/orders", headers=bearer(make_token()))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.headers["cache-control"] == "no-store"
        assert "www-authenticate" not in response.headers
        assert response.json()["error"] == "temporarily_unavailable"


@pytest.mark.feature("rs-kit-metadata")
async def test_http_the_metadata_document(
    client: httpx.AsyncClient, verifier: TokenVerifier
) -> None:
    response = await client.get("/.well-known/oauth-protected-resource")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == protected_resource_metadata(verifier.config)
    assert "no-store" not in response.headers.get("cache-control", "")


@pytest.mark.feature("rs-kit-metadata")
async def test_http_the_metadata_document_under_a_path(http: httpx.AsyncClient) -> None:
    settings = config(resource=f"{RESOURCE}/v1")
    verifier = make_verifier(http, settings)
    for app in (fastapi_app(verifier), starlette_app(verifier)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=RESOURCE
        ) as api:
            response = await api.get("/.well-known/oauth-protected-resource/v1")
            assert response.status_code == 200
            assert response.json()["resource"] == f"{RESOURCE}/v1"
            refusal = await api.get("/orders")
            params = challenges_of(refusal)[BEARER]
            assert (
                params["resource_metadata"] == f"{RESOURCE}/.well-known/oauth-protected-resource/v1"
            )


async def test_http_fastapi_open_routes_stay_open(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}


# -- TokenMiddleware only ---------------------------------------------------------------------


async def test_asgi_the_token_is_in_the_state(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/orders", headers=bearer(make_token(scope="orders:read extra")))
    assert response.json() == {"subject": "alice", "scopes": ["extra", "orders:read"]}


async def test_asgi_exempt_paths_need_no_token(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/public")
    assert response.status_code == 200
    assert response.json() == {"public": True, "token": False}
    # Exempt means exactly that path.
    assert (await asgi.get("/public/more")).status_code == 401


@challenges
async def test_http_two_authorization_headers_are_400(client: httpx.AsyncClient) -> None:
    token = make_token()
    headers = [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")]
    response = await client.get("/orders", headers=headers)
    describe(response, 400, "invalid_request", {BEARER, DPOP})


async def test_asgi_the_content_length_is_the_bodys(asgi: httpx.AsyncClient) -> None:
    response = await asgi.get("/orders")
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.feature("rs-kit-metadata")
async def test_asgi_the_metadata_document_is_for_get_only(asgi: httpx.AsyncClient) -> None:
    path = "/.well-known/oauth-protected-resource"
    head = await asgi.head(path)
    assert (head.status_code, head.content) == (200, b"")  # RFC 9110 §9.3.2: no body
    assert int(head.headers["content-length"]) == len((await asgi.get(path)).content)
    assert (await asgi.post(path)).status_code == 401


@pytest.mark.feature("rs-kit-metadata")
async def test_fastapi_the_metadata_document_answers_head(api: httpx.AsyncClient) -> None:
    assert (await api.head("/.well-known/oauth-protected-resource")).status_code == 200


async def test_asgi_lifespan_is_passed_through(verifier: TokenVerifier) -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        raise AssertionError("the middleware answered a lifespan scope")

    middleware = TokenMiddleware(inner, verifier)
    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert seen == ["lifespan"]


# -- WebSockets through TokenMiddleware (bare ASGI) -------------------------------------------


async def websocket(
    verifier: TokenVerifier, headers: dict[str, str], extensions: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Run a WebSocket handshake through the middleware: what it sent, what the app saw."""
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "wss",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "server": ("api.example", 443),
        "subprotocols": [],
        "extensions": extensions or {},
    }
    sent: list[dict[str, Any]] = []
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["state"]["token"])
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await TokenMiddleware(app, verifier, scopes=["orders:read"])(scope, receive, send)
    return sent, seen


async def test_asgi_a_websocket_without_a_token_is_closed(verifier: TokenVerifier) -> None:
    sent, seen = await websocket(verifier, {})
    assert seen == []
    assert sent == [{"type": "websocket.close", "code": 1008}]


@challenges
async def test_asgi_a_websocket_refusal_as_http(verifier: TokenVerifier) -> None:
    extension: dict[str, Any] = {"websocket.http.response": {}}
    sent, seen = await websocket(verifier, bearer(make_token(scope="profile")), extension)
    assert seen == []
    start, body = sent
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 403)
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert headers["www-authenticate"].startswith("Bearer ")
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert body["type"] == "websocket.http.response.body"
    assert b"insufficient_scope" in body["body"]


async def test_asgi_a_websocket_with_a_token(verifier: TokenVerifier) -> None:
    sent, seen = await websocket(verifier, bearer(make_token()))
    assert [token.subject for token in seen] == ["alice"]
    assert sent == [{"type": "websocket.accept"}]


async def test_asgi_a_websocket_with_dpop(verifier: TokenVerifier) -> None:
    _, seen = await websocket(verifier, dpop_request(make_token(jkt=JKT)))
    assert [token.scheme for token in seen] == [DPOP]
