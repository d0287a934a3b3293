"""Clients identified by the URL of their metadata document
(draft-ietf-oauth-client-id-metadata-document; server/documents.py), served by a real HTTP
server on 127.0.0.1 (``AUTH_CLIENT_FETCH_ALLOW_LOOPBACK``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import structlog
from sqlalchemy import func, select

from server import documents
from server.config import Settings
from server.deps import AppState
from server.documents import document_url_problem, load_document_client
from server.fetch import Fetcher
from server.models import AuthorizationCode, Client, Consent, RefreshFamily
from tests.conftest import MakeUser, make_settings, sign_in
from tests.oauth.test_authorize import (
    CALLBACK,
    authorize_params,
    claims_of,
    exchange,
    get_code,
    pkce,
)
from tests.test_fetch import JSON, Clock, DocServer, resolving

pytestmark = pytest.mark.feature("client-metadata-documents")
PATH = "/client.json"


@pytest.fixture
def settings(database_url: str, keys_dir: Path) -> Settings:
    return make_settings(database_url, keys_dir, client_fetch_allow_loopback=True)


@pytest.fixture
def docs() -> Iterator[DocServer]:
    server = DocServer()
    yield server
    server.stop()


FetcherFactory = Callable[..., Fetcher]


@pytest.fixture
async def use_fetcher(
    state: AppState, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FetcherFactory]:
    """Give the shared app a fetcher of this test's own (an empty cache; a resolver, clock or
    settings of its choosing)."""
    made: list[Fetcher] = []

    def install(settings: Settings | None = None, **kwargs: Any) -> Fetcher:
        fetcher = Fetcher(settings or state.settings, **kwargs)
        made.append(fetcher)
        monkeypatch.setattr(state, "fetcher", fetcher)
        return fetcher

    install()
    yield install
    for fetcher in made:
        await fetcher.aclose()


def document(url: str, **members: Any) -> dict[str, Any]:
    return {
        "client_id": url,
        "client_name": "Photo App",
        "redirect_uris": [CALLBACK],
        "grant_types": ["authorization_code", "refresh_token"],
        "scope": "openid profile email",
        **members,
    }


def serve_document(docs: DocServer, path: str = PATH, **members: Any) -> str:
    url = docs.url(path)
    docs.serve(path, document(url, **members))
    return url


async def rows(state: AppState) -> list[Client]:
    async with state.db.sessions() as db:
        return list((await db.scalars(select(Client))).all())


async def assert_unknown_client(browser: httpx.AsyncClient, client_id: str) -> None:
    """The ordinary unknown-client error page (never a 500, never a redirect)."""
    _, challenge = pkce()
    response = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, client_id=client_id)
    )
    assert response.status_code == 400, response.text
    assert "location" not in response.headers
    assert "not registered with this server" in response.text
    assert "invalid_client" in response.text


# -- a document client, end to end --------------------------------------------------------


@pytest.mark.usefixtures("use_fetcher")
async def test_a_document_client_completes_the_code_flow_with_pkce(
    browser: httpx.AsyncClient, docs: DocServer, make_user: MakeUser, state: AppState
) -> None:
    url = serve_document(docs)
    user = await make_user()
    verifier, challenge = pkce()
    # Not signed in yet: the sign-in page names the client (its row exists by now).
    first = await browser.get(
        "/oauth2/authorize", params=authorize_params(challenge, client_id=url)
    )
    assert first.status_code == 302, first.text
    next_url = parse_qs(urlsplit(first.headers["location"]).query)["next"][0]
    login_page = await browser.get(first.headers["location"])
    assert "Photo App" in login_page.text
    await sign_in(browser, user, next_url)

    code = await get_code(browser, challenge, client_id=url)  # consent names "Photo App"
    response = await exchange(browser, code, verifier, client_id=url)
    assert response.status_code == 200, response.text
    tokens = response.json()
    access = claims_of(tokens["access_token"])
    assert (access["client_id"], access["sub"]) == (url, user.id)
    assert claims_of(tokens["id_token"])["aud"] == url
    refreshed = await browser.post(
        "/oauth2/token",
        data={
            "grant_type": "refresh_token",
            "client_id": url,
            "refresh_token": tokens["refresh_token"],
        },
    )
    assert refreshed.status_code == 200, refreshed.text
    # Without PKCE the public client gets nothing.
    _, challenge = pkce()
    code = await get_code(browser, challenge, client_id=url, consent=False)
    assert (await exchange(browser, code, None, client_id=url)).status_code == 400

    (row,) = await rows(state)
    assert (row.client_id, row.origin, row.name) == (url, "document", "Photo App")
    assert (row.token_endpoint_auth_method, row.secret_hash, row.secret_sealed) == (
        "none",
        None,
        None,
    )
    assert (row.redirect_uris, row.grant_types) == (CALLBACK, "authorization_code refresh_token")
    assert (row.is_admin, row.is_first_party, row.is_resource_server) == (False, False, False)
    async with state.db.sessions() as db:
        assert await db.get(Consent, (user.id, url)) is not None
        assert await db.scalar(select(func.count()).select_from(RefreshFamily)) == 1
        assert await db.scalar(select(func.count()).select_from(AuthorizationCode)) == 2
    # Within its freshness the document was fetched once, however often the client was read.
    assert len(docs.hits(PATH)) == 1


async def test_the_document_is_cached_revalidated_and_followed_when_it_changes(
    docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    clock = Clock()
    use_fetcher(clock=clock)
    url = docs.url(PATH)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=60", "ETag": '"1"'}
    docs.serve(PATH, document(url), headers=headers, etag='"1"')
    assert (await state.clients.get(url)) is not None
    state.clients.invalidate()  # the client cache reads it again: the document is still fresh
    clock.now += 59
    assert (await state.clients.get(url)) is not None
    assert len(docs.hits(PATH)) == 1
    # Stale: revalidated with its ETag; a 304 keeps it (and the row is not rewritten).
    clock.now += 2
    state.clients.invalidate()
    assert (await state.clients.get(url)) is not None
    assert docs.hits(PATH)[1].headers["if-none-match"] == '"1"'
    # Changed: the row follows, and the old redirect URI stops being the client's.
    other = "https://app.example/other"
    docs.serve(
        PATH,
        document(url, redirect_uris=[other], client_name="Renamed"),
        headers={**headers, "ETag": '"2"'},
        etag='"2"',
    )
    clock.now += 61
    state.clients.invalidate()
    client = await state.clients.get(url)
    assert client is not None
    assert (client.redirect_uri_list, client.name) == ([other], "Renamed")
    (row,) = await rows(state)
    assert (row.redirect_uris, row.name, row.origin) == (other, "Renamed", "document")


async def test_a_documents_require_pushed_authorization_requests_is_stored_and_followed(
    docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    """RFC 9126 §6: the document's flag is the row's, and follows the document."""
    clock = Clock()
    use_fetcher(clock=clock)
    url = docs.url(PATH)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=60"}
    docs.serve(PATH, document(url, require_pushed_authorization_requests=True), headers=headers)
    client = await state.clients.get(url)
    assert client is not None and client.require_par is True and client.dpop_bound is False
    (row,) = await rows(state)
    assert (row.require_par, row.origin) == (True, "document")
    docs.serve(PATH, document(url), headers=headers)
    clock.now += 61
    state.clients.invalidate()
    client = await state.clients.get(url)
    assert client is not None and client.require_par is False
    (row,) = await rows(state)
    assert row.require_par is False


async def test_a_client_whose_document_goes_away_no_longer_exists_but_its_row_stays(
    browser: httpx.AsyncClient, docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    clock = Clock()
    use_fetcher(clock=clock)
    url = serve_document(docs)
    assert await state.clients.get(url) is not None
    docs.serve(PATH, status=404, body=b"gone")
    clock.now += 301
    state.clients.invalidate()
    await assert_unknown_client(browser, url)
    (row,) = await rows(state)  # codes, consents and families reference it
    assert row.client_id == url


async def test_a_document_may_not_change_a_client_it_does_not_own(
    docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    url = docs.url(PATH)
    async with state.db.sessions() as db:
        db.add(Client(client_id=url, name="Operator's", redirect_uris=CALLBACK, origin=None))
        await db.commit()
    docs.serve(PATH, document(url, client_name="Hijacked", redirect_uris=["https://evil.example/"]))
    client = await state.clients.get(url)
    assert client is not None and client.name == "Operator's"
    assert docs.seen == []  # not even fetched
    (row,) = await rows(state)
    assert (row.name, row.redirect_uris) == ("Operator's", CALLBACK)


async def test_concurrent_first_loads_store_one_row(
    docs: DocServer, state: AppState, use_fetcher: FetcherFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes that both saw no row both insert: the second one reads the first's row
    instead of failing."""
    url = serve_document(docs)
    fetcher = state.fetcher
    fetch = fetcher.get_json
    other: list[Client | None] = []

    async def another_process_first(target: str, *, refresh: bool = False) -> Any:
        if not other:
            other.append(None)
            # While this load is between its read and its insert, another one completes.
            other[0] = await load_document_client(state, target)
        return await fetch(target, refresh=refresh)

    monkeypatch.setattr(fetcher, "get_json", another_process_first)
    first = await load_document_client(state, url)
    assert first is not None and other[0] is not None
    assert first.client_id == other[0].client_id == url
    assert len(await rows(state)) == 1


