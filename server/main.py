"""The application factory: ``create_app(settings)`` builds one isolated app."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException

from .config import Env, Settings
from .db import assert_schema_at_head, create_engine, session_factory
from .deps import AppState, StateDep
from .keys import KeyStore
from .metrics import MetricsMiddleware
from .metrics import router as metrics_router
from .oauth.authorize import router as authorize_router
from .oauth.routes import router as oauth_router
from .observability import RequestIdMiddleware, configure_logging, log
from .passwords import Passwords
from .ratelimit import Limiter
from .web.browser import STATIC_DIR, SecurityHeadersMiddleware
from .web.pages import router as pages_router

DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, OSError)


def error_body(detail: Any, error_code: str) -> dict[str, Any]:
    return {"detail": detail, "error_code": error_code}


async def _reload_keys(keys: KeyStore, interval: float) -> None:
    """Pick up ``keys rotate`` run by an operator (or on another replica) without a restart."""
    while True:
        await asyncio.sleep(interval)
        try:
            if keys.reload():
                log.info("keys.reloaded", kid=keys.keyset().kid)
        except Exception as exc:  # keep serving with the keys already loaded
            log.error("keys.reload_failed", error=str(exc))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.check_production()
    if settings.env is not Env.production and not settings.issuer.startswith("https://"):
        # Authlib refuses plain-http request URLs unless told otherwise; production never is.
        os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        try:
            await assert_schema_at_head(engine)
            keys = KeyStore(settings.keys_dir)
            if settings.env is not Env.production:
                keys.ensure()
            keys.reload()
            app.state.auth = AppState(
                settings=settings,
                engine=engine,
                sessions=session_factory(engine),
                keys=keys,
                passwords=Passwords(settings),
                limiter=Limiter(settings),
            )
            reloader = asyncio.create_task(_reload_keys(keys, settings.key_reload_interval))
            try:
                yield
            finally:
                reloader.cancel()
                app.state.auth.limiter.close()
        finally:
            await engine.dispose()

    app = FastAPI(
        title="Token server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.include_router(oauth_router)
    app.include_router(authorize_router)
    app.include_router(pages_router)
    app.include_router(metrics_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_health(app)
    _add_error_handlers(app)
    return app


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(state: StateDep) -> Response:
        problems: list[str] = []
        try:
            async with state.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (OSError, DBAPIError) as exc:
            problems.append(f"database: {type(exc).__name__}")
        try:
            state.keys.keyset()
        except Exception as exc:
            problems.append(f"keys: {exc}")
        if problems:
            return JSONResponse(error_body("; ".join(problems), "not_ready"), status_code=503)
        return JSONResponse({"status": "ready"})


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(exc.detail, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        # Field locations and messages only: never echo the submitted values back.
        detail = [{"loc": list(err["loc"]), "msg": err["msg"]} for err in exc.errors()]
        return JSONResponse(error_body(detail, "validation_error"), status_code=422)

    async def database_down(_: Request, exc: Exception) -> Response:
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        log.error("database.unavailable", error=type(cause).__name__)
        return JSONResponse(
            error_body("The database is unavailable; try again shortly.", "database_unavailable"),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    # SQLAlchemy wraps errors on open connections; a refused or timed-out *connect* reaches
    # us as the driver's own OSError (asyncpg re-raises it unwrapped).
    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, database_down)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("request.failed", error=type(exc).__name__)
        return JSONResponse(error_body("Internal server error.", "internal_error"), status_code=500)


def app_factory() -> FastAPI:
    """Entry point for ``uvicorn --factory server.main:app_factory`` (settings from env)."""
    return create_app()
