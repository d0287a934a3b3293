"""The token server's side of RFC 9728 (issue 21, scope 3): ``AUTH_RESOURCES`` entries may
name their resource and give the URL of its protected-resource metadata; discovery lists the
resources (``protected_resources``, RFC 9728 §4); the consent page names the API asked for,
from the setting or from the resource's metadata document (its ``resource_name``, used only
when the document's ``resource`` is the resource exactly, §3.3), served here by a real HTTP
server on 127.0.0.1 (``AUTH_CLIENT_FETCH_ALLOW_LOOPBACK``)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from markupsafe import escape
from pydantic import ValidationError

from server.config import Settings
from server.deps import AppState
from server.fetch import Fetcher
from server.oauth.routes import discovery_document
from tests.conftest import Cli, MakeClient, MakeUser, make_settings, sign_in
from tests.oauth.test_authorize import authorize_params, pkce, spa
from tests.oauth.test_resource_indicators import code_for
from tests.test_config import production
from tests.test_fetch import DocServer

pytestmark = pytest.mark.feature("resource-metadata-links")

NAMED = "https://orders.example/api"
HOSTILE_NAME = "<script>alert(1)</script> \"Orders\" & 'friends'"
HOSTILE = "https://hostile.example/api"
FETCHED = "https://billing.example/api"
BOTH = "https://reports.example"
PLAIN = "urn:example:plain"
UNREACHABLE = "https://gone.example/api"
METADATA = "https://api.example.com/.well-known/oauth-protected-resource"


def made(**overrides: Any) -> Settings:
    return Settings(_env_file=None, env="testing", **overrides)  # type: ignore[call-arg]


# -- AUTH_RESOURCES ----------------------------------------------------------------------------


def test_the_comma_separated_form_is_read_as_before() -> None:
    settings = made(resources=f" {NAMED},{FETCHED}, {NAMED}")
    assert settings.resources == [NAMED, FETCHED]
    assert (settings.resource_names, settings.resource_metadata) == ({}, {})
    assert made(resources=json.dumps([PLAIN, NAMED, PLAIN])).resources == [PLAIN, NAMED]
    assert made().resources == []


def test_the_json_form_mixes_objects_and_uris_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    value = json.dumps(
        [
            {"resource": NAMED, "name": "  Orders API ", "metadata": METADATA},
            PLAIN,
            {"resource": FETCHED, "metadata": "http://billing.example:8080/meta"},
            {"resource": BOTH, "name": "Zahlungs-API – Berichte"},
            {"resource": "https://bare.example"},
        ]
    )
    monkeypatch.setenv("AUTH_RESOURCES", value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Everything else reads the URIs, in order.
    assert settings.resources == [NAMED, PLAIN, FETCHED, BOTH, "https://bare.example"]
    assert settings.audiences == frozenset([settings.issuer, *settings.resources])
    assert settings.resource_names == {NAMED: "Orders API", BOTH: "Zahlungs-API – Berichte"}
    assert settings.resource_metadata == {
        NAMED: METADATA,
        FETCHED: "http://billing.example:8080/meta",
    }
    # Given directly (as tests and tools do), a list of the same.
    direct = made(resources=[{"resource": NAMED, "name": "Orders API"}, PLAIN])
    assert (direct.resources, direct.resource_names) == ([NAMED, PLAIN], {NAMED: "Orders API"})
    # Settings that name a resource differently are different settings.
    assert direct.model_dump() != made(resources=[NAMED, PLAIN]).model_dump()
    assert made(resources=[{"resource": NAMED, "name": "x" * 100}]).resource_names[NAMED]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ('[{"resource": "https://a.example"', "not valid JSON"),
        ([{"resource": NAMED, "title": "Orders"}], "unknown member 'title'"),
        ([{"name": "Orders"}], "each object needs a 'resource'"),
        ([{"resource": 5}], "each object needs a 'resource'"),
        ([{"resource": "api.example.com"}], "is not an absolute URI"),
        ([{"resource": NAMED + "#f"}], "is not an absolute URI"),
        ([{"resource": NAMED, "name": ""}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": "   "}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": "x" * 101}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": "Orders\nAPI"}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": "Orders\x00"}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": "Orders\u202e"}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "name": 5}], "must be text of 1 to 100 printable"),
        ([{"resource": NAMED, "metadata": "/.well-known/x"}], "must be an absolute https URL"),
        ([{"resource": NAMED, "metadata": "ftp://a.example/m"}], "must be an absolute https URL"),
        ([{"resource": NAMED, "metadata": METADATA + "#f"}], "must be an absolute https URL"),
        ([{"resource": NAMED, "metadata": "https://u@a.example/m"}], "an absolute https URL"),
        ([{"resource": NAMED, "metadata": "https://a.example/m x"}], "an absolute https URL"),
        ([{"resource": NAMED, "metadata": "https://a.example:99999/"}], "an absolute https URL"),
        ([{"resource": NAMED, "metadata": "https:///m"}], "must be an absolute https URL"),
        ([{"resource": NAMED, "metadata": ["https://a.example/m"]}], "an absolute https URL"),
        ([{"resource": NAMED, "metadata": "https://a.example/" + "m" * 2048}], "https URL"),
        ([{"resource": NAMED}, NAMED], f"{NAMED!r} is listed more than once"),
        ([NAMED, {"resource": NAMED, "name": "Orders"}], f"{NAMED!r} is listed more than once"),
        ([{"resource": NAMED}, {"resource": NAMED}], f"{NAMED!r} is listed more than once"),
        ([NAMED, 5], "an entry is not a URI or an object"),
        ([None], "an entry is not a URI or an object"),
        ([[NAMED]], "an entry is not a URI or an object"),
        ('{"resource": "https://a.example"}', "is not an absolute URI"),
        (5, "give comma-separated URIs, or a JSON array"),
    ],
)
def test_auth_resources_refuses_what_it_cannot_use_naming_the_setting(
    value: Any, reason: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        made(resources=value)
    (error,) = raised.value.errors()
    assert error["loc"] == ("resources",)
    assert "AUTH_RESOURCES: " in error["msg"] and reason in error["msg"], error["msg"]


def test_the_cli_names_auth_resources_in_its_one_line(cli: Cli) -> None:
    cli.monkeypatch.setenv("AUTH_RESOURCES", json.dumps([{"resource": NAMED, "label": "x"}]))
    result = cli("keys", "list")
    assert (result.code, result.out) == (1, "")
    assert result.messages == [
        "error: AUTH_RESOURCES: Value error, AUTH_RESOURCES: unknown member 'label'; "
        "an object has only resource, name, metadata"
    ]


def test_production_refuses_plain_http_metadata_urls(keys_dir: Path) -> None:
    plain = [{"resource": NAMED, "metadata": "http://orders.example/meta"}]
    reasons = production(keys_dir, resources=plain).insecure_reasons()
    assert [r for r in reasons if "AUTH_RESOURCES" in r] == [
        "AUTH_RESOURCES has http metadata URLs (http://orders.example/meta): a network "
        "attacker could change the names shown on the consent page; use https URLs only"
    ]
    secure = [{"resource": NAMED, "metadata": METADATA}, "http://plain.example"]
    assert production(keys_dir, resources=secure).insecure_reasons() == []


# -- the consent page ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> Iterator[DocServer]:
    """One server for the module, so that its settings (and the shared app) stay the same."""
    server = DocServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def closed_url() -> str:
    """A URL nothing listens at: the port of a server just stopped (connection refused)."""
    server = DocServer()
    url = server.url("/billing.json")
    server.stop()
    return url


@pytest.fixture
def settings(database_url: str, keys_dir: Path, docs: DocServer, closed_url: str) -> Settings:
    return make_settings(
        database_url,
        keys_dir,
        client_fetch_allow_loopback=True,
        default_audience="https://default.example",
        resources=[
            {"resource": NAMED, "name": "Orders API"},
            {"resource": HOSTILE, "name": HOSTILE_NAME},
            {"resource": FETCHED, "metadata": docs.url("/billing.json")},
            {"resource": BOTH, "name": "Reports", "metadata": docs.url("/reports.json")},
            PLAIN,
            {"resource": UNREACHABLE, "metadata": closed_url},
        ],
    )


# -- discovery -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
)
async def test_discovery_lists_the_protected_resources(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    # RFC 9728 §4: the resources, in order; not the default audience (this server's own).
    assert response.json()["protected_resources"] == [
        NAMED,
        HOSTILE,
        FETCHED,
        BOTH,
        PLAIN,
        UNREACHABLE,
    ]


def test_discovery_omits_protected_resources_when_none_are_listed() -> None:
    document = discovery_document(made(default_audience="https://default.example"))
    assert "protected_resources" not in document
    assert discovery_document(made(resources=PLAIN))["protected_resources"] == [PLAIN]


# -- the consent page ------------------------------------------------------------------------


@pytest.fixture
async def fresh_fetcher(
    state: AppState, docs: DocServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Fetcher]:
    """A fetcher with an empty cache for each test, and no document served yet."""
    docs.routes.clear()
    docs.seen.clear()
    fetcher = Fetcher(state.settings)
    monkeypatch.setattr(state, "fetcher", fetcher)
    yield fetcher
    await fetcher.aclose()


@pytest.fixture
async def signed_in(
    browser: httpx.AsyncClient,
    make_client: MakeClient,
    make_user: MakeUser,
    fresh_fetcher: Fetcher,
) -> httpx.AsyncClient:
    await spa(make_client)
    await sign_in(browser, await make_user())
    return browser


async def consent_page(browser: httpx.AsyncClient, *resources: str) -> str:
    _, challenge = pkce()
    params = [*authorize_params(challenge).items(), *[("resource", r) for r in resources]]
    page = await browser.get("/oauth2/authorize", params=params)
    assert page.status_code == 200, page.text
    assert "can use this access at these services:" in page.text
    return page.text


def named_entry(name: str, uri: str) -> re.Pattern[str]:
    """The name, and the URI beside it, in one item of the list (both escaped)."""
    return re.compile(
        rf'<li class="scope">\s*<span class="scope-description resource-name">{re.escape(name)}'
        rf'</span>\s*<code class="scope-name resource">{re.escape(uri)}</code>\s*</li>'
    )


def unnamed_entry(uri: str) -> re.Pattern[str]:
    return re.compile(rf'<li class="scope">\s*<code class="resource">{re.escape(uri)}</code>')


def billing_document(**members: Any) -> dict[str, Any]:
    return {"resource": FETCHED, "resource_name": "Billing API", **members}


async def test_the_consent_page_shows_the_configured_name_beside_the_uri(
    signed_in: httpx.AsyncClient, docs: DocServer
) -> None:
    docs.serve("/reports.json", {"resource": BOTH, "resource_name": "Not this one"})
    page = await consent_page(signed_in, NAMED, PLAIN, BOTH)
    assert named_entry("Orders API", NAMED).search(page)
    assert unnamed_entry(PLAIN).search(page)  # a resource without a name: its URI
    # The configured name wins; the document is not even fetched.
    assert named_entry("Reports", BOTH).search(page)
    assert "Not this one" not in page
    assert docs.seen == []
    # The order asked for is kept.
    assert page.index(NAMED) < page.index(PLAIN) < page.index(BOTH)


async def test_a_hostile_configured_name_is_escaped(signed_in: httpx.AsyncClient) -> None:
    page = await consent_page(signed_in, HOSTILE)
    assert named_entry(str(escape(HOSTILE_NAME)), HOSTILE).search(page)
    assert "<script>" not in page
    assert "&#34;Orders&#34; &amp; &#39;friends&#39;" in page


async def test_the_consent_page_names_a_resource_by_its_metadata_document(
    signed_in: httpx.AsyncClient, docs: DocServer
) -> None:
    docs.serve("/billing.json", billing_document())
    page = await consent_page(signed_in, FETCHED, NAMED)
    assert named_entry("Billing API", FETCHED).search(page)
    assert named_entry("Orders API", NAMED).search(page)
    # The fetcher's cache: a second page does not fetch it again.
    again = await consent_page(signed_in, FETCHED)
    assert named_entry("Billing API", FETCHED).search(again)
    assert len(docs.hits("/billing.json")) == 1


async def test_a_hostile_fetched_name_is_escaped(
    signed_in: httpx.AsyncClient, docs: DocServer
) -> None:
    hostile = '<img src=x onerror="alert(1)"> & Billing'
    docs.serve("/billing.json", billing_document(resource_name=hostile))
    page = await consent_page(signed_in, FETCHED)
    assert named_entry(str(escape(hostile)), FETCHED).search(page)
    assert "<img" not in page


async def test_the_consent_flow_completes_with_named_resources(
    signed_in: httpx.AsyncClient, docs: DocServer
) -> None:
    docs.serve("/billing.json", billing_document())
    _, challenge = pkce()
    assert await code_for(signed_in, challenge, FETCHED, NAMED)


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        # RFC 9728 §3.3: the metadata of another resource (here one slash apart) is not used.
        ({"document": billing_document(resource=FETCHED + "/")}, "resource is not this"),
        ({"document": {"resource_name": "Billing API"}}, "resource is not this"),
        ({"document": {"resource": FETCHED}}, "has no resource_name"),
        ({"document": billing_document(resource_name="Billing\nAPI")}, "not text of 1 to 100"),
        ({"document": billing_document(resource_name="x" * 101)}, "not text of 1 to 100"),
        ({"document": billing_document(resource_name=["Billing API"])}, "not text of 1 to 100"),
        ({"document": [billing_document()]}, "not a JSON object"),
        ({"status": 404}, "could not be fetched: answered 404"),
        ({"status": 500}, "could not be fetched: answered 500"),
        (
            {"document": billing_document(), "headers": {"Content-Type": "text/html"}},
            "could not be fetched: answered with a Content-Type other than JSON",
        ),
        ({"body": b"{not json"}, "could not be fetched: the document is not valid JSON"),
    ],
)
async def test_a_document_that_cannot_name_the_resource_leaves_its_uri(
    signed_in: httpx.AsyncClient, docs: DocServer, route: dict[str, Any], reason: str
) -> None:
    docs.serve("/billing.json", **route)
    with structlog.testing.capture_logs() as logs:
        page = await consent_page(signed_in, FETCHED)
    assert unnamed_entry(FETCHED).search(page)
    assert "Billing API" not in page and "resource-name" not in page
    (line,) = [line for line in logs if line["event"] == "resource_metadata.unused"]
    assert (line["resource"], line["url"]) == (FETCHED, docs.url("/billing.json"))
    assert reason in line["reason"], line


async def test_an_unreachable_metadata_server_leaves_the_uri(
    signed_in: httpx.AsyncClient,
) -> None:
    with structlog.testing.capture_logs() as logs:
        page = await consent_page(signed_in, UNREACHABLE, NAMED)
    assert unnamed_entry(UNREACHABLE).search(page)
    assert named_entry("Orders API", NAMED).search(page)
    (line,) = [line for line in logs if line["event"] == "resource_metadata.unused"]
    assert line["resource"] == UNREACHABLE
    assert line["reason"].startswith("the document could not be fetched: no answer"), line
