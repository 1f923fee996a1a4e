"""The README's main job: `hobbit-cli chat` with the default model, through hobbitd."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil

CLI = [sys.executable, "-m", "hobbit.compute.cli"]


def _hobbitd_children(pid: int) -> list:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if "hobbit.hobbitd.main" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def test_chat_starts_a_private_daemon_and_stops_it(default_moe, tmp_path):
    """No daemon running: chat starts a private one (and says so), answers through it, and
    leaves no daemon, socket or folder behind."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "HOBBIT_SOCKET"}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOBBIT_SOCKET="")
    proc = subprocess.Popen([*CLI, "chat", "--temperature", "0", "-n", "24"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate("What is the capital of France?\n/stats\n/quit\n", timeout=300)
    assert proc.returncode == 0, err
    assert "starting a private one" in err, err
    assert f"through hobbitd at {runtime}" in err, err
    assert default_moe in err
    assert "Paris" in out, out              # a real model answering, not noise
    assert "tok/s" in out + err             # /stats
    assert list(runtime.iterdir()) == [], "the private daemon's folder is removed"
    assert not _hobbitd_children(proc.pid)


def test_chat_with_an_explicit_socket_and_no_daemon_is_an_error(default_moe, tmp_path):
    env = {**os.environ, "HOBBIT_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run([*CLI, "chat"], env=env, input="hi\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "no hobbitd" in r.stderr.strip().splitlines()[-1], r.stderr
