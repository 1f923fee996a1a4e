"""The layers go one way (pyproject.toml's import-linter contracts), and the daemon side
loads nothing of the engine."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " 0 broken" in r.stdout or "broken" not in r.stdout, r.stdout[-3000:]


def test_the_daemon_loads_no_engine():
    code = (
        "import hobbit.hobbitd.server, hobbit.hobbitd.main, sys; "
        "print([m for m in sys.modules if m.startswith('hobbit.compute') or m == 'llama_cpp'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_no_import_cycle_between_modules():
    import grimp  # import-linter's graph library

    g = grimp.build_graph("hobbit.protocol", "hobbit.loader", "hobbit.hobbitd", "hobbit.compute")
    cycles = [
        (m, d)
        for m in g.modules
        for d in g.find_modules_directly_imported_by(m)
        if d in g.modules and g.chain_exists(importer=d, imported=m)
    ]
    assert cycles == []
