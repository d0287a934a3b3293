"""Rate limits, failed-password throttling and trusted proxies, each tried for real."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import coredis
import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from server import manage
from server.config import Settings
from server.deps import AppState
from server.main import create_app
from tests.conftest import ClientCreds, csrf_of, truncate

pytestmark = pytest.mark.feature("rate-limits")
PASSWORD = "correct horse battery"


@asynccontextmanager
async def running(settings: Settings, **overrides: Any) -> AsyncIterator[AppState]:
    await truncate(settings.database_url)
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app):
        state: AppState = app.state.auth
        async with state.db.sessions() as db:
            created = await manage.create_client(db, client_id="app", scope="api")
            await manage.create_client(db, client_id="other", scope="api")
            await manage.create_user(db, state.passwords, username="Alice", password=PASSWORD)
            await db.commit()
        state.app = app  # type: ignore[attr-defined]
        state.creds = ClientCreds("app", created.secret)  # type: ignore[attr-defined]
        yield state


def http_from(state: AppState, ip: str = "192.0.2.10") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=state.app, client=(ip, 40000))  # type: ignore[attr-defined]
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")


def creds(state: AppState) -> ClientCreds:
    value: ClientCreds = state.creds  # type: ignore[attr-defined]
    return value


async def password(
    http: httpx.AsyncClient, state: AppState, username: str, pw: str
) -> httpx.Response:
    return await http.post(
        "/oauth2/token",
        data={"grant_type": "password", "username": username, "password": pw},
        headers=creds(state).basic,
    )


# -- request limits on /oauth2/token ---------------------------------------------------------


async def test_per_ip_limit_answers_429_with_retry_after(settings: Settings) -> None:
    async with (
        running(settings, rate_limit_token_ip="3/minute") as state,
        http_from(state) as http,
        http_from(state, "192.0.2.99") as other,
    ):
        codes = [
            (await http.post("/oauth2/token", data={"grant_type": "nonsense"})).status_code
            for _ in range(3)
        ]
        assert codes == [400, 400, 400]  # garbage counts too
        limited = await http.post("/oauth2/token", data={"grant_type": "client_credentials"})
        assert limited.status_code == 429
        assert limited.json()["error"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["cache-control"] == "no-store"
        # Another address is not affected.
        fine = await other.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers=creds(state).basic,
        )
        assert fine.status_code == 200


async def test_per_client_limit_counts_only_authenticated_requests(settings: Settings) -> None:
    async with (
        running(settings, rate_limit_token_client="2/minute") as state,
        http_from(state) as http,
    ):
        # Anyone can claim the client id; without its secret that spends nothing.
        for _ in range(4):
            wrong = await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials"},
                auth=("app", "not-the-secret"),
            )
            assert wrong.status_code == 401
        for _ in range(2):
            ok = await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials"},
                headers=creds(state).basic,
            )
            assert ok.status_code == 200
        limited = await http.post(
            "/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers=creds(state).basic,
        )
        assert (limited.status_code, limited.json()["error"]) == (429, "rate_limited")


@pytest.mark.feature("brute-force-throttle")
async def test_per_account_limit_shares_one_bucket_across_spellings(settings: Settings) -> None:
    async with (
        running(settings, rate_limit_token_account="3/minute") as state,
        http_from(state) as http,
    ):
        # Case and Unicode width fold to one account: alice, ALICE, ａｌｉｃｅ (full width).
        for name in ("alice", "ALICE", "ａｌｉｃｅ"):
            assert (await password(http, state, name, PASSWORD)).status_code == 200
        limited = await password(http, state, "Alice", PASSWORD)
        assert limited.status_code == 429
        assert (await password(http, state, "bob", "whatever")).status_code == 400


async def test_limits_can_be_switched_off(settings: Settings) -> None:
    async with (
        running(settings, rate_limits_enabled=False, rate_limit_token_ip="1/minute") as state,
        http_from(state) as http,
    ):
        for _ in range(5):
            assert (await password(http, state, "alice", PASSWORD)).status_code == 200


# -- failed-password throttling -----------------------------------------------------------------


@pytest.mark.feature("brute-force-throttle")
async def test_failures_throttle_the_account_for_that_address_only(settings: Settings) -> None:
    async with (
        running(settings, throttle_account_ip="3/minute", throttle_account="50/minute") as state,
        http_from(state, "203.0.113.5") as attacker,
        http_from(state, "198.51.100.7") as owner,
    ):
        bodies = [(await password(attacker, state, "alice", f"guess-{i}")).json() for i in range(3)]
        # Throttled now: even the right password gets the very same answer.
        right = await password(attacker, state, "ALICE", PASSWORD)
        assert right.status_code == 400
        assert right.json() == bodies[0]
        # The owner, elsewhere, is not locked out by one attacking address.
        assert (await password(owner, state, "alice", PASSWORD)).status_code == 200


@pytest.mark.feature("brute-force-throttle")
async def test_the_account_tier_stops_a_distributed_guesser(settings: Settings) -> None:
    async with running(
        settings, throttle_account_ip="50/minute", throttle_account="4/minute"
    ) as state:
        for i in range(4):
            async with http_from(state, f"203.0.113.{i + 1}") as http:
                assert (await password(http, state, "alice", f"guess-{i}")).status_code == 400
        async with http_from(state, "203.0.113.200") as http:
            refused = await password(http, state, "alice", PASSWORD)
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")


@pytest.mark.feature("brute-force-throttle")
async def test_unknown_usernames_are_throttled_the_same_way(settings: Settings) -> None:
    async with running(settings, throttle_account_ip="2/minute") as state, http_from(state) as http:
        known = [(await password(http, state, "alice", "nope")).json() for _ in range(3)]
        unknown = [(await password(http, state, "ghost", "nope")).json() for _ in range(3)]
    assert known == unknown  # the throttle reveals nothing about which accounts exist


@pytest.mark.feature("brute-force-throttle")
async def test_the_sign_in_page_is_limited_and_throttled(settings: Settings) -> None:
    async with (
        running(settings, throttle_account_ip="2/minute", rate_limit_login_ip="5/minute") as state,
        http_from(state) as http,
    ):

        async def attempt(pw: str) -> httpx.Response:
            page = await http.get("/login")
            return await http.post(
                "/login",
                data={"csrf_token": csrf_of(page), "username": "alice", "password": pw},
            )

        for pw in ("wrong-1", "wrong-2"):
            assert "Incorrect username or password." in (await attempt(pw)).text
        throttled = await attempt(PASSWORD)
        assert throttled.status_code == 200
        assert "Incorrect username or password." in throttled.text
        assert "session" not in throttled.cookies
        await attempt(PASSWORD)
        await attempt(PASSWORD)
        limited = await attempt(PASSWORD)  # the 6th POST from this address
        assert limited.status_code == 429
        assert "Too many sign-in attempts" in limited.text
        assert int(limited.headers["retry-after"]) >= 1


# -- trusted proxies -------------------------------------------------------------------------


@pytest.mark.feature("trusted-proxies")
async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(settings: Settings) -> None:
    async with (
        running(settings, rate_limit_token_ip="3/minute") as state,
        http_from(state, "192.0.2.50") as http,
    ):
        codes = []
        for i in range(5):
            # Rotating the header does not make the client someone else.
            response = await http.post(
                "/oauth2/token",
                data={"grant_type": "nonsense"},
                headers={
                    "X-Forwarded-For": f"198.51.100.{i}",
                    "Forwarded": f"for=198.51.100.{i}",
                },
            )
            codes.append(response.status_code)
    assert codes == [400, 400, 400, 429, 429]


@pytest.mark.feature("trusted-proxies")
async def test_a_trusted_proxy_names_the_client(settings: Settings) -> None:
    async with (
        running(
            settings, rate_limit_token_ip="2/minute", trusted_proxies=["10.0.0.0/8", "::1"]
        ) as state,
        http_from(state, "10.1.2.3") as proxy,
    ):

        async def through(header: dict[str, str]) -> int:
            response = await proxy.post(
                "/oauth2/token", data={"grant_type": "nonsense"}, headers=header
            )
            return response.status_code

        # The client prepends a fake hop; the proxy appends the real one: the rightmost
        # untrusted address is the client, whatever it wrote.
        xff: Callable[[str], dict[str, str]] = lambda fake: {  # noqa: E731
            "X-Forwarded-For": f"{fake}, 203.0.113.77"
        }
        assert [await through(xff(f"1.1.1.{i}")) for i in range(3)] == [400, 400, 429]
        # Another client behind the same proxy has its own budget (RFC 7239 syntax too).
        forwarded = {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'}
        assert [await through(forwarded) for _ in range(3)] == [400, 400, 429]
        # Only trusted hops: the leftmost address is the client.
        chain = {"X-Forwarded-For": "203.0.113.88, 10.9.9.9"}
        assert [await through(chain) for _ in range(3)] == [400, 400, 429]


def test_settings_refuse_malformed_limits_and_proxies(settings: Settings) -> None:
    for field, value in (
        ("rate_limit_token_ip", "lots"),
        ("rate_limit_authorize", "30 a minute"),
        ("throttle_account", "5 per fortnight"),
        ("trusted_proxies", "not-an-ip"),
    ):
        with pytest.raises(
            ValidationError, match=field if field != "trusted_proxies" else "not-an-ip"
        ):
            Settings(**{**settings.model_dump(), field: value})


# -- shared between replicas (Redis) ------------------------------------------------------------


def redis_url() -> str:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            pass
    except OSError:
        pytest.skip("Redis is not answering on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/0"


@pytest.mark.feature("brute-force-throttle")
async def test_two_apps_on_redis_share_one_count(settings: Settings) -> None:
    url = redis_url()
    user = f"shared-{secrets.token_hex(4)}"  # unique keys: other runs may share this Redis
    overrides = {"rate_limit_storage": url, "throttle_account_ip": "3/minute"}
    first = create_app(settings.model_copy(update=overrides))
    second = create_app(settings.model_copy(update=overrides))
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        a: AppState = first.state.auth
        b: AppState = second.state.auth
        assert a.limiter.storage is not b.limiter.storage
        ip = f"198.51.100.{secrets.randbelow(200)}"
        await a.limiter.failed(user, ip)
        await b.limiter.failed(user, ip)
        assert not await a.limiter.throttled(user, ip)
        await a.limiter.failed(user, ip)
        # The third failure, made on the other replica, throttles this one too.
        assert await b.limiter.throttled(user, ip)


@pytest.mark.feature("brute-force-throttle")
async def test_deployments_sharing_one_redis_keep_their_own_counts(settings: Settings) -> None:
    url = redis_url()
    run = secrets.token_hex(4)
    user, ip = f"prefixed-{run}", "198.51.100.7"

    def deployment(prefix: str) -> FastAPI:
        return create_app(
            settings.model_copy(
                update={
                    "rate_limit_storage": url,
                    "rate_limit_prefix": prefix,
                    "throttle_account_ip": "2/minute",
                }
            )
        )

    staging, production = deployment(f"staging-{run}"), deployment(f"production-{run}")
    async with (
        staging.router.lifespan_context(staging),
        production.router.lifespan_context(production),
    ):
        a: AppState = staging.state.auth
        b: AppState = production.state.auth
        await a.limiter.failed(user, ip)
        await a.limiter.failed(user, ip)
        assert await a.limiter.throttled(user, ip)
        assert not await b.limiter.throttled(user, ip)  # another deployment's failures
        redis = coredis.Redis.from_url(url, decode_responses=True)
        keys = list(await redis.keys(f"*{user}*"))
        assert keys and all(k.startswith(f"staging-{run}:") for k in keys), keys


def test_the_prefix_is_a_plain_name() -> None:
    for bad in ("", "has space", "x" * 65, "a/b"):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, rate_limit_prefix=bad)  # type: ignore[call-arg]


async def test_throttled_attempts_claiming_a_client_do_not_spend_its_budget(
    settings: Settings,
) -> None:
    async with (
        running(
            settings, rate_limit_token_client="3/minute", throttle_account_ip="1/minute"
        ) as state,
        http_from(state) as http,
    ):
        assert (await password(http, state, "alice", "wrong")).status_code == 400  # counts once
        for _ in range(3):
            # Throttled username, and a secret the attacker does not have: refused unchecked.
            refused = await http.post(
                "/oauth2/token",
                data={"grant_type": "password", "username": "alice", "password": "x"},
                auth=("app", "not-the-secret"),
            )
            assert (refused.status_code, refused.json()["error"]) == (400, "invalid_grant")
        for _ in range(2):
            ok = await http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials"},
                headers=creds(state).basic,
            )
            assert ok.status_code == 200
        limited = await http.post(
            "/oauth2/token", data={"grant_type": "client_credentials"}, headers=creds(state).basic
        )
        assert limited.status_code == 429


@pytest.mark.feature("brute-force-throttle")
async def test_the_sign_in_page_is_limited_per_username_across_addresses(
    settings: Settings,
) -> None:
    async with running(settings, rate_limit_login_account="2/minute") as state:
        outcomes = []
        for i, name in enumerate(("alice", "ALICE", "Alice")):
            async with http_from(state, f"203.0.113.{i + 1}") as http:
                page = await http.get("/login")
                response = await http.post(
                    "/login",
                    data={"csrf_token": csrf_of(page), "username": name, "password": PASSWORD},
                )
                outcomes.append(response.status_code)
        assert outcomes == [303, 303, 429]


# -- growth: sign-ups on the page, codes per browser session ------------------------------------


@pytest.mark.feature("growth-limits")
async def test_the_sign_up_page_shares_the_account_apis_per_address_limit(
    settings: Settings,
) -> None:
    async with (
        running(settings, rate_limit_login_ip="3/minute") as state,
        http_from(state) as http,
        http_from(state, "192.0.2.99") as other,
    ):

        async def sign_up(browser: httpx.AsyncClient, username: str) -> httpx.Response:
            page = await browser.get("/register")
            browser.cookies.delete("session")  # a fresh visitor each time
            return await browser.post(
                "/register",
                data={
                    "csrf_token": csrf_of(page),
                    "username": username,
                    "password": PASSWORD,
                    "password_confirm": PASSWORD,
                },
            )

        api = await http.post("/api/v1/users", json={"username": "api1", "password": PASSWORD})
        assert api.status_code == 201
        assert [(await sign_up(http, f"page{n}")).status_code for n in range(2)] == [303, 303]
        limited = await sign_up(http, "page3")  # the 4th sign-up from this address
        assert limited.status_code == 429
        assert "Too many sign-ups" in limited.text
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert "session" not in limited.cookies
        again = await http.post("/api/v1/users", json={"username": "api2", "password": PASSWORD})
        assert again.status_code == 429  # one bucket for the page and the API
        assert (await sign_up(other, "elsewhere")).status_code == 303
        async with state.db.sessions() as db:
            names = {u.username for u in await manage.list_users(db)}
        assert names == {"Alice", "api1", "page0", "page1", "elsewhere"}


@pytest.mark.feature("growth-limits")
async def test_a_browser_session_is_limited_in_the_codes_it_is_issued(
    settings: Settings,
) -> None:
    from sqlalchemy import func, select

    from server.models import AuthorizationCode

    async with running(settings, rate_limit_authorize="3/minute") as state:
        async with state.db.sessions() as db:
            await manage.create_client(
                db,
                client_id="web",
                first_party=True,
                grants=["authorization_code"],
                redirect_uris=["https://app.example/cb"],
            )
            await manage.create_user(db, state.passwords, username="Bob", password=PASSWORD)
            await db.commit()
        params = {
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": "https://app.example/cb",
            "state": "s",
        }

        async def signed_in(http: httpx.AsyncClient, username: str) -> None:
            page = await http.get("/login")
            data = {"csrf_token": csrf_of(page), "username": username, "password": PASSWORD}
            assert (await http.post("/login", data=data)).status_code == 303

        async with http_from(state) as http, http_from(state) as second:
            # Not signed in: sent to the sign-in page, no code, nothing counted.
            for _ in range(4):
                anonymous = await http.get("/oauth2/authorize", params=params)
                assert anonymous.headers["location"].startswith("/login?next=")
            await signed_in(http, "Alice")
            issued = [await http.get("/oauth2/authorize", params=params) for _ in range(3)]
            assert all("code=" in r.headers["location"] for r in issued)
            limited = await http.get("/oauth2/authorize", params=params)
            assert limited.status_code == 429
            assert "location" not in limited.headers
            assert 1 <= int(limited.headers["retry-after"]) <= 60
            assert "Too many sign-in requests" in limited.text
            # Another browser session (same address) has its own budget.
            await signed_in(second, "Bob")
            fine = await second.get("/oauth2/authorize", params=params)
            assert "code=" in fine.headers["location"]
        async with state.db.sessions() as db:
            assert await db.scalar(select(func.count()).select_from(AuthorizationCode)) == 4
