"""hobbitd's server: the ZeroMQ ROUTER, client sessions, and the cache of expert slots.

Lifecycle: startup() (open models, plan the cache, claim the socket, create the shared
memory and the I/O engine) → serve() until stop() → shutdown() (answer or drain what is in
flight, close, unlink the shared memory, remove the socket). Everything runs on one asyncio
loop; disk reads happen on the IOEngine's threads, which hand completions back with
loop.call_soon_threadsafe, so the loop never blocks on flash.

Pins. A slot named in a SLOTS reply is pinned once for the requesting session: it is never
evicted or overwritten until that session RELEASEs it, says BYE, or goes silent for longer
than client_timeout with no request in flight. A miss pins its slot as soon as it is taken
(before the read), so the slot cannot be given away between the read and the reply.

Oversized messages: the ROUTER's MAXMSGSIZE is MAX_MESSAGE + 1 KiB. A body a little over
MAX_MESSAGE is answered ERROR too_large; beyond the socket limit ZeroMQ drops the message and
disconnects that peer without an answer (the daemon never buffers a huge message).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil
import zmq
import zmq.asyncio

from ..loader.io_engine import DEMAND, PREFETCH, IOEngine
from ..loader.layout import ExpertSource
from ..loader.policy import PolicyWeights, make_policy
from ..loader.pool import Region, Slot, plan_regions
from ..loader.precision import HIGH, LOW, SKIP, Thresholds
from ..loader.shm import SHM_DIR, Segment, new_name
from ..protocol import messages as m
from ..protocol.errors import DaemonError, HobbitError, InputError, ModelError, ProtocolError
from .config import DaemonConfig, default_socket
from .notify import sd_notify

log = logging.getLogger("hobbitd")

MiB = 1 << 20
PROBE_S = 0.5          # how long a live daemon on our socket has to answer a HELLO
DRAIN_S = 2.0          # shutdown: how long in-flight requests may run before shutting_down
REAP_EVERY_S = 0.5
EWMA = 0.2             # weight of a new sample in the prefetch budget's running averages
GAP_MAX_S = 0.1        # a client silent longer than this between requests was idle, not computing
STATUS_EVERY_S = 10.0
CLOSE_LINGER_MS = 100  # not 0: the shutting_down answers just queued should still go out
SUN_PATH_MAX = 107     # bytes in a unix socket path (sockaddr_un.sun_path minus the NUL)


class RequestError(HobbitError):
    """A request answered with ERROR `code` (a protocol error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Session:
    """One client (a ROUTER identity) between HELLO and BYE or its timeout."""
    sid: int                  # pin owner; unique for the daemon's life (identities are reused)
    ident: bytes
    pid: int | None
    name: str
    last_seen: float          # time.monotonic() of its last message
    inflight: int = 0         # requests being served: never reaped while > 0
    alive: bool = True
    pins: Counter = field(default_factory=Counter)   # Slot -> pins this session holds
    protected: list = field(default_factory=list)     # slots its last HINT protects
    replied_at: float = 0.0   # time.monotonic() of its last SLOTS
    gap_s: float | None = None   # its time between a SLOTS and its next REQUEST (EWMA): compute
    connected: float = field(default_factory=time.monotonic)
    # what it asked for (hobbit-cli top shows their rates per client)
    experts: int = 0
    hits: int = 0             # served from the cache (including reads already in flight)
    misses: int = 0
    skipped: int = 0
    tokens: int = 0           # decoded: forwards of one token
    prompt_tokens: int = 0    # in forwards of more than one token
    last_forward: tuple = ()  # (seq, token) of its last request: a new one starts a forward

    def count_forward(self, seq, token, n_tokens) -> None:
        """Count a forward's tokens once, at its first request (the client's first layer)."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1 \
                or (seq, token) == self.last_forward:
            return
        self.last_forward = (seq, token)
        if n_tokens == 1:
            self.tokens += 1
        else:
            self.prompt_tokens += n_tokens

    def stats(self) -> dict:
        return {"name": self.name, "pid": self.pid,
                "connected_s": round(time.monotonic() - self.connected, 3),
                "experts": self.experts, "hits": self.hits, "misses": self.misses,
                "skipped": self.skipped, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens}


@dataclass(eq=False)
class Model:
    name: str
    path: str                 # realpath of the GGUF
    n_layer: int
    n_expert: int
    source: ExpertSource
    low: ExpertSource | None = None                  # the companion file, if served
    crcs: list | None = None                         # the companion's per-expert crc32
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibrated: bool = False
    regions: dict = field(default_factory=dict)      # precision -> Region
    policy: object = None
    loads: dict = field(default_factory=dict)        # (precision, layer, expert) -> Future of its read
    # hits + waits + misses + skipped = experts requested; waits: hits on a read in flight
    requested: int = 0
    hits: int = 0
    misses: int = 0
    waits: int = 0
    skipped: int = 0
    by_precision: Counter = field(default_factory=Counter)   # "hits_high", "misses_low", ...
    prefetched: int = 0        # prefetch reads issued
    prefetch_used: int = 0     # prefetched slots a request then hit
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed submit-to-completion time of this model's reads
    demand_Bps: float | None = None   # bytes/s a request with misses was served at (EWMA)

    def source_of(self, precision: str) -> ExpertSource:
        return self.low if precision == LOW else self.source

    def info(self) -> dict:
        return {"path": self.path, "n_layer": self.n_layer, "n_expert": self.n_expert,
                "regions": {p: {"offset": r.offset, "n_slots": r.n_slots,
                                "format": r.format.to_wire()} for p, r in self.regions.items()}}

    def stats(self) -> dict:
        mbps = self.bytes_read / self.read_seconds / 1e6 if self.read_seconds else 0.0
        th = self.thresholds
        return {"requested": self.requested, "hits": self.hits, "misses": self.misses,
                "waits": self.waits, "skipped": self.skipped,
                **{k: self.by_precision[k] for k in ("hits_high", "hits_low", "misses_high", "misses_low")},
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
                "bytes_read": self.bytes_read, "read_seconds": round(self.read_seconds, 6),
                "read_MBps": round(mbps, 1),
                "hobbit": {"t1": th.t1, "t2": th.t2, "dynamic": th.dynamic, "low_only": th.low_only,
                           "calibrated": self.calibrated, "policy": self.policy.name,
                           "policy_weights": list(getattr(self.policy, "w", PolicyWeights()).__dict__.values())
                           if self.policy.name == "hobbit" else None,
                           "low_type": self.low and _type_name(self.low.format.types[0])},
                "regions": {p: r.counts() for p, r in self.regions.items()}}


class Signal:
    """Wake every waiter. Unlike asyncio.Condition, fire() needs no lock, so plain callbacks
    (a RELEASE, a read completion) can call it."""

    def __init__(self):
        self._fut: asyncio.Future | None = None

    def fire(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None

    async def wait(self, timeout: float) -> bool:
        """True when fired within timeout seconds."""
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._fut), max(timeout, 0))
            return True
        except asyncio.TimeoutError:
            return False


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.socket_path = os.path.abspath(cfg.socket or default_socket())
        self.models: dict[str, Model] = {}
        self.sessions: dict[bytes, Session] = {}
        self.shm: Segment | None = None
        self.io: IOEngine | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.router = None
        self.stopping = False
        self._stop = asyncio.Event()
        self._freed = Signal()       # a slot may have become takeable (release, read done)
        self._sids = itertools.count(1)
        self._requests: set[asyncio.Task] = set()
        self._jobs: dict = {}        # (model, key) -> ReadJob submitted, not yet completed
        self._bound = False
        self.started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        """Raise HobbitError (nothing left behind) if the daemon cannot serve."""
        self.loop = asyncio.get_running_loop()
        self._open_models()
        plan, total = self._plan()
        self.ctx = zmq.asyncio.Context()
        await self._claim_socket()
        free = _shm_free()
        if free is not None and total > free:
            raise InputError(f"the cache needs {total / MiB:.0f} MiB of shared memory but "
                             f"{SHM_DIR} has {free / MiB:.0f} MiB free; lower --cache-size "
                             f"or enlarge {SHM_DIR}")
        self.shm = Segment(new_name(), total, create=True)
        for name, precision, fmt, offset, n in plan:
            self.models[name].regions[precision] = Region(name, precision, fmt, offset, n)
        self.io = IOEngine(self.cfg.io_threads, self.cfg.io_limit or None, self.cfg.direct_io)
        self._bind()
        for mo in self.models.values():
            slots = ", ".join(f"{r.n_slots} {p} slots of {r.format.slot_bytes / MiB:.2f} MiB"
                              for p, r in mo.regions.items())
            th = mo.thresholds
            log.info("model %s: %d layers x %d experts, %s (%s); policy %s, %s", mo.name,
                     mo.n_layer, mo.n_expert, slots, mo.path, mo.policy.name,
                     "low precision only" if th.low_only else
                     f"T1 {th.t1:g} T2 {th.t2:g}{' (calibrated)' if mo.calibrated else ''}"
                     if th.dynamic else "high precision only")
        log.info("listening on %s, shared memory %s (%.0f MiB), %d I/O threads%s",
                 self.socket_path, self.shm.path, total / MiB, self.cfg.io_threads,
                 f", limit {self.cfg.io_limit / MiB:.0f} MiB/s" if self.cfg.io_limit else "")

    async def serve(self) -> None:
        """Receive and answer until stop(). Raises if a service task dies (a bug)."""
        sd_notify(f"READY=1\nSTATUS=serving {len(self.models)} models, "
                  f"cache {self.shm.size / MiB:.0f} MiB")
        services = [self._receive(), self._reap()]
        if os.environ.get("NOTIFY_SOCKET"):
            services.append(self._status())
        tasks = [asyncio.create_task(c) for c in services]
        stopped = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopped:
                    t.result()      # re-raise what killed a service task
        finally:
            for t in [stopped, *tasks]:
                t.cancel()
            await asyncio.gather(stopped, *tasks, return_exceptions=True)

    def stop(self) -> None:
        """Ask serve() to return (safe from a signal handler)."""
        self._stop.set()

    async def shutdown(self, drain: float = DRAIN_S) -> None:
        """Release everything startup() made; safe after a failed or partial startup."""
        self.stopping = True
        if self.router is not None:
            sd_notify("STOPPING=1")
        self._freed.fire()               # requests waiting for a slot answer shutting_down
        if self._requests:
            _, pending = await asyncio.wait(self._requests, timeout=drain)
            for t in pending:
                t.cancel()               # each answers ERROR shutting_down
            await asyncio.gather(*pending, return_exceptions=True)
        if self.router is not None:
            self.router.close(linger=CLOSE_LINGER_MS)
        if self.io is not None:
            await asyncio.to_thread(self.io.close)
            await asyncio.sleep(0)       # run the completions the readers just scheduled
        if self.shm is not None:
            if any(j.state == "running" for j in self._jobs.values()):
                # a reader is stuck mid-read into the mapping: unlink, keep it mapped till exit
                log.warning("a read is still running; leaving it to the process exit")
                os.unlink(self.shm.path)
            else:
                self.shm.close()         # unmaps and unlinks
        if self._bound:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self.ctx is not None:
            self.ctx.term()
        if self._bound:
            log.info("stopped")

    def abandon(self) -> None:
        """A forced exit: remove the shared memory and socket files now, wait for nothing."""
        for path, ours in ((self.shm and self.shm.path, self.shm is not None),
                           (self.socket_path, self._bound)):
            if ours:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    # ---- startup pieces ------------------------------------------------------------------

    def _open_models(self) -> None:
        from ..loader.gguf_file import open_gguf   # deferred: importing gguf costs ~0.2 s
        from ..loader.layout import gguf_experts

        if not self.cfg.models:
            raise InputError("no model to serve: give --model GGUF (or models in the config)")
        names = [_model_name(p) for p in self.cfg.models]
        for name in set(names):
            if names.count(name) > 1:
                raise InputError(f"two models named {name!r}; a model's name is its file name "
                                 "without .gguf, so rename one")
        for path, name in zip(self.cfg.models, names):
            try:
                f = open_gguf(path)
            except OSError as e:
                raise ModelError(f"{path}: {e.strerror or e}") from None
            src = gguf_experts(f)
            mo = Model(name, os.path.realpath(path), src.n_layer, src.n_expert, src)
            self._hobbit_setup(mo, f)
            self.models[name] = mo

    def _hobbit_setup(self, mo: Model, weights) -> None:
        """The companion file (validated: foreign, truncated or stale files are refused),
        the thresholds (flags, else calibrated, else 0.6/0.9) and the eviction policy."""
        from ..loader import ggml_types
        from ..loader.calibration import load_calibration
        from ..loader.companion import companion_path, default_low_type, open_companion

        cfg = self.cfg
        path = None
        if cfg.low_type.lower() != "none":
            if cfg.low_type.lower() == "auto":
                t = default_low_type(mo.source.format)
            else:
                t = ggml_types.TYPES_BY_NAME.get(cfg.low_type.upper())
                if t is None:
                    raise InputError(f"--low {cfg.low_type}: unknown type")
            path = companion_path(weights.path, t)
            if not os.path.exists(path):
                if cfg.low_type.lower() != "auto" or cfg.low_only:
                    raise ModelError(f"{path}: no companion file; run hobbit-cli convert {weights.path}"
                                     f" --low {ggml_types.type_name(t)}")
                path = None
        if path:
            mo.low, mo.crcs = open_companion(weights, path)
        calib = load_calibration(path)
        t1 = cfg.t1 or (calib or {}).get("t1", 0.6)
        t2 = cfg.t2 or (calib or {}).get("t2", 0.9)
        mo.calibrated = calib is not None
        mo.thresholds = Thresholds(t1, max(t1, t2), dynamic=cfg.dynamic and mo.low is not None,
                                   low_only=cfg.low_only and mo.low is not None)
        weights_ = PolicyWeights(*calib["weights"]) if calib else None
        mo.policy = make_policy(cfg.policy, mo.n_layer, weights_)

    def _plan(self) -> tuple[list, int]:
        """Regions [(model, precision, fmt, offset, n_slots)] and the segment size. The cache
        is split among models in proportion to their expert bytes; a model gets at least
        one layer's experts (else InputError naming the minimum) and at most all of them."""
        size = self.cfg.cache_size or int(psutil.virtual_memory().available * 0.5)
        full = {n: mo.n_layer * mo.n_expert * mo.source.expert_bytes
                for n, mo in self.models.items()}
        shares = {n: b / sum(full.values()) for n, b in full.items()}
        specs = []
        for n, mo in self.models.items():
            th = mo.thresholds   # T1 >= 1 loads every miss in high: low slots would stay empty
            low = mo.low is not None and (th.low_only or (th.dynamic and th.t1 < 1.0))
            share = 0.0 if not low else 1.0 if mo.thresholds.low_only else self.cfg.low_share
            if share < 1:
                specs.append((n, HIGH, mo.source.format, shares[n] * (1 - share)))
            if low:
                specs.append((n, LOW, mo.low.format, shares[n] * share))
        plan = plan_regions(specs, size)
        for name, prec, fmt, _, n in plan:
            mo = self.models[name]
            if n < mo.n_expert:
                need = max(self.models[sp[0]].n_expert * sp[2].slot_bytes / sp[3] for sp in specs)
                raise InputError(f"cache size {size / MiB:.1f} MiB is too small: model {name} "
                                 f"would get {n} {prec} slots but needs {mo.n_expert} (one layer's "
                                 f"experts); the minimum cache size is {int(need // MiB) + 1}M")
        # a region never needs more slots than the model has experts; the offsets stay, the
        # unused tail of a region is never touched so it costs no memory
        plan = [(name, p, fmt, off, min(n, self.models[name].n_layer * self.models[name].n_expert))
                for name, p, fmt, off, n in plan]
        total = max(off + n * fmt.slot_bytes for _, _, fmt, off, n in plan)
        return plan, total

    async def _claim_socket(self) -> None:
        """Refuse if a live daemon answers on our socket; remove a stale socket file."""
        path = self.socket_path
        if len(path.encode()) > SUN_PATH_MAX:
            raise InputError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes; "
                             "choose a shorter --socket")
        if not os.path.lexists(path):
            return
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InputError(f"{path} exists and is not a socket; refusing to replace it")
        if await self._probe(path):
            raise DaemonError("socket_in_use", f"another hobbitd is serving on {path}")
        try:
            os.unlink(path)
        except OSError as e:
            raise DaemonError("socket_in_use", f"cannot remove stale socket {path}: "
                                               f"{e.strerror}") from None
        log.info("removed stale socket %s", path)

    async def _probe(self, path: str) -> bool:
        """True if something answers a HELLO on ipc://path within PROBE_S."""
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(f"ipc://{path}")
            await s.send_multipart(m.encode(m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(),
                                            name="hobbitd-probe"))
            if not await s.poll(PROBE_S * 1000):
                return False
            await s.send_multipart(m.encode(m.Cmd.BYE))   # do not leave a session behind
            await asyncio.sleep(0.01)                     # give the BYE a moment to leave
            return True
        finally:
            s.close(linger=0)

    def _bind(self) -> None:
        path = self.socket_path
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE + 1024)
        old = os.umask(0o117)            # the socket file is born 0660: no window of 0777
        try:
            self.router.bind(f"ipc://{path}")
        except zmq.ZMQError as e:
            raise DaemonError("socket_in_use", f"cannot listen on {path}: {e}") from None
        finally:
            os.umask(old)
        self._bound = True
        os.chmod(path, 0o660)

    # ---- receiving -----------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            try:
                self._dispatch(frames[0], frames[1:])
            except Exception as e:     # a bug: tell the client, keep serving
                log.exception("internal error handling a message")
                self._send(frames[0], m.Cmd.ERROR, code="internal", message=f"hobbitd: {e!r}")

    def _dispatch(self, ident: bytes, frames: list) -> None:
        s = self.sessions.get(ident)
        if s is not None:
            s.last_seen = time.monotonic()   # any message counts as a heartbeat
        try:
            cmd, msg = m.decode(frames)
        except ProtocolError as e:
            self._send(ident, m.Cmd.ERROR, code=e.code, message=str(e))
            return
        if cmd == m.Cmd.HELLO:
            return self._hello(ident, msg)
        if cmd == m.Cmd.BYE:
            if s is not None:
                self._drop(s, "said BYE")
            return
        if s is None:
            if cmd in (m.Cmd.HEARTBEAT, m.Cmd.HINT, m.Cmd.RELEASE):
                return    # they have no answer; a stale client learns at its next REQUEST
            rid = msg.get("id") if isinstance(msg.get("id"), int) else None
            return self._error(ident, "no_session", "no session: say HELLO first", rid)
        handler = {m.Cmd.REQUEST: self._on_request, m.Cmd.HINT: self._on_hint,
                   m.Cmd.RELEASE: self._on_release, m.Cmd.STATS: self._on_stats,
                   m.Cmd.HEARTBEAT: lambda s, msg: None}.get(cmd)
        if handler is None:
            return self._error(ident, "unknown_command", f"{cmd.name} is not a client command")
        handler(s, msg)

    def _send(self, ident: bytes, cmd: m.Cmd, **fields) -> None:
        # ROUTER sends never block: a reply to a vanished client is dropped by ZeroMQ
        fut = self.router.send_multipart([ident, *m.encode(cmd, **fields)])
        fut.add_done_callback(_log_send_error)

    def _error(self, ident: bytes, code: str, message: str, rid: int | None = None) -> None:
        extra = {} if rid is None else {"id": rid}
        self._send(ident, m.Cmd.ERROR, code=code, message=message, **extra)

    # ---- sessions ------------------------------------------------------------------------

    def _hello(self, ident: bytes, msg: dict) -> None:
        if msg["version"] != m.VERSION:
            return self._error(ident, "bad_version", f"protocol version {msg['version']}; "
                                                     f"hobbitd speaks {m.VERSION}")
        old = self.sessions.get(ident)
        if old is not None:
            self._drop(old, "said HELLO again")
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) else None
        s = Session(next(self._sids), ident, pid, str(msg.get("name", ""))[:64], time.monotonic())
        self.sessions[ident] = s
        if s.name != "hobbitd-probe":
            log.info("client %s (pid %s) connected", s.name or "?", pid)
        self._send(ident, m.Cmd.WELCOME, version=m.VERSION, shm=self.shm.name,
                   shm_size=self.shm.size, heartbeat_s=self.cfg.client_timeout / 3,
                   models={n: mo.info() for n, mo in self.models.items()})

    def _drop(self, s: Session, why: str) -> None:
        """End a session and release every pin it holds."""
        s.alive = False
        if self.sessions.get(s.ident) is s:
            del self.sessions[s.ident]
        n = sum(s.pins.values())
        for slot in s.pins:
            slot.pins.pop(s.sid, None)
        s.pins.clear()
        for slot in s.protected:
            slot.protected = False
        s.protected = []
        for mo in self.models.values():
            forget = getattr(mo.policy, "forget", None)
            if forget:
                forget(s.sid)
        self._freed.fire()
        if s.name != "hobbitd-probe":
            log.info("client %s (pid %s) %s; released %d pins", s.name or "?", s.pid, why, n)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.inflight == 0 and now - s.last_seen > self.cfg.client_timeout:
                    self._drop(s, f"silent for {now - s.last_seen:.1f} s")

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            hits = sum(mo.hits + mo.waits for mo in self.models.values())
            misses = sum(mo.misses for mo in self.models.values())
            sd_notify(f"STATUS=serving {len(self.models)} models to {len(self.sessions)} "
                      f"clients; {hits} hits, {misses} misses")

    # ---- pins ----------------------------------------------------------------------------

    def _pin(self, s: Session, slot: Slot) -> None:
        if s.alive:                  # a dead session would never release it
            slot.pins[s.sid] += 1
            s.pins[slot] += 1

    def _unpin(self, s: Session, slot: Slot) -> None:
        """Drop one of s's pins on slot; nothing if s holds none (never negative)."""
        if s.pins[slot] <= 0:
            s.pins.pop(slot, None)
            return
        s.pins[slot] -= 1
        if not s.pins[slot]:
            del s.pins[slot]
        slot.pins[s.sid] -= 1
        if slot.pins[s.sid] <= 0:
            del slot.pins[s.sid]     # a zero count would still read as pinned

    # ---- commands ------------------------------------------------------------------------

    def _validate(self, msg: dict) -> tuple[Model, int, list]:
        """(model, layer, experts) of a REQUEST; RequestError naming what is wrong. Field
        types were checked by decode(); ranges and duplicates are checked here."""
        mo = self._model(msg)
        self._check(mo, msg["layer"], msg["experts"])
        return mo, msg["layer"], msg["experts"]

    def _model(self, msg: dict) -> Model:
        mo = self.models.get(msg["model"])
        if mo is None:
            raise RequestError("unknown_model", f"no model {msg['model']!r} "
                                                f"(serving: {', '.join(self.models)})")
        return mo

    @staticmethod
    def _check(mo: Model, layer: int, experts: list) -> None:
        if not 0 <= layer < mo.n_layer:
            raise RequestError("bad_request", f"layer {layer} is out of range 0..{mo.n_layer - 1}")
        for e in experts:
            if not 0 <= e < mo.n_expert:
                raise RequestError("bad_request",
                                   f"expert {e} is out of range 0..{mo.n_expert - 1}")
        if len(set(experts)) != len(experts):
            raise RequestError("bad_request", f"duplicate experts in {experts}")

    def _on_request(self, s: Session, msg: dict) -> None:
        try:
            mo, layer, experts = self._validate(msg)
        except RequestError as e:
            return self._error(s.ident, e.code, str(e), msg["id"])
        scores = msg.get("scores") or [0.0] * len(experts)   # no scores: all important
        if s.replied_at:     # the client computed in between (pauses over GAP_MAX_S are idle)
            gap = time.monotonic() - s.replied_at
            if gap < GAP_MAX_S:
                s.gap_s = gap if s.gap_s is None else (1 - EWMA) * s.gap_s + EWMA * gap
        seq, token = msg.get("seq"), msg.get("token")
        if isinstance(seq, int) and isinstance(token, int):
            mo.policy.begin(s.sid, seq, token, layer)
            s.count_forward(seq, token, msg.get("tokens"))
        s.inflight += 1              # before the task starts: the reaper must not drop s
        t = asyncio.create_task(self._serve_request(s, mo, layer, experts, scores, msg["id"]))
        self._requests.add(t)
        t.add_done_callback(self._requests.discard)

    def _decide(self, mo: Model, key: tuple, score: float):
        """Token-level dynamic loading: the precision to use for one expert (None: skip)."""
        cached = {p: r.lookup(key) is not None for p, r in mo.regions.items()}
        prec, _ = mo.thresholds.choose(score, cached.get(HIGH, False), cached.get(LOW, False))
        if prec is not SKIP and prec not in mo.regions:    # e.g. no companion: high only
            prec = HIGH if HIGH in mo.regions else LOW
        return prec

    async def _serve_request(self, s: Session, mo: Model, layer: int, experts: list,
                             scores: list, rid: int) -> None:
        """Decide each expert's precision, acquire them concurrently (each pinned as soon
        as it is held), reply SLOTS ([precision, index], or None for a skipped expert); on
        any failure unpin what was acquired and reply ERROR."""
        t0, bytes0 = time.monotonic(), mo.bytes_read
        try:
            mo.requested += len(experts)
            precs = [self._decide(mo, (layer, e), float(sc)) for e, sc in zip(experts, scores)]
            mo.skipped += precs.count(SKIP)
            s.experts += len(experts)
            s.skipped += precs.count(SKIP)
            self.io.plug()      # the misses' reads start together, so adjacent ones merge
            acquired = asyncio.gather(*(self._acquire(s, mo, (layer, e), p, sc <= mo.thresholds.t1)
                                        for e, p, sc in zip(experts, precs, scores) if p is not SKIP),
                                      return_exceptions=True)
            self.loop.call_soon(self.io.unplug)   # runs after each _acquire's first step
            got = await acquired
            failed = [g for g in got if isinstance(g, BaseException)]
            if not s.alive:           # BYE or a new HELLO meanwhile: it holds none of these
                return self._error(s.ident, "no_session", "the session ended during the "
                                   "request; say HELLO again", rid)
            if failed:
                for g in got:
                    if isinstance(g, Slot):
                        self._unpin(s, g)
                self._freed.fire()
                e = failed[0]
                if not isinstance(e, RequestError):
                    log.error("request %s failed", rid, exc_info=e)
                    e = RequestError("internal", f"hobbitd: {e!r}")
                return self._error(s.ident, e.code, str(e), rid)
            it = iter(got)
            slots = [None if p is SKIP else [g.region.precision, g.index]
                     for p, g in ((p, None if p is SKIP else next(it)) for p in precs)]
            self._send(s.ident, m.Cmd.SLOTS, id=rid, slots=slots)
            s.replied_at = now = time.monotonic()
            if mo.bytes_read > bytes0 and now > t0:
                rate = (mo.bytes_read - bytes0) / (now - t0)
                mo.demand_Bps = rate if mo.demand_Bps is None else (1 - EWMA) * mo.demand_Bps + EWMA * rate
        except asyncio.CancelledError:
            self._error(s.ident, "shutting_down", "hobbitd is shutting down", rid)
            raise
        finally:
            s.inflight -= 1
            s.last_seen = max(s.last_seen, time.monotonic())   # it was waiting on us

    async def _acquire(self, s: Session, mo: Model, key: tuple, prec: str, important: bool) -> Slot:
        """The slot holding `key` in mo's `prec` region, ready and pinned once for s."""
        region = mo.regions[prec]
        waited, deadline = False, None
        while True:
            slot = region.lookup(key)
            if slot is not None and slot.state == "ready":
                self._pin(s, slot)
                mo.policy.touch(slot, s.sid, important)
                slot.protected = False    # used: the hint that protected it is fulfilled
                if slot.prefetched:       # a prefetch that paid off
                    slot.prefetched = False
                    mo.prefetch_used += 1
                if waited:
                    mo.waits += 1
                else:
                    mo.hits += 1
                s.hits += 1
                mo.by_precision[f"hits_{prec}"] += 1
                return slot
            if slot is not None:      # loading (for someone else, or a prefetch): share that read
                waited = True
                job = self._jobs.get((mo.name, prec, key))
                if job is not None:
                    self.io.promote(job.key)     # a demand overtakes the prefetch queue
                await asyncio.shield(mo.loads[prec, key])
                continue
            if self.stopping:         # hits still count while draining; no new reads or waits
                raise RequestError("shutting_down", "hobbitd is shutting down")
            slot = region.take(key, mo.policy)
            if slot is None:          # every slot pinned or loading: wait for a release
                deadline = deadline or time.monotonic() + self.cfg.slot_wait
                if not await self._freed.wait(deadline - time.monotonic()):
                    raise RequestError("cache_full", f"no free slot for {mo.name} within "
                                       f"{self.cfg.slot_wait:g} s: all {region.n_slots} {prec} "
                                       "slots are pinned")
                continue
            mo.misses += 1
            s.misses += 1
            mo.by_precision[f"misses_{prec}"] += 1
            self._pin(s, slot)        # pinned before the read: nobody can take it meanwhile
            try:
                await asyncio.shield(self._load(mo, slot, key, prec, DEMAND))
            except BaseException:
                self._unpin(s, slot)
                raise
            mo.policy.touch(slot, s.sid, important)
            return slot

    def _load(self, mo: Model, slot: Slot, key: tuple, prec: str, priority: int) -> asyncio.Future:
        """Read expert `key` in precision `prec` into `slot` (state loading) on the I/O
        threads. The future resolves when the slot is ready; the slot's state is settled
        by _loaded, whoever is (still) waiting. Low-precision images are checksummed."""
        from ..loader.companion import check_image, slot_image_offset

        fut = self.loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        mo.loads[prec, key] = fut
        src = mo.source_of(prec)
        base = self.shm.address + slot.offset
        verify = None
        if prec == LOW:   # one aligned read of the whole slot image, then its crc32
            segments = [(src.path, slot_image_offset(src, *key), src.format.slot_bytes, base)]
            verify = lambda job: check_image(src, mo.crcs, key[0], key[1], base)  # noqa: E731
        else:
            segments = [(src.path, off, n, base + src.format.part_offsets[p])
                        for p, (off, n) in enumerate(src.ranges(*key))]
        t0 = time.monotonic()

        def done(job, error):          # on a reader thread
            try:
                self.loop.call_soon_threadsafe(self._loaded, mo, slot, key, prec, fut, t0, error)
            except RuntimeError:
                pass                   # the loop is closed: the daemon is exiting

        jkey = (mo.name, prec, key)
        self._jobs[jkey] = self.io.submit(jkey, segments, priority, done, verify)
        return fut

    def _loaded(self, mo, slot, key, prec, fut, t0, error) -> None:
        from ..loader.companion import ChecksumError

        self._jobs.pop((mo.name, prec, key), None)
        if mo.loads.get((prec, key)) is fut:
            del mo.loads[prec, key]
        if error is not None:
            mo.regions[prec].drop(slot)
            code = "checksum" if isinstance(error, ChecksumError) else "io"
            fut.set_exception(RequestError(code, f"reading {mo.name} layer {key[0]} expert "
                                                 f"{key[1]} ({prec}): {error}"))
        else:
            slot.state = "ready"
            mo.bytes_read += mo.source_of(prec).expert_bytes
            mo.read_seconds += time.monotonic() - t0
            fut.set_result(slot)
        self._freed.fire()

    def _on_hint(self, s: Session, msg: dict) -> None:
        """Layer-level adaptive prefetch. The hint lists the experts a client predicts for
        its coming layers, nearest first, with their scores. Walk them: a layer whose
        predicted experts are all cached (in the precision the rule would use) is skipped;
        the first layer with a predicted miss gets its missing experts read at prefetch
        priority, protected from eviction until used or superseded, and the walk stops.

        Budget: a prefetch pays only while the client computes; beyond that its reads
        compete with the demand loads for flash, and a wrong guess costs a whole read. So
        (unless prefetch_budget is off) the missing experts are read, most important first,
        only up to the bytes flash can deliver in the client's compute time between two
        requests (both measured here, see _prefetch_budget), and at least one."""
        try:
            mo = self._model(msg)
            self._check(mo, msg["layer"], [])
            for layer, experts in zip(msg["layers"], msg["experts"]):
                self._check(mo, layer, experts)
        except RequestError as e:
            return self._error(s.ident, e.code, f"HINT: {e}")
        for slot in s.protected:           # superseded by this newer prediction
            slot.protected = False
            self._cancel_prefetch(mo, slot)
        s.protected = []
        if not self.cfg.prefetch or self.stopping or self.io.pending():
            return    # reads are queued already: a guess must not delay a demand load
        for layer, experts, scores in zip(msg["layers"], msg["experts"], msg["scores"]):
            missing = []
            for e, sc in zip(experts, scores):
                key = (layer, e)
                prec = self._decide(mo, key, float(sc))
                if prec is SKIP:
                    continue
                slot = mo.regions[prec].lookup(key)
                if slot is None:
                    missing.append((key, prec))
                else:
                    slot.protected = True      # keep what the next layers will use
                    s.protected.append(slot)
            if not missing:
                continue
            budget = self._prefetch_budget(s, mo)
            self.io.plug()
            try:
                for i, (key, prec) in enumerate(missing):   # most important first
                    budget -= mo.source_of(prec).expert_bytes
                    if budget < 0 and i > 0:
                        break
                    slot = mo.regions[prec].take(key, mo.policy)
                    if slot is None:
                        break
                    slot.protected = slot.prefetched = True
                    s.protected.append(slot)
                    mo.prefetched += 1
                    self._load(mo, slot, key, prec, PREFETCH)
            finally:
                self.io.unplug()
            return

    def _prefetch_budget(self, s: Session, mo: Model) -> float:
        """Bytes worth prefetching for `s` now: its compute time per layer (the gap between
        our answer and its next request) times the rate demand loads were served at."""
        if not self.cfg.prefetch_budget or s.gap_s is None or mo.demand_Bps is None:
            return float("inf")
        return s.gap_s * mo.demand_Bps

    def _cancel_prefetch(self, mo: Model, slot: Slot) -> None:
        """Drop a superseded prefetch that has not started reading; its slot is freed."""
        prec, key = slot.region.precision, slot.key
        if slot.state != "loading" or key is None or not self.io.cancel((mo.name, prec, key)):
            return
        self._jobs.pop((mo.name, prec, key), None)
        fut = mo.loads.pop((prec, key), None)
        slot.region.drop(slot)
        if fut is not None and not fut.done():
            fut.set_exception(RequestError("io", "prefetch superseded"))
        self._freed.fire()

    def _on_release(self, s: Session, msg: dict) -> None:
        mo = self.models.get(msg["model"])
        if mo is None:
            return self._error(s.ident, "unknown_model", f"RELEASE: no model {msg['model']!r}")
        for item in msg["slots"]:
            # slots it does not hold (released twice, lost with a timed-out session) are ignored
            if isinstance(item, list) and len(item) == 2 and item[0] in mo.regions \
                    and isinstance(item[1], int) and 0 <= item[1] < mo.regions[item[0]].n_slots:
                self._unpin(s, mo.regions[item[0]].slots[item[1]])
        self._freed.fire()

    def _on_stats(self, s: Session, msg: dict) -> None:
        self._send(s.ident, m.Cmd.STATS_REPLY, stats=self.stats())

    def stats(self) -> dict:
        io = self.io
        return {"uptime_s": round(time.monotonic() - self.started, 3),
                "clients": len(self.sessions),
                "sessions": [s.stats() for s in self.sessions.values() if s.name != "hobbitd-probe"],
                "models": {n: mo.stats() for n, mo in self.models.items()},
                "io": {"bytes_read": io.bytes_read, "reads": io.reads,
                       "direct_reads": io.direct_reads, "pending": io.pending(),
                       "read_seconds": round(io.read_seconds, 6)}}


def _type_name(t: int) -> str:
    from ..loader.ggml_types import type_name
    return type_name(t)


def _model_name(path: str) -> str:
    name = os.path.basename(path)
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def _shm_free() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _log_send_error(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())
