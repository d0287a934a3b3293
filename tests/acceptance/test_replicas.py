"""Three real server processes behind one issuer, sharing PostgreSQL, Redis and keys/.

Whatever replica a request reaches, the server behaves as one: one refresh winner, tokens valid
everywhere, limits and throttling counted once, rotated keys picked up by all, and a replica
killed mid-load loses no issued token. PostgreSQL and Redis are required in CI
(``AUTH_TEST_REQUIRE_POSTGRES=1``, ``AUTH_TEST_REQUIRE_REDIS=1``); elsewhere a missing one skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest

from server.keys import KeyStore
from tests.conftest import _drop_pg_database, _new_pg_database, migrate

from .conftest import (
    RunningServer,
    cli,
    create_client,
    create_user,
    fetch,
    server_env,
    sha256_hex,
    start_replicas,
)

pytestmark = pytest.mark.feature("multi-replica", "postgres-backend")
ISSUER = "http://replicas.test"  # one name for every replica, as behind a load balancer
PASSWORD = "a long enough passphrase"
REDIS = "redis://127.0.0.1:6379/0"
ACCOUNT_LIMIT = 12  # password grants per username per minute, counted across replicas


def require_redis() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return
    except OSError as exc:
        reason = f"Redis not reachable at 127.0.0.1:6379: {exc}"
        if os.environ.get("AUTH_TEST_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason} (AUTH_TEST_REQUIRE_REDIS=1)")
        pytest.skip(reason)


@dataclass
class Cluster:
    servers: list[RunningServer]
    env: dict[str, str]
    database_url: str
    auth: tuple[str, str]  # the app: password, refresh_token, client_credentials
    rs_auth: tuple[str, str]  # a resource server: introspects any token
    prefix: str  # unique per run: usernames and limit keys never meet another run's
    dead: set[int] = field(default_factory=set)

    @property
    def live(self) -> list[RunningServer]:
        return [s for i, s in enumerate(self.servers) if i not in self.dead]

    def user(self, name: str) -> str:
        username = f"{self.prefix}-{name}"
        create_user(self.database_url, username, PASSWORD)  # argon2 as the replicas' (cheap)
        return username

    def sign_in(
        self, server: RunningServer, username: str, password: str = PASSWORD
    ) -> httpx.Response:
        return httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "password", "username": username, "password": password},
            auth=self.auth,
            timeout=30,
        )

    def introspect(self, server: RunningServer, token: str) -> dict[str, object]:
        response = httpx.post(
            server.url + "/oauth2/introspect", data={"token": token}, auth=self.rs_auth, timeout=30
        )
        assert response.status_code == 200, response.text
        body: dict[str, object] = response.json()
        return body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_redis()
    database_url = _new_pg_database()
    tmp = tmp_path_factory.mktemp("replicas")
    keys = tmp / "keys"
    extra = {
        "AUTH_RATE_LIMIT_STORAGE": REDIS,
        # Redis outlives a run: this run's counts under a prefix of their own.
        "AUTH_RATE_LIMIT_PREFIX": f"test-replicas-{secrets.token_hex(4)}",
        "AUTH_RATE_LIMIT_TOKEN_ACCOUNT": f"{ACCOUNT_LIMIT}/minute",
        # The load below is one client from one address, and Redis outlives a run: only the
        # per-username limit (fresh usernames each run) is exercised.
        "AUTH_RATE_LIMIT_TOKEN_CLIENT": "100000/minute",
        "AUTH_RATE_LIMIT_TOKEN_IP": "100000/minute",
        "AUTH_ARGON2_MEMORY_COST": "1024",
        "AUTH_ARGON2_TIME_COST": "1",
        "AUTH_KEY_RELOAD_INTERVAL": "0.5",  # seconds (2 by default)
    }
    servers: list[RunningServer] = []
    try:
        migrate(database_url)
        env = server_env(database_url, keys, ISSUER, **extra)
        app = create_client(database_url, "app", scope="api")
        rs = create_client(database_url, "rs", resource_server=True)
        assert app.secret is not None and rs.secret is not None
        servers = start_replicas(
            database_url, keys, [tmp / f"{name}.log" for name in "abc"], issuer=ISSUER, **extra
        )
        yield Cluster(
            servers,
            env,
            database_url,
            ("app", app.secret),
            ("rs", rs.secret),
            prefix=secrets.token_hex(4),
        )
    finally:
        for server in servers:
            server.stop()
        for server in servers:
            log = server.log()
            assert "Traceback" not in log, log[-3000:]
            assert PASSWORD not in log
        _drop_pg_database(database_url)


def test_simultaneous_refreshes_on_different_replicas_have_one_winner(cluster: Cluster) -> None:
    a, b, c = cluster.servers
    signed_in = cluster.sign_in(a, cluster.user("race"))
    assert signed_in.status_code == 200, signed_in.text
    token = signed_in.json()["refresh_token"]
    start = threading.Barrier(6)
    answers: list[httpx.Response] = []

    def refresh(server: RunningServer) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.get("/healthz")  # connected before the barrier: the posts leave together
            start.wait(timeout=30)
            answers.append(
                http.post(
                    "/oauth2/token",
                    data={"grant_type": "refresh_token", "refresh_token": token},
                    auth=cluster.auth,
                )
            )

    threads = [threading.Thread(target=refresh, args=(s,)) for s in (a, b, c, a, b, c)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 400, 400, 400, 400, 400], [r.text for r in answers]
    assert all(r.json()["error"] == "invalid_grant" for r in answers if r.status_code == 400)
    winner = next(r for r in answers if r.status_code == 200).json()
    # The losers were replays of a rotated token: the family is revoked, seen from everywhere.
    for server in cluster.servers:
        assert cluster.introspect(server, winner["access_token"]) == {"active": False}
        again = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "refresh_token", "refresh_token": winner["refresh_token"]},
            auth=cluster.auth,
            timeout=30,
        )
        assert again.status_code == 400


def test_a_token_from_one_replica_introspects_and_revokes_on_another(cluster: Cluster) -> None:
    a, b, c = cluster.servers
    issued = cluster.sign_in(a, cluster.user("roam")).json()
    for server in cluster.servers:
        seen = cluster.introspect(server, issued["access_token"])
        assert seen["active"] is True and seen["iss"] == ISSUER
    refreshed = httpx.post(
        b.url + "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]},
        auth=cluster.auth,
        timeout=30,
    )
    assert refreshed.status_code == 200, refreshed.text
    revoked = httpx.post(
        c.url + "/oauth2/revoke",
        data={"token": refreshed.json()["refresh_token"]},
        auth=cluster.auth,
        timeout=30,
    )
    assert revoked.status_code == 200
    for server in cluster.servers:
        for access_token in (issued["access_token"], refreshed.json()["access_token"]):
            assert cluster.introspect(server, access_token) == {"active": False}


def test_failed_passwords_spread_across_replicas_count_once(cluster: Cluster) -> None:
    username = cluster.user("guessed")
    assert cluster.sign_in(cluster.servers[0], username).status_code == 200
    for attempt in range(5):  # AUTH_THROTTLE_ACCOUNT_IP: 5 a minute, one per replica in turn
        server = cluster.servers[attempt % 3]
        wrong = cluster.sign_in(server, username, "not the password")
        assert wrong.status_code == 400, wrong.text
    for server in cluster.servers:  # now throttled everywhere, the right password included
        refused = cluster.sign_in(server, username)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_grant"


def test_request_limits_are_shared_by_the_replicas(cluster: Cluster) -> None:
    username = cluster.user("busy")
    for attempt in range(ACCOUNT_LIMIT):
        assert cluster.sign_in(cluster.servers[attempt % 3], username).status_code == 200
    for server in cluster.servers:
        limited = cluster.sign_in(server, username)
        assert limited.status_code == 429, limited.text
        assert int(limited.headers["retry-after"]) >= 1


def test_keys_rotated_once_reach_every_replica(cluster: Cluster) -> None:
    def issue(server: RunningServer) -> str:
        response = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=cluster.auth,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    before = issue(cluster.servers[0])
    old_kid = jwt.get_unverified_header(before)["kid"]
    # What `keys rotate --force` does (test_key_rotation runs the command itself).
    KeyStore(Path(cluster.env["AUTH_KEYS_DIR"])).rotate(min_next_age=0)
    tokens: dict[str, str] = {}
    deadline = time.monotonic() + 30  # each replica re-reads keys.json every 0.5 s
    while time.monotonic() < deadline and len(tokens) < 3:
        for server in cluster.servers:
            token = issue(server)
            if jwt.get_unverified_header(token)["kid"] != old_kid:
                tokens[server.url] = token
        time.sleep(0.2)
    assert len(tokens) == 3, "not every replica signs with the new key"
    for server in cluster.servers:  # every token verifies against every replica's JWKS
        keys = jwt.PyJWKClient(server.url + "/.well-known/jwks.json", cache_keys=False)
        for token in [before, *tokens.values()]:
            claims = jwt.decode(
                token,
                keys.get_signing_key_from_jwt(token).key,
                algorithms=["RS256"],
                audience=ISSUER,
                issuer=ISSUER,
            )
            assert claims["iss"] == ISSUER


def test_killing_a_replica_mid_load_loses_no_token(cluster: Cluster) -> None:
    """Runs last: it kills replica c for good."""
    username = cluster.user("load")
    chains = [
        cluster.sign_in(cluster.servers[i % 3], username).json()["refresh_token"] for i in range(6)
    ]
    received: list[str] = list(chains)
    outcomes: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def run(index: int) -> None:
        token = chains[index]
        turn = index
        while not stop.is_set():
            server = cluster.servers[turn % 3]
            turn += 1
            try:
                response = httpx.post(
                    server.url + "/oauth2/token",
                    data={"grant_type": "refresh_token", "refresh_token": token},
                    auth=cluster.auth,
                    timeout=10,
                )
            except httpx.TransportError as exc:  # the dead replica: try the next one
                with lock:
                    outcomes.append(type(exc).__name__)
                continue
            with lock:
                outcomes.append(str(response.status_code))
            if response.status_code == 200:
                token = response.json()["refresh_token"]
                with lock:
                    received.append(token)
            elif response.status_code == 400:
                return  # the answer to a rotation was lost with the replica: a replay (SPEC)

    def load_until(successes: int) -> None:
        """Wait (30 s at most) until the load has had ``successes`` refreshes, or has ended."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(thread.is_alive() for thread in threads):
            with lock:
                if outcomes.count("200") >= successes:
                    return
            time.sleep(0.05)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    load_until(18)  # the load is on: about three refreshes per chain, one per replica
    victim = cluster.servers[2]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=10)
    cluster.dead.add(2)
    with lock:
        before_kill = outcomes.count("200")
    load_until(before_kill + 12)  # and goes on without it
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"\nrefresh outcomes around the kill: {counts}")  # in the test report
    assert "500" not in outcomes and "503" not in outcomes, outcomes
    assert outcomes.count("200") > 20
    for server in cluster.live:  # the others keep serving
        assert cluster.sign_in(server, username).status_code in (200, 429)
        issued = httpx.post(
            server.url + "/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=cluster.auth,
            timeout=30,
        )
        assert issued.status_code == 200
    rows = {
        row[0]
        for row in asyncio.run(fetch(cluster.database_url, "SELECT token_hash FROM refresh_tokens"))
    }
    assert all(sha256_hex(token) in rows for token in received)  # none issued without its row
    two_live = asyncio.run(
        fetch(
            cluster.database_url,
            "SELECT family_id FROM refresh_tokens WHERE rotated_at IS NULL "
            "GROUP BY family_id HAVING count(*) > 1",
        )
    )
    assert two_live == []


