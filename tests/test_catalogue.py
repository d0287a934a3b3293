"""The feature catalogue, the tests' feature markers and the report tooling agree.

SPEC (artifacts/): a test fails when a catalogued feature has no test. The markers are read from
the source of every test file with ``ast`` rather than from a collection run, so the check sees
the whole suite even when only this file runs.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests import report_md
from tests.report_plugin import (
    CATALOGUE_PATH,
    MUST_BE_TESTED,
    STATUSES,
    Catalogue,
    ItemResult,
    Report,
    build_report,
    load_catalogue,
)

ROOT = CATALOGUE_PATH.parents[2]
TESTS_DIR = ROOT / "tests"

pytestmark = pytest.mark.feature("feature-report")


@dataclass
class MarkerScan:
    uses: dict[str, list[str]] = field(default_factory=dict)  # feature id -> "file:line" list
    unreadable: list[str] = field(default_factory=list)  # markers whose ids are not literals


def _is_feature_marker(node: ast.expr) -> bool:
    """``pytest.mark.feature``, the one spelling the scan recognises."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "feature"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "pytest"
    )


def scan_markers(paths: Iterable[Path], root: Path) -> MarkerScan:
    # Every call is visited, so decorators, ``pytestmark = ...`` (single or list), class
    # attributes and ``pytest.param(..., marks=...)`` are all found without special cases.
    scan = MarkerScan()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_feature_marker(node.func)):
                continue
            where = f"{path.relative_to(root)}:{node.lineno}"
            literal = [
                arg.value
                for arg in node.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ]
            if not node.args or node.keywords or len(literal) != len(node.args):
                scan.unreadable.append(where)
            for fid in literal:
                scan.uses.setdefault(fid, []).append(where)
    return scan


def suite_markers() -> MarkerScan:
    return scan_markers(sorted(TESTS_DIR.rglob("*.py")), ROOT)


def test_catalogue_is_well_formed() -> None:
    catalogue = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))
    assert isinstance(catalogue, dict)
    assert isinstance(catalogue.get("features"), list)
    assert catalogue["features"], "the catalogue lists no feature"
    problems: list[str] = []
    seen: set[str] = set()
    for index, feature in enumerate(catalogue["features"]):
        fid = feature.get("id") if isinstance(feature, dict) else None
        name = fid if isinstance(fid, str) and fid else f"features[{index}]"
        if not isinstance(feature, dict) or set(feature) != {"id", "description", "status", "spec"}:
            problems.append(f"{name}: keys must be exactly id, description, status, spec")
            continue
        if not isinstance(fid, str) or not fid:
            problems.append(f"{name}: id must be a non-empty string")
        elif fid in seen:
            problems.append(f"{name}: duplicate id")
        else:
            seen.add(fid)
        if feature["status"] not in STATUSES:
            problems.append(f"{name}: status {feature['status']!r} not in {STATUSES}")
        description = feature["description"]
        if not isinstance(description, str) or not description.strip() or "\n" in description:
            problems.append(f"{name}: description must be one non-empty line")
        if not isinstance(feature["spec"], str) or not feature["spec"].strip():
            problems.append(f"{name}: spec must name a SPEC.md section")
    assert not problems, "invalid catalogue entries:\n" + "\n".join(problems)


def test_every_implemented_or_partial_feature_has_a_test() -> None:
    uses = suite_markers().uses
    untested = [
        f"{feature['id']} ({feature['status']})"
        for feature in load_catalogue()["features"]
        if feature["status"] in MUST_BE_TESTED and feature["id"] not in uses
    ]
    assert not untested, (
        f"{len(untested)} catalogued feature(s) marked implemented or partial have no test; "
        "add @pytest.mark.feature(<id>) to a test covering each, or correct its status in "
        f"{CATALOGUE_PATH.relative_to(ROOT)}:\n  " + "\n  ".join(untested)
    )


def test_every_marked_feature_is_catalogued() -> None:
    known = {feature["id"] for feature in load_catalogue()["features"]}
    unknown = {fid: where for fid, where in suite_markers().uses.items() if fid not in known}
    assert not unknown, "feature ids used in markers but not in the catalogue:\n" + "\n".join(
        f"  {fid}: {', '.join(where)}" for fid, where in sorted(unknown.items())
    )


