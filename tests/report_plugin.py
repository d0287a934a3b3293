"""pytest plugin: the ``feature`` marker and the feature report written by ``make report``.

``@pytest.mark.feature("refresh-rotation", "grant-refresh")`` names the features of the catalogue
(artifacts/auth-implement/features.json) that a test covers; on a class or in a module's
``pytestmark`` it covers every test below. With ``--report-dir DIR`` the plugin writes
``DIR/features.json``: the catalogue with, on each feature, the tests carrying it and their
outcomes and ``tested`` (at least one of them passed), plus the counts of the run.
tests/report_md.py turns that file into test-results.md.

Load it with ``-p tests.report_plugin`` from the repository root. With pytest-xdist each worker
puts a test's feature ids on its reports (``user_properties``), which travel to the controller;
only the controller writes the report. The report also holds the run's wall time and each
test's duration (setup, call and teardown), for the slowest-tests table.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import takewhile
from pathlib import Path
from typing import Final, Literal, TypedDict, cast

import pytest

CATALOGUE_PATH: Final = (
    Path(__file__).resolve().parent.parent / "artifacts" / "auth-implement" / "features.json"
)
STATUSES: Final = ("implemented", "partial", "missing")
# A feature with one of these statuses must carry at least one test (SPEC: artifacts/).
MUST_BE_TESTED: Final = ("implemented", "partial")
REASON_LENGTH: Final = 300
MARKER_HELP: Final = (
    "feature(*ids): the catalogued features (artifacts/auth-implement/features.json) a test covers"
)

Status = Literal["implemented", "partial", "missing"]
Outcome = Literal["passed", "failed", "skipped", "error"]


class Feature(TypedDict):
    id: str
    description: str
    status: Status
    spec: str


class Catalogue(TypedDict):
    features: list[Feature]


class ResultRef(TypedDict):
    """One test as listed under a feature."""

    nodeid: str
    outcome: Outcome
    reason: str | None  # skip reason, or the error line of a failure; None when passed
    seconds: float  # setup, call and teardown


class ResultEntry(ResultRef):
    """One test (or collection error) of the run, with the features it carries."""

    features: list[str]


class ReportedFeature(Feature):
    tested: bool
    tests: list[ResultRef]


class Summary(TypedDict):
    passed: int
    failed: int
    skipped: int
    errors: int
    total: int


class Report(TypedDict):
    generated_at: str
    #: From the start of the session (collection included) to its end, in the controller.
    wall_seconds: float
    #: Worker processes (pytest-xdist ``-n``); 0 when the tests ran in the pytest process.
    workers: int
    summary: Summary
    features: list[ReportedFeature]
    tests: list[ResultEntry]
    # Feature ids used by markers but absent from the catalogue, with the tests using them.
    uncatalogued: dict[str, list[str]]


@dataclass
class ItemResult:
    nodeid: str
    features: tuple[str, ...] = ()
    outcome: Outcome = "passed"
    reason: str | None = None
    seconds: float = 0.0


def load_catalogue(path: Path = CATALOGUE_PATH) -> Catalogue:
    # Its shape is checked by tests/test_catalogue.py, not at every load.
    return cast(Catalogue, json.loads(path.read_text(encoding="utf-8")))


def feature_ids(item: pytest.Item) -> tuple[str, ...]:
    """The ids of every ``feature`` marker on the item, its class and its module, once each."""
    return tuple(
        dict.fromkeys(str(fid) for marker in item.iter_markers("feature") for fid in marker.args)
    )


def build_report(
    catalogue: Catalogue,
    results: Sequence[ItemResult],
    generated_at: datetime,
    *,
    wall_seconds: float = 0.0,
    workers: int = 0,
) -> Report:
    known = {feature["id"] for feature in catalogue["features"]}
    by_feature: dict[str, list[ResultRef]] = {}
    uncatalogued: dict[str, list[str]] = {}
    for result in results:
        ref = ResultRef(
            nodeid=result.nodeid,
            outcome=result.outcome,
            reason=result.reason,
            seconds=round(result.seconds, 3),
        )
        for fid in result.features:
            by_feature.setdefault(fid, []).append(ref)
            if fid not in known:
                uncatalogued.setdefault(fid, []).append(result.nodeid)
    features = [
        ReportedFeature(
            id=feature["id"],
            description=feature["description"],
            status=feature["status"],
            spec=feature["spec"],
            tested=any(t["outcome"] == "passed" for t in by_feature.get(feature["id"], [])),
            tests=by_feature.get(feature["id"], []),
        )
        for feature in catalogue["features"]
    ]
    counts = Counter(result.outcome for result in results)
    return Report(
        generated_at=generated_at.isoformat(timespec="seconds"),
        wall_seconds=round(wall_seconds, 3),
        workers=workers,
        summary=Summary(
            passed=counts["passed"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            errors=counts["error"],
            total=len(results),
        ),
        features=features,
        tests=[
            ResultEntry(
                nodeid=r.nodeid,
                outcome=r.outcome,
                reason=r.reason,
                seconds=round(r.seconds, 3),
                features=list(r.features),
            )
            for r in results
        ],
        uncatalogued=uncatalogued,
    )


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return f"xfail: {wasxfail}" if wasxfail else "xfail"
    if isinstance(report.longrepr, tuple):  # (path, lineno, "Skipped: reason") for skips
        return report.longrepr[2].removeprefix("Skipped: ")
    return report.longreprtext.strip()


def _failure_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The first ``E`` block of the traceback (the exception or failed assertion), on one line.

    Cut at REASON_LENGTH: the report lists it next to the test, the full text stays in the
    pytest output.
    """
    lines = report.longreprtext.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("E ")), None)
    if start is None:  # no traceback, e.g. a strict XPASS: its one-line message
        block = [line for line in lines if line.strip()][-1:]
    else:
        block = list(takewhile(lambda line: line.startswith("E "), lines[start:]))
    reason = " ".join(" ".join(line.removeprefix("E ").split()) for line in block)
    return reason if len(reason) <= REASON_LENGTH else reason[: REASON_LENGTH - 1] + "…"


