"""The README's main job: `hobbit-cli chat` with the default model, through hobbitd."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def _hobbitd_children(pid: int) -> list:
    try:
        return [
            p for p in psutil.Process(pid).children(recursive=True) if "hobbit.hobbitd.main" in " ".join(p.cmdline())
        ]
    except psutil.NoSuchProcess:
        return []


def test_chat_starts_a_private_daemon_and_stops_it(default_moe, tmp_path):
    """No daemon running: chat starts a private one (and says so), answers through it, and
    leaves no daemon, socket or folder behind."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "HOBBIT_SOCKET"}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOBBIT_SOCKET="")
    proc = subprocess.Popen(
        [*CLI, "chat", "--temperature", "0", "-n", "24"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate("What is the capital of France?\n/stats\n/quit\n", timeout=300)
    assert proc.returncode == 0, err
    assert "starting a private one" in err, err
    assert f"through hobbitd at {runtime}" in err, err
    assert default_moe in err
    assert "Paris" in out, out  # a real model answering, not noise
    assert "tok/s" in out + err  # /stats
    assert list(runtime.iterdir()) == [], "the private daemon's folder is removed"
    assert not _hobbitd_children(proc.pid)


def test_chat_samples_through_hobbitd_what_it_samples_in_process(default_moe, tmp_path):
    """The first sampled answers (the model's recommended sampling, one seed) are
    the same through a private hobbitd as in-process: an uncalibrated model is served
    exactly, so nothing but the seed decides."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "HOBBIT_SOCKET"}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOBBIT_SOCKET="")
    talk = "What is the capital of France?\nAnd of Italy?\n/quit\n"
    outs, errs = [], []
    for where in ([], ["--no-daemon"]):
        r = subprocess.run(
            [*CLI, "chat", "--seed", "7", "-n", "32", *where],
            env=env,
            input=talk,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
        errs.append(r.stderr)
    assert "through hobbitd" in errs[0] and "through hobbitd" not in errs[1], errs
    assert len(outs[0].strip()) > 20 and outs[0] == outs[1], outs


def test_chat_with_an_explicit_socket_and_no_daemon_is_an_error(default_moe, tmp_path):
    env = {**os.environ, "HOBBIT_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run([*CLI, "chat"], env=env, input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "no hobbitd" in r.stderr.strip().splitlines()[-1], r.stderr


def test_chat_in_a_terminal_streams_stops_on_ctrl_c_and_quits(default_moe, tmp_path):
    """`hobbit-cli chat` on a pseudo-terminal as a person uses it: the answer streams, Ctrl-C
    (the terminal's own SIGINT to the foreground group) stops the answer but not the session,
    /stats answers, /quit exits 0 and the private daemon is gone."""
    import fcntl
    import pty
    import select
    import termios
    import time

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "HOBBIT_SOCKET"}
    env.update(XDG_RUNTIME_DIR=str(runtime), HOBBIT_SOCKET="", TERM="dumb")
    master, slave = pty.openpty()

    def controlling_terminal():  # a session of its own, the pty as its terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [*CLI, "chat", "--temperature", "0", "-n", "2000"],
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    seen = []

    def read_until(text: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while text not in "".join(seen):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, f"no {text!r} in: {''.join(seen)[-2000:]}"
            if select.select([master], [], [], 0.5)[0]:
                seen.append(os.read(master, 4096).decode(errors="replace"))
        out = "".join(seen)
        seen[:] = [out[out.index(text) + len(text) :]]
        return out[: out.index(text)]

    try:
        read_until("> ")
        os.write(master, b"Write a long story about a dragon who learns to bake bread.\n")
        read_until("\n")  # the echoed line
        deadline = time.monotonic() + 300
        while len("".join(seen)) < 80:  # the answer streams in
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            if select.select([master], [], [], 0.5)[0]:
                seen.append(os.read(master, 4096).decode(errors="replace"))
        os.write(master, b"\x03")  # Ctrl-C, typed
        read_until("[stopped]", 60)
        read_until("> ", 60)  # the session goes on
        os.write(master, b"/stats\n")
        assert "tok/s" in read_until("> ", 60)
        os.write(master, b"/quit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert list(runtime.iterdir()) == [], "the private daemon stopped with the session"
