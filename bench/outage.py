"""``make bench``, a database outage: the latency figures the outage tests no longer assert.

One server (one worker, PostgreSQL reached through ``tests/faultproxy.py``'s TCP proxy, the
circuit breaker and timeouts at their defaults) answers a steady client_credentials load from
``CLIENTS`` threads. For each way the database can go (``reset``: connections reset and new ones
refused, a crashed host or a failover; ``blackhole``: nothing answers, a partitioned network)
it measures, from the clients' side:

- the time from the cut to the first 503;
- the latency of the 503s once the breaker is open (median, p99, max): answered without I/O;
- the time from restoring the database to the first 200.

The tests assert what happens (``tests/test_db_faults.py``,
``tests/acceptance/test_database_outage.py``); this module says how fast. It rewrites its own
section of artifacts/benchmarks.md (between the markers below), so ``python -m bench.outage``
refreshes it without the whole run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from sqlalchemy.engine import make_url

from server.config import Settings
from server.keys import KeyStore
from tests.faultproxy import FaultProxy

from .processes import free_port, stop
from .run import ARTIFACTS, basic, cli, database, server_env, start

CLIENTS = 4
BEFORE_CUT = 2.0  # s of normal service before each cut
#: Seconds the database stays away: longer than the breaker's cooldown, and for a blackhole
#: long enough for the statement timeouts (10 s) to fail enough requests to open the breaker.
OUTAGE = {"reset": 8.0, "blackhole": 30.0}
BEGIN = "<!-- bench.outage: begin -->"
END = "<!-- bench.outage: end -->"


@dataclass
class Sample:
    sent: float  # time.monotonic() when the request was sent
    seconds: float
    status: int


@dataclass
class Outage:
    mode: str
    to_first_503: float
    open_503s: list[float] = field(default_factory=list)
    to_first_200: float = 0.0
    other: int = 0  # answers other than 200 and 503

    def line(self) -> str:
        ms = sorted(t * 1000 for t in self.open_503s)
        p99 = ms[max(0, int(len(ms) * 0.99) - 1)] if ms else 0.0
        median = statistics.median(ms) if ms else 0.0
        return (
            f"| {self.mode} | {self.to_first_503:.2f} s | {len(ms)} | {median:.1f} ms "
            f"| {p99:.1f} ms | {max(ms, default=0.0):.1f} ms | {self.to_first_200:.2f} s "
            f"| {self.other} |"
        )


def load(url: str, auth: str, stop_at: threading.Event, samples: list[Sample]) -> None:
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Basic " + auth}) as http:
        while not stop_at.is_set():
            sent = time.monotonic()
            try:
                status = http.post(
                    "/oauth2/token", data={"grant_type": "client_credentials"}
                ).status_code
            except httpx.HTTPError:
                status = 0
            samples.append(Sample(sent, time.monotonic() - sent, status))
            if status == 503:
                time.sleep(0.01)  # a polite client


def measure(url: str, auth: str, proxy: FaultProxy, mode: Literal["reset", "blackhole"]) -> Outage:
    samples: list[Sample] = []
    stop_at = threading.Event()
    threads = [
        threading.Thread(target=load, args=(url, auth, stop_at, samples)) for _ in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    time.sleep(BEFORE_CUT)
    proxy.cut(mode)
    cut = time.monotonic()
    time.sleep(OUTAGE[mode])
    proxy.restore()
    restored = time.monotonic()
    deadline = restored + 60
    while time.monotonic() < deadline and not any(
        s.status == 200 and s.sent >= restored for s in list(samples)
    ):
        time.sleep(0.05)
    stop_at.set()
    for thread in threads:
        thread.join(timeout=60)
    during = [s for s in samples if cut <= s.sent < restored]
    first_503 = min((s.sent + s.seconds for s in during if s.status == 503), default=restored)
    # Once the first 503 has been answered, the breaker has opened (or is about to): the
    # answers that follow are its fast ones, except the probes after each cooldown.
    outage = Outage(mode, to_first_503=first_503 - cut)
    outage.open_503s = [s.seconds for s in during if s.status == 503 and s.sent > first_503]
    after = [s for s in samples if s.sent >= restored and s.status == 200]
    outage.to_first_200 = (min(s.sent + s.seconds for s in after) - restored) if after else -1.0
    outage.other = sum(s.status not in (200, 503) for s in samples)
    return outage


def run() -> list[Outage]:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]  # the defaults served
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        workdir = Path(tmp)
        keys = workdir / "keys"
        KeyStore(keys).ensure()
        with database("postgresql", workdir) as direct:
            parsed = make_url(direct)
            proxy = FaultProxy(parsed.port or 5432, parsed.host or "127.0.0.1")
            proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(
                hide_password=False
            )
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = server_env(proxied, keys, url)
            cli(env, "migrate")
            created = json.loads(
                cli(
                    env,
                    *("clients", "create", "--client-id", "outage"),
                    *("--grant", "client_credentials", "--json"),
                )
            )
            auth = basic(created["client_id"], created["client_secret"])
            process = start(env, port, 1, workdir / "server.log")
            try:
                outages = [measure(url, auth, proxy, mode) for mode in ("reset", "blackhole")]
            finally:
                stop(process)
                proxy.close()
    for outage in outages:
        print(outage.line(), flush=True)
    write(outages, settings)
    return outages


def write(outages: list[Outage], settings: Settings) -> None:
    section = [
        BEGIN,
        "## Database outage (`bench/outage.py`)",
        "",
        f"One worker on PostgreSQL through a TCP fault proxy, {CLIENTS} clients sending "
        "client_credentials requests; the database goes away for "
        + " and ".join(f"{seconds:g} s ({mode})" for mode, seconds in OUTAGE.items())
        + f". Breaker: opens "
        f"after {settings.db_breaker_threshold} consecutive failures, probes every "
        f"{settings.db_breaker_cooldown:g} s; connect timeout {settings.db_connect_timeout:g} s, "
        f"statement timeout {settings.db_statement_timeout:g} s. The tests assert that these "
        "503s come from the open breaker without a connection attempt; here is how fast.",
        "",
        "| cut | to the first 503 | 503s while open | median | p99 | max | restore to first 200 "
        "| other answers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(outage.line() for outage in outages),
        "",
        "`reset`: connections reset and new ones refused (a crashed host, a failover). "
        "`blackhole`: nothing answers (a partitioned network): the requests in flight wait for "
        "the statement timeout, so the first 503 comes after it; then the breaker answers at "
        "once. The p99 and max include the requests that met a probe after each cooldown.",
        END,
    ]
    path = ARTIFACTS / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        text = before + "\n".join(section) + after
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    path.write_text(text)
    print(f"wrote the outage section of {path}")


if __name__ == "__main__":
    run()
