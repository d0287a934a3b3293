"""The app factory, health endpoints, request ids and JSON error format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import create_async_engine

from server import keys as keys_module
from server import main as server_main
from server import manage
from server.config import Settings
from server.db import Database, SchemaNotAtHeadError
from server.deps import AppState
from server.keys import KeyStore
from server.main import create_app
from tests.conftest import (
    ClientCreds,
    MakeClient,
    MakeUser,
    make_settings,
    password_grant,
    truncate,
)


@pytest.mark.feature("health")
async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


@pytest.mark.feature("health")
async def test_readyz_reports_missing_keys(
    client: httpx.AsyncClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("no current signing key")

    monkeypatch.setattr(state.keys, "keyset", broken)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error_code"] == "not_ready"
    assert "keys" in response.json()["detail"]


@pytest.mark.feature("health")
async def test_readyz_reports_database_down(
    client: httpx.AsyncClient, state: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    monkeypatch.setattr(state, "db", Database(state.settings, dead))
    try:
        response = await client.get("/readyz")
    finally:
        await dead.dispose()
    assert response.status_code == 503
    assert response.json()["detail"].startswith("database:")


@pytest.mark.feature("request-id")
async def test_request_id_is_echoed_when_well_formed_and_replaced_otherwise(
    client: httpx.AsyncClient,
) -> None:
    kept = await client.get("/healthz", headers={"X-Request-ID": "abc-123.DEF:9"})
    assert kept.headers["x-request-id"] == "abc-123.DEF:9"
    for bad in ("x" * 200, "has space", "semi;colon", "\u00e9t\u00e9"):
        replaced = await client.get("/healthz", headers={"X-Request-ID": bad.encode()})
        assert replaced.headers["x-request-id"] != bad
        assert len(replaced.headers["x-request-id"]) == 32
    generated = await client.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32


@pytest.mark.feature("json-errors")
async def test_unknown_path_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found", "error_code": "not_found"}


@pytest.mark.feature("json-errors")
async def test_unexpected_exception_is_a_bare_500(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal server error.", "error_code": "internal_error"}
    assert "secret internals" not in response.text


@pytest.mark.feature("json-errors")
async def test_validation_errors_do_not_echo_input(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/echo")
    async def echo(n: int) -> int:
        return n

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get("/echo", params={"n": "s3cr3t-value"})
    assert response.status_code == 422
    assert response.json()["error_code"] == "validation_error"
    assert "s3cr3t-value" not in response.text


@pytest.mark.feature("schema-at-head", "app-factory")
async def test_app_refuses_to_start_on_unmigrated_database(tmp_path: Path, keys_dir: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", keys_dir)
    app = create_app(settings)
    with pytest.raises(SchemaNotAtHeadError, match="python -m server migrate"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.feature("app-factory")
async def test_two_apps_are_isolated(app: FastAPI, settings: Settings) -> None:
    other = create_app(settings.model_copy(update={"access_token_ttl": 60}))
    async with other.router.lifespan_context(other):
        assert other.state.auth.settings.access_token_ttl == 60
        assert app.state.auth.settings.access_token_ttl == 900


@pytest.mark.feature("authlib-bridge", "nonblocking-argon2")
async def test_password_hash_runs_off_the_event_loop(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    creds = await make_client()
    user = await make_user()
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = state.passwords.verify

    def recording_verify(*args: object) -> object:
        seen.append(threading.get_ident())
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(state.passwords, "verify", recording_verify)
    response = await password_grant(client, creds, user)
    assert response.status_code == 200
    assert seen and all(ident != loop_thread for ident in seen)


@pytest.mark.feature("audit-events", "structured-logs")
async def test_token_events_are_json_audit_lines_without_secrets(
    client: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    capsys: pytest.CaptureFixture[str],
) -> None:
    creds = await make_client()
    user = await make_user()
    body = (await password_grant(client, creds, user)).json()
    await password_grant(client, creds, user, password="wrong-password-x")
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    events = {line["event"]: line for line in lines}
    assert events["token.issued"]["grant_type"] == "password"
    assert events["token.issued"]["request_id"]
    assert events["token.refused"]["error"] == "invalid_grant"
    text = "\n".join(json.dumps(line) for line in lines)
    for secret in (
        user.password,
        "wrong-password-x",
        creds.secret or "",
        body["access_token"],
        body["refresh_token"],
    ):
        assert secret not in text


@pytest.mark.feature("json-errors")
@pytest.mark.parametrize(
    "dead_url",
    ["postgresql+asyncpg://postgres@127.0.0.1:1/none", "sqlite+aiosqlite:////nonexistent/dir/x.db"],
)
async def test_token_endpoint_answers_503_when_the_database_is_unreachable(
    client: httpx.AsyncClient,
    state: AppState,
    monkeypatch: pytest.MonkeyPatch,
    dead_url: str,
) -> None:
    dead = create_async_engine(dead_url)
    monkeypatch.setattr(state, "db", Database(state.settings, dead))
    try:
        response = await client.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": "a", "client_secret": "b"},
        )
    finally:
        await dead.dispose()
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["cache-control"] == "no-store"
    # RFC 6749 §5.2's shape, so OAuth client libraries read it.
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "The service is briefly unavailable; try again shortly.",
    }


@pytest.mark.feature("key-hot-reload")
async def test_running_app_signs_with_a_rotated_key_without_restart(
    settings: Settings, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    app = create_app(settings.model_copy(update={"keys_dir": keys, "key_reload_interval": 0.05}))
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        before = state.keys.keyset().kid
        upcoming = next(i.kid for i in KeyStore(keys).read_manifest() if i.state == "next")
        KeyStore(keys).rotate()  # as `python -m server keys rotate` would, from outside
        for _ in range(200):  # bounded wait for the background reload, no timing asserted
            if state.keys.keyset().kid != before:
                break
            await asyncio.sleep(0.05)
        assert state.keys.keyset().kid == upcoming
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            jwks = (await http.get("/.well-known/jwks.json")).json()
        assert {k["kid"] for k in jwks["keys"]} >= {before, upcoming}


@pytest.mark.feature("key-lifecycle", "introspection")
async def test_tokens_signed_before_a_rotation_stay_valid_until_their_key_is_pruned(
    settings: Settings, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    app = create_app(settings.model_copy(update={"keys_dir": keys, "key_reload_interval": 0.05}))
    await truncate(settings.database_url)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            created = await manage.create_client(
                db, client_id="svc", grants=["client_credentials"], scope="api"
            )
            await db.commit()
        creds = ClientCreds("svc", created.secret)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

            async def issue() -> str:
                response = await http.post(
                    "/oauth2/token", data={"grant_type": "client_credentials"}, headers=creds.basic
                )
                token: str = response.json()["access_token"]
                return token

            async def active(token: str) -> bool:
                response = await http.post(
                    "/oauth2/introspect", data={"token": token}, headers=creds.basic
                )
                result: bool = response.json()["active"]
                return result

            old = await issue()
            old_kid = state.keys.keyset().kid
            KeyStore(keys).rotate()
            for _ in range(200):  # bounded wait for the background reload
                if state.keys.keyset().kid != old_kid:
                    break
                await asyncio.sleep(0.05)
            new = await issue()
            assert jwt.get_unverified_header(new)["kid"] != old_kid
            jwks = {k["kid"] for k in (await http.get("/.well-known/jwks.json")).json()["keys"]}
            assert old_kid in jwks, "a retired key stays published while its tokens live"
            assert await active(old) and await active(new)

            # Too early: the retired key is kept, and tokens it signed still verify.
            pruned = KeyStore(keys).prune(max_token_lifetime=settings.access_token_ttl)
            removed, kept = pruned.removed, pruned.kept
            assert (removed, len(kept)) == ([], 1)
            # Once its tokens could all have expired (here: pretend the retirement was long
            # ago), prune removes it; the server drops it from the JWKS and from verification.
            manifest = json.loads((keys / "keys.json").read_text())
            for entry in manifest["keys"]:
                if entry["kid"] == old_kid:
                    entry["retired_at"] -= settings.access_token_ttl + 1
            (keys / "keys.json").write_text(json.dumps(manifest))
            assert KeyStore(keys).prune(max_token_lifetime=settings.access_token_ttl).removed == [
                old_kid
            ]
            for _ in range(200):
                if old_kid not in state.keys.keyset().public:
                    break
                await asyncio.sleep(0.05)
            jwks = {k["kid"] for k in (await http.get("/.well-known/jwks.json")).json()["keys"]}
            assert old_kid not in jwks
            assert not await active(old)
            assert await active(new)


class CountingKeyStore(KeyStore):
    """Counts the background reloader's attempts, so a test waits for attempts, not time."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.attempts = 0

    def reload(self) -> bool:
        self.attempts += 1
        return super().reload()


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.events.append(("error", event, fields))


