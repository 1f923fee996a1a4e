"""hobbitd's inbox: the messages received, queued per client and served round-robin.

One ROUTER socket receives every client's messages. Served in the order they arrive, a
client that sends as fast as it can would have the daemon serve it almost alone, and every
other client's request would wait behind its queue (issue 31: a flooding client made
another's generation 38x slower). So each message is queued under its sender's identity,
at most `limit` per sender, and serve order takes one message of each sender in turn.

A sender whose queue is full sends faster than it is served, and never waits for its
answers as a client does (one request at a time): put() says so, the daemon drops its
session, and its identity is ignored from then on (its messages are discarded unread and
unanswered) and its connection is cut (disconnect()), so that the flood stops costing the
daemon: a ZeroMQ client connects again by itself, under a new identity that floods into a
new full queue and is cut again, each round costing the daemon one queue's worth.
Identities are not reused by ZeroMQ while the daemon runs; the ignored ones are
remembered up to IGNORED_MAX.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections import OrderedDict, deque
from typing import NamedTuple

import zmq

IGNORED_MAX = 4096  # flooding identities remembered (a new connection has a new one)
LOG_EVERY_S = 60.0  # a process whose new connections keep flooding is logged this often


class Message(NamedTuple):
    ident: bytes  # the sender's ROUTER identity
    frames: list  # the frames after the identity, as bytes
    peer: zmq.Frame  # the last frame received: its metadata names the peer process


class Inbox:
    """Per-sender queues of at most `limit` messages, served round-robin (see the module
    docstring)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._queues: dict[bytes, deque[Message]] = {}
        self._turns: deque[bytes] = deque()  # senders with queued messages, next first
        self._ignored: OrderedDict[bytes, None] = OrderedDict()
        self._logged: dict[int | None, float] = {}  # time.monotonic() a flooding pid was last logged

    def __len__(self) -> int:
        return len(self._turns)

    def put(self, msg: Message) -> bool:
        """Queue `msg`; False (nothing queued) when its sender's queue is full: the caller
        drops the sender (ignore()). Messages of ignored senders are discarded (True)."""
        if msg.ident in self._ignored:
            return True
        q = self._queues.get(msg.ident)
        if q is None:
            q = self._queues[msg.ident] = deque()
            self._turns.append(msg.ident)
        elif len(q) >= self.limit:
            return False
        q.append(msg)
        return True

    def take(self) -> Message | None:
        """The next sender's oldest message (senders in turn), or None when none is queued."""
        if not self._turns:
            return None
        ident = self._turns.popleft()
        q = self._queues[ident]
        msg = q.popleft()
        if q:
            self._turns.append(ident)  # its next message after every other sender's
        else:
            del self._queues[ident]
        return msg

    def ignore(self, ident: bytes) -> int:
        """Discard `ident`'s queued messages and every later one; returns how many were queued."""
        q = self._queues.pop(ident, None)
        if q is not None:
            self._turns.remove(ident)
        self._ignored[ident] = None
        while len(self._ignored) > IGNORED_MAX:
            self._ignored.popitem(last=False)
        return len(q) if q is not None else 0

    def ignored(self, ident: bytes) -> bool:
        return ident in self._ignored

    def worth_logging(self, pid: int | None) -> bool:
        """Whether to log another cut connection of process `pid` (once per LOG_EVERY_S:
        a flooding process reconnects every 0.1 s)."""
        now = time.monotonic()
        if now - self._logged.get(pid, -LOG_EVERY_S) < LOG_EVERY_S:
            return False
        self._logged = {p: t for p, t in self._logged.items() if now - t < LOG_EVERY_S}
        self._logged[pid] = now
        return True


def disconnect(frame: zmq.Frame) -> bool:
    """Cut the connection `frame` came in on (ZeroMQ has no call for it on a ROUTER): shut
    down its unix socket, whose end ZeroMQ's I/O thread then closes as for a client gone.
    Only if the socket's peer process is still the one the frame names (the descriptor
    may have been closed and reused meanwhile). True when cut."""
    try:
        fd = int(frame.get(zmq.SRCFD))
        pid = int(str(frame.get("Peer-Address")).rsplit(":", 1)[1])
    except (AttributeError, IndexError, ValueError, zmq.ZMQError):
        return False
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if sock.family != socket.AF_UNIX:
            return False
        peer_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        if peer_pid != pid:
            return False
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()  # our duplicate only: ZeroMQ closes its own
