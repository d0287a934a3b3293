"""The SSRF-safe fetcher of client metadata documents and ``jwks_uri`` (server/fetch.py),
against a real HTTP server on 127.0.0.1 (and a TLS one, for the certificate check of a name
whose address was resolved here)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.config import Settings
from server.fetch import Fetcher, FetchError, address_problem

pytestmark = pytest.mark.feature("client-metadata-documents")

JSON = "application/json"


@dataclass
class Route:
    body: bytes = b"{}"
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": JSON})
    #: Wait for ``DocServer.release`` before answering at all / after half of the body.
    stall: bool = False
    stall_mid_body: bool = False
    #: Sent without ``Content-Length`` (the body read until the connection closes).
    no_length: bool = False
    #: Answer 304 to this ``If-None-Match``.
    etag: str | None = None


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class DocServer:
    """A local HTTP(S) server whose answers a test sets per path, and which records every
    request it gets (its path and headers)."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        #: Stalled answers wait for this (set when the server stops): no test sleeps.
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = server.routes.get(self.path, Route(b"not found", 404, {}))
                if route.stall:
                    server.release.wait(30)
                    return
                if route.etag is not None and self.headers.get("If-None-Match") == route.etag:
                    self.send_response(304)
                    for name, value in route.headers.items():
                        if name.lower() != "content-type":
                            self.send_header(name, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.no_length:
                    self.send_header("Connection", "close")
                else:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.stall_mid_body:
                    self.wfile.write(route.body[: len(route.body) // 2])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                self.wfile.write(route.body)
                if route.no_length:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if context is not None else "http"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def serve(self, path: str, document: Any = None, **route: Any) -> str:
        """Serve ``document`` (as JSON) or ``body`` at ``path``; returns its URL."""
        if document is not None:
            route["body"] = json.dumps(document).encode()
        self.routes[path] = Route(**route)
        return self.url(path)

    def hits(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def docs() -> Iterator[DocServer]:
    server = DocServer()
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetch_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "testing",
        "client_fetch_allow_loopback": True,
        "client_fetch_ttl": 300,
        "client_fetch_min_ttl": 30,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def resolving(table: dict[str, list[str]]) -> Any:
    """A resolver that answers from ``table`` (and records what it was asked)."""
    asked: list[str] = []

    async def resolve(host: str, _port: int) -> list[str]:
        asked.append(host)
        if host not in table:
            raise OSError("no such name")
        return table[host]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


@pytest.fixture
async def make_fetcher() -> Any:
    made: list[Fetcher] = []

    def factory(settings: Settings | None = None, **kwargs: Any) -> Fetcher:
        fetcher = Fetcher(settings or fetch_settings(), **kwargs)
        made.append(fetcher)
        return fetcher

    yield factory
    for fetcher in made:
        await fetcher.aclose()


# -- what is fetched, and how often ----------------------------------------------------------


async def test_a_document_is_fetched_once_while_fresh(docs: DocServer, make_fetcher: Any) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=60"}
    url = docs.serve("/doc", {"a": 1}, headers=headers)
    assert await fetcher.get_json(url) == {"a": 1}
    seen = docs.hits("/doc")[0]
    # The connection went to the address; the name travelled in Host.
    assert seen.headers["host"] == f"127.0.0.1:{docs.port}"
    assert seen.headers["accept"] == JSON
    clock.now += 59
    docs.serve("/doc", {"a": 2}, headers=headers)
    assert await fetcher.get_json(url) == {"a": 1}
    assert len(docs.hits("/doc")) == 1
    clock.now += 2
    assert await fetcher.get_json(url) == {"a": 2}
    assert len(docs.hits("/doc")) == 2


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [
        (None, 300),  # nothing said: AUTH_CLIENT_FETCH_TTL
        ("max-age=5", 30),  # below the floor: AUTH_CLIENT_FETCH_MIN_TTL
        ("public, max-age=100000", 300),  # above the ceiling
        ("max-age=120", 120),
        ("no-cache", 30),  # asked again, but at most every AUTH_CLIENT_FETCH_MIN_TTL
        ("no-store", 30),
        ("max-age=nonsense", 300),
    ],
)
async def test_freshness_follows_max_age_within_the_bounds(
    docs: DocServer, make_fetcher: Any, cache_control: str | None, fresh_for: int
) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    headers = {"Content-Type": JSON}
    if cache_control is not None:
        headers["Cache-Control"] = cache_control
    url = docs.serve("/doc", {"v": 1}, headers=headers)
    await fetcher.get_json(url)
    clock.now += fresh_for - 0.5
    await fetcher.get_json(url)
    assert len(docs.hits("/doc")) == 1
    clock.now += 1
    await fetcher.get_json(url)
    assert len(docs.hits("/doc")) == 2


async def test_age_counts_against_max_age(docs: DocServer, make_fetcher: Any) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=200", "Age": "150"}
    url = docs.serve("/doc", {"v": 1}, headers=headers)
    await fetcher.get_json(url)
    clock.now += 51  # 200 - 150 = 50 s were left
    await fetcher.get_json(url)
    assert len(docs.hits("/doc")) == 2


async def test_a_stale_document_is_revalidated_with_its_etag(
    docs: DocServer, make_fetcher: Any
) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=60", "ETag": '"v1"'}
    url = docs.serve("/doc", {"v": 1}, headers=headers, etag='"v1"')
    assert await fetcher.get_json(url) == {"v": 1}
    assert "if-none-match" not in docs.hits("/doc")[0].headers
    clock.now += 61
    # The server's body changed, but it answers 304 to the ETag: the kept body is served.
    docs.serve("/doc", {"v": "changed"}, headers=headers, etag='"v1"')
    assert await fetcher.get_json(url) == {"v": 1}
    revalidation = docs.hits("/doc")[1]
    assert revalidation.headers["if-none-match"] == '"v1"'
    # The 304 made it fresh again for its max-age.
    clock.now += 59
    assert await fetcher.get_json(url) == {"v": 1}
    assert len(docs.hits("/doc")) == 2
    # A new ETag: the new body.
    clock.now += 2
    docs.serve("/doc", {"v": 2}, headers={**headers, "ETag": '"v2"'}, etag='"v2"')
    assert await fetcher.get_json(url) == {"v": 2}


async def test_a_304_that_was_not_asked_for_is_refused(docs: DocServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    url = docs.serve("/doc", status=304, body=b"")
    with pytest.raises(FetchError, match="answered 304"):
        await fetcher.get_json(url)


async def test_refresh_asks_again_at_most_once_per_minimum_interval(
    docs: DocServer, make_fetcher: Any
) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    url = docs.serve("/jwks", {"keys": [1]}, headers={"Content-Type": JSON})
    await fetcher.get_json(url)
    docs.serve("/jwks", {"keys": [2]}, headers={"Content-Type": JSON})
    clock.now += 29
    # Forged assertions with unknown kids must not make it hammer the remote.
    for _ in range(5):
        assert await fetcher.get_json(url, refresh=True) == {"keys": [1]}
    assert len(docs.hits("/jwks")) == 1
    clock.now += 2
    assert await fetcher.get_json(url, refresh=True) == {"keys": [2]}
    assert await fetcher.get_json(url, refresh=True) == {"keys": [2]}
    assert len(docs.hits("/jwks")) == 2


async def test_concurrent_gets_of_one_url_share_one_fetch(
    docs: DocServer, make_fetcher: Any
) -> None:
    url = docs.serve("/doc", {"v": 1})
    gate = asyncio.Event()
    resolver_calls = 0

    async def resolve(host: str, port: int) -> list[str]:
        nonlocal resolver_calls
        resolver_calls += 1
        await gate.wait()
        return ["127.0.0.1"]

    fetcher = make_fetcher(resolver=resolve)
    named = url.replace("127.0.0.1", "docs.test")
    waiting = [asyncio.create_task(fetcher.get_json(named)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == [{"v": 1}] * 5
    assert resolver_calls == 1
    assert len(docs.hits("/doc")) == 1
    assert docs.hits("/doc")[0].headers["host"] == f"docs.test:{docs.port}"


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch(
    docs: DocServer, make_fetcher: Any
) -> None:
    gate = asyncio.Event()

    async def resolve(host: str, port: int) -> list[str]:
        await gate.wait()
        return ["127.0.0.1"]

    fetcher = make_fetcher(resolver=resolve)
    url = docs.serve("/doc", {"v": 1}).replace("127.0.0.1", "docs.test")
    first = asyncio.create_task(fetcher.get_json(url))
    second = asyncio.create_task(fetcher.get_json(url))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second == {"v": 1}
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_the_cache_keeps_the_most_recently_used_urls(
    docs: DocServer, make_fetcher: Any
) -> None:
    fetcher = make_fetcher(max_entries=2)
    urls = [docs.serve(f"/d{i}", {"i": i}) for i in range(3)]
    await fetcher.get_json(urls[0])
    await fetcher.get_json(urls[1])
    await fetcher.get_json(urls[0])  # used: /d1 is now the oldest
    await fetcher.get_json(urls[2])
    await fetcher.get_json(urls[0])
    assert len(docs.hits("/d0")) == 1
    await fetcher.get_json(urls[1])
    assert len(docs.hits("/d1")) == 2


# -- failures ------------------------------------------------------------------------------


async def test_a_failure_is_remembered_for_the_minimum_interval(
    docs: DocServer, make_fetcher: Any
) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    url = docs.serve("/gone", status=404, body=b"no")
    for _ in range(3):
        with pytest.raises(FetchError, match="answered 404"):
            await fetcher.get_json(url)
    assert len(docs.hits("/gone")) == 1
    clock.now += 31
    docs.serve("/gone", {"back": True})
    assert await fetcher.get_json(url) == {"back": True}


async def test_last_known_good_is_served_through_a_transient_failure_only(
    docs: DocServer, make_fetcher: Any
) -> None:
    clock = Clock()
    fetcher = make_fetcher(clock=clock)
    headers = {"Content-Type": JSON, "Cache-Control": "max-age=60"}
    url = docs.serve("/doc", {"v": 1}, headers=headers)
    await fetcher.get_json(url)
    clock.now += 61
    docs.serve("/doc", status=503, body=b"down")
    assert await fetcher.get_json(url) == {"v": 1}  # the host restarts: still served
    assert len(docs.hits("/doc")) == 2
    clock.now += 29
    assert await fetcher.get_json(url) == {"v": 1}  # not asked again before the minimum
    assert len(docs.hits("/doc")) == 2
    # At most AUTH_CLIENT_FETCH_TTL past its freshness.
    clock.now += 300
    with pytest.raises(FetchError, match="answered 503"):
        await fetcher.get_json(url)

    # A definitive answer ends it at once: how a document is withdrawn.
    url = docs.serve("/other", {"v": 1}, headers=headers)
    await fetcher.get_json(url)
    clock.now += 61
    docs.serve("/other", status=404, body=b"gone")
    with pytest.raises(FetchError, match="answered 404"):
        await fetcher.get_json(url)


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ({"status": 302, "headers": {"Location": "/doc"}, "body": b""}, "redirect"),
        ({"status": 301, "headers": {"Location": "http://169.254.169.254/"}}, "redirect"),
        ({"status": 500, "body": b"oops"}, "answered 500"),
        ({"status": 201}, "answered 201"),
        ({"headers": {"Content-Type": "text/html"}}, "Content-Type"),
        ({"headers": {}}, "Content-Type"),
        ({"headers": {"Content-Type": "application/jsonp"}}, "Content-Type"),
        ({"body": b"{not json"}, "not valid JSON"),
        ({"body": b'{"a": NaN}'}, "not valid JSON"),
        ({"body": b"\xff\xfe{}"}, "not valid JSON"),
        ({"body": b"[" * 5000 + b"]" * 5000}, "not valid JSON"),
        ({"body": b"x" * 70_000}, "larger than 65536 bytes"),  # declared length
        ({"body": b"[" + b"1," * 40_000 + b"1]", "no_length": True}, "larger than 65536"),
    ],
)
async def test_answers_that_are_refused(
    docs: DocServer, make_fetcher: Any, route: dict[str, Any], reason: str
) -> None:
    fetcher = make_fetcher()
    url = docs.serve("/bad", **route)
    docs.serve("/doc", {"redirected": True})
    with pytest.raises(FetchError, match=reason) as refused:
        await fetcher.get_json(url)
    assert "oops" not in refused.value.reason  # never the body
    assert docs.hits("/doc") == []  # a redirect is not followed


async def test_json_media_types_with_parameters_and_suffixes_are_accepted(
    docs: DocServer, make_fetcher: Any
) -> None:
    fetcher = make_fetcher()
    for i, media in enumerate(["application/json; charset=utf-8", "application/jwk-set+json"]):
        url = docs.serve(f"/m{i}", {"ok": i}, headers={"Content-Type": media})
        assert await fetcher.get_json(url) == {"ok": i}


async def test_a_compressed_body_is_measured_decompressed(
    docs: DocServer, make_fetcher: Any
) -> None:
    # A few kilobytes of gzip that would inflate to 10 MB: cut off at the limit.
    bomb = gzip.compress(b'{"a": "' + b"0" * 10_000_000 + b'"}')
    assert len(bomb) < 65_536
    fetcher = make_fetcher()
    url = docs.serve("/bomb", body=bomb, headers={"Content-Type": JSON, "Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="larger than 65536 bytes"):
        await fetcher.get_json(url)
    small = gzip.compress(b'{"a": 1}')
    url = docs.serve("/ok", body=small, headers={"Content-Type": JSON, "Content-Encoding": "gzip"})
    assert await fetcher.get_json(url) == {"a": 1}


async def test_a_resolver_answer_that_is_not_an_address(make_fetcher: Any) -> None:
    fetcher = make_fetcher(resolver=resolving({"odd.test": ["not-an-ip"]}))
    with pytest.raises(FetchError, match="not an address"):
        await fetcher.get_json("https://odd.test/doc")


@pytest.mark.parametrize("route", [{"stall": True}, {"stall_mid_body": True, "body": b"x" * 100}])
async def test_a_slow_server_is_cut_off_at_the_timeout(
    docs: DocServer, make_fetcher: Any, route: dict[str, Any]
) -> None:
    fetcher = make_fetcher(fetch_settings(client_fetch_timeout=0.2))
    url = docs.serve("/slow", **route)
    with pytest.raises(FetchError, match=r"no complete answer within 0.2 s") as refused:
        await fetcher.get_json(url)
    assert refused.value.transient


async def test_nothing_listening_is_a_transient_failure(make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    with pytest.raises(FetchError, match="no answer") as refused:
        await fetcher.get_json("http://127.0.0.1:9/doc")
    assert refused.value.transient


# -- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),  # noqa: S104
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("fc00::1", "private"),
        ("2001:db8::1", "private"),  # documentation
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a9fe:a9fe::", "link-local"),  # 6to4 of 169.254.169.254
        ("2002:0a00:0001::", "private"),  # 6to4 of 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo, client 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("::a00:1", "reserved"),  # IPv4-compatible (deprecated)
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_which_addresses_are_refused(address: str, problem: str | None) -> None:
    assert address_problem(ipaddress.ip_address(address)) == problem


def test_loopback_is_allowed_only_by_the_setting() -> None:
    loopback = ipaddress.ip_address("::ffff:127.0.0.1")
    assert address_problem(loopback, allow_loopback=True) is None
    assert address_problem(ipaddress.ip_address("10.0.0.1"), allow_loopback=True) == "private"
    # Production never allows it, whatever the setting says.
    production = Fetcher(fetch_settings(env="production"))
    assert not production.allow_loopback


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.0.0.1"],
        ["169.254.169.254"],
        ["::1"],
        ["127.0.0.1"],
        ["fd00::5"],
        ["93.184.215.14", "10.0.0.1"],  # any address refused refuses the name
        ["::ffff:192.168.0.1"],
    ],
)
async def test_a_name_resolving_to_a_refused_address_is_never_connected_to(
    docs: DocServer, make_fetcher: Any, addresses: list[str]
) -> None:
    resolve = resolving({"evil.test": addresses})
    fetcher = make_fetcher(fetch_settings(client_fetch_allow_loopback=False), resolver=resolve)
    docs.serve("/doc", {"v": 1})
    with pytest.raises(
        FetchError, match=r"evil\.test resolves to an address that is not fetched \(\w"
    ) as refused:
        await fetcher.get_json(f"http://evil.test:{docs.port}/doc")
    assert not refused.value.transient
    assert resolve.asked == ["evil.test"]
    assert docs.seen == []


async def test_loopback_is_refused_without_the_setting(docs: DocServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher(fetch_settings(client_fetch_allow_loopback=False))
    url = docs.serve("/doc", {"v": 1})
    for each in (url, url.replace("127.0.0.1", "[::1]"), url.replace("127.0.0.1", "2130706433")):
        with pytest.raises(FetchError, match=r"not fetched \(loopback\)"):
            await fetcher.get_json(each)
    with pytest.raises(
        FetchError, match=r"localhost resolves to an address that is not fetched \(loopback\)"
    ):
        await fetcher.get_json(url.replace("127.0.0.1", "localhost"))
    assert docs.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://docs.test/doc",
        "file:///etc/passwd",
        "https://user:pw@docs.test/doc",
        "https://docs.test/doc#frag",
        "https:///doc",
        "https://docs.test:99999/doc",
        "https://[::1/doc",
        "docs.test/doc",
    ],
)
async def test_urls_that_are_not_fetched(make_fetcher: Any, url: str) -> None:
    resolve = resolving({})
    fetcher = make_fetcher(resolver=resolve)
    with pytest.raises(FetchError, match="absolute https URL"):
        await fetcher.get_json(url)
    assert resolve.asked == []


async def test_production_fetches_https_only(make_fetcher: Any) -> None:
    resolve = resolving({"docs.test": ["93.184.215.14"]})
    fetcher = make_fetcher(fetch_settings(env="production"), resolver=resolve)
    with pytest.raises(FetchError, match="absolute https URL"):
        await fetcher.get_json("http://docs.test/doc")
    assert resolve.asked == []


async def test_a_name_that_does_not_resolve(make_fetcher: Any) -> None:
    fetcher = make_fetcher(resolver=resolving({}))
    with pytest.raises(FetchError, match=r"nowhere\.test does not resolve"):
        await fetcher.get_json("https://nowhere.test/doc")


async def test_the_system_resolver_is_used_by_default(docs: DocServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    url = docs.serve("/doc", {"v": 1}).replace("127.0.0.1", "localhost")
    assert await fetcher.get_json(url) == {"v": 1}
    assert docs.hits("/doc")[0].headers["host"] == f"localhost:{docs.port}"


# -- TLS: the certificate is checked for the name, on a connection to the checked address ----


def _certificate(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_docs(tmp_path: Path) -> Iterator[tuple[DocServer, ssl.SSLContext]]:
    cert, key = _certificate(tmp_path, "docs.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    server = DocServer(server_context)
    yield server, trust
    server.stop()


async def test_tls_verifies_the_certificate_for_the_name_not_the_address(
    tls_docs: tuple[DocServer, ssl.SSLContext], make_fetcher: Any
) -> None:
    docs, trust = tls_docs
    resolve = resolving({"docs.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    fetcher = make_fetcher(resolver=resolve, verify=trust)
    docs.serve("/doc", {"tls": True})
    assert await fetcher.get_json(docs.url("/doc", "docs.test")) == {"tls": True}
    assert docs.hits("/doc")[0].headers["host"] == f"docs.test:{docs.port}"
    # The same address under a name the certificate does not carry: refused by TLS.
    with pytest.raises(FetchError, match="no answer"):
        await fetcher.get_json(docs.url("/doc", "other.test"))
    # And the address itself (no name to check the certificate against): refused too.
    with pytest.raises(FetchError, match="no answer"):
        await fetcher.get_json(docs.url("/doc"))
    assert len(docs.hits("/doc")) == 1
