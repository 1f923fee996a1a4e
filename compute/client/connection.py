"""One client's connection to hobbitd, as the ZeroMQ guide's client API (mdcliapi) has it:
a DEALER socket, its liveness, retries, reconnects and request ids. It returns decoded
answers and raises DaemonError; what the answers mean is its owner's (a Session: the
expert provider, client/expert_client.py). It knows nothing of experts.

Liveness. ZeroMQ pings the daemon every HEARTBEAT_IVL_MS and drops the connection after
HEARTBEAT_TIMEOUT_MS without an answer; a daemon that dies drops it at once. A wait for an
answer looks at the connection every LIVENESS_S (the answer itself ends the wait at once:
no extra round trip), so a client learns within about 2 s that its daemon is gone, also in
the middle of a request. Then it reconnects (_recover): HELLO again with backoff until a
hobbitd answers at the socket or `reconnect_s` passed (DaemonError daemon_lost), hands the
new WELCOME to its session and asks again what it was waiting for (the request's fields
as the session renews them for the new daemon).

A daemon alive but silent for `timeout` seconds is asked again on a new socket, up to
`retries` times, after which DaemonError says so. A daemon that forgot us answers
no_session: the connection says HELLO again.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from ...protocol import messages as m
from ...protocol.errors import TOO_MANY_SESSIONS, DaemonError, NoFreeSession, ProtocolError

LIVENESS_S = 0.25  # a wait for an answer looks at the connection this often
HEARTBEAT_IVL_MS = 500  # ZeroMQ pings the daemon this often...
HEARTBEAT_TIMEOUT_MS = 1500  # ...and drops the connection after this long without a pong
HELLO_S = 1.0  # reconnecting: how long one HELLO waits for its WELCOME
BACKOFF_S = (0.05, 1.0)  # reconnecting: the first and the longest pause between HELLOs
RECONNECT_S = 30.0  # default deadline for finding a hobbitd again


class Session(Protocol):
    """What a connection's owner does with a session (one HELLO answered)."""

    def welcome(self, reply: dict) -> None:
        """Take a WELCOME: the first, or a new daemon's after a reconnect (DaemonError if
        this daemon will not do)."""

    def renew(self, fields: dict) -> dict:
        """A request's fields, to be asked again of the daemon the last welcome() came from."""


class _Lost(Exception):
    """The connection to the daemon dropped while waiting for an answer."""


