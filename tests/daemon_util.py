"""Helpers for daemon tests: run the real hobbitd as a subprocess, talk to it raw.

run_daemon(models, cache_size, tmp_path, **flags) starts hobbitd (client/daemon.py) with
--socket in tmp_path and yields once it answers a HELLO; flags become --flag-name value
(True: a bare flag). Stopping it checks it exited 0 without a Traceback. The raw client is
a ZeroMQ DEALER speaking protocol.messages, with no retries or reconnects, so tests see
exactly what the daemon sends.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import zmq

from hobbit.compute.client.daemon import DaemonProcess, daemon_command
from hobbit.protocol import messages as m
from hobbit.protocol.errors import DaemonError

START_TIMEOUT = 60.0  # seconds; generous: a start took ~2 s on a busy 2-core machine


class RunningDaemon(DaemonProcess):
    @property
    def stderr(self) -> str:
        return self.log()

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon, wait for it, assert it exited 0; returns the exit code."""
        rc = super().stop(sig, timeout)
        if self.killed:
            pytest.fail(f"hobbitd did not stop within {timeout} s:\n{self.stderr}")
        assert rc == 0, f"hobbitd exited {rc}:\n{self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        return rc


def daemon_args(models, cache_size, socket, **flags) -> list[str]:
    return daemon_command(models, socket, cache_size, **flags)


@contextlib.contextmanager
def run_daemon(models, cache_size, tmp_path, env=None, **flags):
    """Yield a RunningDaemon serving `models`; stopped (and checked for exit 0) after. It is
    owned by this process (--owner-pid): if the test process dies (a crash in native code),
    the daemon stops too, leaving no shared memory behind."""
    flags.setdefault("owner_pid", os.getpid())
    d = RunningDaemon(
        models,
        str(tmp_path / "hobbitd.sock"),
        log_path=str(tmp_path / "hobbitd.stderr"),
        cache_size=cache_size,
        env={**os.environ, **(env or {})},
        **flags,
    )
    try:
        try:
            d.wait_ready(START_TIMEOUT)
        except DaemonError as e:
            pytest.fail(f"hobbitd did not start: {e}\n{d.stderr}")
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()


# ---- raw client ----------------------------------------------------------------------------


class Dealer(zmq.Socket):
    welcome: dict | None = None  # the WELCOME fields, once hello() succeeded


def connect(socket_path: str) -> Dealer:
    sock = zmq.Context.instance().socket(zmq.DEALER, socket_class=Dealer)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{socket_path}")
    return sock


def send(sock: zmq.Socket, cmd, **fields) -> None:
    sock.send_multipart(m.encode(cmd, **fields))


def recv(sock: zmq.Socket, timeout: float = 5.0):
    """(Cmd, fields) of the next message, or None after `timeout` seconds of silence."""
    if not sock.poll(int(timeout * 1000)):
        return None
    return m.decode(sock.recv_multipart())


def call(sock: zmq.Socket, cmd, timeout: float = 5.0, **fields):
    send(sock, cmd, **fields)
    got = recv(sock, timeout)
    assert got is not None, f"no answer to {cmd.name} within {timeout} s"
    return got


def hello(sock: zmq.Socket, name: str = "test") -> dict:
    cmd, msg = call(sock, m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name=name)
    assert cmd == m.Cmd.WELCOME, msg
    sock.welcome = msg
    return msg


def stats(sock: zmq.Socket) -> dict:
    cmd, msg = call(sock, m.Cmd.STATS)
    assert cmd == m.Cmd.STATS_REPLY, msg
    return msg["stats"]


def request(sock: zmq.Socket, model: str, layer: int, experts, rid: int = 1, timeout: float = 10.0) -> list:
    """Pinned slots [[precision, index]] for `experts`; fails the test on any other answer."""
    cmd, msg = call(sock, m.Cmd.REQUEST, timeout=timeout, id=rid, model=model, layer=layer, experts=list(experts))
    assert cmd == m.Cmd.SLOTS and msg["id"] == rid, msg
    return msg["slots"]


def release(sock: zmq.Socket, model: str, slots) -> None:
    send(sock, m.Cmd.RELEASE, model=model, slots=[list(s) for s in slots])


# ---- checking slot contents ----------------------------------------------------------------

_sources: dict = {}


def expert_source(gguf_path: str):
    """The GGUF's ExpertSource (cached: opening a GGUF takes seconds)."""
    from hobbit.compute.engine.weights import open_model
    from hobbit.loader.layout import gguf_experts

    if gguf_path not in _sources:
        _sources[gguf_path] = gguf_experts(open_model(gguf_path))
    return _sources[gguf_path]


class SlotView:
    """The daemon's shared memory mapped read-only (as a compute client maps it), next to
    the GGUF, to compare what a slot holds with the expert's bytes in the file."""

    def __init__(self, welcome: dict, model: str, gguf_path: str):
        from hobbit.loader.layout import SlotFormat
        from hobbit.loader.shm import Segment

        self.seg = Segment(welcome["shm"], welcome["shm_size"])
        self.region = welcome["models"][model]["regions"]["high"]
        self.fmt = SlotFormat.from_wire(self.region["format"])
        self.source = expert_source(gguf_path)
        self.path = gguf_path

    def slot_parts(self, index: int, layer: int) -> list[bytes]:
        """The parts slot `index` holds, each as long as a part of `layer`'s experts."""
        base = self.region["offset"] + index * self.fmt.slot_bytes
        return [
            self.seg.array[base + off : base + off + n].tobytes()
            for off, n in zip(self.fmt.offsets(layer), self.fmt.part_nbytes(layer))
        ]

    def file_parts(self, layer: int, expert: int) -> list[bytes]:
        with open(self.path, "rb") as f:
            parts = []
            for off, n in self.source.ranges(layer, expert):
                f.seek(off)
                parts.append(f.read(n))
            return parts

    def check(self, slot, layer: int, expert: int) -> None:
        precision, index = slot
        assert precision == "high"
        got, want = self.slot_parts(index, layer), self.file_parts(layer, expert)
        for p, (g, w) in enumerate(zip(got, want)):
            assert g == w, f"slot {index}: part {p} of layer {layer} expert {expert} differs"

    def close(self) -> None:
        self.seg.close()


# the small synthetic Mixtral-layout MoE every daemon test serves: 4 layers x 8 experts,
# 417792 bytes (0.4 MiB) per expert, 430080-byte slots, so "4M" is the minimum cache (9 slots)
SYNTH = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0", seed=0)
