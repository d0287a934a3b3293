"""CORS: only configured origins, only on the endpoints a browser app calls, never credentials."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from server.config import Env, Settings
from server.main import create_app
from tests.conftest import make_settings, truncate

# The backend rule (CLAUDE.md): nothing here depends on the database.
pytestmark = [pytest.mark.feature("cors"), pytest.mark.one_backend]

APP = "https://app.example.com"
LOCAL = "http://localhost:5173"
EVIL = "https://evil.example"


@pytest.fixture
async def http(database_url: str, keys_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(database_url, keys_dir, cors_origins=f"{APP}, {LOCAL}")
    await truncate(database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


def preflight(origin: str, method: str = "POST", headers: str = "") -> dict[str, str]:
    result = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        result["Access-Control-Request-Headers"] = headers
    return result


#: What a single-page app calls: (method, path, what a bare request answers).
BROWSER_ENDPOINTS = [
    ("POST", "/oauth2/token", 400),
    ("POST", "/oauth2/par", 400),
    ("POST", "/oauth2/revoke", 400),
    ("GET", "/userinfo", 401),
    ("GET", "/.well-known/jwks.json", 200),
    ("GET", "/.well-known/openid-configuration", 200),
    ("GET", "/api/v1/me", 401),
]


@pytest.mark.parametrize(("method", "path", "status"), BROWSER_ENDPOINTS)
async def test_a_configured_origin_may_call_what_a_browser_app_calls(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    for origin in (APP, LOCAL):
        response = await http.request(method, path, headers={"Origin": origin})
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == origin
        assert "origin" in response.headers["vary"].lower()
        assert "access-control-allow-credentials" not in response.headers
        exposed = response.headers["access-control-expose-headers"].lower()
        assert "x-request-id" in exposed and "www-authenticate" in exposed
        assert "dpop-nonce" in exposed  # RFC 9449 §8: the app reads its next nonce
    asked = "authorization,content-type,dpop"
    allowed = await http.options(path, headers=preflight(APP, method, asked))
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP
    assert method in allowed.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in allowed.headers
    assert allowed.headers["access-control-max-age"] == "600"
    # Preflights get the same security headers and request id as everything else.
    assert allowed.headers["x-content-type-options"] == "nosniff"
    assert allowed.headers["x-request-id"]


@pytest.mark.parametrize(("method", "path", "status"), BROWSER_ENDPOINTS)
async def test_any_other_origin_gets_no_cors_at_all(
    http: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    for origin in (EVIL, APP + ".evil.example", "https://APP.example.com:443", "null", APP + "/"):
        response = await http.request(method, path, headers={"Origin": origin})
        assert response.status_code == status
        assert "access-control-allow-origin" not in response.headers
        refused = await http.options(path, headers=preflight(origin, method))
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize(
    "path",
    [
        "/login",
        "/account",
        "/oauth2/authorize",
        "/oauth2/introspect",
        "/admin/v1/clients",
        "/metrics",
        "/healthz",
        "/openapi.json",
    ],
)
async def test_pages_introspection_admin_and_operations_never_answer_cors(
    http: httpx.AsyncClient, path: str
) -> None:
    response = await http.get(path, headers={"Origin": APP})
    assert "access-control-allow-origin" not in response.headers
    options = await http.options(path, headers=preflight(APP, "POST"))
    assert "access-control-allow-origin" not in options.headers
    assert options.status_code in (404, 405)


async def test_a_preflight_for_a_method_or_header_not_allowed_is_refused(
    http: httpx.AsyncClient,
) -> None:
    put = await http.options("/api/v1/me", headers=preflight(APP, "PUT"))
    assert put.status_code == 400
    cookie = await http.options("/api/v1/me", headers=preflight(APP, "GET", "cookie"))
    assert cookie.status_code == 400


async def test_no_origins_configured_means_no_cors(client: httpx.AsyncClient) -> None:
    response = await client.get("/.well-known/jwks.json", headers={"Origin": APP})
    assert response.status_code == 200
    assert not [h for h in response.headers if h.startswith("access-control-")]
    options = await client.options("/oauth2/token", headers=preflight(APP))
    assert options.status_code == 405
    assert not [h for h in options.headers if h.startswith("access-control-")]


def settings_with(origins: str, **extra: object) -> Settings:
    return Settings(_env_file=None, cors_origins=origins, **extra)  # type: ignore[call-arg]


def test_origins_are_parsed_and_normalised() -> None:
    settings = settings_with(" https://App.Example.com , http://localhost:5173,")
    assert settings.cors_origins == ["https://app.example.com", "http://localhost:5173"]
    assert settings_with("").cors_origins == []
    assert settings_with('["https://a.example"]').cors_origins == ["https://a.example"]


@pytest.mark.parametrize(
    "origin",
    [
        "*",
        "https://a.example/",
        "https://a.example/path",
        "a.example",
        "ftp://a.example",
        "https://a.example?x",
        "https://*.example.com",
        "https://",
    ],
)
def test_anything_but_an_exact_origin_is_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="AUTH_CORS_ORIGINS"):
        settings_with(origin)


def test_production_refuses_http_origins() -> None:
    settings = settings_with("http://app.example.com", env=Env.production)
    assert any("AUTH_CORS_ORIGINS" in reason for reason in settings.insecure_reasons())
    assert not any(
        "AUTH_CORS_ORIGINS" in reason
        for reason in settings_with(APP, env=Env.production).insecure_reasons()
    )
