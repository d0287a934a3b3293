"""The benchmark harness's own logic (bench/): its verdicts and its report, not performance.

Performance figures come from ``make bench`` only; these tests check that the harness judges
and writes what it measured correctly, from synthetic runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.run import ALL_SCENARIOS, Result, Run, Seeded
from server.config import Settings

pytestmark = pytest.mark.feature("benchmarks")


def result(
    scenario: str, backend: str, workers: int, rps: float, p99: float = 5.0, errors: int = 0
) -> Result:
    made = Result(scenario, backend, workers)
    made.runs = [
        Run(rps=rps * f, p50_ms=1.0, p99_ms=p99, errors=errors, broken=0) for f in (0.9, 1.0, 1.1)
    ]
    return made


def synthetic(**overrides: float) -> dict[str, Any]:
    rps = {
        "password": 90,
        "refresh": 1200,
        "client_credentials": 3000,
        "jwks": 12000,
        "introspection": 3500,
        "mixed": 2000,
    } | overrides
    results = [
        result(s, b, w, rps[s])
        for b, w in (("postgresql", 2), ("sqlite", 1))
        for s in ALL_SCENARIOS
    ]
    return {
        "results": results,
        "floors": {
            "argon2id verify": 100.0,
            "RS256 sign": 8000.0,
            "ASGI hello (1)": 30000.0,
            "ASGI hello (2)": 35000.0,
        },
        "memory": {"postgresql-2-pass1": [120.0, 121.0], "postgresql-2-pass2": [120.5, 121.2]},
        "healthz": {"p50_ms": 1.0, "p99_ms": 9.0, "rps": 500.0, "errors": 0},
    }


def test_the_median_of_the_measured_runs_is_reported() -> None:
    assert result("jwks", "postgresql", 2, 1000).median("rps") == pytest.approx(1000)


def test_every_goal_is_met_by_figures_above_it() -> None:
    verdicts = report.goals(synthetic())
    assert len(verdicts) == 9
    assert all(met for _, _, met in verdicts), verdicts


@pytest.mark.parametrize(
    ("overrides", "failing"),
    [
        ({"password": 84}, "password ≥ 85% of the argon2id floor"),
        ({"refresh": 999}, "refresh chains ≥ 1,000/s, zero errors, p99 < 50 ms"),
        ({"client_credentials": 2499}, "client_credentials ≥ 2,500/s, p99 < 25 ms"),
        ({"jwks": 9999}, "JWKS ≥ 10,000/s"),
        ({"introspection": 2999}, "introspection ≥ 3,000/s"),
    ],
)
def test_a_figure_below_its_goal_is_reported_as_not_met(
    overrides: dict[str, float], failing: str
) -> None:
    verdicts = {goal: met for goal, _, met in report.goals(synthetic(**overrides))}
    assert verdicts[failing] is False
    assert sum(not met for met in verdicts.values()) == 1


def test_a_broken_chain_fails_the_refresh_goal_however_fast() -> None:
    data = synthetic()
    refresh = next(
        r for r in data["results"] if (r.scenario, r.backend) == ("refresh", "postgresql")
    )
    refresh.runs[0].errors = 1
    verdicts = {goal: met for goal, _, met in report.goals(data)}
    assert verdicts["refresh chains ≥ 1,000/s, zero errors, p99 < 50 ms"] is False


def test_memory_growth_between_passes_is_reported() -> None:
    data = synthetic()
    data["memory"]["postgresql-2-pass2"] = [130.0, 121.0]
    verdicts = {goal: met for goal, _, met in report.goals(data)}
    assert verdicts["no memory growth between two identical passes"] is False


@pytest.mark.parametrize("wrk_installed", [True, False], ids=["wrk", "no-wrk"])
def test_the_report_and_chart_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrk_installed: bool
) -> None:
    monkeypatch.setattr(report, "ARTIFACTS", tmp_path)
    if not wrk_installed:  # the report names wrk's version; it must not need wrk to be written
        monkeypatch.setenv("PATH", str(tmp_path))
    report.write(synthetic(jwks=9000), 300.0, Settings(_env_file=None))  # type: ignore[call-arg]
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "| JWKS ≥ 10,000/s | 9000/s | **no** |" in markdown
    assert "| postgresql | 2 | password | 90 |" in markdown
    assert (tmp_path / "benchmarks.png").read_bytes().startswith(b"\x89PNG")


def test_each_scenario_sends_what_its_script_expects(tmp_path: Path) -> None:
    seeded = Seeded("http://x", "YXBwOnM=", "Y2M6cw==", "cnM6cw==", "eyJ.a.b", tmp_path / "t")
    assert seeded.scenario_args("client_credentials") == (
        "static",
        ["POST", "/oauth2/token", "Y2M6cw==", "grant_type=client_credentials"],
    )
    assert seeded.scenario_args("jwks")[1][:2] == ["GET", "/.well-known/jwks.json"]
    script, args = seeded.scenario_args("refresh")
    assert script == "refresh" and args[0] == str(tmp_path / "t")
    script, args = seeded.scenario_args("mixed")
    assert script == "mixed" and len(args) == 8
    for scenario in ALL_SCENARIOS:
        script, _ = seeded.scenario_args(scenario)
        assert (report.ROOT / "bench" / "wrk" / f"{script}.lua").exists()
