"""hobbitd as a process: start, refuse, clean up, time out dead clients, stop on signals."""

from __future__ import annotations

import glob
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from daemon_util import SYNTH, call, connect, daemon_args, hello, recv, release, request, run_daemon, send, stats
from hobbit.protocol import messages as m


def model_name(path) -> str:
    return os.path.basename(path)[: -len(".gguf")]


def run_failing(args, timeout=60):
    """Run hobbitd expecting it to refuse to start: exit 1, one line on stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hobbitd: error: "), err
    assert out == ""
    assert not glob.glob(f"/dev/shm/hobbit-{proc.pid}-*"), "shared memory left behind"
    return lines[0]


def test_start_serve_stop(synth, tmp_path):
    """Stale socket replaced; files 0660; READY/STOPPING to $NOTIFY_SOCKET; SIGTERM exits 0
    and removes the shared memory and the socket."""
    sock_path = tmp_path / "hobbitd.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # a socket file nobody listens on
    stale.close()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}) as d:
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving 1 models, cache ")
        sock = connect(d.socket)
        shm = "/dev/shm/" + hello(sock)["shm"]
        request(sock, model_name(path), 0, [0, 1])  # left pinned: shutdown must not care
        st = os.stat(d.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(os.stat(shm).st_mode) == 0o660
        assert "replaced stale socket" in d.stderr
        d.stop(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert not os.path.exists(shm)
        assert not os.path.exists(d.socket)
        assert d.stderr.rstrip().endswith("hobbitd: stopped")
        sock.close()
    notify.close()


def test_second_daemon_refuses(synth, tmp_path):
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path) as d:
        line = run_failing(daemon_args([path], "4M", d.socket))
        assert f"another hobbitd is serving on {d.socket}" in line
        sock = connect(d.socket)  # the first one is unharmed
        hello(sock)
        request(sock, model_name(path), 1, [2])
        sock.close()


def test_startup_errors(synth, smollm2, tmp_path):
    path = synth(**SYNTH)
    sock = str(tmp_path / "s.sock")
    missing = str(tmp_path / "nope.gguf")
    assert f"{missing}: no such file" in run_failing(daemon_args([missing], "4M", sock))
    line = run_failing(daemon_args([smollm2], "4M", sock))
    assert smollm2 in line and "not a mixture-of-experts model" in line
    line = run_failing(daemon_args([path], "1M", sock))
    assert "too small" in line and "the minimum cache size is 4M" in line
    line = run_failing(daemon_args([path, path], "8M", sock))
    assert "two models named" in line
    assert not os.path.exists(sock)


def test_minimum_cache_size_is_enough(synth, tmp_path):
    """The size the too-small error names does start (9 slots of 0.41 MiB in 4 MiB)."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path) as d:
        sock = connect(d.socket)
        w = hello(sock)
        assert w["models"][model_name(path)]["regions"]["high"]["n_slots"] == 9
        assert request(sock, model_name(path), 3, range(8))
        sock.close()


CLIENT = textwrap.dedent("""
    import os, sys, time, zmq
    from hobbit.protocol import messages as m
    s = zmq.Context().socket(zmq.DEALER)
    s.connect("ipc://" + sys.argv[1])
    s.send_multipart(m.encode(m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name="doomed"))
    m.decode(s.recv_multipart())
    s.send_multipart(m.encode(m.Cmd.REQUEST, id=1, model=sys.argv[2], layer=0, experts=[0, 1]))
    cmd, msg = m.decode(s.recv_multipart())
    print(cmd.name, flush=True)
    time.sleep(600)
""")


