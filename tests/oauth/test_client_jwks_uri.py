"""private_key_jwt with keys the client publishes at its ``jwks_uri``, fetched from a real
HTTP server on 127.0.0.1 through the app's SSRF-safe fetcher (``AUTH_CLIENT_FETCH_ALLOW_LOOPBACK``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey

from server.config import Settings
from server.deps import AppState
from server.fetch import Fetcher
from tests.conftest import MakeClient, make_settings
from tests.oauth.test_client_assertion import CC, claims_for, form, public_jwks, sign
from tests.test_fetch import Clock, DocServer

pytestmark = pytest.mark.feature("client-auth-private-key-jwt")
PATH = "/jwks.json"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
ROTATED = RSAKey.generate_key(2048, parameters={"kid": "k2"})


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(
        database_url, keys_dir, client_fetch_allow_loopback=True, client_fetch_min_ttl=30
    )


@pytest.fixture
def docs() -> Iterator[DocServer]:
    server = DocServer()
    yield server
    server.stop()


@pytest.fixture
async def clock(state: AppState, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Clock]:
    """A fetcher of this test's own (an empty cache) on a clock the test moves."""
    clock = Clock()
    fetcher = Fetcher(state.settings, clock=clock)
    monkeypatch.setattr(state, "fetcher", fetcher)
    yield clock
    await fetcher.aclose()


async def token(
    http: httpx.AsyncClient, state: AppState, key: RSAKey | ECKey, alg: str = "RS256"
) -> httpx.Response:
    url = state.settings.issuer + "/oauth2/token"
    assertion = sign(claims_for("remote", url), key, alg, kid=key.kid)
    return await http.post("/oauth2/token", data={**CC, **form(assertion)})


async def test_keys_are_fetched_cached_and_refetched_once_for_a_new_kid(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    docs: DocServer,
    clock: Clock,
) -> None:
    uri = docs.serve(
        PATH,
        public_jwks(KEY),
        headers={"Content-Type": "application/json", "Cache-Control": "max-age=600"},
    )
    await make_client(
        "remote",
        auth_method="private_key_jwt",
        jwks_uri=uri,
        grants=["client_credentials"],
        settings=state.settings,
    )
    for _ in range(3):
        assert (await token(client, state, KEY)).status_code == 200
    assert len(docs.hits(PATH)) == 1  # cached: max-age honoured

    # The client rotates. A new kid refetches the set, but at most once per
    # AUTH_CLIENT_FETCH_MIN_TTL after the last fetch: just after one, the cached set answers.
    docs.serve(PATH, public_jwks(ROTATED))
    assert (await token(client, state, ROTATED)).status_code == 401
    assert len(docs.hits(PATH)) == 1
    clock.now += 31
    assert (await token(client, state, ROTATED)).status_code == 200
    assert len(docs.hits(PATH)) == 2

    # A flood of forged kids costs at most one fetch per interval.
    for interval in range(2):
        clock.now += 31
        for n in range(10):
            forged = ECKey.generate_key("P-256", parameters={"kid": f"forged-{interval}-{n}"})
            response = await token(client, state, forged, "ES256")
            assert response.status_code == 401
            assert response.json()["error"] == "invalid_client"
        assert len(docs.hits(PATH)) == 3 + interval
    # The real key works throughout.
    assert (await token(client, state, ROTATED)).status_code == 200


async def test_an_unreachable_or_refused_jwks_uri_is_invalid_client_never_a_500(
    client: httpx.AsyncClient,
    state: AppState,
    make_client: MakeClient,
    docs: DocServer,
    clock: Clock,
) -> None:
    for client_id, uri in [
        ("redirecting", docs.serve("/moved", status=302, headers={"Location": "/jwks.json"})),
        ("not-json", docs.serve("/text", body=b"keys", headers={"Content-Type": "text/plain"})),
        ("missing", docs.url("/nothing-here")),
        ("private", "http://10.0.0.1/jwks.json"),
    ]:
        await make_client(
            client_id,
            auth_method="private_key_jwt",
            jwks_uri=uri,
            grants=["client_credentials"],
            settings=state.settings,
        )
        url = state.settings.issuer + "/oauth2/token"
        assertion = sign(claims_for(client_id, url), KEY, "RS256", kid=KEY.kid)
        response = await client.post("/oauth2/token", data={**CC, **form(assertion)})
        assert response.status_code == 401, (client_id, response.text)
        assert response.json()["error"] == "invalid_client"