async def reload_attempts(keys: CountingKeyStore, count: int) -> None:
    target = keys.attempts + count
    for _ in range(2000):  # bounded wait for the background reloads, no timing asserted
        if keys.attempts >= target:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"only {keys.attempts} reload attempts")


@pytest.mark.feature("key-hot-reload", "key-reload-health")
async def test_a_reload_refused_for_loose_permissions_keeps_the_keys_and_logs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded = RecordingLog()
    monkeypatch.setattr(server_main, "log", recorded)
    keys = CountingKeyStore(tmp_path)
    keys.ensure()
    before = keys.keyset().kid
    KeyStore(tmp_path).rotate()
    keys.manifest_path.chmod(0o666)  # as if another user had rewritten keys.json

    reloader = asyncio.create_task(server_main._reload_keys(keys, 0.001))
    try:
        await reload_attempts(keys, 5)
        assert keys.keyset().kid == before
        failures = [fields for level, event, fields in recorded.events if level == "error"]
        assert len(failures) == 1, "the reason is logged once, not at every attempt"
        assert str(keys.manifest_path) in failures[0]["error"]
        assert "chmod 600" in failures[0]["error"]

        keys.manifest_path.chmod(0o600)
        await reload_attempts(keys, 2)
        assert keys.keyset().kid != before
        assert ("info", "keys.reloaded", {"kid": keys.keyset().kid}) in recorded.events

        # A new failure after a recovery is logged again.
        KeyStore(tmp_path).rotate()
        keys.manifest_path.chmod(0o620)
        await reload_attempts(keys, 5)
        assert sum(level == "error" for level, _, _ in recorded.events) == 2
    finally:
        reloader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloader


