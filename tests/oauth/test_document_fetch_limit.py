"""Client metadata documents cost a fetch each: one address may make the server fetch only
``AUTH_RATE_LIMIT_REGISTRATION_IP`` new ones, at the authorization and the token endpoints
alike; a document already cached costs nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from server.config import Settings
from tests.conftest import Events, make_settings
from tests.oauth.test_documents import docs, serve_document, use_fetcher  # noqa: F401
from tests.test_fetch import DocServer

pytestmark = [
    pytest.mark.feature("client-metadata-documents"),
    pytest.mark.usefixtures("use_fetcher"),
]


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(
        database_url,
        keys_dir,
        client_fetch_allow_loopback=True,
        rate_limit_registration_ip="3/minute",
    )


def authorize(client_id: str) -> dict[str, str]:
    return {"response_type": "code", "client_id": client_id, "scope": "openid"}


async def test_new_documents_per_address_are_limited_cached_ones_are_free(
    browser: httpx.AsyncClient,
    client: httpx.AsyncClient,
    docs: DocServer,  # noqa: F811 (the fixture imported above)
    events: Events,
) -> None:
    known = serve_document(docs, "/known.json")
    first = await browser.get("/oauth2/authorize", params=authorize(known))
    assert first.status_code != 429
    # The same (cached) document again and again: no fetch, no count.
    for _ in range(5):
        again = await browser.get("/oauth2/authorize", params=authorize(known))
        assert again.status_code == first.status_code
    assert len(docs.hits("/known.json")) == 1
    # New URLs (valid or not, it does not matter: each is a fetch) are counted.
    statuses = [
        (await browser.get("/oauth2/authorize", params=authorize(docs.url(f"/new-{n}.json"))))
        for n in range(3)
    ]
    assert all(r.status_code == 400 for r in statuses[:2])  # unknown clients, fetched
    limited = statuses[2]
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert "Too many new applications" in limited.text
    assert not docs.hits("/new-2.json")  # refused before any fetch
    # The token endpoint shares the count (a JSON 429 there), and sends nothing either.
    token = await client.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_id": docs.url("/t.json"),
        },
    )
    assert token.status_code == 429 and token.json()["error"] == "rate_limited"
    assert not docs.hits("/t.json")
    assert [f["endpoint"] for e, f in events if e == "rate_limit.exceeded"][-1] == "client_document"
