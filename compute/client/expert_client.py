"""The compute side of the daemon protocol: ask hobbitd for experts, get pinned slots in
shared memory, release them after use.

One client per compute process, used from one thread. With a control block (hobbitd
offers one where the kernel has membarrier; loader/control.py) a layer whose experts are
all cached costs no message: the client finds them in the slot directory, pins them in its
own row and reports the hits later, batched with its next message (HITS at the end of a
forward at the latest); releases of slots hobbitd gave ride along the same way. Requests
block until the daemon answers.

Liveness. ZeroMQ pings the daemon every HEARTBEAT_IVL_MS and drops the connection after
HEARTBEAT_TIMEOUT_MS without an answer; a daemon that dies drops it at once. A wait for an
answer looks at the connection every LIVENESS_S (the answer itself ends the wait at once:
no extra round trip), so a client learns within about 2 s that its daemon is gone, also in
the middle of a request. Then it reconnects (_recover): HELLO again with backoff until a
hobbitd answers at the socket or `reconnect_s` passed (DaemonError daemon_lost), maps the
new shared memory and control block and asks again what it was waiting for. The forward
re-points its tensors at part_bases() before every layer, and the resident table and the
handles of hits pinned in our row belong to one HELLO (`generation`), so neither computes
on nor unpins in the old daemon's memory past that point. A mapping of a dead daemon's
segment stays valid (its pages live while mapped), so a forward already computing on it
finishes with the right bytes.

A daemon alive but silent for `timeout` seconds is asked again on a new socket, up to
`retries` times, after which DaemonError says so. A daemon that forgot us answers
no_session: the client says HELLO again.
"""
from __future__ import annotations

import itertools
import os
import threading
import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from ...loader import control
from ...loader.layout import SlotFormat, SlotRegion
from ...loader.precision import HIGH, LOW, SKIP, Thresholds
from ...loader.shm import Segment
from ...protocol import messages as m
from ...protocol.errors import DaemonError, ProtocolError

LIVENESS_S = 0.25          # a wait for an answer looks at the connection this often
HEARTBEAT_IVL_MS = 500     # ZeroMQ pings the daemon this often...
HEARTBEAT_TIMEOUT_MS = 1500   # ...and drops the connection after this long without a pong
HELLO_S = 1.0              # reconnecting: how long one HELLO waits for its WELCOME
BACKOFF_S = (0.05, 1.0)    # reconnecting: the first and the longest pause between HELLOs
RECONNECT_S = 30.0         # default deadline for finding a hobbitd again
USED_EVERY_S = 0.25        # one-token forwards on resident experts are reported this often


class _Lost(Exception):
    """The connection to the daemon dropped while waiting for an answer."""


class _Pinned(list):
    """The handles of one layer's hits pinned by ourselves (_pin_cached), with their row
    indices: release() unpins them in one step."""

    def __init__(self, handles, ids: list, generation: int):
        super().__init__(handles)
        self.ids, self.generation = ids, generation


