"""The application factory: ``create_app(settings)`` builds one isolated app."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import jwks
from .api.account import router as account_router
from .api.admin import router as admin_router
from .api.auth import ApiError
from .bearer import Refusal
from .breaker import DatabaseUnavailable
from .clients import ClientCache, Listener
from .clients import load as load_client
from .config import Env, Settings
from .cors import Cors
from .db import Database, assert_schema_compatible, create_engine, is_unavailable
from .deps import AppState, StateDep
from .documents import load_document_client
from .fetch import Fetcher
from .jwks import PATH as JWKS_PATH
from .jwks import JwksMiddleware
from .key_rotation import AutoRotator
from .keys import KeySource, KeyStore
from .keys_db import CHANNEL as KEYS_CHANNEL
from .keys_db import DatabaseKeyStore
from .metrics import KEYS_RELOAD_FAILING, KEYS_RELOAD_FAILURES, MetricsMiddleware, set_key_ages
from .metrics import router as metrics_router
from .models import Client
from .oauth.authorize import router as authorize_router
from .oauth.par import ROUTES as PAR_ROUTES
from .oauth.registration_routes import ROUTES as REGISTRATION_ROUTES
from .oauth.routes import PLAIN_ROUTES
from .oauth.routes import router as oauth_router
from .oauth.server import TokenServer
from .oauth.userinfo import router as userinfo_router
from .observability import RequestIdMiddleware, configure_logging, log
from .passwords import Passwords
from .ratelimit import Limiter
from .web.browser import STATIC_DIR, SecurityHeadersMiddleware, error_page
from .web.pages import router as pages_router
from .web.passkey_pages import router as passkey_router
from .web.second_factor import router as second_factor_router
from .web.totp_pages import router as totp_router

#: Paths that answer people in a browser: their 503 is a page, not JSON.
PAGE_PATHS = ("/login", "/register", "/logout", "/account", "/consent", "/oauth2/authorize")
#: Paths whose clients read RFC 6749 §5.2 error objects.
OAUTH_PATHS = ("/oauth2/", "/userinfo")


def error_body(detail: Any, error_code: str) -> dict[str, Any]:
    return {"detail": detail, "error_code": error_code}


async def _reload_keys(keys: KeySource, interval: float, wake: asyncio.Event | None = None) -> None:
    """Pick up ``keys rotate`` run by an operator (or on another replica) without a restart:
    every ``interval``, or at once when ``wake`` is set (PostgreSQL ``NOTIFY`` of the
    database store).

    Reading and parsing keys must not hold up requests: the stores parse in a worker thread.
    A failure keeps the keys loaded before; it is logged once per reason, counted, and shown
    by ``/readyz`` and ``keys_reload_failing`` until a reload succeeds.
    """
    failure: str | None = None  # the last reason logged: once, not at every attempt
    wake = wake or asyncio.Event()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()
        try:
            if await keys.areload():
                log.info("keys.reloaded", kid=keys.keyset().kid)
            failure = None
            set_key_ages(keys.keyset().infos, time.time())
        except Exception as exc:  # keep serving with the keys already loaded
            KEYS_RELOAD_FAILURES.inc()
            if str(exc) != failure:
                failure = str(exc)
                log.error("keys.reload_failed", error=failure)


async def _open_keys(settings: Settings, engine: AsyncEngine) -> KeySource:
    """The configured key store, loaded; outside production an empty one gets a first pair."""
    keys: KeySource
    if settings.key_store == "database":
        encryption, previous = settings.key_encryption()
        store = DatabaseKeyStore(engine, encryption, settings.signing_alg, previous=previous)
        if settings.env is not Env.production:
            await store.ensure()
        keys = store
    else:
        files = KeyStore(settings.keys_dir, settings.signing_alg)
        if settings.env is not Env.production:
            files.ensure()
        keys = files
    await keys.areload()
    return keys


class App(FastAPI):
    """FastAPI, with resource servers' JWKS fetches answered before any middleware
    (``server/jwks.py``: ``fast``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == JWKS_PATH
            and await jwks.fast(self, scope, send)
        ):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.check_production()
    settings.check_profile()
    if settings.env is not Env.production and not settings.issuer.startswith("https://"):
        # Authlib refuses plain-http request URLs unless told otherwise; production never is.
        os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        try:
            await assert_schema_compatible(engine)
            keys = await _open_keys(settings, engine)
            database = Database(settings, engine)
            postgresql = engine.dialect.name == "postgresql"

            async def load_any_client(client_id: str) -> Client | None:
                # ``state`` when it is read: tests put a broken database in its place.
                state: AppState = app.state.auth
                return await load_client(
                    state.db,
                    client_id,
                    documents=lambda url: load_document_client(state, url),
                )

            clients = ClientCache(
                settings.client_cache_ttl, load_any_client, trusted=not postgresql
            )
            app.state.auth = state = AppState(
                settings=settings,
                db=database,
                keys=keys,
                passwords=Passwords(settings),
                limiter=Limiter(settings),
                clients=clients,
                fetcher=Fetcher(settings),
            )
            # The OAuth core, built once: its grants and endpoints keep nothing of a request.
            app.state.oauth = TokenServer(state, clients)
            wake = asyncio.Event()
            channels = {}
            if isinstance(keys, DatabaseKeyStore):
                channels[KEYS_CHANNEL] = lambda _payload: wake.set()
            listener = (
                Listener(
                    engine,
                    clients if clients.ttl > 0 else None,
                    timeout=settings.db_connect_timeout,
                    channels=channels,
                )
                if postgresql and (clients.ttl > 0 or channels)
                else None
            )
            app.state.clients_listener = listener
            if listener is not None:
                listener.start()
            set_key_ages(keys.keyset().infos, time.time())
            # Read from the store's own failure at each scrape, as /readyz reads it: the two
            # can never disagree (the gauge used to be set a moment after the store cleared).
            KEYS_RELOAD_FAILING.set_function(lambda: float(keys.failure is not None))
            reloader = asyncio.create_task(_reload_keys(keys, settings.key_reload_interval, wake))
            # AUTH_KEY_AUTO_ROTATE: every replica ticks, the one holding the lock acts.
            rotator = (
                asyncio.create_task(AutoRotator.from_settings(keys, settings).run())
                if isinstance(keys, DatabaseKeyStore) and settings.key_auto_rotate
                else None
            )
            try:
                yield
            finally:
                reloader.cancel()
                if rotator is not None:
                    rotator.cancel()
                    # Its transaction, if any, rolls back before the engine is disposed.
                    await asyncio.wait({rotator})
                if listener is not None:
                    await listener.stop()
                app.state.auth.limiter.close()
                app.state.auth.passwords.close()
                await app.state.auth.fetcher.aclose()
        finally:
            await engine.dispose()

    app = App(
        title="Token server",
        summary="JSON APIs of the token server (the OAuth endpoints are described by discovery)",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.add_middleware(JwksMiddleware)  # innermost of ours: inside metrics, ids, headers
    # Inside CORS, the headers and the request id, so a 500 carries all of them.
    app.add_middleware(UnexpectedErrorMiddleware)
    if settings.cors_origins:
        # Outside the JWKS fast path, inside the headers: preflights get ids and headers too.
        app.add_middleware(Cors, origins=settings.cors_origins)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware)
    # The schema describes the JSON APIs; OAuth endpoints are described by discovery (RFC 8414).
    app.router.routes.extend(PLAIN_ROUTES + PAR_ROUTES + REGISTRATION_ROUTES)
    app.include_router(oauth_router, include_in_schema=False)
    app.include_router(userinfo_router, include_in_schema=False)
    app.include_router(authorize_router, include_in_schema=False)
    app.include_router(pages_router, include_in_schema=False)
    app.include_router(second_factor_router, include_in_schema=False)
    app.include_router(totp_router, include_in_schema=False)
    app.include_router(passkey_router, include_in_schema=False)
    app.include_router(metrics_router, include_in_schema=False)
    app.include_router(account_router)
    app.include_router(admin_router)
    if settings.docs_enabled:
        _add_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_health(app)
    _add_error_handlers(app)
    return app


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(state: StateDep) -> Response:
        problems: list[str] = []
        try:
            # Through the breaker: while it is open this answers at once, without I/O.
            async with state.db.session() as db:
                await db.execute(text("SELECT 1"))
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            reason = exc.reason if isinstance(exc, DatabaseUnavailable) else type(exc).__name__
            problems.append(f"database: {reason}")
        try:
            keyset = state.keys.keyset()
        except Exception as exc:
            problems.append(f"keys: {exc}")
        else:
            failure = state.keys.failure
            if failure is not None:
                # The server still signs, but not with the keys the operator set: take it out
                # of rotation until a reload succeeds.
                problems.append(
                    f"keys: reloading has failed for {max(0, round(time.time() - failure.since))}"
                    f" s ({failure.attempts} attempts), still signing with {keyset.kid}: "
                    f"{failure.reason}"
                )
        if problems:
            return JSONResponse(error_body("; ".join(problems), "not_ready"), status_code=503)
        return JSONResponse({"status": "ready"})


