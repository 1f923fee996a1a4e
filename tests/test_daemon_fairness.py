"""No client can hurt the others (issue 31): a client that floods hobbitd and never reads
its answers leaves another client's generation within 2x of its time alone, and is dropped
with its memory returned; one process cannot take every session, and a client refused a
session is told why."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import zmq

from daemon_util import SYNTH, call, connect, hello, recv, run_daemon, send, stats
from hobbit.protocol import messages as m

PROMPT = "The quick brown fox jumps over the lazy dog. Then"
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
# The bound is the issue's: a flooding client may at most double another's generation.
# Measured here (2 cores shared with other work, load 2-8): 0.94-1.37x over six runs; before
# the fix the flooded generation failed (hobbitd did not answer within 30 s, three times).
# The ratio of two runs side by side in one test; the noise of a busy machine (one run
# alone took 0.7-2.4 s) is why the bound is 2x and not closer to 1.
FAIR_RATIO = 2.0


def timed_generate(model: str, socket: str, n: int = 40) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(
        [*CLI, "generate", model, "-p", PROMPT, "-n", str(n), "--temperature", "0", "--socket", socket],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0, r.stdout


# A hostile client, a process of its own: HELLO (its WELCOME read), then STATS and REQUEST
# pairs as fast as it can, never reading an answer (SNDHWM 0: its sends never block; RCVHWM
# 0: its I/O thread takes whatever hobbitd sends, so hobbitd never sees its queue fill).
FLOODER = """
import os, sys, zmq
from hobbit.protocol import messages as m
socket, model, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = zmq.Context.instance().socket(zmq.DEALER)
s.setsockopt(zmq.SNDHWM, 0)
s.setsockopt(zmq.RCVHWM, 0)
s.connect("ipc://" + socket)
s.send_multipart(m.encode(m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name="flooder"))
assert m.decode(s.recv_multipart())[0] == m.Cmd.WELCOME
print("flooding", flush=True)
rid = 0
while True:
    rid += 1
    s.send_multipart(m.encode(m.Cmd.STATS))
    experts = [rid % 8, (rid + 1) % 8]
    s.send_multipart(m.encode(m.Cmd.REQUEST, id=rid, model=model, layer=rid % layers, experts=experts))
