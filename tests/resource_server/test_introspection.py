"""Online checks (RFC 7662) through ``Introspector``, against a fake token server."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from resource_server.config import Introspection, ResourceServerConfig
from resource_server.introspection import IntrospectionUnavailable, Introspector
from tests.resource_server.fake_issuer import FakeClock
from tests.resource_server.kit_helpers import (
    INTROSPECTION_URL,
    RESOURCE,
    FakeTokenServer,
    claims_of,
    config,
    make_token,
    with_introspection,
)

pytestmark = pytest.mark.feature("rs-kit-introspection")


@pytest.fixture
def server() -> FakeTokenServer:
    return FakeTokenServer()


@pytest.fixture
async def http(server: FakeTokenServer) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def introspector(
    http: httpx.AsyncClient,
    clock: FakeClock,
    settings: ResourceServerConfig | None = None,
    **options: Any,
) -> Introspector:
    return Introspector(
        settings or with_introspection(cache_ttl=5.0), http, INTROSPECTION_URL, clock, **options
    )


def answer_with(status: int = 200, **response: Any) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, **response)

    return handler


async def test_an_active_token_gets_the_answer(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = make_token()
    answer = await introspector(http, clock).active(token)
    assert answer is not None
    assert answer["active"] is True
    assert answer["jti"] == claims_of(token)["jti"]
    assert server.introspections == 1


async def test_an_inactive_token_is_none(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = make_token()
    server.revoked.add(claims_of(token)["jti"])
    assert await introspector(http, clock).active(token) is None


async def test_the_request_is_rfc_7662_with_client_secret_basic(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = make_token()
    await introspector(http, clock).active(token)
    (request,) = server.introspection_requests
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form == {"token": token, "token_type_hint": "access_token"}
    scheme, _, credentials = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(credentials) == b"orders-api:s3cret"


async def test_credentials_are_form_encoded_before_basic(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    # RFC 6749 §2.3.1; the token server percent-decodes the id and the secret.
    own = Introspection(client_id="api:1", client_secret="p+ss/w%rd é")
    settings = config(introspection=own)
    await introspector(http, clock, settings).active(make_token())
    credentials = server.introspection_requests[0].headers["authorization"].split(" ")[1]
    assert base64.b64decode(credentials) == b"api%3A1:p%2Bss%2Fw%25rd%20%C3%A9"


async def test_answers_are_reused_for_cache_ttl(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    token = make_token()
    assert await checker.active(token) is not None
    clock.advance(4.9)
    assert await checker.active(token) is not None
    assert server.introspections == 1
    assert checker.requests == 1
    clock.advance(0.2)
    assert await checker.active(token) is not None
    assert server.introspections == 2


async def test_a_revocation_is_seen_after_cache_ttl(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    token = make_token()
    assert await checker.active(token) is not None
    server.revoked.add(claims_of(token)["jti"])
    assert await checker.active(token) is not None  # still cached
    clock.advance(5.1)
    assert await checker.active(token) is None


async def test_inactive_answers_are_cached_too(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    token = make_token()
    server.revoked.add(claims_of(token)["jti"])
    assert await checker.active(token) is None
    assert await checker.active(token) is None
    assert server.introspections == 1


async def test_each_token_is_asked_about(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    first, second = make_token(), make_token()
    await checker.active(first)
    await checker.active(second)
    await checker.active(first)
    assert server.introspections == 2


async def test_an_answer_is_never_kept_past_the_tokens_exp(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock, with_introspection(cache_ttl=600))
    token = make_token(exp_in=3)  # exp within 2-3 s of now (wall clock)
    await checker.active(token)
    clock.advance(1.5)
    await checker.active(token)
    assert server.introspections == 1
    clock.advance(2)
    await checker.active(token)
    assert server.introspections == 2


async def test_an_answer_past_its_exp_is_not_cached(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    past = int(time.time()) - 10
    server.introspection = answer_with(json={"active": True, "exp": past})
    await checker.active(make_token())
    await checker.active(make_token())
    assert server.introspections == 2


async def test_an_exp_past_a_floats_range_is_kept_for_the_ttl(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    server.introspection = answer_with(json={"active": True, "exp": 10**400})
    token = make_token()
    assert await checker.active(token) is not None  # no OverflowError
    await checker.active(token)
    assert server.introspections == 1


@pytest.mark.parametrize("aud", [RESOURCE, [RESOURCE], ["https://other.example", RESOURCE], None])
async def test_an_answer_whose_aud_names_this_api_is_active(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock, aud: Any
) -> None:
    body: dict[str, Any] = {"active": True, "sub": "alice"}
    if aud is not None:
        body["aud"] = aud
    server.introspection = answer_with(json=body)
    assert await introspector(http, clock).active(make_token()) == body


@pytest.mark.parametrize(
    "aud", ["https://other.example", ["https://other.example"], [], 42, {"aud": RESOURCE}]
)
async def test_an_answer_for_another_audience_is_none(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock, aud: Any
) -> None:
    server.introspection = answer_with(json={"active": True, "aud": aud})
    assert await introspector(http, clock).active(make_token()) is None


@pytest.mark.parametrize(
    "response",
    [
        {"status": 401, "json": {"error": "invalid_client"}},
        {"status": 500, "json": {"active": True}},
        {"status": 503, "text": "busy"},
        {"status": 302, "headers": {"location": "https://as.example/login"}},
        {"status": 200, "text": "<html>not json</html>"},
        {"status": 200, "json": ["active"]},
        {"status": 200, "json": {"sub": "alice"}},
        {"status": 200, "json": {"active": "true"}},
        {"status": 200, "json": {"active": 1}},
    ],
)
async def test_an_unusable_answer_is_unavailable(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock, response: dict[str, Any]
) -> None:
    status = response.pop("status")
    server.introspection = answer_with(status, **response)
    with pytest.raises(IntrospectionUnavailable):
        await introspector(http, clock).active(make_token())


async def test_a_network_error_is_unavailable(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    server.down = True
    with pytest.raises(IntrospectionUnavailable):
        await introspector(http, clock).active(make_token())


async def test_a_timeout_is_unavailable(http: httpx.AsyncClient, clock: FakeClock) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
        with pytest.raises(IntrospectionUnavailable):
            await introspector(client, clock).active(make_token())


async def test_failures_are_not_cached(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock)
    token = make_token()
    server.down = True
    with pytest.raises(IntrospectionUnavailable):
        await checker.active(token)
    server.down = False
    assert await checker.active(token) is not None


async def test_the_cache_is_bounded(
    server: FakeTokenServer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    checker = introspector(http, clock, max_entries=2)
    tokens = [make_token() for _ in range(3)]
    for token in tokens:
        await checker.active(token)
    assert len(checker._cache) == 2
    await checker.active(tokens[2])
    await checker.active(tokens[1])
    assert server.introspections == 3  # the two newest are still cached
    await checker.active(tokens[0])
    assert server.introspections == 4  # the oldest was forgotten
