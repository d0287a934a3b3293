"""Prometheus metrics: ``GET /metrics`` in the text exposition format.

Three sources feed one dedicated ``REGISTRY`` (never the global default registry, so nothing a
library registers there leaks out, and tests can read exact values):

- ``MetricsMiddleware`` (pure ASGI) counts and times every HTTP request by method, route
  *template* and status. The raw path never becomes a label: it is client-controlled and would
  make the label set unbounded. Paths that match no route are counted as ``"unmatched"``.
- An audit listener (``AUDIT_LISTENERS`` in ``observability``) turns audit events into
  counters: tokens issued and refused, refresh/code reuse, failed sign-ins, rate-limit hits and
  revocations. Every label value is checked against a fixed list and anything else is counted
  as ``"other"``, so a hostile ``grant_type`` or ``error`` can never mint a new series.
- ``database_breaker_state``, set through ``set_breaker_state``; ``keys_reload_failing``, read
  from the key store's ``failure`` at each scrape, and ``keys_reload_failures``, counted by the
  key reloader (``main._reload_keys``); ``key_age_seconds``
  (by state), set through ``set_key_ages`` by the reloader and the automatic rotation.

Each process has its own counters: with several uvicorn workers, a scrape reaches one worker
and sees only its share. Prometheus's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) is future
work; until then run one worker per replica and let Prometheus sum the replicas.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .keys import KEY_STATES, KeyInfo
from .names import GRANT_TYPES
from .observability import AUDIT_LISTENERS, log

KNOWN_GRANT_TYPES = frozenset(GRANT_TYPES)

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
OTHER = "other"

REGISTRY = CollectorRegistry(auto_describe=True)

# -- the label values we accept; anything else is counted as "other" -------------------------

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: RFC 6749 §4.1.2.1 and §5.2, RFC 7009 §2.2.1, RFC 8707 §2 (resource indicators).
OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "unsupported_response_type",
        "server_error",
        "temporarily_unavailable",
        "unsupported_token_type",
        "invalid_target",
    }
)
TOKEN_TYPES = frozenset({"access_token", "refresh_token"})
RATE_LIMIT_ENDPOINTS = frozenset(
    {"token", "login", "register", "revoke", "introspect", "authorize"}
)
#: What a limit is counted per; the limiter names them "<endpoint>-<scope>" ("token-ip").
RATE_LIMIT_SCOPES = frozenset({"ip", "client", "account", "session"})
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

#: From 1 ms (a cached discovery document) to 2.5 s (argon2 under load, a slow database).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# -- the metrics ------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ["method", "route"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
TOKENS_ISSUED = Counter(
    "tokens_issued",
    "Successful token responses, by grant type.",
    ["grant_type"],
    registry=REGISTRY,
)
TOKEN_FAILURES = Counter(
    "token_failures",
    "Refused token requests, by OAuth error code.",
    ["error"],
    registry=REGISTRY,
)
RETRIES_SERVED = Counter(
    "refresh_retries_served",
    "Refresh tokens presented again within their client's retry window and answered with the "
    "same successor (the family lived on).",
    registry=REGISTRY,
)
REUSE_DETECTED = Counter(
    "refresh_reuse_detected",
    "Replayed refresh tokens or authorization codes (the family was revoked).",
    ["kind"],
    registry=REGISTRY,
)
SIGNIN_FAILURES = Counter(
    "signin_failures",
    "Failed sign-ins on the hosted login page.",
    registry=REGISTRY,
)
RATE_LIMIT_HITS = Counter(
    "rate_limit_hits",
    "Requests refused by a rate limit, by endpoint and limit scope.",
    ["endpoint", "scope"],
    registry=REGISTRY,
)
TOKENS_REVOKED = Counter(
    "tokens_revoked",
    "Tokens revoked at the revocation endpoint, by token type.",
    ["token_type"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "database_breaker_state",
    "The database circuit breaker: 0 closed, 1 half-open, 2 open.",
    registry=REGISTRY,
)

KEYS_RELOAD_FAILING = Gauge(
    "keys_reload_failing",
    "1 while the latest reload of the signing keys failed (the server signs with the keys it "
    "loaded before, not the ones keys.json names), else 0.",
    registry=REGISTRY,
)
KEYS_RELOAD_FAILURES = Counter(
    "keys_reload_failures",
    "Reloads of the signing keys that failed.",
    registry=REGISTRY,
)

KEY_AGE = Gauge(
    "key_age_seconds",
    "Age of the signing keys by state: current, since it began signing (alert when it "
    "outlives AUTH_KEY_ROTATION_INTERVAL with AUTH_KEY_AUTO_ROTATE); next, since it was "
    "published; retired, the oldest retired key since it was retired (pruned once every "
    "token it signed has expired). No series for a state without a key.",
    ["state"],
    registry=REGISTRY,
)


def set_key_ages(infos: Iterable[KeyInfo], now: float) -> None:
    """Publish ``key_age_seconds`` from the keys' states and timestamps (epoch seconds)."""
    ages: dict[str, float] = {}
    for info in infos:
        if info.state == "current":
            since = info.activated_at or info.created_at
        elif info.state == "next":
            since = info.created_at
        elif info.state == "retired":
            since = info.retired_at or info.created_at
        else:
            continue
        age = max(0.0, now - since)
        # Of several keys in a state: the newest current key (the one that signs), the oldest
        # retired (or next) key.
        pick = min if info.state == "current" else max
        ages[info.state] = pick(ages.get(info.state, age), age)
    for state in KEY_STATES:
        if state in ages:
            KEY_AGE.labels(state).set(ages[state])
        else:
            with contextlib.suppress(KeyError):
                KEY_AGE.remove(state)


