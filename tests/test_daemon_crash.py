"""Crashes leave nothing behind and cost a pause, not an answer: dead daemons' shared
memory and sockets are removed (never a live one's), a private daemon goes with its owner,
a client learns within ~2 s that its daemon died (also mid-request), and the per-client
limits on pins and sessions answer with clear errors, and a model file cut short under the
daemon fails only the requests that need it."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from daemon_util import (
    START_TIMEOUT,
    SYNTH,
    RunningDaemon,
    call,
    connect,
    expert_source,
    hello,
    release,
    request,
    run_daemon,
    send,
    stats,
)
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.loader.shm import SHM_DIR
from hobbit.protocol import messages as m
from hobbit.protocol.errors import DaemonError


def model_name(path) -> str:
    return os.path.basename(path)[: -len(".gguf")]


def segments(pid: int) -> list[str]:
    return glob.glob(f"{SHM_DIR}/hobbit-{pid}-*")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def kill(d) -> None:
    d.proc.kill()
    d.proc.wait()


def folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


@contextlib.contextmanager
def two_daemons(path, a, b):
    """Two hobbitd started at once (each start takes seconds); stopped if still running."""
    ds = [
        RunningDaemon([path], str(t / "hobbitd.sock"), log_path=str(t / "hobbitd.stderr"), cache_size="4M")
        for t in (a, b)
    ]
    try:
        for d in ds:
            d.wait_ready(START_TIMEOUT)
        yield ds
    finally:
        for d in ds:
            if d.proc.poll() is None:
                d.stop()


def test_dead_daemons_leftovers_are_removed_live_ones_never(synth, tmp_path):
    """A hobbitd starting removes the segments of dead hobbitd processes (here one
    SIGKILLed on its socket) and keeps those of live ones: a running daemon's, one whose pid
    lives (maybe reused) and one whose creator still holds its lock (a daemon in another pid
    namespace). The owner of a SIGKILLed daemon removes its segment and socket, but not a
    new daemon's socket on the same path."""
    path = synth(**SYNTH)
    fakes = {}
    for kind, pid in (("dead", dead_pid()), ("locked", dead_pid()), ("live pid", os.getpid())):
        fakes[kind] = f"{SHM_DIR}/hobbit-{pid}-{os.urandom(4).hex()}"
        with open(fakes[kind], "wb") as f:
            f.write(b"x")
    held = os.open(fakes["locked"], os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with two_daemons(path, folder(tmp_path, "a"), folder(tmp_path, "b")) as (live, doomed):
            # the cache, and the control block beside it where the kernel has membarrier
            live_shm, dead_shm = segments(live.proc.pid), segments(doomed.proc.pid)
            assert len(live_shm) == len(dead_shm) >= 1
            kill(doomed)
            assert all(map(os.path.exists, dead_shm)) and os.path.exists(doomed.socket)
            with run_daemon([path], "4M", tmp_path / "b") as new:
                assert not any(map(os.path.exists, dead_shm))
                for p in dead_shm:
                    assert f"removed {os.path.basename(p)}" in new.stderr
                assert not os.path.exists(fakes["dead"])
                for kind in ("locked", "live pid"):
                    assert os.path.exists(fakes[kind]), kind
                assert all(map(os.path.exists, live_shm))
                assert doomed.died() and os.path.exists(new.socket)  # the new one's: kept
                sock = connect(new.socket)
                hello(sock)
                sock.close()
            # the owner's side: a daemon it finds SIGKILLed leaves nothing behind
            kill(live)
            assert all(map(os.path.exists, live_shm))
            assert live.died()
            assert not any(map(os.path.exists, live_shm)) and not os.path.exists(live.socket)
    finally:
        os.close(held)
        for p in fakes.values():
            if os.path.exists(p):
                os.unlink(p)


def test_a_restarting_daemon_replaces_the_stale_socket_without_a_gap(synth, tmp_path):
    """Between a SIGKILL and the new hobbitd answering there is always a socket file at the
    path (the dead one's, then the new one's, swapped by a rename): a client that starts
    meanwhile sees a daemon restarting, never "no daemon", and waits."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path) as d:
        kill(d)
        stale = os.lstat(d.socket).st_ino
        new = RunningDaemon([path], d.socket, log_path=str(tmp_path / "new.log"), cache_size="4M")
        try:
            missing, deadline = 0, time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and new.proc.poll() is None:
                try:
                    if os.lstat(d.socket).st_ino != stale:
                        break
                except FileNotFoundError:
                    missing += 1
            assert missing == 0, "the socket path was missing while hobbitd started"
            new.wait_ready()
            assert "replaced stale socket" in new.stderr
            assert not glob.glob(os.path.join(os.path.dirname(d.socket), ".*.new"))
        finally:
            new.stop()


OWNER = textwrap.dedent("""
    import os, sys, time
    from hobbit.compute.client.connect import connect
    c = connect(sys.argv[1], os.path.join(sys.argv[2], "none.sock"), quiet=True)
    print(c.private.proc.pid, c.private.folder, flush=True)
    time.sleep(600)
""")


def test_private_daemon_goes_with_its_sigkilled_owner(synth, tmp_path):
    """A client that starts a private hobbitd and is SIGKILLed: the daemon stops within
    about a second and removes its shared memory, socket and folder."""
    path = synth(**SYNTH)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, path, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid, where = owner.stdout.readline().split()
        pid = int(pid)
        assert segments(pid) and os.path.isdir(where)
    finally:
        owner.kill()
        owner.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and os.path.exists(where):
        time.sleep(0.1)
    assert not os.path.exists(where), os.listdir(where)
    assert time.monotonic() - t0 < 3
    assert not segments(pid)


def test_client_learns_mid_request_that_its_daemon_died(synth, tmp_path):
    """A request waiting on a slow read when hobbitd is SIGKILLed: the client knows within
    2 s (not after its 30 s timeout); with nobody back by its deadline, daemon_lost; once a
    new hobbitd runs on the socket, the same client asks again and gets its slots."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path, io_limit="100K") as d:  # 1.4 s per part
        client = ExpertClient(d.socket, path, reconnect_s=0.5)
        killer = threading.Timer(0.3, kill, [d])
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(DaemonError, match="is gone and none answered") as e:
            client.request(0, [0, 1])
        killer.join()
        assert e.value.code == "daemon_lost"
        assert time.monotonic() - t0 < 0.3 + 2 + 0.5
        old_shm = client.shm.name
    d.died()
    with run_daemon([path], "4M", tmp_path) as d:
        slots = client.request(0, [0, 1])  # HELLO again, the new segment mapped
        assert len(slots) == 2 and client.reconnects == 1
        assert client.shm.name != old_shm and client.shm.name in d.stderr
        client.release(slots)
        client.close()


def test_pin_and_session_limits(synth, tmp_path):
    """One client cannot pin more than its share of the cache (never less than one layer's
    experts): pin_limit, while another client still gets slots; beyond max_sessions a HELLO
    is refused too_many_sessions, and a BYE makes room again."""
    path = synth(**SYNTH)
    model = model_name(path)
    with run_daemon([path], "8M", tmp_path, max_sessions=2, client_pin_share=0.5) as d:  # 19 slots
        a, b, c = connect(d.socket), connect(d.socket), connect(d.socket)
        hello(a, "a")
        hello(b, "b")
        held = request(a, model, 0, range(8))
        cmd, msg = call(a, m.Cmd.REQUEST, id=2, model=model, layer=1, experts=[0, 1])
        assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "pin_limit", 2), msg
        assert "limit of 9 per client" in msg["message"]
        request(a, model, 1, [0])  # 9: at the limit is fine
        release(b, model, request(b, model, 2, range(8)))  # the other client is not starved
        cmd, msg = call(c, m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name="c")
        assert (cmd, msg["code"]) == (m.Cmd.ERROR, "too_many_sessions"), msg
        release(a, model, held)
        request(a, model, 1, [2, 3])
        send(b, m.Cmd.BYE)
        time.sleep(0.1)
        hello(c, "c")
        for s in (a, b, c):
            s.close(linger=0)


