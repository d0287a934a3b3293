"""Prometheus metrics at /metrics: the format, the counters' deltas and bounded labels.

The registry is process-global, so every test reads values before and after and compares the
difference, never absolute values.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from server import metrics
from server.config import Settings
from server.main import create_app
from server.metrics import (
    DURATION_BUCKETS,
    REGISTRY,
    MetricsMiddleware,
    record_audit,
    set_breaker_state,
)
from server.observability import AUDIT_LISTENERS, audit
from tests.conftest import MakeClient, MakeUser, password_grant, refresh_grant, truncate

# The backend rule (CLAUDE.md): nothing here depends on the database.
pytestmark = [pytest.mark.feature("metrics"), pytest.mark.one_backend]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

FAMILIES = {
    "http_requests",
    "http_request_duration_seconds",
    "tokens_issued",
    "token_failures",
    "refresh_reuse_detected",
    "signin_failures",
    "rate_limit_hits",
    "tokens_revoked",
    "database_breaker_state",
}


def key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return after.get(key(name, labels), 0.0) - before.get(key(name, labels), 0.0)


def label_values(samples: Samples, label: str) -> set[str]:
    return {value for (_, labels) in samples for name, value in labels if name == label}


def registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the endpoint --------------------------------------------------------------------------


@pytest.mark.feature("metrics")
async def test_metrics_is_prometheus_text_and_never_cached(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200  # at least one timed request
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert response.headers["cache-control"] == "no-store"
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert set(families) >= FAMILIES
    assert families["http_requests"].type == "counter"
    assert families["http_request_duration_seconds"].type == "histogram"
    assert families["database_breaker_state"].type == "gauge"
    bounds = {
        s.labels["le"]
        for s in families["http_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert bounds == {str(b) for b in DURATION_BUCKETS} | {"+Inf"}


@pytest.mark.feature("metrics")
async def test_scraping_is_not_itself_counted(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    await client.get("/metrics")
    after = await scrape(client)
    assert "/metrics" not in label_values(after, "route")
    assert delta(before, after, "http_requests_total", method="GET", route="/metrics") == 0


# -- HTTP requests by route template -------------------------------------------------------


@pytest.mark.feature("metrics")
async def test_token_requests_are_counted_by_route_and_status(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    before = await scrape(client)
    assert (await password_grant(client, creds, user)).status_code == 200
    assert (await password_grant(client, creds, user, password="wrong")).status_code == 400
    after = await scrape(client)
    token = {"method": "POST", "route": "/oauth2/token"}
    assert delta(before, after, "http_requests_total", **token, status="200") == 1
    assert delta(before, after, "http_requests_total", **token, status="400") == 1
    assert delta(before, after, "http_request_duration_seconds_count", **token) == 2
    assert delta(before, after, "http_request_duration_seconds_bucket", **token, le="+Inf") == 2


@pytest.mark.feature("metrics")
async def test_route_label_is_the_template_never_the_raw_path(client: httpx.AsyncClient) -> None:
    family_id = f"fam-{uuid.uuid4().hex}"
    raw = f"/account/sessions/{family_id}/revoke"
    before = await scrape(client)
    response = await client.post(raw, data={})
    after = await scrape(client)
    template = "/account/sessions/{family_id}/revoke"
    status = str(response.status_code)
    assert delta(before, after, "http_requests_total", method="POST", route=template, status=status)
    assert delta(
        before, after, "http_request_duration_seconds_count", method="POST", route=template
    )
    routes = label_values(after, "route")
    assert template in routes
    assert not any(family_id in value for value in routes)
    assert raw not in routes


@pytest.mark.feature("metrics")
async def test_unknown_paths_are_counted_as_unmatched(client: httpx.AsyncClient) -> None:
    junk = f"/no/such/{uuid.uuid4().hex}"
    before = await scrape(client)
    assert (await client.get(junk)).status_code == 404
    assert (await client.request("BREW", junk)).status_code == 404
    after = await scrape(client)
    unmatched = {"route": "unmatched", "status": "404"}
    assert delta(before, after, "http_requests_total", method="GET", **unmatched) == 1
    # A made-up method is not a label value either.
    assert delta(before, after, "http_requests_total", method="other", **unmatched) == 1
    assert not any(junk in value for value in label_values(after, "route"))
    assert "BREW" not in label_values(after, "method")


@pytest.mark.feature("metrics")
async def test_mounted_static_files_use_the_mount_template(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    assert (await client.get("/static/style.css")).status_code == 200
    assert (await client.get(f"/static/{uuid.uuid4().hex}.css")).status_code == 404
    after = await scrape(client)
    static = {"method": "GET", "route": "/static/{path}"}
    assert delta(before, after, "http_requests_total", **static, status="200") == 1
    assert delta(before, after, "http_requests_total", **static, status="404") == 1


@pytest.mark.feature("metrics")
async def test_an_unhandled_exception_counts_as_500() -> None:
    app = FastAPI()

    @app.get("/boom/{item}")
    async def boom(item: str) -> None:
        raise RuntimeError(item)

    app.add_middleware(MetricsMiddleware)
    labels = {"method": "GET", "route": "/boom/{item}", "status": "500"}
    before = registry_value("http_requests_total", **labels)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/boom/x")).status_code == 500
    assert registry_value("http_requests_total", **labels) - before == 1


@pytest.mark.feature("metrics")
async def test_non_http_scopes_pass_through_uncounted() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        return None

    await MetricsMiddleware(inner)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]


# -- audit events -> counters --------------------------------------------------------------


@pytest.mark.feature("metrics", "refresh-reuse-detection")
async def test_grants_failures_and_reuse_move_their_counters(
    client: httpx.AsyncClient, make_client: MakeClient, make_user: MakeUser
) -> None:
    creds = await make_client()
    user = await make_user()
    before = await scrape(client)
    first = await password_grant(client, creds, user)
    assert first.status_code == 200
    wrong = await password_grant(client, creds, user, password="not the password")
    assert wrong.json()["error"] == "invalid_grant"
    refresh_token = first.json()["refresh_token"]
    assert (await refresh_grant(client, creds, refresh_token)).status_code == 200
    replay = await refresh_grant(client, creds, refresh_token)
    assert replay.json()["error"] == "invalid_grant"
    after = await scrape(client)
    assert delta(before, after, "tokens_issued_total", grant_type="password") == 1
    assert delta(before, after, "tokens_issued_total", grant_type="refresh_token") == 1
    assert delta(before, after, "token_failures_total", error="invalid_grant") == 2
    assert delta(before, after, "refresh_reuse_detected_total", kind="refresh") == 1
    assert delta(before, after, "refresh_reuse_detected_total", kind="code") == 0


@pytest.mark.feature("metrics", "hostile-input-table")
async def test_a_junk_grant_type_never_becomes_a_label(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    junk = f"evil-{uuid.uuid4().hex}"
    before = await scrape(client)
    response = await client.post(
        "/oauth2/token", data={"grant_type": junk, "error": junk}, headers=creds.basic
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    after = await scrape(client)
    labels = {v for (_, pairs) in after for _, v in pairs}
    assert not any(junk in value for value in labels)
    token = {"method": "POST", "route": "/oauth2/token", "status": "400"}
    assert delta(before, after, "http_requests_total", **token) == 1
    assert delta(before, after, "token_failures_total", error="other") == 0


@pytest.mark.feature("metrics")
async def test_a_junk_grant_type_counts_as_unsupported_grant_type(
    client: httpx.AsyncClient, make_client: MakeClient
) -> None:
    creds = await make_client()
    before = await scrape(client)
    data = {"grant_type": "urn:example:junk"}
    response = await client.post("/oauth2/token", data=data, headers=creds.basic)
    assert response.json()["error"] == "unsupported_grant_type"
    after = await scrape(client)
    assert delta(before, after, "token_failures_total", error="unsupported_grant_type") == 1


@pytest.mark.feature("metrics", "rate-limits")
async def test_a_rate_limited_request_is_counted(settings: Settings) -> None:
    await truncate(settings.database_url)
    app = create_app(settings.model_copy(update={"rate_limit_token_ip": "1/minute"}))
    labels = {"endpoint": "token", "scope": "ip"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            before = await scrape(http)
            data = {"grant_type": "client_credentials"}
            assert (await http.post("/oauth2/token", data=data)).status_code == 401
            assert (await http.post("/oauth2/token", data=data)).status_code == 429
            after = await scrape(http)
    assert delta(before, after, "rate_limit_hits_total", **labels) == 1
    token = {"method": "POST", "route": "/oauth2/token"}
    assert delta(before, after, "http_requests_total", **token, status="429") == 1


@pytest.mark.feature("metrics")
def test_the_listener_is_registered_once() -> None:
    assert AUDIT_LISTENERS.count(record_audit) == 1


@pytest.mark.feature("metrics")
def test_audit_events_map_to_bounded_labels() -> None:
    hostile = "x" * 500
    cases: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
        ("token.issued", {"grant_type": "client_credentials"}, "tokens_issued_total",
         {"grant_type": "client_credentials"}),
        ("token.issued", {"grant_type": hostile}, "tokens_issued_total", {"grant_type": "other"}),
        ("token.refused", {"error": "invalid_client"}, "token_failures_total",
         {"error": "invalid_client"}),
        ("token.refused", {"error": hostile}, "token_failures_total", {"error": "other"}),
        ("token.refused", {"error": None}, "token_failures_total", {"error": "other"}),
        ("token.refused", {}, "token_failures_total", {"error": "other"}),
        ("code.reuse_detected", {}, "refresh_reuse_detected_total", {"kind": "code"}),
        ("refresh.reuse_detected", {}, "refresh_reuse_detected_total", {"kind": "refresh"}),
        ("signin.failed", {"user_id": None}, "signin_failures_total", {}),
        ("rate_limit.exceeded", {"endpoint": "token", "scope": "token-client"},
         "rate_limit_hits_total", {"endpoint": "token", "scope": "client"}),
        ("rate_limit.exceeded", {"endpoint": "login", "scope": "login-account"},
         "rate_limit_hits_total", {"endpoint": "login", "scope": "account"}),
        ("rate_limit.exceeded", {"endpoint": "authorize", "scope": "authorize-session"},
         "rate_limit_hits_total", {"endpoint": "authorize", "scope": "session"}),
        ("rate_limit.exceeded", {"endpoint": "login", "scope": "ip"}, "rate_limit_hits_total",
         {"endpoint": "login", "scope": "ip"}),
        ("rate_limit.exceeded", {"endpoint": "login", "scope": "token-ip"},
         "rate_limit_hits_total", {"endpoint": "login", "scope": "other"}),
        ("rate_limit.exceeded", {"endpoint": hostile, "scope": 7}, "rate_limit_hits_total",
         {"endpoint": "other", "scope": "other"}),
        ("token.revoked", {"token_type": "refresh_token"}, "tokens_revoked_total",
         {"token_type": "refresh_token"}),
        ("token.revoked", {"token_type": hostile}, "tokens_revoked_total",
         {"token_type": "other"}),
    ]  # fmt: skip
    for event, fields, name, labels in cases:
        before = registry_value(name, **labels)
        audit(event, **fields)
        assert registry_value(name, **labels) - before == 1, (event, fields)
    exposed = {
        v for family in REGISTRY.collect() for s in family.samples for v in s.labels.values()
    }
    assert hostile not in exposed


@pytest.mark.feature("metrics")
def test_unrelated_events_change_nothing() -> None:
    def total() -> float:
        return sum(
            s.value
            for family in REGISTRY.collect()
            if family.name != "http_request_duration_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        )

    before = total()
    record_audit("key.rotated", {"kid": "k1"})
    record_audit("signin.succeeded", {"user_id": "u"})
    assert total() == before


@pytest.mark.feature("metrics")
def test_the_listener_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "TOKENS_ISSUED", None)
    record_audit("token.issued", {"grant_type": "password"})  # would be AttributeError
    audit("token.issued", grant_type="password")


# -- the circuit breaker gauge -------------------------------------------------------------


@pytest.mark.feature("metrics")
def test_breaker_state_gauge() -> None:
    assert registry_value("database_breaker_state") == 0
    try:
        for state, value in [("open", 2), ("half-open", 1), ("half_open", 1), ("closed", 0)]:
            set_breaker_state(state)
            assert registry_value("database_breaker_state") == value, state
        with pytest.raises(ValueError, match="unknown circuit breaker state"):
            set_breaker_state("melted")
        assert registry_value("database_breaker_state") == 0
    finally:
        set_breaker_state("closed")
