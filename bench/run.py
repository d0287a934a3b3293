"""``make bench``: real uvicorn processes under wrk, against floors measured in the same run.

For each backend (PostgreSQL, SQLite) and worker count (2, 1) the harness migrates a fresh
database, seeds clients and a user, starts ``python -m server serve --workers N`` (info logging
to a file, rate limits off) and drives it from wrk over loopback with keep-alive: one warm-up
run, then ``RUNS`` measured runs per scenario, the median reported. PostgreSQL with 2 workers
(the goals' setting) runs the whole scenario set twice, to compare memory after each pass,
and once more under password load to time ``/healthz``.

Before our servers, node-oidc-provider (bench/peer.py, bench/node/server.mjs) runs with as many
workers as the main mode, and its client_credentials and JWKS are measured the same way, so the
report can set ours beside a peer measured in the same run (``BENCH_PEER=0`` skips it).

Writes artifacts/benchmarks.md and artifacts/benchmarks.png and prints the table.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from server.config import Settings
from server.keys import KeyStore

from . import floors, peer
from .processes import free_port, stop, wait_for
from .report import MAIN, against_peer, write

ROOT = Path(__file__).resolve().parent.parent
WRK_DIR = Path(__file__).resolve().parent / "wrk"
ARTIFACTS = ROOT / "artifacts"
PG_ADMIN_URL = os.environ.get(
    "AUTH_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
DURATION = float(os.environ.get("BENCH_DURATION", "3"))
WARMUP = float(os.environ.get("BENCH_WARMUP", "2"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
PASSWORD = "bench passphrase 4 load"
#: (backend, workers); BENCH_MODES=postgresql-2,sqlite-1 runs a subset (no report is written).
MODES = [
    (name, int(workers))
    for name, workers in (
        mode.rsplit("-", 1)
        for mode in os.environ.get(
            "BENCH_MODES", "postgresql-2,postgresql-1,sqlite-1,sqlite-2"
        ).split(",")
    )
]
ALL_SCENARIOS = ["password", "refresh", "client_credentials", "jwks", "introspection", "mixed"]
#: BENCH_SCENARIOS=password,jwks and BENCH_SERVER_ENV="AUTH_X=1 AUTH_Y=2" are for exploring.
SCENARIOS = os.environ.get("BENCH_SCENARIOS", ",".join(ALL_SCENARIOS)).split(",")
EXTRA_ENV = dict(item.split("=", 1) for item in os.environ.get("BENCH_SERVER_ENV", "").split())
#: node-oidc-provider is measured in every run, subsets too; BENCH_PEER=0 skips it.
PEER = os.environ.get("BENCH_PEER", "1") != "0"
#: Each scenario is compared with the floor that bounds it.
FLOOR_OF = {
    "password": "argon2id verify",
    "refresh": "RS256 sign",
    "client_credentials": "RS256 sign",
    "jwks": "ASGI hello",
    "introspection": "ASGI hello",
    "mixed": "ASGI hello",
}


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    broken: int


@dataclass
class Result:
    scenario: str
    backend: str
    workers: int
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return float(statistics.median(getattr(run, attribute) for run in self.runs))

    @property
    def errors(self) -> int:
        return sum(run.errors for run in self.runs)

    @property
    def broken(self) -> int:
        return sum(run.broken for run in self.runs)


# -- processes --------------------------------------------------------------------------------


def worker_rss_mb(process: subprocess.Popen[bytes]) -> list[float]:
    """RSS of each uvicorn worker (the children), or of the one process without workers."""
    parent = psutil.Process(process.pid)
    children = [c for c in parent.children() if "resource_tracker" not in " ".join(c.cmdline())]
    workers = children or [parent]
    return [round(p.memory_info().rss / 2**20, 1) for p in workers]


def cli(env: dict[str, str], *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-m", "server", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"`server {' '.join(args)}` failed: {done.stderr}")
    return done.stdout


# -- wrk ----------------------------------------------------------------------------------------


def wrk(url: str, script: str, args: list[str], duration: float, connections: int) -> Run:
    """One wrk run; the scenario script is appended to common.lua (setup and done())."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write((WRK_DIR / "common.lua").read_text())
        lua.write((WRK_DIR / f"{script}.lua").read_text())
    command = [
        "wrk",
        f"-t{connections}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        lua.name,
        url,
        "--",
        *args,
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(lua.name)
    line = next(line for line in output.splitlines() if line.startswith("JSON "))
    data = json.loads(line[5:])
    errors = sum(data[k] for k in ("connect", "read", "write", "timeout", "status"))
    return Run(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        broken=data["broken"],
    )


def basic(client_id: str, secret: str) -> str:
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@dataclass
class Seeded:
    url: str
    app: str  # base64 client_id:secret of the password + refresh client
    cc: str
    rs: str
    access_token: str
    tokens_file: Path

    def fresh_chains(self, count: int) -> None:
        """``count`` new sign-ins (refresh tokens), written one per line for refresh.lua."""

        async def sign_in(http: httpx.AsyncClient) -> str:
            response = await http.post(
                "/oauth2/token",
                data={"grant_type": "password", "username": "bench", "password": PASSWORD},
                headers={"Authorization": "Basic " + self.app},
            )
            response.raise_for_status()
            token: str = response.json()["refresh_token"]
            return token

        async def all_of() -> list[str]:
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
                return list(await asyncio.gather(*(sign_in(http) for _ in range(count))))

        self.tokens_file.write_text("\n".join(asyncio.run(all_of())) + "\n")

    def scenario_args(self, scenario: str) -> tuple[str, list[str]]:
        if scenario == "password":
            body = f"grant_type=password&username=bench&password={PASSWORD.replace(' ', '+')}"
            return "static", ["POST", "/oauth2/token", self.app, body]
        if scenario == "client_credentials":
            return "static", ["POST", "/oauth2/token", self.cc, "grant_type=client_credentials"]
        if scenario == "jwks":
            return "static", ["GET", "/.well-known/jwks.json", "-", "-"]
        if scenario == "introspection":
            return "static", ["POST", "/oauth2/introspect", self.rs, "token=" + self.access_token]
        if scenario == "refresh":
            return "refresh", [str(self.tokens_file), self.app, str(CONNECTIONS)]
        password = PASSWORD.replace(" ", "+")
        return "mixed", [
            str(self.tokens_file),
            self.app,
            self.cc,
            self.rs,
            self.access_token,
            "bench",
            password,
            str(CONNECTIONS),
        ]


def seed(url: str, env: dict[str, str], workdir: Path) -> Seeded:
    def client(*args: str) -> str:
        created = json.loads(cli(env, "clients", "create", *args, "--json"))
        return basic(created["client_id"], created["client_secret"])

    app = client(
        "--client-id",
        "bench-app",
        "--grant",
        "password",
        "--grant",
        "refresh_token",
        "--scope",
        "api",
    )
    cc = client("--client-id", "bench-cc", "--grant", "client_credentials", "--scope", "api")
    rs = client("--client-id", "bench-rs", "--resource-server")
    cli(env, "users", "create", "--username", "bench", "--password-stdin", stdin=PASSWORD)
    issued = httpx.post(
        url + "/oauth2/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": "Basic " + cc},
        timeout=30,
    )
    issued.raise_for_status()
    return Seeded(url, app, cc, rs, issued.json()["access_token"], workdir / "tokens.txt")