def set_breaker_state(state: str) -> None:
    """Publish the breaker's state: ``closed``, ``half-open`` (or ``half_open``) or ``open``."""
    value = BREAKER_STATES.get(state.lower().replace("_", "-"))
    if value is None:
        raise ValueError(f"unknown circuit breaker state: {state!r}")
    BREAKER_STATE.set(value)


# -- audit events -> counters ------------------------------------------------------------------


def _known(value: Any, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else OTHER


def record_audit(event: str, fields: dict[str, Any]) -> None:
    """The audit listener. Cheap, bounded labels only, and never raises (audit must not fail)."""
    try:
        if event == "token.issued":
            TOKENS_ISSUED.labels(_known(fields.get("grant_type"), KNOWN_GRANT_TYPES)).inc()
        elif event == "token.refused":
            TOKEN_FAILURES.labels(_known(fields.get("error"), OAUTH_ERRORS)).inc()
        elif event == "refresh.reuse_detected":
            REUSE_DETECTED.labels("refresh").inc()
        elif event == "code.reuse_detected":
            REUSE_DETECTED.labels("code").inc()
        elif event == "refresh.retry_served":
            RETRIES_SERVED.inc()
        elif event == "signin.failed":
            SIGNIN_FAILURES.inc()
        elif event == "rate_limit.exceeded":
            endpoint = _known(fields.get("endpoint"), RATE_LIMIT_ENDPOINTS)
            scope = fields.get("scope")
            if isinstance(scope, str):
                scope = scope.removeprefix(f"{endpoint}-")
            RATE_LIMIT_HITS.labels(endpoint, _known(scope, RATE_LIMIT_SCOPES)).inc()
        elif event == "token.revoked":
            TOKENS_REVOKED.labels(_known(fields.get("token_type"), TOKEN_TYPES)).inc()
    except Exception as exc:  # a metric must never break the request that emitted the event
        log.warning("metrics.audit_failed", audit_event=event, error=type(exc).__name__)


if record_audit not in AUDIT_LISTENERS:
    AUDIT_LISTENERS.append(record_audit)


# -- HTTP requests ----------------------------------------------------------------------------


def _template(route: Any) -> str | None:
    # ``path_format`` is the template with converters dropped: "/static/{path}" for a mount.
    path = getattr(route, "path_format", None)
    return path if isinstance(path, str) and path else None


def route_template(scope: Scope, original: Scope) -> str:
    """The template of the route that answered, or ``"unmatched"``; never the raw path.

    Starlette's router records the matched route in ``scope["route"]``. Mounts (``/static``)
    are not recorded there, so look them up in the application's routes, using ``original``,
    a copy of the scope taken before routing rewrote ``root_path``.
    """
    template = _template(scope.get("route"))
    if template is not None:
        return template
    app = original.get("app")
    for route in getattr(app, "routes", ()):
        if isinstance(route, Mount):
            match, _ = route.matches(original)
            if match is Match.FULL:
                return _template(route) or UNMATCHED
    return UNMATCHED


class MetricsMiddleware:
    """Counts and times each HTTP request by method, route template and status (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        original = dict(scope)
        status = 500  # unless a response starts: an exception escaped to the server
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope, original)
            if route != METRICS_PATH:
                method = _known(scope.get("method"), METHODS)
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_DURATION.labels(method, route).observe(elapsed)


# -- GET /metrics -----------------------------------------------------------------------------

router = APIRouter()


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics() -> Response:
    return Response(
        generate_latest(REGISTRY),
        media_type=CONTENT_TYPE_LATEST,
        headers={"Cache-Control": "no-store"},
    )
