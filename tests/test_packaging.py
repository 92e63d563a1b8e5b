"""The package as pip builds it: `serve/` is `raylib.serve`, every package folder ships, and
nothing of ours needs a sys.path edit to be found."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO


def _packages() -> dict[str, str]:
    """{package: folder} of the project's sources (folders with an __init__.py)."""
    found = {}
    for top, pkg in (("raylib", "raylib"), ("serve", "raylib.serve")):
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(root, os.path.join(REPO, top))
                found[pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")] = root
    return found


def test_pyproject_lists_every_package_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools_cfg = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    assert sorted(setuptools_cfg["packages"]) == sorted(_packages())
    assert setuptools_cfg["package-dir"]["raylib.serve"] == "serve"


def test_the_built_wheel_holds_raylib_serve_and_imports_from_it(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), REPO],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("raylib-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (target / "raylib" / "serve" / "app.py").is_file()
    assert not (target / "serve").exists(), "serve/ must ship as raylib.serve, not as a top-level package"
    code = "import raylib.serve.app as a, raylib.serve.engine as e; print(a.__file__); print(e.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(line.startswith(str(target)) for line in proc.stdout.split()), proc.stdout


def test_no_source_file_edits_sys_path():
    """The package is installed (pip install -e . / the cluster image) and Ray puts a job's
    working_dir on PYTHONPATH itself: a sys.path edit would hide a packaging bug."""
    offenders = []
    for folder in ("raylib", "serve", "jobs", "tests"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py") and name != os.path.basename(__file__):
                    text = open(os.path.join(root, name)).read()
                    if re.search(r"sys\.path\.(insert|append)|sys\.path\[:\]\s*=", text):
                        offenders.append(os.path.relpath(os.path.join(root, name), REPO))
    assert offenders == []