"""


def start_flooder(socket: str, model: str) -> subprocess.Popen:
    """The flooder at the lowest CPU priority: on this 2-core machine its own busy loop would
    otherwise take a core from the other client whatever hobbitd does; what is measured is
    what hobbitd does with its flood."""
    p = subprocess.Popen(
        [sys.executable, "-c", FLOODER, socket, model, str(SYNTH["layers"])],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.nice(19),
    )
    assert p.stdout is not None and p.stdout.readline() == "flooding\n"
    return p


def test_a_flooding_client_does_not_slow_another(synth, tmp_path):
    path = synth(**SYNTH)
    model = os.path.basename(path)[: -len(".gguf")]
    with run_daemon([path], os.environ.get("FAIR_CACHE", "8M"), tmp_path) as d:
        daemon = psutil.Process(d.proc.pid)
        timed_generate(path, d.socket)  # warm: the experts cached, the files in the page cache
        alone, text = timed_generate(path, d.socket)
        rss_before = daemon.memory_info().rss
        flooder = start_flooder(d.socket, model)
        try:
            time.sleep(1.0)  # the flood under way
            cpu0 = sum(daemon.cpu_times()[:2])
            flooded, flooded_text = timed_generate(path, d.socket)
            cpu = sum(daemon.cpu_times()[:2]) - cpu0
        finally:
            flooder.kill()
            flooder.wait()
        ratio = flooded / alone
        print(
            f"generation alone {alone:.2f} s, beside a flooder {flooded:.2f} s: {ratio:.2f}x; hobbitd's CPU {cpu:.2f} s"
        )
        assert flooded_text == text
        assert ratio <= FAIR_RATIO, (alone, flooded, d.stderr[-2000:])
        sock = connect(d.socket)
        try:
            hello(sock)
            deadline = time.monotonic() + 10
            while any(s["name"] == "flooder" for s in stats(sock)["sessions"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = stats(sock)
        finally:
            sock.close(linger=0)
        assert not any(s["name"] == "flooder" for s in left["sessions"]), left["sessions"]
        assert "flooder" in d.stderr and "does not read" in d.stderr, d.stderr[-2000:]
        assert left["models"][model]["regions"]["high"]["pinned"] == 0
        grown = daemon.memory_info().rss - rss_before
        print(f"hobbitd's memory after the flood: {grown / 2**20:+.1f} MiB")
        assert grown < 20 << 20, f"hobbitd kept {grown / 2**20:.0f} MiB more after the flood"


def test_a_client_that_leaves_its_answers_unread_is_dropped(synth, tmp_path):
    """A client that asks at a modest pace but never reads: once ROUTER_HWM answers wait for
    it (past what the kernel's buffers hold), hobbitd drops it with a log line and serves on."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path) as d:
        sock = connect(d.socket)
        sock.setsockopt(zmq.RCVHWM, 1)  # its I/O thread takes in little: hobbitd's queue fills
        hello(sock, "deaf")
        for _ in range(4000):
            send(sock, m.Cmd.STATS)
            time.sleep(0.0005)
            if "leaves its answers unread" in d.stderr:
                break
        sock.close(linger=0)
        assert "client deaf" in d.stderr and "leaves its answers unread" in d.stderr, d.stderr[-2000:]
        other = connect(d.socket)
        hello(other, "other")
        assert [s["name"] for s in stats(other)["sessions"]] == ["other"]
        other.close(linger=0)


def test_a_client_has_at_most_max_requests_served_at_once(synth, tmp_path):
    """A client waits for each answer; one that sends requests without waiting has at most
    max_requests of them served (reading from flash) at once, the others answered busy."""
    path = synth(**SYNTH)
    model = os.path.basename(path)[: -len(".gguf")]
    with run_daemon([path], "8M", tmp_path, io_limit="2M", max_requests=2) as d:  # 0.2 s a read
        sock = connect(d.socket)
        hello(sock)
        for e in range(5):
            send(sock, m.Cmd.REQUEST, id=e + 1, model=model, layer=0, experts=[e])
        answers = [recv(sock, 10) for _ in range(5)]
        sock.close(linger=0)
    codes = sorted(msg.get("code", cmd.name) for cmd, msg in answers if cmd is not None)
    assert codes == ["SLOTS", "SLOTS", "busy", "busy", "busy"], answers


def test_one_process_cannot_take_every_session(synth, tmp_path):
    """64 HELLOs from one process, kept alive: it gets max_sessions_per_process of them, the
    others are refused naming it, and another process still generates."""
    path = synth(**SYNTH)
    with run_daemon([path], "8M", tmp_path) as d:
        socks, refused = [], []
        for i in range(64):
            s = connect(d.socket)
            socks.append(s)
            cmd, msg = call(s, m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name=f"hog{i}")
            if cmd == m.Cmd.ERROR:
                refused.append(msg)
        try:
            assert len(refused) == 64 - 16, refused[:1]
            assert {r["code"] for r in refused} == {"too_many_sessions"}
            assert refused[0]["message"].startswith(f"no free session for pid {os.getpid()}: it holds 16"), refused[0]
            for s in socks:
                send(s, m.Cmd.HEARTBEAT)
            timed_generate(path, d.socket, n=8)  # another process still gets a session
        finally:
            for s in socks:
                s.close(linger=0)


def test_a_client_refused_a_session_says_why(synth, tmp_path):
    """Every session taken: `generate` says hobbitd has no free session and who holds them
    (not that no hobbitd answers); a user's share is refused likewise."""
    path = synth(**SYNTH)
    with run_daemon([path], "8M", tmp_path, max_sessions=4) as d:
        socks = [connect(d.socket) for _ in range(4)]
        try:
            for s in socks:
                hello(s)
            r = subprocess.run(
                [*CLI, "generate", path, "-p", PROMPT, "-n", "4", "--socket", d.socket],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode != 0
            want = f"hobbitd at {d.socket} has no free session: 4 in use, 4 by pid {os.getpid()} (max_sessions 4)"
            assert want in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and "no hobbitd answers" not in r.stderr, r.stderr
        finally:
            for s in socks:
                s.close(linger=0)
    (tmp_path / "user").mkdir()
    with run_daemon([path], "8M", tmp_path / "user", max_sessions_per_user=2) as d:
        socks = [connect(d.socket) for _ in range(3)]
        try:
            hello(socks[0])
            hello(socks[1])
            cmd, msg = call(socks[2], m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name="third")
            assert (cmd, msg["code"]) == (m.Cmd.ERROR, "too_many_sessions"), msg
            assert (
                msg["message"]
                == f"no free session for uid {os.getuid()}: its processes hold 2 (max_sessions_per_user 2)"
            )
        finally:
            for s in socks:
                s.close(linger=0)
