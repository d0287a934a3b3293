"""The repository itself: SPEC.md's layout, the two commands, CI, and what git must never hold."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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


@pytest.mark.feature("make-run")
def test_makefile_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test", "lint", "report"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "--cov-fail-under=95" in makefile
    assert "--cov-branch" in makefile
    assert "$(PORT)" in makefile


def test_ci_requires_postgresql() -> None:
    script = (ROOT / ".ci/run").read_text()
    assert "AUTH_TEST_REQUIRE_POSTGRES=1" in script
    assert "make test" in script


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
