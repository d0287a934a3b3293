"""deploy/nginx/token-server.conf in front of two real replicas (PostgreSQL and Redis shared).

nginx runs the deployment's own server block, with only its listen line and upstream servers
pointed at loopback. Requests reach both replicas; the replicas believe X-Forwarded-For from
nginx only (``AUTH_TRUSTED_PROXIES=127.0.0.1``), so a client on another loopback address that
forges the header is still limited as itself; ``/metrics`` is not exposed.
nginx comes from Debian's packages (.ci/run installs it and sets AUTH_TEST_REQUIRE_NGINX=1).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import _drop_pg_database, _new_pg_database, migrate

from .conftest import ROOT, RunningServer, create_client, free_port, start_replicas
from .test_replicas import REDIS, require_redis

pytestmark = pytest.mark.feature("deployment-kit", "multi-replica", "trusted-proxies")
CONF = ROOT / "deploy" / "nginx" / "token-server.conf"
IP_LIMIT = 4


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        reason = "nginx not found: apt-get install nginx-light"
        if os.environ.get("AUTH_TEST_REQUIRE_NGINX") == "1":
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_NGINX=1)")
        pytest.skip(reason)
    return found


#: The deployment waits 10 s for a request's headers; the test waits this long instead.
HEADER_TIMEOUT = 2


def render(conf: str, port: int, upstreams: list[str]) -> str:
    """The deployment's server block with loopback addresses and a shorter header timeout;
    nothing else changes."""
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    assert "    client_header_timeout 10s;\n" in conf
    conf = conf.replace("client_header_timeout 10s;", f"client_header_timeout {HEADER_TIMEOUT}s;")
    servers = "".join(f"    server {u} max_fails=3 fail_timeout=5s;\n" for u in upstreams)
    conf, count = re.subn(r"(?m)^    server app\d:8000 [^\n]*\n", "", conf)
    assert count == 2, "deploy/nginx/token-server.conf no longer names app1 and app2"
    return conf.replace("upstream token_server {\n", "upstream token_server {\n" + servers)


@pytest.fixture(scope="module")
def balanced(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, list[RunningServer], tuple[str, str]]]:
    binary = nginx_binary()
    require_redis()
    database_url = _new_pg_database()
    tmp = tmp_path_factory.mktemp("nginx")
    keys = tmp / "keys"
    extra = {
        "AUTH_RATE_LIMIT_STORAGE": REDIS,
        "AUTH_RATE_LIMIT_PREFIX": f"test-nginx-{secrets.token_hex(4)}",
        "AUTH_TRUSTED_PROXIES": "127.0.0.1",
        "AUTH_RATE_LIMIT_TOKEN_IP": f"{IP_LIMIT}/minute",
    }
    replicas: list[RunningServer] = []
    nginx: subprocess.Popen[bytes] | None = None
    try:
        migrate(database_url)
        secret = create_client(database_url, "svc", scope="api").secret
        assert secret is not None
        auth = ("svc", secret)
        replicas = start_replicas(
            database_url,
            keys,
            [tmp / f"{name}.log" for name in ("app1", "app2")],
            issuer="http://auth.test",
            **extra,
        )
        port = free_port()
        upstreams = [r.url.removeprefix("http://") for r in replicas]
        (tmp / "logs").mkdir()
        (tmp / "nginx.conf").write_text(
            "pid nginx.pid;\nerror_log logs/error.log;\nevents {}\nhttp {\n"
            "  access_log off;\n  client_body_temp_path tmp;\n  proxy_temp_path tmp;\n"
            + render(CONF.read_text(), port, upstreams)
            + "\n}\n"
        )
        (tmp / "tmp").mkdir()
        nginx = subprocess.Popen(
            [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,  # it logs to logs/error.log
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("nginx did not start: " + (tmp / "logs" / "error.log").read_text())
        yield url, replicas, auth
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        for replica in replicas:
            replica.stop()
        _drop_pg_database(database_url)


def loopback() -> str:
    """A loopback address of its own: Redis outlives a run, and so do its counts per address."""
    second, third, fourth = (
        secrets.randbelow(200) + 20,
        *(secrets.randbelow(250) + 1 for _ in "ab"),
    )
    return f"127.{second}.{third}.{fourth}"


def client_from(address: str, url: str) -> httpx.Client:
    """A client whose connections come from another loopback address (as another host would)."""
    return httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30
    )


def test_requests_through_nginx_reach_both_replicas(
    balanced: tuple[str, list[RunningServer], tuple[str, str]],
) -> None:
    url, replicas, auth = balanced
    with client_from(loopback(), url) as http:
        for _ in range(IP_LIMIT):
            issued = http.post(
                "/oauth2/token", data={"grant_type": "client_credentials"}, auth=auth
            )
            assert issued.status_code == 200, issued.text
    served = [replica.log().count('"token.issued"') for replica in replicas]
    assert all(count >= 1 for count in served), served  # round robin: both took a share


def test_a_forged_forwarded_for_does_not_escape_the_limit_behind_nginx(
    balanced: tuple[str, list[RunningServer], tuple[str, str]],
) -> None:
    url, _, auth = balanced
    with client_from(loopback(), url) as http:
        statuses = [
            http.post(
                "/oauth2/token",
                data={"grant_type": "client_credentials"},
                auth=auth,
                headers={"X-Forwarded-For": f"203.0.113.{n}"},  # a new "address" every time
            ).status_code
            for n in range(IP_LIMIT + 2)
        ]
    # Counted by the client's own address (nginx's view of its peer), whichever replica answered.
    assert statuses == [200] * IP_LIMIT + [429, 429], statuses
    with client_from(loopback(), url) as other:  # another client keeps its own budget
        fine = other.post("/oauth2/token", data={"grant_type": "client_credentials"}, auth=auth)
        assert fine.status_code == 200


def test_metrics_are_not_exposed_through_the_load_balancer(
    balanced: tuple[str, list[RunningServer], tuple[str, str]],
) -> None:
    url, replicas, _ = balanced
    assert httpx.get(url + "/metrics", timeout=10).status_code == 404
    assert httpx.get(replicas[0].url + "/metrics", timeout=10).status_code == 200


# -- header limits: what uvicorn does not bound, the production front does -----------------


def healthz_served(replica: RunningServer) -> float:
    """How many /healthz requests a replica has answered (its own Prometheus counter)."""
    metrics = httpx.get(replica.url + "/metrics", timeout=10).text
    pattern = r'http_requests_total\{[^}]*route="/healthz"[^}]*\} ([0-9.e+]+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


@pytest.mark.feature("header-limits")
def test_oversized_request_headers_are_refused_before_any_replica(
    balanced: tuple[str, list[RunningServer], tuple[str, str]],
) -> None:
    url, replicas, _ = balanced
    before = sum(healthz_served(replica) for replica in replicas)
    with httpx.Client(base_url=url, timeout=10) as http:
        header = http.get("/healthz", headers={"X-Padding": "a" * 64 * 1024})
        many = http.get("/healthz", headers={f"X-Pad-{n}": "b" * 7000 for n in range(8)})
        line = http.get("/oauth2/authorize?" + "c" * 16 * 1024)
        # What the server itself accepts still passes: a 4 KiB authorization request and a
        # header of a few KiB (a long bearer token) reach a replica.
        query = http.get("/oauth2/authorize?client_id=" + "d" * 4000)
        token = http.get("/api/v1/me", headers={"Authorization": "Bearer " + "e" * 6000})
    assert (header.status_code, many.status_code, line.status_code) == (400, 400, 414)
    assert all("nginx" in r.text for r in (header, many, line))  # nginx's own answers
    assert sum(healthz_served(replica) for replica in replicas) == before  # none forwarded
    assert query.status_code == 400 and "This sign-in request is not valid" in query.text
    assert token.status_code == 401 and token.json()["error_code"] == "invalid_token"


@pytest.mark.feature("header-limits")
def test_a_client_trickling_its_headers_is_cut_off(
    balanced: tuple[str, list[RunningServer], tuple[str, str]],
) -> None:
    url, _, _ = balanced
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT * 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: auth.test\r\n")
        # One header line every quarter second, for up to five times the header timeout: a
        # client that never finishes its headers must not keep the connection.
        for n in range(HEADER_TIMEOUT * 20):
            try:
                sock.sendall(f"X-Slow-{n}: x\r\n".encode())
                sent += 1
                time.sleep(0.25)
                sock.setblocking(False)
                try:
                    chunk = sock.recv(4096)
                except BlockingIOError:
                    chunk = None
                finally:
                    sock.setblocking(True)
                if chunk is not None:
                    answer = chunk
                    break  # nginx answered or closed: the request is over
            except OSError:
                break  # reset: nginx closed the connection
    assert sent < HEADER_TIMEOUT * 20, "the connection was still open after every header line"
    assert b"200 OK" not in answer  # the request was never completed and served