# -- databases ----------------------------------------------------------------------------------


async def _pg(sql: str) -> None:
    engine = create_async_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(sql))
    finally:
        await engine.dispose()


@contextmanager
def database(backend: str, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"tokenserver_bench_{uuid.uuid4().hex[:10]}"  # ours: created and dropped here only
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def server_env(database_url: str, keys: Path, issuer: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AUTH_")},
        "AUTH_ENV": "development",
        "AUTH_DATABASE_URL": database_url,
        "AUTH_KEYS_DIR": str(keys),
        "AUTH_ISSUER": issuer,
        "AUTH_LOG_LEVEL": "info",
        "AUTH_RATE_LIMITS_ENABLED": "false",  # limits are measured by their own tests
        **EXTRA_ENV,
    }


def start(env: dict[str, str], port: int, workers: int, log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m server serve`` on ``port``, logging to ``log_path``, once it is ready."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "server", "serve"),
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", process, log_path)
    except BaseException:
        stop(process)
        raise
    return process


@contextmanager
def serving(
    backend: str, workers: int, workdir: Path, keys: Path
) -> Iterator[tuple[Seeded, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with database(backend, workdir) as database_url:
        env = server_env(database_url, keys, url)
        cli(env, "migrate")
        process = start(env, port, workers, workdir / f"server-{backend}-{workers}.log")
        try:
            yield seed(url, env, workdir), process
        finally:
            stop(process)


class Target(Protocol):
    """What ``measure`` drives: our seeded server, or the peer (bench/peer.py)."""

    url: str

    def scenario_args(self, scenario: str) -> tuple[str, list[str]]: ...


def measure(target: Target, scenario: str, backend: str, workers: int) -> Result:
    result = Result(scenario, backend, workers)
    script, args = target.scenario_args(scenario)
    for index in range(RUNS + 1):  # run 0 is the warm-up, discarded
        if script in ("refresh", "mixed"):
            assert isinstance(target, Seeded)
            target.fresh_chains(CONNECTIONS * 3)  # a chain per connection, two spares each
        run = wrk(target.url, script, args, WARMUP if index == 0 else DURATION, CONNECTIONS)
        if index:
            result.runs.append(run)
    print(
        f"  {scenario:<19} {result.median('rps'):>9.0f}/s  p50 {result.median('p50_ms'):7.1f} ms"
        f"  p99 {result.median('p99_ms'):7.1f} ms  errors {result.errors}",
        flush=True,
    )
    return result


def healthz_under_password_load(seeded: Seeded) -> Run:
    """/healthz on one connection while 16 connections saturate the workers with argon2."""
    script, args = seeded.scenario_args("password")
    seconds = DURATION * 2
    with ThreadPoolExecutor(max_workers=1) as pool:
        load = pool.submit(wrk, seeded.url, script, args, seconds, CONNECTIONS)
        time.sleep(0.5)
        probe = wrk(seeded.url, "static", ["GET", "/healthz", "-", "-"], seconds - 1, 1)
        load.result()
    return probe


def hello_floor(workers: int, workdir: Path) -> Run:
    port = free_port()
    log_path = workdir / f"hello-{workers}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.hello:app",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--log-level",
                "info",
                "--no-access-log",
                "--no-server-header",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/", process, log_path)
        wrk(url, "static", ["GET", "/", "-", "-"], WARMUP, CONNECTIONS)
        runs = [
            wrk(url, "static", ["GET", "/", "-", "-"], DURATION, CONNECTIONS) for _ in range(RUNS)
        ]
    finally:
        stop(process)
    return sorted(runs, key=lambda run: run.rps)[len(runs) // 2]


def measure_peer(workdir: Path) -> dict[str, Any]:
    """node-oidc-provider's client_credentials and JWKS, with as many workers as our main mode.

    Returns its versions and results, or the reason it was not measured.
    """
    if not PEER:
        print("node-oidc-provider: not measured (BENCH_PEER=0)", flush=True)
        return {"reason": "skipped (BENCH_PEER=0)"}
    workers = MAIN[1]
    try:
        with peer.serving(workdir, workers) as node:
            print(
                f"node-oidc-provider {node.oidc_provider} on node {node.node}, {workers} workers, "
                f"{CONNECTIONS} connections",
                flush=True,
            )
            results = [measure(node, s, "node-oidc-provider", workers) for s in peer.SCENARIOS]
    except peer.PeerUnavailable as error:
        print(f"node-oidc-provider: not measured ({error})", flush=True)
        return {"reason": str(error)}
    return {
        "node": node.node,
        "oidc_provider": node.oidc_provider,
        "workers": workers,
        "results": results,
    }


# -- the run ------------------------------------------------------------------------------------


def main() -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make bench installs it with apt-get)")
    started = time.monotonic()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]  # the default argon2 parameters
    report: dict[str, Any] = {
        "results": [],
        "floors": {},
        "memory": {},
        "healthz": {},
        "peer": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        keys = workdir / "keys"
        KeyStore(keys).ensure()
        cores = os.cpu_count() or 1
        print(f"floors on {cores} cores", flush=True)
        floors_found = {
            "argon2id verify": floors.argon2_per_second(settings, cores),
            "RS256 sign": floors.rs256_per_second(keys, cores, "raw"),
            "RS256 sign (KeySet.sign, whole JWT)": floors.rs256_per_second(keys, cores, "jwt"),
        }
        hello = {w: hello_floor(w, workdir) for w in (1, 2)}
        for name, value in floors_found.items():
            print(f"  {name:<36} {value:>9.0f}/s", flush=True)
        for w, run in hello.items():
            print(f"  ASGI hello, {w} worker(s)               {run.rps:>9.0f}/s", flush=True)
        report["floors"] = {
            **floors_found,
            **{f"ASGI hello ({w})": r.rps for w, r in hello.items()},
        }
        report["peer"] = measure_peer(workdir)

        for backend, workers in MODES:
            print(f"{backend}, {workers} worker(s), {CONNECTIONS} connections", flush=True)
            with serving(backend, workers, workdir, keys) as (seeded, process):
                passes = 2 if (backend, workers) == ("postgresql", 2) and len(MODES) > 1 else 1
                for number in range(passes):
                    results = [measure(seeded, s, backend, workers) for s in SCENARIOS]
                    rss = worker_rss_mb(process)
                    report["memory"][f"{backend}-{workers}-pass{number + 1}"] = rss
                    print(f"  RSS per worker after pass {number + 1}: {rss} MB", flush=True)
                    if number == 0:
                        report["results"].extend(results)
                if (backend, workers) == ("postgresql", 2) and "password" in SCENARIOS:
                    probe = healthz_under_password_load(seeded)
                    report["healthz"] = {
                        "p50_ms": probe.p50_ms,
                        "p99_ms": probe.p99_ms,
                        "rps": probe.rps,
                        "errors": probe.errors,
                    }
                    print(f"  /healthz under password load: p99 {probe.p99_ms:.1f} ms", flush=True)
        elapsed = time.monotonic() - started
    for label, _, _, ratio, goal, met in against_peer(report):
        if met is not None:  # both sides measured in this run
            print(f"  ours ÷ node-oidc-provider, {label}: {ratio} (goal {goal})", flush=True)
    if {"BENCH_MODES", "BENCH_SCENARIOS", "BENCH_SERVER_ENV"} & set(os.environ):
        print(f"subset of modes: no report written ({elapsed:.0f} s)")
        return 0
    write(report, elapsed, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
