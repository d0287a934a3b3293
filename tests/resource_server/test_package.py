"""The kit is a package of its own: it never imports the token server (``server``), and its
distribution holds the kit and nothing else."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.feature("rs-kit-integration")

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "resource_server"
MODULES = sorted(
    "resource_server" if p.stem == "__init__" else f"resource_server.{p.stem}"
    for p in KIT.glob("*.py")
)


def test_the_kit_has_the_modules_expected() -> None:
    # The glob above finds the modules the other tests walk: a wrong ROOT would find none.
    for name in ("keys", "tokens", "challenges", "verifier", "dpop", "fastapi", "asgi"):
        assert f"resource_server.{name}" in MODULES


def _modules_after_importing(names: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter once ``names`` are imported (from this checkout)."""
    script = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def _server_modules(loaded: list[str]) -> list[str]:
    return [name for name in loaded if name == "server" or name.startswith("server.")]


def test_importing_every_kit_module_loads_nothing_of_the_server() -> None:
    loaded = _modules_after_importing([*MODULES, "resource_server.fastapi"])
    assert set(MODULES) <= set(loaded)
    assert _server_modules(loaded) == []


def test_the_import_check_would_see_the_server() -> None:
    # The check above can fail: importing one server module shows up in sys.modules.
    assert "server.config" in _server_modules(_modules_after_importing(["server.config"]))


def _server_imports(source: str) -> list[str]:
    """Imports of the token server in ``source``: ``import server…``, ``from server… import``,
    a relative import climbing out of the kit, or ``import_module("server…")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "server"]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.split(".")[0] == "server":
                found.append(module)
            elif node.level >= 2:
                found.append("." * node.level + module)
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.split(".")[0] == "server"
            ):
                found.append(first.value)
    return found


@pytest.mark.parametrize("path", sorted(KIT.glob("**/*.py")), ids=lambda p: p.name)
def test_no_kit_file_imports_the_server(path: Path) -> None:
    assert _server_imports(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import server",
        "import os, server.config as c",
        "from server import manage",
        "from server.keys import KeyStore",
        "from ..server import x",
        "from .. import server",
        "def f():\n    import server.db",
        "importlib.import_module('server.main')",
    ],
)
def test_the_static_check_sees_server_imports(source: str) -> None:
    assert _server_imports(source)


@pytest.mark.parametrize(
    "source",
    ["import serverless", "from .keys import KeyCache", "from . import errors", "x = 'server'"],
)
def test_the_static_check_lets_other_imports_be(source: str) -> None:
    assert _server_imports(source) == []


def test_the_distribution_depends_on_joserfc_and_httpx_only() -> None:
    kit = tomllib.loads((KIT / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert kit["name"] != server["name"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip() for d in kit["dependencies"]]
    assert sorted(names) == ["httpx", "joserfc"]
    extras = kit.get("optional-dependencies", {})
    assert all(server["name"] not in d for deps in extras.values() for d in deps)


def _copy_of_the_kit(tmp_path: Path) -> Path:
    """The kit's directory as a fresh source tree (a build writes into its source tree)."""
    source = tmp_path / "src"
    shutil.copytree(KIT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return source


def _check_files(files: list[str]) -> None:
    for module in ("__init__", "keys", "tokens", "challenges", "dpop", "verifier", "config"):
        assert f"resource_server/{module}.py" in files, files
    assert "resource_server/py.typed" in files
    outside = [f for f in files if not f.startswith(("resource_server/", "token_server_resource"))]
    assert outside == [], outside
    assert not [f for f in files if f.startswith("server/") or "/server/" in f]
    assert "resource_server/pyproject.toml" not in files


def test_built_package_holds_the_kit_and_nothing_of_the_server(tmp_path: Path) -> None:
    # setuptools' build_py: the files a wheel would hold (works with the venv's setuptools,
    # offline, in well under a second).
    source, out = _copy_of_the_kit(tmp_path), tmp_path / "lib"
    subprocess.run(
        [sys.executable, "-W", "ignore", "-c", "import setuptools; setuptools.setup()",
         "-q", "build_py", "-d", str(out)],
        cwd=source, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    _check_files(files)


def test_wheel_holds_the_kit_and_nothing_of_the_server(tmp_path: Path) -> None:
    source, out = _copy_of_the_kit(tmp_path), tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0 and "invalid command 'bdist_wheel'" in done.stdout + done.stderr:
        # setuptools < 70.1 needs the `wheel` package for bdist_wheel; the venv has neither a
        # newer setuptools nor `wheel` (the build requires setuptools>=69; an isolated build
        # would download it). test_built_package_... checks the same files meanwhile.
        pytest.skip("no bdist_wheel in this venv (setuptools < 70.1 without `wheel`)")
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = out.glob("token_server_resource-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        metadata = archive.read(
            next(f for f in files if f.endswith(".dist-info/METADATA"))
        ).decode()
    _check_files(files)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "token-server" in r or "token_server" in r]