def test_feature_markers_name_literal_ids() -> None:
    # Only string literals can be checked by the scan above; anything else would hide a test.
    unreadable = suite_markers().unreadable
    assert not unreadable, (
        "pytest.mark.feature(...) must take one or more string literals, here it does not:\n  "
        + "\n  ".join(unreadable)
    )


def test_scan_finds_every_marker_form(tmp_path: Path) -> None:
    source = tmp_path / "test_forms.py"
    source.write_text(
        "import pytest\n"
        "pytestmark = [pytest.mark.feature('module-a'), pytest.mark.slow]\n"
        "@pytest.mark.feature('deco-a', 'deco-b')\n"
        "def test_one(): ...\n"
        "class TestGroup:\n"
        "    pytestmark = pytest.mark.feature('class-a')\n"
        "@pytest.mark.parametrize('x', [pytest.param(1, marks=pytest.mark.feature('param-a'))])\n"
        "def test_two(x): ...\n"
        "IDS = ('dynamic',)\n"
        "@pytest.mark.feature(*IDS)\n"
        "def test_three(): ...\n",
        encoding="utf-8",
    )
    scan = scan_markers([source], tmp_path)
    assert set(scan.uses) == {"module-a", "deco-a", "deco-b", "class-a", "param-a"}
    assert scan.uses["deco-a"] == ["test_forms.py:3"]
    assert scan.unreadable == ["test_forms.py:10"]


def _catalogue() -> Catalogue:
    return {
        "features": [
            {"id": "a", "description": "Feature A", "status": "implemented", "spec": "Tokens"},
            {"id": "b", "description": "Feature B", "status": "partial", "spec": "Keys"},
            {"id": "c", "description": "Feature C", "status": "missing", "spec": "Errors"},
        ]
    }


def _report() -> Report:
    results = [
        ItemResult("t.py::test_a[sqlite-1]", ("a",), seconds=0.25),
        ItemResult("t.py::test_a[postgresql-2]", ("a", "b"), "failed", "assert 1 == 2", 1.5),
        ItemResult("t.py::test_b", ("b", "typo"), "skipped", "no PostgreSQL | here"),
        ItemResult("t.py", (), "error", "ImportError: boom"),
    ]
    return build_report(
        _catalogue(),
        results,
        datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        wall_seconds=421.06,
        workers=2,
    )


def test_build_report_marks_features_tested_by_a_passing_test() -> None:
    report = _report()
    assert report["summary"] == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1, "total": 4}
    assert report["generated_at"] == "2025-01-02T03:04:05+00:00"
    assert (report["wall_seconds"], report["workers"]) == (421.06, 2)
    tested = {f["id"]: (f["tested"], [t["nodeid"] for t in f["tests"]]) for f in report["features"]}
    assert tested == {
        "a": (True, ["t.py::test_a[sqlite-1]", "t.py::test_a[postgresql-2]"]),
        "b": (False, ["t.py::test_a[postgresql-2]", "t.py::test_b"]),
        "c": (False, []),
    }
    assert report["uncatalogued"] == {"typo": ["t.py::test_b"]}


@pytest.mark.parametrize(
    ("nodeid", "backend"),
    [
        ("t.py::test[sqlite]", "sqlite"),
        ("t.py::test[postgresql-basic]", "postgresql"),
        ("t.py::test[x-sqlite-3]", "sqlite"),
        ("t.py::test", None),
        ("t.py::test[sqlite_file]", None),
        ("t.py::test[sqlite-postgresql]", None),
    ],
)
def test_the_backend_of_a_test_comes_from_its_parameter_id(
    nodeid: str, backend: str | None
) -> None:
    assert report_md.backend_of(nodeid) == backend