# -- refusals: each is the ordinary unknown client, and nothing is stored -------------------


def _route(docs: DocServer, **route: Any) -> str:
    docs.serve(PATH, **route)
    return docs.url(PATH)


REFUSALS: dict[str, Callable[[DocServer], str]] = {
    "not found": lambda d: _route(d, status=404, body=b"no"),
    "redirect": lambda d: (
        serve_document(d, "/real.json"),
        _route(d, status=302, headers={"Location": "/real.json"}, body=b""),
    )[1],
    "oversized": lambda d: serve_document(d, padding="x" * 70_000),
    "not JSON": lambda d: _route(d, body=b"<html></html>", headers={"Content-Type": "text/html"}),
    "not an object": lambda d: _route(d, body=b"[1, 2]"),
    "another client_id": lambda d: (
        d.serve(PATH, document(d.url(PATH) + "?x")),
        d.url(PATH),
    )[1],
    "client_id by another spelling": lambda d: (
        d.serve(PATH, document(d.url(PATH, "localhost"))),
        d.url(PATH),
    )[1],
    "no client_id": lambda d: (d.serve(PATH, {"client_name": "x"}), d.url(PATH))[1],
    "a client_secret": lambda d: serve_document(d, client_secret="s3cret"),
    "a client_secret_expires_at": lambda d: serve_document(d, client_secret_expires_at=0),
    "a shared-secret method": lambda d: serve_document(
        d, token_endpoint_auth_method="client_secret_basic"
    ),
    "http redirect URI": lambda d: serve_document(d, redirect_uris=["http://app.example/cb"]),
    "the admin scope": lambda d: serve_document(d, scope="openid admin"),
    "the password grant": lambda d: serve_document(d, grant_types=["password"]),
    "a lone surrogate in the name": lambda d: serve_document(d, client_name="x\ud800"),
    "a NUL in a redirect URI": lambda d: serve_document(
        d, redirect_uris=["https://a.example/\x00"]
    ),
    "a NUL in the name": lambda d: serve_document(d, client_name="x\x00"),
    "dpop_bound_access_tokens not a boolean": lambda d: serve_document(
        d, dpop_bound_access_tokens="true"
    ),
    "require_pushed_authorization_requests not a boolean": lambda d: serve_document(
        d, require_pushed_authorization_requests="true"
    ),
    "root path": lambda d: (d.serve("/", document(d.url("/"))), d.url("/"))[1],
    "dot segment": lambda d: (
        d.serve("/a/../client.json", document(d.url("/a/../client.json"))),
        d.url("/a/../client.json"),
    )[1],
    "encoded dot segment": lambda d: d.url("/a/%2E%2E/client.json"),
    "user information": lambda d: f"http://user@127.0.0.1:{d.port}{PATH}",
    "too long for a client id": lambda d: (
        d.serve("/" + "a" * 100, document(d.url("/" + "a" * 100))),
        d.url("/" + "a" * 100),
    )[1],
}