def _client_credentials(server: RunningServer, auth: tuple[str, str]) -> int:
    response = httpx.post(
        server.url + "/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=auth,
        timeout=30,
    )
    return response.status_code


def _refused_everywhere_within(
    cluster: Cluster, auth: tuple[str, str], seconds: float
) -> list[float]:
    """Poll every replica until it refuses ``auth``; how long each took (fails past
    ``seconds``)."""
    started = time.monotonic()
    took: list[float] = []
    for server in cluster.live:
        while _client_credentials(server, auth) != 401:
            assert time.monotonic() - started < seconds, f"{server.url} still accepts it"
            time.sleep(0.05)
        took.append(time.monotonic() - started)
    return took


@pytest.mark.feature("client-cache")
def test_a_client_changed_by_the_cli_stops_working_on_every_replica_within_a_second(
    cluster: Cluster,
) -> None:
    """Every replica caches clients for AUTH_CLIENT_CACHE_TTL (5 s by default), and a change
    made through the CLI reaches all of them at once (PostgreSQL NOTIFY): a rotated secret and
    a deleted client stop working well inside the TTL."""
    assert len(cluster.live) >= 2
    created = create_client(cluster.database_url, "cached", grants=["client_credentials"])
    assert created.secret is not None
    old = ("cached", created.secret)
    for server in cluster.live:  # each replica now holds the client in its cache
        assert _client_credentials(server, old) == 200
    rotated = cli(cluster.env, "clients", "rotate-secret", "cached", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new = ("cached", json.loads(rotated.stdout)["client_secret"])
    assert max(_refused_everywhere_within(cluster, old, 1.0)) < 1.0
    for server in cluster.live:
        assert _client_credentials(server, new) == 200
    deleted = cli(cluster.env, "clients", "delete", "cached")
    assert deleted.returncode == 0, deleted.stderr
    assert max(_refused_everywhere_within(cluster, new, 1.0)) < 1.0


@pytest.mark.feature("refresh-retries")
def test_with_a_retry_window_replicas_racing_one_token_all_get_one_successor(
    cluster: Cluster,
) -> None:
    """The same race as above, from a client with a refresh retry window: every presentation
    gets the one successor, and that successor rotates on (the family lives)."""
    created = create_client(
        cluster.database_url,
        "retrying",
        grants=["password", "refresh_token"],
        scope="api",
        refresh_retry_window=30,
    )
    assert created.secret is not None
    auth = ("retrying", created.secret)
    live = cluster.live
    signed_in = httpx.post(
        live[0].url + "/oauth2/token",
        data={"grant_type": "password", "username": cluster.user("retry"), "password": PASSWORD},
        auth=auth,
        timeout=30,
    )
    assert signed_in.status_code == 200, signed_in.text
    token = signed_in.json()["refresh_token"]
    racers = [live[i % len(live)] for i in range(6)]
    start = threading.Barrier(len(racers))
    answers: list[httpx.Response] = []

    def refresh(server: RunningServer) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.get("/healthz")
            start.wait(timeout=30)
            answers.append(
                http.post(
                    "/oauth2/token",
                    data={"grant_type": "refresh_token", "refresh_token": token},
                    auth=auth,
                )
            )

    threads = [threading.Thread(target=refresh, args=(s,)) for s in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.status_code for r in answers] == [200] * len(racers), [r.text for r in answers]
    successors = {r.json()["refresh_token"] for r in answers}
    assert len(successors) == 1
    onward = httpx.post(
        live[-1].url + "/oauth2/token",
        data={"grant_type": "refresh_token", "refresh_token": successors.pop()},
        auth=auth,
        timeout=30,
    )
    assert onward.status_code == 200, onward.text


@pytest.mark.feature("client-registration-management")
def test_a_client_deleted_through_rfc_7592_gets_no_token_on_any_replica(cluster: Cluster) -> None:
    """A client registered on one replica works on all of them; deleted through another with
    its registration access token, it is refused everywhere at once (PostgreSQL NOTIFY)."""
    issued = cli(cluster.env, "clients", "registration-token", "--json")
    assert issued.returncode == 0, issued.stderr
    first, second = cluster.live[0], cluster.live[1]
    registered = httpx.post(
        first.url + "/oauth2/register",
        json={"grant_types": ["client_credentials"], "client_name": "self-registered"},
        headers={"Authorization": "Bearer " + json.loads(issued.stdout)["token"]},
        timeout=30,
    )
    assert registered.status_code == 201, registered.text
    body = registered.json()
    auth = (body["client_id"], body["client_secret"])
    for server in cluster.live:  # each replica now holds the client in its cache
        assert _client_credentials(server, auth) == 200
    deleted = httpx.delete(
        second.url + "/oauth2/register/" + body["client_id"],
        headers={"Authorization": "Bearer " + body["registration_access_token"]},
        timeout=30,
    )
    assert deleted.status_code == 204
    assert max(_refused_everywhere_within(cluster, auth, 1.0)) < 1.0