def test_report_md_writes_its_four_sections(tmp_path: Path) -> None:
    (tmp_path / "features.json").write_text(json.dumps(_report()), encoding="utf-8")
    (tmp_path / "pytest-output.txt").write_text("==== 1 passed ====\n```\n", encoding="utf-8")
    assert report_md.main([str(tmp_path)]) == 0
    markdown = (tmp_path / "test-results.md").read_text(encoding="utf-8")
    headings = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Test Results",
        "## Tests Written",
        "## Issues Found",
        "## Test Execution Output",
    ]
    results = markdown.split("## Test Results")[1].split("## Tests Written")[0]
    assert "| 1 | 1 | 1 | 1 | 4 |" in results
    assert "Wall time: **7 min 01 s** (421.1 s, collection included, 2 pytest-xdist workers)" in (
        results
    )
    assert "1 on sqlite, 1 on postgresql, 2 on neither" in results
    slowest = results.split("slowest tests")[1].splitlines()
    rows = [line for line in slowest if line.startswith("| ") and "`" in line]
    assert rows[:2] == [
        "| 1.50 | `t.py::test_a[postgresql-2]` |",
        "| 0.25 | `t.py::test_a[sqlite-1]` |",
    ]
    assert "| `a` | implemented | yes | 2 | 1 |" in markdown
    assert "| `b` | partial | no | 2 | 0 |" in markdown
    assert "- skipped: `t.py::test_b`: no PostgreSQL | here" in markdown
    issues = markdown.split("## Issues Found")[1].split("## Test Execution Output")[0]
    # The maintained list, then what this run found.
    assert report_md.ISSUES_FOUND.read_text(encoding="utf-8").strip() in issues
    this_run = issues.split("### In this run")[1]
    assert "- failed: `t.py::test_a[postgresql-2]`: assert 1 == 2" in this_run
    assert "- error: `t.py`: ImportError: boom" in this_run
    assert "- `b` (partial): 2 test(s), none passed" in this_run
    assert "- `typo`: `t.py::test_b`" in this_run
    # The output's own ``` must not close the block that holds it.
    assert markdown.endswith("````text\n==== 1 passed ====\n```\n````\n")


def test_report_md_fails_without_its_inputs(tmp_path: Path) -> None:
    assert report_md.main([str(tmp_path)]) != 0
    assert not (tmp_path / "test-results.md").exists()


FAKE_SUITE = """
import pytest

pytestmark = pytest.mark.feature("health")

@pytest.mark.feature("discovery")
@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    assert n == 1

class TestGroup:
    pytestmark = [pytest.mark.feature("jwks-endpoint")]

    def test_skipped(self):
        pytest.skip("no database here")

@pytest.fixture
def broken():
    raise RuntimeError("boom")

def test_setup_error(broken):
    pass
"""


@pytest.mark.parametrize(
    "workers", [[], ["-p", "xdist.plugin", "-n", "2"]], ids=["one-process", "xdist"]
)
def test_plugin_records_outcomes_and_markers(tmp_path: Path, workers: list[str]) -> None:
    (tmp_path / "test_fake.py").write_text(FAKE_SUITE, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    # Only the plugins named below: loading every installed one took 10x the run itself.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # A separate pytest process: the plugin hooks only run in a real session. It imports
    # tests.report_plugin from the repository root, its working directory.
    options = ["-q", "-p", "tests.report_plugin", "-p", "no:cacheprovider"]
    isolation = ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path)]
    run = [*workers, "--report-dir", str(tmp_path / "out"), str(tmp_path / "test_fake.py")]
    command = [sys.executable, "-m", "pytest", *options, *isolation, *run]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    written_path = tmp_path / "out" / "features.json"
    assert written_path.is_file(), done.stdout + done.stderr
    written = json.loads(written_path.read_text(encoding="utf-8"))
    outcomes = {t["nodeid"]: (t["outcome"], t["reason"]) for t in written["tests"]}
    assert outcomes == {
        "test_fake.py::test_param[1]": ("passed", None),
        "test_fake.py::test_param[2]": ("failed", "assert 2 == 1"),
        "test_fake.py::TestGroup::test_skipped": ("skipped", "no database here"),
        "test_fake.py::test_setup_error": ("error", "RuntimeError: boom"),
    }
    assert written["summary"] == {"passed": 1, "failed": 1, "skipped": 1, "errors": 1, "total": 4}
    features = {f["id"]: f for f in written["features"]}
    assert features["discovery"]["tested"] is True
    assert len(features["discovery"]["tests"]) == 2
    assert len(features["health"]["tests"]) == 4  # the module's pytestmark reaches every test
    assert features["jwks-endpoint"]["tested"] is False
    assert features["jwks-endpoint"]["tests"][0]["outcome"] == "skipped"
    assert written["workers"] == (2 if workers else 0)
    assert written["wall_seconds"] > 0