class Connection:
    """A DEALER socket to the hobbitd at `socket_path`, used by one thread (and a heartbeat
    thread, once started). hello: the fields our HELLO adds to version, pid and name."""

    def __init__(
        self,
        socket_path: str,
        session: Session,
        name: str,
        hello: dict,
        timeout: float,
        retries: int,
        reconnect_s: float,
    ):
        self.socket_path, self.session = socket_path, session
        self.name, self.hello = name, hello
        self.timeout, self.retries, self.reconnect_s = timeout, retries, reconnect_s
        self.ctx: zmq.Context = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None  # the socket's monitor: its disconnections
        self._lost = False  # the connection dropped (and has not been replaced)
        self._lock = threading.RLock()  # the socket is used by us and the heartbeat thread
        self._beat: threading.Event | None = None  # the heartbeat thread's stop event, once started
        self._ids = itertools.count(1)
        self.private = None  # a hobbitd this client owns (client/connect.py): restarted here
        self.announce = None  # callable(line): told when the daemon is lost and found
        self.round_trips = 0
        self.wait_seconds = 0.0  # time spent waiting for the daemon's answers
        self.reconnects = 0  # times a lost daemon was found again

    def open(self) -> None:
        """Connect and say HELLO (DaemonError no_daemon when nobody is there)."""
        if not os.path.exists(self.socket_path):
            raise DaemonError(
                "no_daemon", f"no hobbitd socket at {self.socket_path} (start hobbitd, or use --no-daemon)"
            )
        self._open_socket()
        try:
            self._hello()
        except _Lost:
            raise DaemonError("no_daemon", f"hobbitd at {self.socket_path} went away while we said HELLO") from None

    def next_id(self) -> int:
        """A new request id: its answer carries it (answers to requests given up on are
        skipped)."""
        return next(self._ids)

    # ---- the socket ------------------------------------------------------------------

    def _open_socket(self) -> None:
        with self._lock:
            self._close_socket()
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            self._mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(f"ipc://{self.socket_path}")
            self.sock, self._lost = sock, False

    def _close_socket(self, linger: int = 0) -> None:
        if self._mon is not None:
            if self.sock is not None:  # None: its connect failed after the monitor was made
                self.sock.disable_monitor()
            self._mon.close(linger=0)
            self._mon = None
        if self.sock is not None:
            self.sock.close(linger=linger)
            self.sock = None

    def _daemon_gone(self) -> bool:
        """Whether the connection dropped: the daemon died, or stopped answering pings."""
        while self._mon is not None and self._mon.poll(0):
            if recv_monitor_message(self._mon)["event"] == zmq.EVENT_DISCONNECTED:
                self._lost = True
        return self._lost

    def _hello_fields(self) -> dict:
        return {"version": m.VERSION, "pid": os.getpid(), "name": self.name, **self.hello}

    def _hello(self) -> None:
        with self._lock:
            self.session.welcome(self._call_locked(m.Cmd.HELLO, m.Cmd.WELCOME, True, **self._hello_fields()))

    def send(self, cmd, **fields) -> None:
        """Send without waiting for an answer (nothing when the socket is closed)."""
        with self._lock:
            if self.sock is not None:  # closed: nothing to tell anyone
                self.sock.send_multipart(m.encode(cmd, **fields))

    def start_heartbeat(self, every: float) -> None:
        """While a forward computes on pinned slots it sends nothing; a heartbeat every
        `every` seconds keeps the daemon from taking it for dead and freeing its pins."""
        if self._beat is not None:
            return
        stop = threading.Event()

        def beat():
            while not stop.wait(every):
                try:
                    self.send(m.Cmd.HEARTBEAT)
                except zmq.ZMQError:
                    pass

        self._beat = stop
        threading.Thread(target=beat, name="hobbit-heartbeat", daemon=True).start()

    # ---- requests --------------------------------------------------------------------

    def call(self, cmd, expect, **fields) -> dict:
        """Send and return the fields of the matching answer (`expect`); DaemonError on an
        ERROR, another answer, or none (see the module docstring for what is retried)."""
        with self._lock:
            return self._call_locked(cmd, expect, False, **fields)

    def _call_locked(self, cmd, expect, hello: bool, **fields) -> dict:
        """call(). The daemon gone: find one again (_recover) and ask again; silence:
        reconnect (a new socket) and try again; no_session (the daemon restarted or forgot
        us): HELLO again and retry. With hello, a lost connection raises _Lost (the caller
        is reconnecting)."""
        tries, lost_since = 0, None
        if self.sock is None:  # lost before, past a deadline: look again first
            lost_since = time.monotonic()
            self._recover(lost_since + self.reconnect_s)
            fields = self.session.renew(fields)
        while True:
            self.send(cmd, **fields)
            try:
                reply = self._receive(fields.get("id"))
            except _Lost:
                if hello:
                    raise
                lost_since = lost_since or time.monotonic()  # one deadline for this call
                self._recover(lost_since + self.reconnect_s)
                fields = self.session.renew(fields)
                continue
            if reply is None:
                tries += 1
                if tries > self.retries:
                    raise DaemonError(
                        "timeout",
                        f"hobbitd at {self.socket_path} did not answer within {self.timeout:g} s ({tries} tries)",
                    )
                self._open_socket()
                continue
            got, msg = reply
            if got == expect:
                return msg
            if got == m.Cmd.ERROR and msg["code"] == "no_session" and not hello:
                self._open_socket()
                try:
                    self._hello()
                except _Lost:
                    lost_since = lost_since or time.monotonic()
                    self._recover(lost_since + self.reconnect_s)
                fields = self.session.renew(fields)
                continue
            if got == m.Cmd.ERROR:
                raise self._error(msg)
            raise DaemonError("malformed", f"hobbitd answered {got.name} to {cmd.name}")

    def check(self) -> None:
        """Before using what the daemon gave (its mapping, its directory, our pins there):
        if it is gone, find one again (a poll of the socket's monitor: no message)."""
        with self._lock:
            if self.sock is None or self._daemon_gone():
                self._recover(time.monotonic() + self.reconnect_s)

    def _recover(self, deadline: float) -> None:
        """Our daemon is gone: HELLO at the socket with backoff until a hobbitd answers
        (then the session takes its WELCOME), or DaemonError daemon_lost once `deadline`
        (time.monotonic()) passed. A private daemon that died is restarted here: nobody
        else would."""
        t0 = time.monotonic()
        self._say(f"hobbit: lost hobbitd at {self.socket_path}; reconnecting (for up to {max(deadline - t0, 0):.0f} s)")
        pause, restarted = BACKOFF_S[0], False
        while True:
            if self.private is not None and not restarted and self.private.died():
                restarted = True  # once: a daemon that cannot start will not now
                try:
                    self.private.restart(timeout=max(deadline - time.monotonic(), 1.0))
                except (DaemonError, OSError) as e:
                    self._say(f"hobbit: restarting the private hobbitd failed: {e}")
            if os.path.exists(self.socket_path):
                self._open_socket()
                self.send(m.Cmd.HELLO, **self._hello_fields())
                try:
                    reply = self._receive(None, min(HELLO_S, max(deadline - time.monotonic(), 0.1)))
                except _Lost:
                    reply = None
                if reply is not None and reply[0] == m.Cmd.WELCOME:
                    self.session.welcome(reply[1])
                    self.reconnects += 1
                    self._say(
                        f"hobbit: reconnected to hobbitd at {self.socket_path} after {time.monotonic() - t0:.1f} s"
                    )
                    return
                if reply is not None and reply[0] == m.Cmd.ERROR:
                    raise self._error(reply[1])
            left = deadline - time.monotonic()
            if left <= 0:
                self._close_socket()  # its HELLO may still reach a later daemon: unasked
                raise DaemonError(
                    "daemon_lost",
                    f"hobbitd at {self.socket_path} is gone and none answered there within {self.reconnect_s:g} s",
                )
            time.sleep(min(pause, left))
            pause = min(2 * pause, BACKOFF_S[1])

    def _error(self, msg: dict) -> DaemonError:
        """The DaemonError of an ERROR answer (NoFreeSession for a HELLO refused a session)."""
        if msg["code"] == TOO_MANY_SESSIONS:
            return NoFreeSession(self.socket_path, msg["message"])
        return DaemonError(msg["code"], f"hobbitd: {msg['message']}")

    def _say(self, line: str) -> None:
        if self.announce is not None:
            self.announce(line)

    def _receive(self, request_id, timeout: float | None = None):
        """The next answer (skipping stale answers to requests given up on), or None after
        `timeout` (default self.timeout) seconds of silence; _Lost when the connection
        dropped meanwhile."""
        sock = self.sock
        assert sock is not None  # our callers (holding the lock) have just opened it
        t0 = time.perf_counter()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not sock.poll(int(min(left, LIVENESS_S) * 1000)):
                if self._daemon_gone():
                    raise _Lost
                continue
            try:
                got, msg = m.decode(sock.recv_multipart())
            except ProtocolError as e:
                raise DaemonError(e.code, f"hobbitd sent a bad message: {e}") from None
            if request_id is not None and msg.get("id") not in (None, request_id):
                continue
            self.round_trips += 1
            self.wait_seconds += time.perf_counter() - t0
            return got, msg

    def close(self) -> None:
        """Say BYE and close the socket; stop the heartbeat. The private daemon stays
        (stop_private())."""
        if self._beat is not None:
            self._beat.set()
        if self.sock is not None:
            try:
                self.send(m.Cmd.BYE)
            except zmq.ZMQError:
                pass
            self._close_socket(linger=100)

    def stop_private(self) -> None:
        if self.private is not None:
            self.private.stop()
            self.private = None