#: Swagger UI's files, by exact URL (FastAPI's defaults, pinned here so the CSP names them).
SWAGGER_JS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"
SWAGGER_CSS = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"
SWAGGER_FAVICON = "https://fastapi.tiangolo.com/img/favicon.png"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def docs_page() -> Response:
    """Swagger UI with a CSP that allows exactly what it loads: its script and stylesheet by
    URL, and its inline start-up script by the hash of the bytes served (CSP Level 3 §8.4),
    so no ``'unsafe-inline'`` and no other file of the CDN."""
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Token server API",
        swagger_js_url=SWAGGER_JS,
        swagger_css_url=SWAGGER_CSS,
        swagger_favicon_url=SWAGGER_FAVICON,
    )
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(bytes(page.body))
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {SWAGGER_JS} {hashes}; style-src {SWAGGER_CSS}; "
        f"img-src 'self' data: {SWAGGER_FAVICON}; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return page


def _add_docs(app: FastAPI) -> None:
    page = docs_page()  # the same bytes every time: built and hashed once

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return Response(
            page.body,
            media_type="text/html",
            headers={"Content-Security-Policy": page.headers["Content-Security-Policy"]},
        )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        headers = {"Cache-Control": "no-store", **exc.headers}
        return JSONResponse(
            error_body(exc.detail, exc.error_code), status_code=exc.status, headers=headers
        )

    @app.exception_handler(Refusal)
    async def refusal(_: Request, exc: Refusal) -> Response:
        return exc.response()  # bearer.py: the challenge and body of the resource's realm

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's answer to a JSON body that is not UTF-8 (RFC 8259 §8.1): invalid JSON,
            # so the same 422 as a syntax error, which every operation documents.
            invalid = [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]
            return JSONResponse(error_body(invalid, "validation_error"), status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(exc.detail, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        # Field locations and messages only: never echo the submitted values back.
        detail = [
            {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
            for err in exc.errors()
        ]
        return JSONResponse(error_body(detail, "validation_error"), status_code=422)

    async def unexpected(request: Request, exc: Exception) -> Response:
        # Only a failure outside ``UnexpectedErrorMiddleware`` (in the request-id, headers or
        # metrics middleware) still reaches Starlette's last-resort handler.
        log.exception("request.failed", error=type(exc).__name__)
        return server_error_response(request.url.path)

    async def database_error(request: Request, exc: Exception) -> Response:
        """503 with ``Retry-After`` for the database being down, busy or behind an open
        breaker (the one test, ``db.is_unavailable``, that the breaker uses too)."""
        if not is_unavailable(exc):
            return await unexpected(request, exc)
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        retry_after = exc.retry_after if isinstance(exc, DatabaseUnavailable) else 1
        log.error("database.unavailable", error=type(cause).__name__, reason=str(exc)[:200])
        return unavailable_response(request.url.path, retry_after)

    for error in (DatabaseUnavailable, DBAPIError, OSError):
        app.add_exception_handler(error, database_error)
    app.add_exception_handler(Exception, unexpected)


def server_error_response(path: str) -> Response:
    """The 500 in the format of the endpoint that was asked; never says what went wrong."""
    response: Response
    if path.startswith(PAGE_PATHS):
        response = error_page(
            500, "Something went wrong", "The server met an unexpected error. Try again later."
        )
    elif path.startswith(OAUTH_PATHS):
        # RFC 6749 §4.1.2.1 and §5.2 (its registry, RFC 6749 §11.4): server_error.
        body = {"error": "server_error", "error_description": "The server met an unexpected error."}
        response = JSONResponse(body, status_code=500)
    else:
        response = JSONResponse(error_body("Internal server error.", "internal_error"), 500)
    response.headers["Cache-Control"] = "no-store"
    return response


class UnexpectedErrorMiddleware:
    """The last word on an exception no handler took: one redacted JSON log line (its
    traceback folded into the line by structlog) and ``server_error_response``.

    Starlette's own ``ServerErrorMiddleware`` sits outside every middleware of ours (so its
    500 had no security headers and no request id) and re-raises after answering, so uvicorn
    printed a multi-line traceback outside the JSON log; this one answers and stops there.
    When the response had already started, nothing more can be sent: the line is logged and
    the response stays cut off, which the client sees as an incomplete body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.exception("request.failed", error=type(exc).__name__, response_started=started)
            if not started:
                await server_error_response(scope["path"])(scope, receive, send)


def unavailable_response(path: str, retry_after: int) -> Response:
    """The 503 in the format of the endpoint that was asked."""
    headers = {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
    message = "The service is briefly unavailable; try again shortly."
    response: Response
    if path.startswith(PAGE_PATHS):
        response = error_page(503, "Try again shortly", message)
    elif path.startswith(OAUTH_PATHS):
        # RFC 6749 §4.1.2.1 names temporarily_unavailable; token clients parse this shape.
        body = {"error": "temporarily_unavailable", "error_description": message}
        response = JSONResponse(body, status_code=503)
    else:
        response = JSONResponse(error_body(message, "database_unavailable"), status_code=503)
    response.headers.update(headers)
    return response


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory server.main:app_factory`` (settings from env)."""
    return create_app()