def keys_app(sqlite_url: str, keys: Path) -> FastAPI:
    """An app on the session's SQLite database with its own keys directory, reloading often.
    The key behaviour does not depend on the database, so one backend is enough."""
    return create_app(make_settings(sqlite_url, keys, key_reload_interval=0.01))


async def readiness_until(http: httpx.AsyncClient, status: int) -> httpx.Response:
    for _ in range(1000):  # bounded wait for the background reloader, no timing asserted
        response = await http.get("/readyz")
        if response.status_code == status:
            return response
        await asyncio.sleep(0.01)
    raise AssertionError(f"/readyz never answered {status}: {response.text}")


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


@pytest.mark.feature("key-hot-reload", "health", "metrics", "key-reload-health")
async def test_readiness_and_a_metric_report_a_key_reload_that_keeps_failing(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The review's case: the next key's PEM is gone and `keys rotate --force` runs. The server
    keeps signing with the key keys.json now calls retired; it must not stay ready."""
    keys = tmp_path / "keys"
    KeyStore(keys).ensure()
    app = keys_app(sqlite_url, keys)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            await readiness_until(http, 200)
            before = state.keys.keyset().kid
            upcoming = next(i.kid for i in KeyStore(keys).read_manifest() if i.state == "next")
            pem = keys / f"{upcoming}.pem"
            saved = pem.read_bytes()
            pem.unlink()
            KeyStore(keys).rotate()

            refused = await readiness_until(http, 503)
            assert refused.json()["error_code"] == "not_ready"
            detail = refused.json()["detail"]
            assert detail.startswith("keys: reloading has failed for ")
            assert f"still signing with {before}" in detail
            assert f"keys.json lists {upcoming} but {pem} is missing" in detail
            assert (await http.get("/healthz")).status_code == 200, "alive, only not ready"
            metrics = (await http.get("/metrics")).text
            assert metric(metrics, "keys_reload_failing") == 1
            assert metric(metrics, "keys_reload_failures_total") >= 1
            assert state.keys.keyset().kid == before

            pem.write_bytes(saved)
            pem.chmod(0o600)
            await readiness_until(http, 200)
            assert state.keys.keyset().kid == upcoming
            assert state.keys.failure is None
            # The gauge reads the store's failure, as /readyz does: 0 as soon as it is ready.
            assert metric((await http.get("/metrics")).text, "keys_reload_failing") == 0


@pytest.mark.feature("key-hot-reload", "health", "key-reload-health")
async def test_health_is_served_while_a_reload_of_many_keys_runs(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome, not a timing: a reload held inside key parsing must not hold up requests.
    Were it run on the event loop, /healthz could not answer until the reload had finished."""
    keys = tmp_path / "keys"
    store = KeyStore(keys)
    store.ensure()
    for _ in range(6):
        store.rotate()  # 8 keys: 6 retired, a current and a next
    app = keys_app(sqlite_url, keys)
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        parsing, release = threading.Event(), threading.Event()
        real = keys_module.public_half

        def held_public_key(kid: str, pem: bytes, path: Path) -> Any:
            parsing.set()
            release.wait(timeout=10)  # until /healthz has answered (or the test gave up)
            return real(kid, pem, path)

        monkeypatch.setattr(keys_module, "public_half", held_public_key)
        before = state.keys.keyset().kid
        KeyStore(keys).rotate()
        assert await asyncio.to_thread(parsing.wait, 10), "the reload never started"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            health = await http.get("/healthz")
            reload_was_running = state.keys.keyset().kid == before
            release.set()
            assert health.status_code == 200
            assert reload_was_running, "/healthz waited for the reload to finish"
            for _ in range(1000):
                if state.keys.keyset().kid != before:
                    break
                await asyncio.sleep(0.01)
            assert state.keys.keyset().kid != before