FEATURES_PROPERTY: Final = "features"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Put the item's feature ids on each of its reports. Read at every phase rather than at
    collection, so markers that fixtures add (request.applymarker) count too; carried in
    ``user_properties``, which pytest-xdist sends from its workers to the controller."""
    report = yield
    report.user_properties = [
        *(prop for prop in report.user_properties if prop[0] != FEATURES_PROPERTY),
        (FEATURES_PROPERTY, list(feature_ids(item))),
    ]
    return report


class FeatureReport:
    """Records one result per test item and per failed or skipped collector, then writes it."""

    def __init__(self, report_dir: Path, catalogue: Catalogue, workers: int) -> None:
        self.report_dir = report_dir
        self.catalogue = catalogue
        self.workers = workers
        self.results: dict[str, ItemResult] = {}
        self.started = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = self.results.setdefault(report.nodeid, ItemResult(report.nodeid))
        features = dict(report.user_properties).get(FEATURES_PROPERTY)
        if features is not None:
            result.features = tuple(features)
        result.seconds += report.duration
        if report.skipped:
            result.outcome, result.reason = "skipped", _skip_reason(report)
        elif report.failed and report.when == "call":
            result.outcome, result.reason = "failed", _failure_reason(report)
        elif report.failed and result.outcome != "failed":
            # A setup or teardown failure makes the test an error (pytest lists it under errors),
            # unless the test itself already failed.
            result.outcome, result.reason = "error", _failure_reason(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # A module that fails to import (or skips itself) hides its tests: record it as one entry
        # so the report shows it, as pytest's own summary does.
        if report.failed:
            self.results[report.nodeid] = ItemResult(
                report.nodeid, outcome="error", reason=_failure_reason(report)
            )
        elif report.skipped:
            self.results[report.nodeid] = ItemResult(
                report.nodeid, outcome="skipped", reason=_skip_reason(report)
            )

    def pytest_sessionfinish(self) -> None:
        report = build_report(
            self.catalogue,
            list(self.results.values()),
            datetime.now(UTC),
            wall_seconds=time.monotonic() - self.started,
            workers=self.workers,
        )
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / "features.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--report-dir",
        metavar="DIR",
        default=None,
        help="write DIR/features.json: the feature catalogue with the tests covering each feature",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    report_dir: str | None = config.getoption("report_dir")
    if report_dir is None or hasattr(config, "workerinput"):
        return  # an xdist worker: its reports reach the controller, which writes the report
    try:
        catalogue = load_catalogue()
    except (OSError, ValueError) as exc:
        # Fail before running the suite rather than after it, when the report cannot be written.
        raise pytest.UsageError(f"--report-dir: cannot read {CATALOGUE_PATH}: {exc}") from exc
    numprocesses = getattr(config.option, "numprocesses", 0)
    workers = numprocesses if isinstance(numprocesses, int) else 0
    config.pluginmanager.register(
        FeatureReport(Path(report_dir), catalogue, workers), "feature-report"
    )
