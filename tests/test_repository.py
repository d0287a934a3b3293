"""The repository itself: SPEC.md's layout, the two commands, CI, and what git must never hold."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.feature("repo-layout")


def test_spec_layout_exists() -> None:
    for folder in ("server", "tests", "templates", "keys", "migrations", "artifacts"):
        assert (ROOT / folder).is_dir(), folder
    for name in (
        "pyproject.toml",
        ".env.example",
        "CLAUDE.md",
        "README.md",
        "Makefile",
        ".ci/run",
        "artifacts/auth-implement/features.json",
        "artifacts/auth-implement/implementation.md",
    ):
        assert (ROOT / name).is_file(), name


def test_authlib_is_imported_only_by_the_oauth_package() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "server").rglob("*.py")
        if "oauth" not in path.parts
        and re.search(r"^\s*(from|import) authlib", path.read_text(), re.M)
    ]
    assert offenders == []


def recorder(directory: Path, name: str, log: Path, status: int = 0) -> None:
    """An executable ``directory/name`` that appends its argv, working directory and AUTH_*
    environment to ``log`` as one JSON line, then exits with ``status``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as log:\n"
        "    env = {k: v for k, v in os.environ.items() if k.startswith('AUTH_')}\n"
        "    call = {'argv': sys.argv, 'cwd': os.getcwd(), 'env': env}\n"
        "    log.write(json.dumps(call) + '\\n')\n"
        f"sys.exit({status})\n"
    )
    script.chmod(0o755)


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def make_with_recorders(directory: Path, failing: str = "") -> tuple[list[str], Path]:
    """``make`` arguments that point the Makefile at a virtualenv of recorders (python, ruff,
    mypy; the one named ``failing`` exits 1) whose install stamp is up to date, and the log
    they write: the targets run for real, their commands are recorded instead of executed."""
    venv, log = directory / "venv", directory / "calls.jsonl"
    for name in ("python", "ruff", "mypy"):
        recorder(venv / "bin", name, log, int(name == failing))
    stamp = directory / "stamp"
    stamp.touch()
    future = (ROOT / "pyproject.toml").stat().st_mtime + 3600
    os.utime(stamp, (future, future))
    return ["make", "-C", str(ROOT), f"VENV={venv}", f"STAMP={stamp}"], log


@pytest.fixture
def fake_venv(tmp_path: Path) -> tuple[list[str], Path]:
    return make_with_recorders(tmp_path)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.feature("make-run")
def test_make_run_migrates_seeds_and_serves_on_the_chosen_port(
    fake_venv: tuple[list[str], Path],
) -> None:
    make, log = fake_venv
    done = subprocess.run([*make, "run", "PORT=8123"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    run = calls(log)
    assert [call["argv"][1:] for call in run] == [
        ["-m", "server", "migrate"],
        ["-m", "server", "seed-demo"],
        ["-m", "server", "serve", "--port", "8123"],
    ]
    for call in run:  # the issuer follows the port, in every step
        assert call["env"]["AUTH_ISSUER"] == "http://127.0.0.1:8123"
        assert Path(call["cwd"]) == ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_runs_the_suite_with_branch_coverage_and_its_floor(
    fake_venv: tuple[list[str], Path],
) -> None:
    make, log = fake_venv
    done = subprocess.run([*make, "test"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = calls(log)
    args = call["argv"][1:]
    assert args[:2] == ["-m", "pytest"]
    assert {"--cov=server", "--cov-branch"} <= set(args), args
    floors = [int(a.split("=", 1)[1]) for a in args if a.startswith("--cov-fail-under=")]
    assert floors and floors[0] >= 95, args  # CLAUDE.md: fails below 95%


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_and_lint_fail_when_their_tools_fail(tmp_path: Path) -> None:
    for target, tool in [("test", "python"), ("lint", "ruff"), ("lint", "mypy")]:
        make, _ = make_with_recorders(tmp_path / f"{target}-{tool}", failing=tool)
        done = subprocess.run([*make, target], capture_output=True, check=False)
        assert done.returncode != 0, (target, tool)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lint_checks_style_formatting_and_types(fake_venv: tuple[list[str], Path]) -> None:
    make, log = fake_venv
    done = subprocess.run([*make, "lint"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    run = [(Path(call["argv"][0]).name, call["argv"][1:]) for call in calls(log)]
    assert [tool for tool, _ in run] == ["ruff", "ruff", "mypy"]
    assert run[0][1][0] == "check" and "server" in run[0][1] and "tests" in run[0][1]
    assert run[1][1][:2] == ["format", "--check"]


def test_ci_runs_make_test_with_every_optional_dependency_required(tmp_path: Path) -> None:
    """.ci/run, with make, chromium and nginx replaced by recorders: it runs `make test` at
    the repository root with PostgreSQL, the browser, Redis and nginx required (a missing
    one fails instead of skipping), and fails when the suite fails."""
    log = tmp_path / "calls.jsonl"
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    for name in ("chromium", "nginx"):
        recorder(tmp_path / "bin", name, log)
    recorder(tmp_path / "bin", "make", log)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")} | {"PATH": path}
    done = subprocess.run([str(ROOT / ".ci/run")], env=env, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    (call,) = calls(log)  # neither chromium nor nginx is run, nor installed: both are there
    assert Path(call["argv"][0]).name == "make"
    assert call["argv"][1:] == ["test"]
    assert Path(call["cwd"]) == ROOT
    required = {
        "AUTH_TEST_REQUIRE_POSTGRES": "1",
        "AUTH_TEST_REQUIRE_BROWSER": "1",
        "AUTH_TEST_REQUIRE_REDIS": "1",
        "AUTH_TEST_REQUIRE_NGINX": "1",
    }
    assert required.items() <= call["env"].items(), call["env"]
    recorder(tmp_path / "bin", "make", log, status=2)  # the suite fails: so does CI
    failed = subprocess.run([str(ROOT / ".ci/run")], env=env, capture_output=True, check=False)
    assert failed.returncode == 2


def test_env_example_names_every_setting() -> None:
    from server.config import Settings

    example = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        assert f"AUTH_{name.upper()}" in example, name


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("keys/abc.pem", True),
        ("keys/keys.json", True),
        ("keys/README.md", False),
        (".venv/bin/python", True),
        ("data/auth.db", True),
        (".env", True),
        ("server/main.py", False),
    ],
)
def test_gitignore_keeps_secrets_out(path: str, ignored: bool) -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, check=False
    )
    assert (result.returncode == 0) is ignored, path


def _server_imports() -> dict[str, set[str]]:
    """Module → the modules of ``server/`` it imports (``TYPE_CHECKING`` imports included)."""
    paths = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / "server").rglob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: ``.`` is the package, ``..`` its parent
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, node.module] if node.module else parts)
                else:
                    base = node.module or ""
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in graph} - {name}
    return graph


@pytest.mark.feature("repo-layout")
def test_server_has_no_import_cycle() -> None:
    """ARCHITECTURE.md: modules depend one way (a type-only import counts too)."""
    graph = _server_imports()
    assert graph["server.oauth.server"] >= {"server.oauth.grants", "server.oauth.endpoints"}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for step in graph[todo.pop()] - seen:
                if step == goal:
                    return True
                seen.add(step)
                todo.append(step)
        return False

    cycles = sorted(name for name in graph if reaches(name, name))
    assert cycles == []
