"""`hobbit-cli top` and the per-client counts behind it, against a real hobbitd."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from daemon_util import run_daemon

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def _stats(socket: str) -> dict:
    r = subprocess.run([*CLI, "stats", "--json", "--socket", socket], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_top_shows_occupancy_rates_and_each_clients_tokens(default_moe, tmp_path):
    """A chat answers one question and stays connected; hobbitd counts exactly its decoded
    and prompt tokens, and top lists it by name with the cache's occupancy."""
    with run_daemon([default_moe], 24 << 20, tmp_path) as d:
        chat = subprocess.Popen(
            [*CLI, "chat", default_moe, "--socket", d.socket, "--temperature", "0", "-n", "12"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            chat.stdin.write("Name three fruits.\n/stats\n")
            chat.stdin.flush()
            deadline, stats_line = time.monotonic() + 120, ""
            while "last answer" not in stats_line and time.monotonic() < deadline:
                stats_line = chat.stderr.readline()
                assert stats_line or chat.poll() is None, "chat exited early"
            new, prompt = map(int, re.search(r"last answer: (\d+) tokens.*prompt (\d+) new", stats_line).groups())
            sessions = [
                s for s in _stats(d.socket)["sessions"] if s["name"] == "cli.py chat" or s["name"] == "hobbit-cli chat"
            ]
            assert len(sessions) == 1, _stats(d.socket)["sessions"]
            s = sessions[0]
            assert s["pid"] == chat.pid
            assert (s["tokens"], s["prompt_tokens"]) == (new, prompt)
            assert s["hits"] + s["misses"] + s["skipped"] == s["experts"] > 0

            top = subprocess.run(
                [*CLI, "top", "--socket", d.socket, "--count", "2", "--interval", "0.5"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert top.returncode == 0, top.stderr
            frames = top.stdout.split("\n--- ")
            assert len(frames) == 2, top.stdout
            last = frames[-1]
            assert re.search(r"high \[#+\.*\]\s+\d+/\d+\s+slots", last), last
            assert re.search(r"experts\s+[\d.]+/s\s+hit", last) and "prefetch" in last, last
            # the default model is not calibrated: served exactly, and top says so
            assert "exact: high precision only (not calibrated)" in last, last
            row = next(line for line in last.splitlines() if line.split()[:1] == [str(chat.pid)])
            assert "hobbit-cli chat" in row and row.split()[-2] == str(new), row
        finally:
            chat.stdin.close()
            chat.wait(60)
        assert chat.returncode == 0


def test_top_without_a_daemon_is_a_one_line_error(tmp_path):
    r = subprocess.run(
        [*CLI, "top", "--socket", str(tmp_path / "none.sock"), "-n", "1"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("hobbit-cli: error: no hobbitd socket"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