@pytest.mark.one_backend
@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_document_is_an_unknown_client(
    browser: httpx.AsyncClient,
    docs: DocServer,
    state: AppState,
    use_fetcher: FetcherFactory,
    case: str,
) -> None:
    url = REFUSALS[case](docs)
    with structlog.testing.capture_logs() as logs:
        await assert_unknown_client(browser, url)
    assert await rows(state) == []
    if len(url) <= 100:
        refused = [line for line in logs if line["event"] == "client_document.refused"]
        assert refused and refused[0]["client_id"] == url
        assert "s3cret" not in str(refused)


@pytest.mark.one_backend
@pytest.mark.parametrize(
    "addresses", [["10.0.0.1"], ["169.254.169.254"], ["::1"], ["8.8.8.8", "192.168.0.1"]]
)
async def test_a_document_on_a_refused_address_is_an_unknown_client(
    browser: httpx.AsyncClient,
    docs: DocServer,
    state: AppState,
    use_fetcher: FetcherFactory,
    addresses: list[str],
) -> None:
    resolve = resolving({"docs.test": addresses})
    use_fetcher(resolver=resolve)
    url = f"http://docs.test:{docs.port}{PATH}"
    docs.serve(PATH, document(url))
    await assert_unknown_client(browser, url)
    assert resolve.asked == ["docs.test"]
    assert docs.seen == []
    assert await rows(state) == []