class ExpertClient:
    remote = True     # the experts come from hobbitd, which needs CPU of its own (Model threads)

    def __init__(self, socket_path: str, model_path: str | None, timeout: float = 30.0,
                 retries: int = 2, name: str | None = None, reconnect_s: float = RECONNECT_S):
        """model_path None: a client for stats only (no model, no shared memory). name: how
        hobbitd lists this client (default: the program and its subcommand). reconnect_s:
        how long to look for a hobbitd again once ours is gone (0: try once)."""
        self.name = (name or _program())[:64]
        self.socket_path = socket_path
        self.model_path = model_path and os.path.realpath(model_path)
        self.timeout, self.retries = timeout, retries
        self.ctx = zmq.Context.instance()
        self.sock = None
        self.shm: Segment | None = None
        self.model = None            # name the daemon knows our model by
        self.regions: dict[str, SlotRegion] = {}
        self._layout = None          # the regions' slot counts and formats, as sent
        self._ids = itertools.count(1)
        self._lock = threading.RLock()   # the socket is used by us and the heartbeat thread
        self._beat = None
        self.generation = 0          # HELLOs answered: a new one means new slots
        self.resident_possible = True    # False once hobbitd said it cannot hold every expert
        self._resident = None        # (generation, slot table) once every expert is pinned
        self.control: control.ControlBlock | None = None   # where we pin hits ourselves
        self._dirs: dict = {}        # precision -> int32 [n_layer, n_expert] slot directory
        self._first: dict = {}       # precision -> our row's index of its slot 0
        self._row = None             # our pin counts (int32 view), or None: ask for every hit
        self.thresholds = Thresholds()
        self.holds_all = False
        self._hits: list = []        # hits pinned ourselves, not yet reported
        self._release: list = []     # slots hobbitd gave, done with, not yet released
        self._used = None            # [uses, seq, token, forwards] of one-token forwards not yet sent
        self._used_sent = 0.0        # time.monotonic() of the last USED
        self._position = (0, 0, 1)   # (seq, token, n_tokens) of the forward those belong to
        self._checked = False        # the daemon was found alive during this forward
        self.local_hits = 0          # layers served from the directory, no message
        self.round_trips = 0
        self.wait_seconds = 0.0      # time spent waiting for the daemon's answers
        self.private = None          # a hobbitd this client owns (client/connect.py), stopped with it
        self.reconnect_s = reconnect_s
        self.reconnects = 0          # times a lost daemon was found again
        self.announce = None         # callable(line): told when the daemon is lost and found
        self._mon = None             # the socket's monitor: its disconnections
        self._lost = False           # the connection dropped (and has not been replaced)
        self._connect()

    # ---- connection ------------------------------------------------------------------

    def _connect(self) -> None:
        if not os.path.exists(self.socket_path):
            raise DaemonError("no_daemon", f"no hobbitd socket at {self.socket_path} "
                                           "(start hobbitd, or use --no-daemon)")
        self._open_socket()
        try:
            self._hello()
        except _Lost:
            raise DaemonError("no_daemon", f"hobbitd at {self.socket_path} went away "
                                           "while we said HELLO") from None

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

    def _hello(self) -> None:
        self._welcome(self._call(m.Cmd.HELLO, m.Cmd.WELCOME, _hello=True, **self._hello_fields()))

    def _hello_fields(self) -> dict:
        # our model's path: a daemon with model folders opens it if it does not serve it yet
        model = {} if self.model_path is None else {"model": self.model_path}
        return {"version": m.VERSION, "pid": os.getpid(), "name": self.name, **model}

    def _welcome(self, welcome: dict) -> None:
        """Take a WELCOME: our model's name and regions there, its shared memory mapped."""
        if self.model_path is None:
            return
        for name, info in welcome["models"].items():
            if os.path.realpath(info["path"]) == self.model_path:
                break
        else:
            served = ", ".join(welcome["models"]) or "none"
            raise DaemonError("unknown_model", f"hobbitd at {self.socket_path} does not serve "
                                               f"{self.model_path} (it serves: {served})")
        layout = {p: (r["n_slots"], r["format"]) for p, r in info["regions"].items()}
        if self.generation and layout != self._layout:
            # the forward's tensors were made for the old regions (slot counts, types)
            raise DaemonError("layout_changed", f"hobbitd at {self.socket_path} came back "
                              "with another cache layout for this model; start this client again")
        self._layout = layout
        self.model = name
        self.generation += 1
        self.resident_possible = True    # this daemon may have another cache size
        self._start_heartbeat(float(welcome.get("heartbeat_s") or 1.0))
        self.regions = {p: SlotRegion(r["n_slots"], SlotFormat.from_wire(r["format"]), r["offset"],
                                      r.get("first_slot"), r.get("directory"))
                        for p, r in info["regions"].items()}
        self.thresholds = Thresholds(**info["thresholds"])
        self.holds_all = bool(info["holds_all"])
        # a model opened on demand has its own segment and control block (our row is the same)
        shm, size = info.get("shm", welcome["shm"]), info.get("shm_size", welcome["shm_size"])
        if self.shm is None or self.shm.name != shm:
            old = self.shm
            self.shm = Segment(shm, size)
            if old is not None:
                old.close()
        ctl = welcome.get("control")
        if ctl and "control" in info:
            ctl = {**info["control"], "row": ctl["row"]}
        self._attach_control(ctl, info)

    def _attach_control(self, ctl: dict | None, info: dict) -> None:
        """Map the control block and our pin row (a new HELLO: what was pending belonged to
        the old session and goes)."""
        self._hits, self._release, self._row, self._dirs, self._first = [], [], None, {}, {}
        self._used = None            # counted by the daemon that is gone, or by none
        if self.control is not None:
            self.control.close()
            self.control = None
        if not ctl or ctl.get("row") is None or not control.register_client():
            return
        self.control = control.ControlBlock.attach(ctl["shm"], ctl["size"], ctl["rows_offset"],
                                                   ctl["n_slots"])
        self._row = self.control.rows[ctl["row"]]
        for p, r in info["regions"].items():
            self._dirs[p] = self.control.directory(r["directory"], info["n_layer"], info["n_expert"])
            self._first[p] = r["first_slot"]

    def region_address(self, precision: str) -> int:
        return self.shm.address + self.regions[precision].offset

    # the ExpertProvider protocol the segmented forward uses (engine/experts.py)

    def part_bases(self, precision: str, layer: int) -> tuple:
        """Addresses of slot 0's parts of `layer` (gate/up/down, then any biases) in our
        mapping (SlotFormat.offsets)."""
        base = self.region_address(precision)
        return tuple(base + o for o in self.regions[precision].format.offsets(layer))

    def part_strides(self, precision: str, layer: int) -> tuple:
        """One slot to the next: the same for every layer (slots fit the largest layer)."""
        fmt = self.regions[precision].format
        return (fmt.slot_bytes,) * len(fmt.parts)

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """The experts' handles: pinned by ourselves when the directory has each one in the
        precision hobbitd's rule would serve (local handles carry our row's index and the
        session), else asked of hobbitd."""
        self._position = (int(seq), int(token), int(n_tokens))
        if not self._checked:
            # once per forward (flush() ends one): the directory of a dead daemon would
            # still say "cached". Within a forward its slots stay mapped and whole (no one
            # writes them any more), so what we pinned before it died computes right.
            self._check_alive()
            self._checked = True
        local = self._pin_cached(layer, experts, scores)
        if local is None:
            return self.request(layer, experts, scores, seq, token, n_tokens)
        self.local_hits += 1
        self._hits.append([int(layer), list(map(int, experts)),
                           [None if h is None else [h[0], h[1]] for h in local],
                           list(map(float, scores))])
        return local

    def _cached(self, layer: int, experts, scores):
        """[(precision, index) or None (skipped)] for experts the directory holds in the
        precision loader.precision's rule picks (as ModelCache.decide); None if one is not."""
        if self._row is None:
            return None
        th = self.thresholds
        found = self._entries(layer)
        high, low = found.get(HIGH), found.get(LOW)
        if high is not None and not th.low_only:
            hs = [high[e] for e in experts]
            if min(hs) >= 0:          # the rule's first case: a high copy is used as it is
                return [(HIGH, i) for i in hs]
            if self.holds_all:        # hobbitd serves every expert in high precision
                return None
        out = []
        for e, score in zip(experts, scores):
            h = high[e] if high is not None else -1
            lo = low[e] if low is not None else -1
            prec, load = th.choose(float(score), h >= 0, lo >= 0)
            if prec is not SKIP and prec not in self._dirs:
                return None         # hobbitd falls back to the other precision: ask it
            if load:
                return None
            out.append(None if prec is SKIP else (prec, h if prec == HIGH else lo))
        return out

    def _entries(self, layer: int) -> dict:
        """{precision: the directory's E entries of `layer`, as a list} (a snapshot)."""
        return {p: d[layer].tolist() for p, d in self._dirs.items()}

    def _pin_cached(self, layer: int, experts, scores):
        """_cached's handles pinned in our row, or None (nothing pinned). The pin holds only
        if the directory still says the same after it (loader/control.py)."""
        got = self._cached(layer, experts, scores)
        if got is None:
            return None
        first = self._first
        ids = [first[h[0]] + h[1] for h in got if h is not None]
        self._row[ids] += 1
        # every entry we pinned unchanged (a slot freed and refilled with the same expert
        # has the same key, so the same bytes)
        now = self._entries(layer)
        if any(h is not None and now[h[0]][e] != h[1] for e, h in zip(experts, got)):
            self._row[ids] -= 1       # evicted meanwhile: hobbitd decides
            return None
        gen = self.generation
        return _Pinned([None if h is None else (h[0], h[1], first[h[0]] + h[1], gen) for h in got],
                       ids, gen)

    def fetch_pairs(self, layer: int, sel, scores, fetched: dict) -> list:
        """Each use of an expert gets the one slot hobbitd gave that expert for the batch."""
        return [[fetched[e] for e in row] for row in np.asarray(sel).tolist()]

    # ---- requests --------------------------------------------------------------------

    def _send(self, cmd, **fields) -> None:
        with self._lock:
            if self.sock is not None:       # closed: nothing to tell anyone
                self.sock.send_multipart(m.encode(cmd, **fields))

    def _start_heartbeat(self, every: float) -> None:
        """While a forward computes on pinned slots it sends nothing; a heartbeat every
        `every` seconds keeps the daemon from taking it for dead and freeing its pins."""
        if self._beat is not None:
            return
        stop = threading.Event()

        def beat():
            while not stop.wait(every):
                try:
                    self._send(m.Cmd.HEARTBEAT)
                except zmq.ZMQError:
                    pass
        self._beat = stop
        threading.Thread(target=beat, name="hobbit-heartbeat", daemon=True).start()

    def _call(self, cmd, expect, _hello=False, **fields) -> dict:
        with self._lock:
            return self._call_locked(cmd, expect, _hello, **fields)

    def _call_locked(self, cmd, expect, _hello=False, **fields) -> dict:
        """Send and wait for the matching answer. The daemon gone: find one again
        (_recover) and ask again; silence: reconnect (a new socket) and try again;
        no_session (the daemon restarted or forgot us): HELLO again and retry. With
        _hello, a lost connection raises _Lost (the caller is reconnecting)."""
        tries, lost_since = 0, None
        if self.sock is None:            # lost before, past a deadline: look again first
            lost_since = time.monotonic()
            self._recover(lost_since + self.reconnect_s)
            fields = self._renamed(fields)
        while True:
            self._send(cmd, **fields)
            try:
                reply = self._receive(fields.get("id"))
            except _Lost:
                if _hello:
                    raise
                lost_since = lost_since or time.monotonic()   # one deadline for this call
                self._recover(lost_since + self.reconnect_s)
                fields = self._renamed(fields)
                continue
            if reply is None:
                tries += 1
                if tries > self.retries:
                    raise DaemonError("timeout", f"hobbitd at {self.socket_path} did not "
                                      f"answer within {self.timeout:g} s ({tries} tries)")
                self._open_socket()
                continue
            got, msg = reply
            if got == expect:
                return msg
            if got == m.Cmd.ERROR and msg["code"] == "no_session" and not _hello:
                self._open_socket()
                try:
                    self._hello()
                except _Lost:
                    lost_since = lost_since or time.monotonic()
                    self._recover(lost_since + self.reconnect_s)
                fields = self._renamed(fields)
                continue
            if got == m.Cmd.ERROR:
                raise DaemonError(msg["code"], f"hobbitd: {msg['message']}")
            raise DaemonError("malformed", f"hobbitd answered {got.name} to {cmd.name}")

    def _renamed(self, fields: dict) -> dict:
        """A request's fields after a new HELLO: our model by its name there, without what
        was batched for the old session (its slots mean nothing to the new one)."""
        fields = {k: v for k, v in fields.items() if k not in ("hits", "release")}
        return {**fields, "model": self.model} if "model" in fields else fields

    def _check_alive(self) -> None:
        """Before using what the daemon gave (its mapping, its directory, our pins there):
        if it is gone, find one again (a poll of the socket's monitor: no message)."""
        with self._lock:
            if self.sock is None or self._daemon_gone():
                self._recover(time.monotonic() + self.reconnect_s)

    def _recover(self, deadline: float) -> None:
        """Our daemon is gone: HELLO at the socket with backoff until a hobbitd answers
        (then its shared memory is mapped and `generation` moves on), or DaemonError
        daemon_lost once `deadline` (time.monotonic()) passed. A private daemon that died
        is restarted here: nobody else would."""
        t0 = time.monotonic()
        self._say(f"hobbit: lost hobbitd at {self.socket_path}; reconnecting "
                  f"(for up to {max(deadline - t0, 0):.0f} s)")
        pause, restarted = BACKOFF_S[0], False
        while True:
            if self.private is not None and not restarted and self.private.died():
                restarted = True         # once: a daemon that cannot start will not now
                try:
                    self.private.restart(timeout=max(deadline - time.monotonic(), 1.0))
                except (DaemonError, OSError) as e:
                    self._say(f"hobbit: restarting the private hobbitd failed: {e}")
            if os.path.exists(self.socket_path):
                self._open_socket()
                self._send(m.Cmd.HELLO, **self._hello_fields())
                try:
                    reply = self._receive(None, min(HELLO_S, max(deadline - time.monotonic(), 0.1)))
                except _Lost:
                    reply = None
                if reply is not None and reply[0] == m.Cmd.WELCOME:
                    self._welcome(reply[1])
                    self.reconnects += 1
                    self._say(f"hobbit: reconnected to hobbitd at {self.socket_path} after "
                              f"{time.monotonic() - t0:.1f} s")
                    return
                if reply is not None and reply[0] == m.Cmd.ERROR:
                    raise DaemonError(reply[1]["code"], f"hobbitd: {reply[1]['message']}")
            left = deadline - time.monotonic()
            if left <= 0:
                self._close_socket()   # its HELLO may still reach a later daemon: unasked
                raise DaemonError("daemon_lost", f"hobbitd at {self.socket_path} is gone and "
                                  f"none answered there within {self.reconnect_s:g} s")
            time.sleep(min(pause, left))
            pause = min(2 * pause, BACKOFF_S[1])

    def _say(self, line: str) -> None:
        if self.announce is not None:
            self.announce(line)

    def _receive(self, request_id, timeout: float | None = None):
        """The next answer (skipping stale answers to requests given up on), or None after
        `timeout` (default self.timeout) seconds of silence; _Lost when the connection
        dropped meanwhile."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not self.sock.poll(int(min(left, LIVENESS_S) * 1000)):
                if self._daemon_gone():
                    raise _Lost
                continue
            try:
                got, msg = m.decode(self.sock.recv_multipart())
            except ProtocolError as e:
                raise DaemonError(e.code, f"hobbitd sent a bad message: {e}") from None
            if request_id is not None and msg.get("id") not in (None, request_id):
                continue
            self.round_trips += 1
            self.wait_seconds += time.perf_counter() - t0
            return got, msg

    def request(self, layer: int, experts, scores=None, seq: int = 0, token: int = 0,
                n_tokens: int = 1) -> list:
        """Pinned slots [(precision, index) or None if skipped] for `experts` of `layer`;
        scores are their unimportance (hobbitd picks precisions from them); seq and token
        place the request in the client's sequence for the cache policy; n_tokens is how
        many tokens the forward computes (for the daemon's per-client token counts)."""
        fields = {"id": next(self._ids), "model": self.model, "layer": int(layer),
                  "experts": [int(e) for e in experts], "seq": int(seq), "token": int(token),
                  "tokens": int(n_tokens), **self._batched()}
        if scores is not None:
            fields["scores"] = [float(s) for s in scores]
        reply = self._call(m.Cmd.REQUEST, m.Cmd.SLOTS, **fields)
        return [tuple(s) if s is not None else None for s in reply["slots"]]

    def _batched(self) -> dict:
        """What rides along with the next message: hits to report, slots to release."""
        out = {}
        if self._hits:
            seq, token, n = self._position
            out.update(hits=self._hits, seq=seq, token=token, tokens=n)
            self._hits = []
        if self._release:
            out["release"], self._release = self._release, []
        return out

    def release(self, slots) -> None:
        """End the use of one fetch()'s handles: ours are unpinned at once, hobbitd's go
        with the next message (or flush())."""
        if isinstance(slots, _Pinned):    # pinned by ourselves, all at once
            if slots.generation == self.generation and self._row is not None and slots.ids:
                self._row[slots.ids] -= 1
            return
        self._release += [[h[0], h[1]] for h in slots if h is not None]   # hobbitd's

    def flush(self) -> None:
        """The forward is over: report what is batched (no answer)."""
        self._checked = False
        try:
            self._send_used()
        except zmq.ZMQError:
            pass
        if self._hits or self._release:
            batched = self._batched()
            try:
                self._send(m.Cmd.HITS, model=self.model, hits=batched.pop("hits", []), **batched)
            except zmq.ZMQError:
                pass      # the daemon is gone: nothing of this matters to a new one

    def hint(self, layer: int, predictions, compute_s: float | None = None) -> None:
        """Lookahead from `layer`: predictions [(target layer, experts, scores)], nearest
        first; compute_s: our seconds of compute before the next request (the daemon's
        prefetch budget). No answer; the daemon prefetches up to the first predicted miss.
        Not sent when the directory holds every predicted expert: nothing to do there."""
        if not predictions or all(self._cached(t, ex, sc) is not None for t, ex, sc in predictions):
            return
        timed = {} if compute_s is None else {"compute_s": float(compute_s)}
        self._send(m.Cmd.HINT, model=self.model, layer=int(layer),
                   layers=[int(t) for t, _, _ in predictions],
                   experts=[[int(e) for e in ex] for _, ex, _ in predictions],
                   scores=[[float(x) for x in sc] for _, _, sc in predictions], **timed,
                   **self._batched())

    def holds(self, first: int, last: int) -> bool:
        """The directory holds every expert of layers [first, last) in high precision (low
        for a low-only model): _cached finds any prediction of them, whatever its scores."""
        d = self._dirs.get(LOW if self.thresholds.low_only else HIGH)
        return d is not None and bool((d[first:last] >= 0).all())

    def resident(self):
        """The (n_layer, n_expert) int32 slot table of every expert, pinned for us until
        close(), once hobbitd holds them all in high precision (it starts reading the
        missing ones at the first ask); None meanwhile, or for good when it cannot."""
        self._check_alive()      # never compute on a dead daemon's pins unknowingly
        if self._resident is not None and self._resident[0] == self.generation:
            return self._resident[1]
        if not self.resident_possible:
            return None
        r = self._call(m.Cmd.RESIDENT, m.Cmd.RESIDENT_REPLY, id=next(self._ids), model=self.model)
        if r["total"] == 0:
            self.resident_possible = False
        if r.get("slots") is None:
            return None
        self._resident = (self.generation, np.asarray(r["slots"], np.int32))
        return self._resident[1]

    def used(self, uses: int, seq: int, token: int, n_tokens: int) -> None:
        """A forward on resident experts used `uses` of them. One-token forwards are summed
        and sent at most every USED_EVERY_S (and by flush(), stats() and close()): a note
        per decode step cost hobbitd and this client ~0.4 ms each, 5 % of a step on the
        default model; hobbitd's counts lag by that interval at most."""
        if n_tokens > 1:            # a prompt: counted as one, now
            self._send_used()
            self._send(m.Cmd.USED, model=self.model, uses=int(uses), seq=int(seq), token=int(token),
                       tokens=int(n_tokens))
            return
        p = self._used
        self._used = [p[0] + int(uses), int(seq), int(token), p[3] + 1] if p else [int(uses), int(seq), int(token), 1]
        if time.monotonic() - self._used_sent >= USED_EVERY_S:
            self._send_used()

    def _send_used(self) -> None:
        """Send the summed one-token forwards (USED), if any."""
        if self._used is None:
            return
        uses, seq, token, n = self._used
        self._used, self._used_sent = None, time.monotonic()
        self._send(m.Cmd.USED, model=self.model, uses=uses, seq=seq, token=token, tokens=n, forwards=n)

    def stats(self) -> dict:
        self.flush()                # the counts include every forward so far
        return self._call(m.Cmd.STATS, m.Cmd.STATS_REPLY)["stats"]

    def close(self) -> None:
        if self._beat is not None:
            self._beat.set()
        if self.sock is not None:
            self.flush()
            try:
                self._send(m.Cmd.BYE)
            except zmq.ZMQError:
                pass
            self._close_socket(linger=100)
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if self.control is not None:
            self._row, self._dirs = None, {}
            self.control.close()
            self.control = None
        if self.private is not None:
            self.private.stop()
            self.private = None


def _program() -> str:
    """'hobbit-cli chat', 'my_app.py', ...: what `hobbit-cli top` shows for this client."""
    import sys

    argv = sys.argv or ["python"]
    prog = os.path.basename(argv[0]) or "python"
    if prog == "cli.py" or prog == "-m":
        prog = "hobbit-cli"
    sub = argv[1] if len(argv) > 1 and not argv[1].startswith("-") and prog.startswith("hobbit") else ""
    return f"{prog} {sub}".strip()