def test_killed_client_loses_its_pins(synth, tmp_path):
    path = synth(**SYNTH)
    model = model_name(path)
    with run_daemon([path], "4M", tmp_path, client_timeout=1) as d:
        sock = connect(d.socket)
        hello(sock)
        mine = request(sock, model, 1, [5])
        doomed = subprocess.Popen([sys.executable, "-c", CLIENT, d.socket, model], stdout=subprocess.PIPE, text=True)
        try:
            assert doomed.stdout.readline().strip() == "SLOTS"
            st = stats(sock)
            assert (st["clients"], st["models"][model]["regions"]["high"]["pinned"]) == (2, 3)
        finally:
            doomed.kill()
            doomed.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:  # STATS every 0.25 s keeps us alive
            st = stats(sock)
            if st["models"][model]["regions"]["high"]["pinned"] == 1:
                break
            time.sleep(0.25)
        waited = time.monotonic() - t0
        assert st["models"][model]["regions"]["high"]["pinned"] == 1, st  # ours stays
        assert st["clients"] == 1
        # its process is gone: dropped at the next reap, before its timeout
        assert waited < 2, waited
        assert f"doomed (pid {doomed.pid}) exited" in d.stderr
        # the survivors keep working, and the dead client's slots are reusable
        release(sock, model, mine)
        release(sock, model, request(sock, model, 0, range(8)))
        # a silent client is timed out too: after 1.5 s without a message, no session
        time.sleep(1.6)
        cmd, msg = call(sock, m.Cmd.STATS)
        assert (cmd, msg["code"]) == (m.Cmd.ERROR, "no_session")
        assert "test (pid" in d.stderr and "silent for" in d.stderr
        hello(sock)
        assert stats(sock)["models"][model]["regions"]["high"]["pinned"] == 0
        sock.close()


def test_shutdown_answers_waiting_requests(synth, tmp_path):
    """A request waiting for a slot is answered shutting_down at SIGTERM, not after
    --slot-wait; the daemon still exits 0 and cleans up."""
    path = synth(**SYNTH)
    model = model_name(path)
    with run_daemon([path], "4M", tmp_path, slot_wait=60) as d:
        a, b = connect(d.socket), connect(d.socket)
        shm = "/dev/shm/" + hello(a)["shm"]
        hello(b)
        request(a, model, 0, range(8))  # 8 of 9 slots pinned
        send(b, m.Cmd.REQUEST, id=9, model=model, layer=1, experts=[0, 1])
        assert recv(b, 0.3) is None  # waiting for a slot
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        cmd, msg = recv(b, 5)
        assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "shutting_down", 9)
        d.stop()
        assert time.monotonic() - t0 < 5
        assert not os.path.exists(shm) and not os.path.exists(d.socket)


def wait_loading(socket_path: str, model: str, timeout: float = 10) -> None:
    """Return once a read is in flight (seen from another client's STATS)."""
    sock = connect(socket_path)
    hello(sock, "watcher")
    deadline = time.monotonic() + timeout
    while stats(sock)["models"][model]["regions"]["high"]["loading"] == 0:
        assert time.monotonic() < deadline, "the read never started"
        time.sleep(0.05)
    send(sock, m.Cmd.BYE)
    sock.close(linger=100)


def test_second_sigint_forces_exit(synth, tmp_path):
    """SIGINT starts a graceful shutdown that waits for a slow read; a second SIGINT exits
    at once (130), still removing the shared memory and the socket."""
    path = synth(**SYNTH)
    model = model_name(path)
    with run_daemon([path], "4M", tmp_path, io_limit="100K") as d:  # 1.4 s per part
        sock = connect(d.socket)
        shm = "/dev/shm/" + hello(sock)["shm"]
        send(sock, m.Cmd.REQUEST, id=1, model=model, layer=0, experts=[0])
        wait_loading(d.socket, model)
        d.proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert d.proc.poll() is None  # draining
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(5) == 130
        assert "second interrupt" in d.stderr
        assert not os.path.exists(shm) and not os.path.exists(d.socket)
        sock.close()


@pytest.mark.slow
def test_sigterm_during_a_slow_read(synth, tmp_path):
    """A read that outlives the drain (2 s) and the I/O threads' join (5 s): the request is
    answered shutting_down, the daemon exits 0 without waiting for the read, and removes
    the shared memory (kept mapped, so the late read writes into valid memory)."""
    path = synth(**SYNTH)
    model = model_name(path)
    with run_daemon([path], "4M", tmp_path, io_limit="16K") as d:  # 8.5 s per part
        sock = connect(d.socket)
        shm = "/dev/shm/" + hello(sock)["shm"]
        send(sock, m.Cmd.REQUEST, id=1, model=model, layer=0, experts=[0])
        wait_loading(d.socket, model)
        t0 = time.monotonic()
        d.stop(signal.SIGTERM)
        assert time.monotonic() - t0 < 8.5
        assert "a read is still running" in d.stderr
        cmd, msg = recv(sock, 1)
        assert (cmd, msg["code"]) == (m.Cmd.ERROR, "shutting_down")
        assert not os.path.exists(shm) and not os.path.exists(d.socket)
        sock.close()