def test_a_model_file_truncated_under_the_daemon(synth, tmp_path):
    """A real fault: the served GGUF is cut short while hobbitd runs. Its cached experts
    are dropped (never served with a changed file): every request of the model is answered a
    typed error (file_changed) naming the file, and `stats` says so."""
    path = str(tmp_path / "cut.gguf")
    shutil.copy(synth(**SYNTH), path)
    with run_daemon([path], "4M", tmp_path) as d:
        sock = connect(d.socket)
        hello(sock)
        held = request(sock, "cut", 0, [0])
        release(sock, "cut", held)
        os.truncate(path, expert_source(path).ranges(3, 7)[0][0])
        for rid, layer, expert in ((5, 3, 7), (6, 0, 0)):  # a miss, and what was a hit
            cmd, msg = call(sock, m.Cmd.REQUEST, id=rid, model="cut", layer=layer, experts=[expert])
            assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "file_changed", rid), msg
            assert path in msg["message"] and "truncated" in msg["message"] and "\n" not in msg["message"]
        st = stats(sock)["models"]["cut"]["file"]
        assert st["changes"] == 1 and "truncated" in st["error"]
        assert "changed while served" in d.stderr
        sock.close(linger=0)


def test_a_private_daemon_killed_with_its_owner_leaves_nothing_after_the_next_start(synth, tmp_path):
    """Owner and private hobbitd SIGKILLed together (its process group and itself): nobody
    could clean up, so the next private daemon's start removes the dead pair's folder (and
    the next hobbitd start their segment); a live owner's folder is never touched."""
    path = synth(**SYNTH)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    owners = [
        subprocess.Popen([sys.executable, "-c", OWNER, path, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    try:
        (dead_daemon, dead), (_, live) = (o.stdout.readline().split() for o in owners)
        os.kill(int(dead_daemon), signal.SIGKILL)
        owners[0].kill()
        owners[0].wait()
        assert os.path.isdir(dead) and os.path.isdir(live)
        third = subprocess.Popen(
            [sys.executable, "-c", OWNER, path, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            _, fresh = third.stdout.readline().split()
            assert not os.path.exists(dead) and os.path.isdir(live) and os.path.isdir(fresh)
            assert not segments(int(dead_daemon))
        finally:
            third.kill()
            third.wait()
    finally:
        for o in owners:
            o.kill()
            o.wait()
