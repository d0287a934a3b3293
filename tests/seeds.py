"""Seeds of the randomised tests (Hypothesis, and schemathesis through it): shown on every
run, and any run replayed with the seed it showed.

A randomised test calls ``run_seeded(request, check, default=...)`` with its
``@given``-decorated ``check`` (or ``seed_for`` once, then ``run_with`` for each of several
``@given`` runs, as the schemathesis test does: one seed for all of them). The seed is
``AUTH_TEST_SEED`` if set, else ``--hypothesis-seed`` if that is a number, else the test's
``default`` (a fixed number keeps the test deterministic), else a fresh random one. It is

- recorded as the test's ``seed`` and ``seed_origin`` properties (``user_properties``: junit
  XML, and they travel from pytest-xdist workers with the reports);
- listed from those at the end of the terminal report, under "seeds of the randomised tests"
  (each test's seed and where it came from, then how to replay one). This module is the
  plugin that prints it: it registers itself when first used; under pytest-xdist it must be
  loaded in the controlling process (``-p tests.seeds``, or ``pytest_plugins`` in
  tests/conftest.py), since the workers' own summaries are not shown;
- appended to the failure of the test as a note, with the command that replays it.

Replay: ``AUTH_TEST_SEED=<seed> .venv/bin/python -m pytest '<node id>'``. The same seed
gives the same examples (the Hypothesis example database is off in these tests, so nothing
but the seed decides what runs), on the same Hypothesis version.
"""

from __future__ import annotations

import os
import random
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

import hypothesis
import pytest

ENV = "AUTH_TEST_SEED"
PLUGIN = "tests.seeds"


@dataclass(frozen=True)
class Seeded:
    nodeid: str
    seed: int
    origin: str  # where the seed came from

    @property
    def replay(self) -> str:
        return f"{ENV}={self.seed} .venv/bin/python -m pytest {shlex.quote(self.nodeid)}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The seeds of this run, read from the test reports (so pytest-xdist workers' tests are
    listed too when this module is loaded as a plugin in the controlling process)."""
    seen: dict[str, tuple[object, object]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            properties = dict(getattr(report, "user_properties", ()))
            if getattr(report, "when", None) == "call" and "seed" in properties:
                seen[report.nodeid] = (properties["seed"], properties.get("seed_origin"))
    if not seen:
        return
    terminalreporter.section("seeds of the randomised tests")
    for nodeid, (seed, origin) in sorted(seen.items()):
        terminalreporter.write_line(f"{nodeid}: seed {seed} ({origin})")
    terminalreporter.write_line(f"replay one: {ENV}=<seed> .venv/bin/python -m pytest <id>")


def choose(config: pytest.Config, default: int | None) -> tuple[int, str]:
    """The seed for this run and where it came from."""
    value = os.environ.get(ENV, "").strip()
    if value:
        return int(value), ENV
    option = config.getoption("hypothesis_seed", None)
    if isinstance(option, str) and option.strip().lstrip("-").isdigit():
        return int(option), "--hypothesis-seed"
    if default is not None:
        return default, "the test's fixed default"
    return random.SystemRandom().randrange(2**32), "random"


def seed_for(request: pytest.FixtureRequest, *, default: int | None = None) -> Seeded:
    """The seed of this test, chosen (``choose``) and reported: as the ``seed`` and
    ``seed_origin`` properties, which the summary section reads. Without pytest-xdist this
    module registers itself as the plugin that prints it, if nothing loaded it yet."""
    seed, origin = choose(request.config, default)
    plugins = request.config.pluginmanager
    module = sys.modules[__name__]
    if not plugins.is_registered(module):
        plugins.register(module, PLUGIN)
    request.node.user_properties += [("seed", seed), ("seed_origin", origin)]
    return Seeded(request.node.nodeid, seed, origin)


def run_with(seeded: Seeded, check: Callable[[], None]) -> None:
    """Run the ``@given`` test ``check`` with ``seeded``'s seed; a failure carries a note with
    the seed and the command that replays it."""
    try:
        hypothesis.seed(seeded.seed)(check)()
    except BaseException as exc:
        exc.add_note(f"Seed {seeded.seed} ({seeded.origin}); replay: {seeded.replay}")
        raise


def run_seeded(
    request: pytest.FixtureRequest, check: Callable[[], None], *, default: int | None = None
) -> Seeded:
    """``seed_for`` then ``run_with``: one ``@given`` test, its seed reported."""
    seeded = seed_for(request, default=default)
    run_with(seeded, check)
    return seeded
