"""artifacts/benchmarks.md and artifacts/benchmarks.png from one ``make bench`` run."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
NOTES = Path(__file__).resolve().parent / "notes.md"
MAIN = ("postgresql", 2)


#: The heading of the absolute goals of issue 6; issue 17 replaced them by the ratios to
#: node-oidc-provider of the section after it.
GOALS_HEADING = (
    "## Absolute goals of issue 6 (PostgreSQL, 2 workers, 16 connections; "
    "issue 17 replaced them by the ratios below)"
)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _wrk_version() -> str:
    try:
        done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    except OSError:  # rewriting a report where wrk is not installed
        return "wrk (version unknown: not installed here)"
    output = done.stdout or done.stderr
    return output.splitlines()[0] if output else "wrk (version unknown)"


def _find(results: list[Any], scenario: str, backend: str, workers: int) -> Any:
    return next(
        r for r in results if (r.scenario, r.backend, r.workers) == (scenario, backend, workers)
    )


def goals(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    results = report["results"]
    floors = report["floors"]

    def main(scenario: str) -> Any:
        return _find(results, scenario, *MAIN)

    password = main("password")
    refresh = main("refresh")
    cc = main("client_credentials")
    sqlite_refresh = _find(results, "refresh", "sqlite", 1)
    argon2 = floors["argon2id verify"]
    memory = report["memory"]
    all_rss = [mb for values in memory.values() for mb in values]
    first, second = memory["postgresql-2-pass1"], memory["postgresql-2-pass2"]
    growth = max(b - a for a, b in zip(first, second, strict=False))
    healthz = report["healthz"]
    ratio = password.median("rps") / argon2
    return [
        (
            "password ≥ 85% of the argon2id floor",
            f"{password.median('rps'):.0f}/s = {ratio:.0%} of {argon2:.0f}/s",
            ratio >= 0.85,
        ),
        (
            "refresh chains ≥ 1,000/s, zero errors, p99 < 50 ms",
            f"{refresh.median('rps'):.0f}/s, {refresh.errors} errors, "
            f"p99 {refresh.median('p99_ms'):.1f} ms",
            refresh.median("rps") >= 1000 and refresh.errors == 0 and refresh.median("p99_ms") < 50,
        ),
        (
            "SQLite refresh chains ≥ 500/s, zero errors (1 worker)",
            f"{sqlite_refresh.median('rps'):.0f}/s, {sqlite_refresh.errors} errors",
            sqlite_refresh.median("rps") >= 500 and sqlite_refresh.errors == 0,
        ),
        (
            "client_credentials ≥ 2,500/s, p99 < 25 ms",
            f"{cc.median('rps'):.0f}/s, p99 {cc.median('p99_ms'):.1f} ms",
            cc.median("rps") >= 2500 and cc.median("p99_ms") < 25,
        ),
        (
            "JWKS ≥ 10,000/s",
            f"{main('jwks').median('rps'):.0f}/s",
            main("jwks").median("rps") >= 10_000,
        ),
        (
            "introspection ≥ 3,000/s",
            f"{main('introspection').median('rps'):.0f}/s",
            main("introspection").median("rps") >= 3000,
        ),
        (
            "/healthz p99 < 20 ms while password grants saturate both workers",
            f"p99 {healthz['p99_ms']:.1f} ms (p50 {healthz['p50_ms']:.1f} ms)",
            healthz["p99_ms"] < 20,
        ),
        (
            "≤ 150 MB RSS per worker after the whole run",
            f"largest {max(all_rss):.0f} MB",
            max(all_rss) <= 150,
        ),
        (
            "no memory growth between two identical passes",
            f"{first} MB → {second} MB",
            growth <= 2.0,
        ),
    ]


#: Ours against node-oidc-provider: (label, our scenario, our backend and workers, the peer's
#: scenario it is compared with, the least ratio, the p99 limit in ms, zero errors required).
AGAINST_PEER: list[tuple[str, str, tuple[str, int], str, float, float | None, bool]] = [
    ("client_credentials", "client_credentials", MAIN, "client_credentials", 1.0, 25, True),
    ("JWKS", "jwks", MAIN, "jwks", 1.5, None, False),
    ("refresh chains", "refresh", MAIN, "client_credentials", 0.5, 50, True),
    (
        "introspection of a live token",
        "introspection",
        MAIN,
        "client_credentials",
        1.0,
        None,
        False,
    ),
    (
        "refresh chains, SQLite 1 worker",
        "refresh",
        ("sqlite", 1),
        "client_credentials",
        0.25,
        None,
        True,
    ),
]


def _figures(result: Any) -> str:
    return (
        f"{result.median('rps'):,.0f}/s, p99 {result.median('p99_ms'):.1f} ms, "
        f"{result.errors} errors"
    )


def against_peer(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool | None]]:
    """Rows of the node-oidc-provider table: scenario, ours, the peer's, ratio, goal, met.

    ``met`` is None where either side was not measured (no peer in this run, or a subset).
    """
    peer = {r.scenario: r for r in (report.get("peer") or {}).get("results", [])}
    names = {"client_credentials": "client_credentials", "jwks": "JWKS"}
    rows: list[tuple[str, str, str, str, str, bool | None]] = []
    for label, scenario, (backend, workers), theirs, least, p99, no_errors in AGAINST_PEER:
        goal = f"≥ {least}× node's {names[theirs]}"
        goal += f", p99 < {p99:g} ms" if p99 is not None else ""
        goal += ", zero errors" if no_errors else ""
        ours = next(
            (
                r
                for r in report["results"]
                if (r.scenario, r.backend, r.workers) == (scenario, backend, workers)
            ),
            None,
        )
        node = peer.get(theirs)
        if ours is None or node is None:
            rows.append(
                (
                    label,
                    _figures(ours) if ours else "not measured",
                    _figures(node) if node else "not measured",
                    "–",
                    goal,
                    None,
                )
            )
            continue
        ratio = ours.median("rps") / node.median("rps")
        met = (
            ratio >= least
            and (p99 is None or ours.median("p99_ms") < p99)
            and (not no_errors or ours.errors == 0)
        )
        rows.append((label, _figures(ours), _figures(node), f"{ratio:.2f}×", goal, met))
    return rows


def peer_section(report: dict[str, Any]) -> list[str]:
    """The "Against node-oidc-provider (same run)" section of benchmarks.md."""
    peer = report.get("peer") or {}
    lines = ["## Against node-oidc-provider (same run)", ""]
    if "results" in peer:
        lines += [
            f"node-oidc-provider {peer['oidc_provider']} on node {peer['node']} "
            "(`bench/node/server.mjs`): its in-memory adapter, one `client_secret_basic` "
            "client, RS256 JWT access tokens for client_credentials (one token's signature "
            f"checked against its JWKS before the load), {peer['workers']} cluster workers "
            "like ours. Driven by the same wrk script, connections, warm-up and runs as our "
            "scenarios, in this run, before our servers started. The ratio is ours ÷ node's "
            "req/s; the p99 limits and error counts are ours.",
        ]
    else:
        reason = peer.get("reason", "no figures in this report")
        lines += [f"node-oidc-provider was not measured in this run: {reason}."]
    lines += [
        "",
        "| Scenario | Ours (PostgreSQL, 2 workers) | node-oidc-provider (2 workers) "
        "| Ratio | Goal | Met |",
        "|---|---|---|---:|---|---|",
    ]
    for label, ours, node, ratio, goal, met in against_peer(report):
        verdict = "not measured" if met is None else "yes" if met else "**no**"
        lines.append(f"| {label} | {ours} | {node} | {ratio} | {goal} | {verdict} |")
    return [*lines, ""]


def write(report: dict[str, Any], elapsed: float, settings: Settings) -> None:
    from .run import CONNECTIONS, DURATION, FLOOR_OF, RUNS, WARMUP

    results = report["results"]
    floors = report["floors"]

    def floor_for(result: Any) -> float:
        name = FLOOR_OF[result.scenario]
        if name == "ASGI hello":
            return float(floors[f"ASGI hello ({result.workers})"])
        return float(floors[name])

    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {datetime.date.today().isoformat()} "
        f"in {elapsed / 60:.1f} min.",
        "Figures are medians of the measured runs; nothing here is a test assertion.",
        "",
        "## Machine and settings",
        "",
        f"- CPU: {_cpu()}, {os.cpu_count()} cores; Python {platform.python_version()} on "
        f"{platform.system()} {platform.release()}",
        f"- uvicorn {version('uvicorn')}, FastAPI {version('fastapi')}, "
        f"Authlib {version('authlib')}, "
        f"SQLAlchemy {version('sqlalchemy')}, asyncpg {version('asyncpg')}, "
        f"joserfc {version('joserfc')}, {_wrk_version()}",
        f"- Load: wrk over loopback with keep-alive, {CONNECTIONS} connections (one per wrk "
        f"thread), warm-up {WARMUP:g} s discarded, then {RUNS} runs of {DURATION:g} s; "
        "wrk runs on the same 2 cores as the server.",
        "- Server: `python -m server serve --workers N`, logging at info to a file, rate limits "
        f"off, argon2id m={settings.argon2_memory_cost} KiB t={settings.argon2_time_cost} "
        f"p={settings.argon2_parallelism}, RSA-2048 keys, pool 10 + 10 per worker.",
        "- Refresh chains: each connection sends the refresh token its previous response "
        "returned; a non-200 breaks the chain and counts as an error.",
        "- Mixed: 35% client_credentials, 30% refresh (chained), 15% introspection, 15% JWKS, "
        "5% password.",
        "",
        "## Floors (same run, same cores)",
        "",
        "| Floor | per second |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {value:,.0f} |" for name, value in floors.items()]
    lines += [
        "",
        GOALS_HEADING,
        "",
        "| Goal | Measured | Met |",
        "|---|---|---|",
    ]
    lines += [
        f"| {goal} | {measured} | {'yes' if met else '**no**'} |"
        for goal, measured, met in goals(report)
    ]
    lines += ["", *peer_section(report)]
    lines += [
        "## Every scenario",
        "",
        "| Backend | Workers | Scenario | req/s | p50 ms | p99 ms | errors | floor | of floor |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        floor = floor_for(r)
        lines.append(
            f"| {r.backend} | {r.workers} | {r.scenario} | {r.median('rps'):,.0f} | "
            f"{r.median('p50_ms'):.1f} | {r.median('p99_ms'):.1f} | {r.errors} | "
            f"{FLOOR_OF[r.scenario]} | {r.median('rps') / floor:.0%} |"
        )
    lines += ["", "## Memory (RSS per worker, MB)", ""]
    lines += [f"- {name}: {values}" for name, values in report["memory"].items()]
    healthz = report["healthz"]
    lines += [
        "",
        "## /healthz while password grants saturate both workers",
        "",
        f"p50 {healthz['p50_ms']:.1f} ms, p99 {healthz['p99_ms']:.1f} ms, "
        f"{healthz['rps']:.0f} probes/s on one connection, {healthz['errors']} errors.",
        "",
    ]
    if NOTES.exists():
        lines += [NOTES.read_text().rstrip(), ""]
    (ARTIFACTS / "benchmarks.md").write_text("\n".join(lines))
    chart(results, floor_for)
    print("\n".join(lines[lines.index(GOALS_HEADING) :]))


def chart(results: list[Any], floor_for: Any) -> None:
    from .run import FLOOR_OF, SCENARIOS

    main = [
        next(r for r in results if (r.scenario, r.backend, r.workers) == (s, *MAIN))
        for s in SCENARIOS
    ]
    figure, axis = plt.subplots(figsize=(9, 4.8))
    positions = range(len(main))
    floors_values = [floor_for(r) for r in main]
    measured = [r.median("rps") for r in main]
    axis.barh(
        [p + 0.2 for p in positions],
        floors_values,
        height=0.4,
        color="#c8ccd4",
        label="floor (same run)",
    )
    axis.barh(
        [p - 0.2 for p in positions], measured, height=0.4, color="#2f6fdf", label="token server"
    )
    for p, r, value, floor in zip(positions, main, measured, floors_values, strict=True):
        axis.text(
            value * 1.05, p - 0.2, f"{value:,.0f}/s ({value / floor:.0%})", va="center", fontsize=8
        )
        axis.text(
            floor * 1.05, p + 0.2, FLOOR_OF[r.scenario], va="center", fontsize=7, color="#555"
        )
    axis.set_yticks(list(positions), [r.scenario for r in main])
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlim(10, max(floors_values + measured) * 12)
    axis.set_xlabel("requests per second (log scale)")
    axis.set_title(
        "Throughput per scenario against its floor — PostgreSQL, 2 workers, 16 connections",
        fontsize=10,
    )
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(ARTIFACTS / "benchmarks.png", dpi=110)