@pytest.mark.one_backend
async def test_loopback_documents_need_the_development_setting(
    browser: httpx.AsyncClient, docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    use_fetcher(state.settings.model_copy(update={"client_fetch_allow_loopback": False}))
    url = serve_document(docs)
    await assert_unknown_client(browser, url)
    assert docs.seen == []
    assert await rows(state) == []


@pytest.mark.one_backend
async def test_a_slow_document_is_an_unknown_client(
    browser: httpx.AsyncClient, docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    use_fetcher(state.settings.model_copy(update={"client_fetch_timeout": 0.2}))
    url = _route(docs, stall=True)
    await assert_unknown_client(browser, url)
    assert await rows(state) == []


@pytest.mark.one_backend
async def test_documents_can_be_turned_off(
    browser: httpx.AsyncClient,
    docs: DocServer,
    state: AppState,
    use_fetcher: FetcherFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = serve_document(docs)
    assert await state.clients.get(url) is not None
    monkeypatch.setattr(
        state, "settings", state.settings.model_copy(update={"client_metadata_documents": False})
    )
    state.clients.invalidate()
    # Its row stays (tokens reference it), but the client no longer exists.
    await assert_unknown_client(browser, url)
    assert len(await rows(state)) == 1
    assert len(docs.hits(PATH)) == 1


@pytest.mark.one_backend
@pytest.mark.usefixtures("use_fetcher")
async def test_a_document_client_authenticating_with_a_key_is_stored_without_a_usable_secret(
    docs: DocServer, state: AppState
) -> None:
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
        "kid": "k1",
    }
    url = serve_document(
        docs,
        token_endpoint_auth_method="private_key_jwt",
        jwks={"keys": [jwk]},
        grant_types=["authorization_code", "refresh_token"],
    )
    client = await state.clients.get(url)
    assert client is not None
    assert client.token_endpoint_auth_method == "private_key_jwt"
    assert client.secret_hash is not None and client.secret_sealed is None
    assert not client.check_client_secret("")
    assert client.jwks is not None and '"kid":"k1"' in client.jwks


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://app.example/client.json", None),
        ("https://app.example:8443/oauth/client?v=1", None),
        ("http://app.example/client.json", "https"),  # production
        ("https://app.example", "path"),
        ("https://app.example/", "path"),
        ("https://app.example/a/./b", ". or .."),
        ("https://app.example/a/%2e%2E/b", ". or .."),
        ("https://app.example/a/..", ". or .."),
        ("https://app.example/c#frag", "fragment"),
        ("https://app.example/c#", "fragment"),
        ("https://u:p@app.example/c", "user information"),
        ("https:///c", "host"),
        ("https://app.example:99999/c", "not a valid URL"),
        ("https://app.example/" + "a" * 81, "at most 100"),
        ("https://app.example/" + "a" * 80, None),  # exactly 100
        ("https://app.example/a b", "spaces"),
        ("https://app.example/\x00", "at most 100"),
    ],
)
def test_client_identifier_urls(url: str, problem: str | None, keys_dir: Path) -> None:
    production = Settings(_env_file=None, env="production", keys_dir=keys_dir)  # type: ignore[call-arg]
    found = document_url_problem(url, production)
    assert found is None if problem is None else (found is not None and problem in found)
    if problem == "https":
        testing = Settings(_env_file=None, env="testing")  # type: ignore[call-arg]
        assert document_url_problem(url, testing) is None


def test_only_url_shaped_ids_are_sent_to_the_document_loader() -> None:
    from server.clients import is_document_id

    assert is_document_id("https://app.example/c") and is_document_id("http://127.0.0.1/c")
    assert not is_document_id("app") and not is_document_id("HTTPS://app.example/c")
    assert documents.DOCUMENT == "document"


async def test_lookups_while_the_document_loads_share_its_fetch(
    docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    url = serve_document(docs)
    found = await asyncio.gather(*(state.clients.get(url) for _ in range(4)))
    assert all(client is not None and client.client_id == url for client in found)
    assert len(docs.hits(PATH)) == 1
    assert len(await rows(state)) == 1


@pytest.mark.feature("end-session")
async def test_sign_out_follows_a_document_clients_post_logout_uri_while_it_exists(
    browser: httpx.AsyncClient, docs: DocServer, state: AppState, use_fetcher: FetcherFactory
) -> None:
    clock = Clock()
    use_fetcher(clock=clock)
    bye = "https://app.example/bye"
    url = serve_document(docs, post_logout_redirect_uris=[bye])
    params = {"client_id": url, "post_logout_redirect_uri": bye}
    gone = await browser.get("/logout", params=params)
    assert (gone.status_code, gone.headers["location"]) == (303, bye)
    # The document is withdrawn: its row stays, but its URIs are no longer followed.
    docs.serve(PATH, status=404, body=b"gone")
    clock.now += 301
    state.clients.invalidate()
    plain = await browser.get("/logout", params=params)
    assert plain.status_code == 200 and "location" not in plain.headers
    assert len(await rows(state)) == 1
