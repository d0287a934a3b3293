"""Write DIR/test-results.md from DIR/features.json and DIR/pytest-output.txt.

Run after ``pytest --report-dir DIR`` (tests/report_plugin.py) whose console output was saved to
DIR/pytest-output.txt::

    python -m tests.report_md artifacts/auth-test

The file's sections, by these names: Test Results (counts, wall time, the slowest tests), Tests
Written (test files and functions per catalogued feature), Issues Found (the maintained list in
tests/issues_found.md, then what this run found), Test Execution Output (the console output).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from tests.report_plugin import MUST_BE_TESTED, Report, ReportedFeature, ResultEntry, ResultRef

#: The bugs and regressions found while testing, kept by hand: what they were, and whether fixed.
ISSUES_FOUND = Path(__file__).resolve().parent / "issues_found.md"
SLOWEST = 30
BACKENDS = ("sqlite", "postgresql")


def one_line(text: str) -> str:
    return " ".join(text.split())


def cell(text: str) -> str:
    """Text for a table cell: one line, and a ``|`` of the text does not end the cell."""
    return one_line(text).replace("|", "\\|")


def code(text: str) -> str:
    return f"`{one_line(text)}`"


def fenced(text: str) -> list[str]:
    # The fence is longer than any backtick run in the text, so the text cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}text", text.rstrip("\n"), fence]


def _test_line(test: ResultRef) -> str:
    line = f"- {test['outcome']}: {code(test['nodeid'])}"
    return f"{line}: {one_line(test['reason'])}" if test["reason"] else line


def _features_table(features: list[ReportedFeature]) -> list[str]:
    lines = [
        "| Feature | Status | Tested | Tests | Passed |",
        "|---|---|---|---:|---:|",
    ]
    for feature in features:
        passed = sum(t["outcome"] == "passed" for t in feature["tests"])
        tested = "yes" if feature["tested"] else "no"
        lines.append(
            f"| {cell(code(feature['id']))} | {feature['status']} | {tested} "
            f"| {len(feature['tests'])} | {passed} |"
        )
    return lines


def _this_run(report: Report) -> list[str]:
    lines: list[str] = []
    broken = [t for t in report["tests"] if t["outcome"] in ("failed", "error")]
    if broken:
        lines += ["#### Failed tests and errors", ""]
        lines += [_test_line(test) for test in broken]
        lines.append("")
    untested = [f for f in report["features"] if f["status"] in MUST_BE_TESTED and not f["tested"]]
    if untested:
        lines += ["#### Implemented or partial features without a passing test", ""]
        for feature in untested:
            count = len(feature["tests"])
            why = f"{count} test(s), none passed" if count else "no test"
            lines.append(f"- {code(feature['id'])} ({feature['status']}): {why}")
        lines.append("")
    if report["uncatalogued"]:
        lines += ["#### Feature ids used by tests but not in the catalogue", ""]
        for fid, nodeids in report["uncatalogued"].items():
            lines.append(f"- {code(fid)}: {', '.join(code(n) for n in nodeids)}")
        lines.append("")
    return lines or ["Nothing: every test passed and every implemented feature is tested.", ""]


def backend_of(nodeid: str) -> str | None:
    """The database a test ran on, from its parameter id (``[sqlite]``, ``[postgresql-…]``)."""
    params = nodeid.partition("[")[2].rstrip("]").split("-")
    found = [backend for backend in BACKENDS if backend in params]
    return found[0] if len(found) == 1 else None


def _results(report: Report) -> list[str]:
    summary = report["summary"]
    tests = report["tests"]
    per_backend = {
        backend: sum(backend_of(t["nodeid"]) == backend for t in tests) for backend in BACKENDS
    }
    minutes, seconds = divmod(round(report["wall_seconds"]), 60)
    workers = report["workers"]
    how = f"{workers} pytest-xdist workers" if workers else "one pytest process"
    lines = [
        "| Passed | Failed | Skipped | Errors | Total |",
        "|---:|---:|---:|---:|---:|",
        f"| {summary['passed']} | {summary['failed']} | {summary['skipped']} "
        f"| {summary['errors']} | {summary['total']} |",
        "",
        f"Wall time: **{minutes} min {seconds:02d} s** ({report['wall_seconds']:.1f} s, collection "
        f"included, {how}). Tests per database: "
        + ", ".join(f"{count} on {backend}" for backend, count in per_backend.items())
        + f", {len(tests) - sum(per_backend.values())} on neither or on their own.",
        "",
        f"### The {SLOWEST} slowest tests",
        "",
        "Setup, call and teardown; with several workers they overlap.",
        "",
        "| Seconds | Test |",
        "|---:|---|",
    ]
    slowest: list[ResultEntry] = sorted(tests, key=lambda t: -t["seconds"])[:SLOWEST]
    lines += [f"| {t['seconds']:.2f} | {cell(code(t['nodeid']))} |" for t in slowest]
    return lines


def render(report: Report, pytest_output: str, issues_found: str) -> str:
    lines = [
        "# Test results",
        "",
        f"Generated {report['generated_at']} from the pytest run below "
        "(`make report`: pytest with `--report-dir`, then `python -m tests.report_md`).",
        "",
        "## Test Results",
        "",
        *_results(report),
        "",
        "## Tests Written",
        "",
        "Each catalogued feature (artifacts/auth-implement/features.json) and the tests carrying "
        "its marker. A feature is tested when at least one of them passed.",
        "",
        *_features_table(report["features"]),
        "",
    ]
    for feature in report["features"]:
        lines += [
            f"### {code(feature['id'])}: {one_line(feature['description'])}",
            "",
            f"Status: {feature['status']} (SPEC.md: {feature['spec']}).",
            "",
        ]
        lines += [_test_line(test) for test in feature["tests"]] or ["No test."]
        lines.append("")
    skipped = [t for t in report["tests"] if t["outcome"] == "skipped"]
    lines += ["### Skipped tests", ""]
    lines += [_test_line(test) for test in skipped] or ["None."]
    lines += [
        "",
        "## Issues Found",
        "",
        "The bugs and regressions testing found, kept in `tests/issues_found.md`:",
        "",
        issues_found.strip(),
        "",
        "### In this run",
        "",
        *_this_run(report),
    ]
    lines += ["## Test Execution Output", "", *fenced(pytest_output), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.report_md",
        description="Write DIR/test-results.md from DIR/features.json and DIR/pytest-output.txt.",
    )
    parser.add_argument("report_dir", type=Path)
    report_dir: Path = parser.parse_args(argv).report_dir
    features_path = report_dir / "features.json"
    output_path = report_dir / "pytest-output.txt"
    missing = [str(path) for path in (features_path, output_path) if not path.is_file()]
    if missing:
        print(f"report_md: missing {', '.join(missing)}; run `make report`", file=sys.stderr)
        return 1
    report = cast(Report, json.loads(features_path.read_text(encoding="utf-8")))
    # pytest output may hold undecodable bytes from a test; they must not stop the report.
    output = output_path.read_text(encoding="utf-8", errors="replace")
    target = report_dir / "test-results.md"
    issues_found = ISSUES_FOUND.read_text(encoding="utf-8")
    target.write_text(render(report, output, issues_found), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
