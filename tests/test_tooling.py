"""Lint, format and types are checked by tools, configured in pyproject.toml so that the same
bare commands in the repo root check what the suite does: `ruff check .`, `ruff format
--check .` and `mypy`. And no module grows past MAX_LINES lines."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's tools, not whatever is on PATH
MAX_LINES = 500
FOLDERS = ("protocol", "loader", "hobbitd", "compute", "tests")


def _passes(tool: str, *args: str, fix: str = "") -> None:
    r = subprocess.run([os.path.join(BIN, tool), *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"`{' '.join((tool, *args))}` failed{fix}:\n{r.stdout[-6000:]}{r.stderr[-2000:]}"


def test_ruff_finds_nothing():
    _passes("ruff", "check", "--no-cache", ".")


def test_the_code_is_formatted():
    _passes("ruff", "format", "--check", "--no-cache", ".", fix=" (`ruff format .` fixes it)")


def test_mypy_finds_nothing():
    _passes("mypy")


def test_no_module_is_over_500_lines():
    over = []
    for folder in FOLDERS:
        for dirpath, dirnames, names in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        n = sum(1 for _ in f)
                    if n > MAX_LINES:
                        over.append(f"{os.path.relpath(path, ROOT)} ({n})")
    assert not over, f"over {MAX_LINES} lines: " + ", ".join(sorted(over))
