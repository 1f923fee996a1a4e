"""hobbitd's server: the ZeroMQ ROUTER, dispatch of client messages, and the lifecycle.

The cache of expert slots is loader/cache.py's ExpertCache, the sessions hobbitd/sessions.py's;
this module turns messages into calls on them and their results or RequestErrors into
replies. A REQUEST all of whose experts are cached is answered at once (ExpertCache.try_hit);
one with misses is served by a task (ExpertCache.acquire), so other clients go on meanwhile.

Lifecycle: startup() (open models, plan the cache, claim the socket, remove the shared
memory dead hobbitd processes left, create ours and the I/O engine) → serve() until stop()
→ shutdown() (answer or drain what is in flight, close, unlink the shared memory, remove
the socket). Everything runs on one asyncio
loop; disk reads happen on the IOEngine's threads, so the loop never blocks on flash.

Pins. A slot named in a SLOTS reply is pinned once for the requesting session: it is never
evicted or overwritten until that session RELEASEs it, says BYE, its process exits (the
kernel's pid for the connection, checked every REAP_EVERY_S), or it goes silent for longer
than client_timeout with no request in flight. One session may pin at most
client_pin_share of a model's slots (pin_limit); at most max_sessions at once.

Oversized messages: the ROUTER's MAXMSGSIZE is MAX_MESSAGE + 1 KiB. A body a little over
MAX_MESSAGE is answered ERROR too_large; beyond the socket limit ZeroMQ drops the message and
disconnects that peer without an answer (the daemon never buffers a huge message).
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from dataclasses import fields

import psutil
import zmq
import zmq.asyncio

from ..loader import control
from ..loader.cache import ExpertCache
from ..loader.io_engine import IOEngine
from ..loader.model_cache import ModelCache
from ..loader.served import ModelOptions, model_name, open_served, open_served_all, plan_added, plan_cache
from ..loader.shm import SHM_DIR, Segment, new_name, pid_alive, remove_stale
from ..protocol import messages as m
from ..protocol.errors import DaemonError, HobbitError, InputError, ProtocolError, RequestError
from .config import DaemonConfig, default_socket
from .model_dirs import allowed_model, listed_models
from .notify import sd_notify
from .sessions import PROBE, Session, Sessions

log = logging.getLogger("hobbitd")

MiB = 1 << 20
PROBE_S = 0.5          # how long a live daemon on our socket has to answer a HELLO
DRAIN_S = 2.0          # shutdown: how long in-flight requests may run before shutting_down
REAP_EVERY_S = 0.5
STATUS_EVERY_S = 10.0
CLOSE_LINGER_MS = 100  # not 0: the shutting_down answers just queued should still go out
SUN_PATH_MAX = 107     # bytes in a unix socket path (sockaddr_un.sun_path minus the NUL)


class Daemon:
    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.socket_path = os.path.abspath(cfg.socket or default_socket())
        self.models: dict[str, ModelCache] = {}
        self.cache: ExpertCache | None = None
        self.sessions: Sessions | None = None
        self.shm: Segment | None = None
        self.control: control.ControlBlock | None = None
        self.opened: dict[str, dict] = {}   # models opened on demand: their segment and block
        self._opening = asyncio.Lock()      # one model opened on demand at a time
        self.io: IOEngine | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.router = None
        self._stop = asyncio.Event()
        self._requests: set[asyncio.Task] = set()
        self._bound = False
        self._stale_socket = False   # a dead hobbitd's socket file is at our path
        self._peer = None            # the frame last received (its metadata: the peer)
        self.owner_gone = False      # stopped because owner_pid exited
        self.started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        """Raise HobbitError (nothing left behind) if the daemon cannot serve."""
        cfg = self.cfg
        self.opts = ModelOptions(**{f.name: getattr(cfg, f.name) for f in fields(ModelOptions)})
        # with model folders a daemon may start empty: clients ask for their models
        self.models = open_served_all(cfg.models, self.opts) if cfg.models or not cfg.model_dirs else {}
        size = self.cache_size = cfg.cache_size or int(psutil.virtual_memory().available * 0.5)
        plan, total = plan_cache(self.models, size, cfg.low_share)
        self.ctx = zmq.asyncio.Context()
        await self._claim_socket()
        _remove_stale_segments()
        free = _shm_free()
        if free is not None and total > free:
            raise InputError(f"the cache needs {total / MiB:.0f} MiB of shared memory but "
                             f"{SHM_DIR} has {free / MiB:.0f} MiB free; lower --cache-size "
                             f"or enlarge {SHM_DIR}")
        self.shm = Segment(new_name(), total, create=True)
        if control.fence_available():    # clients may pin their hits themselves
            lay = control.layout([(n, p, self.models[n].n_layer, self.models[n].n_expert, k)
                                  for n, p, _, _, k in plan])
            self.control = control.ControlBlock.create(self.shm.name + "-ctl", lay)
        self.io = IOEngine(cfg.io_threads, cfg.io_limit or None, cfg.direct_io)
        self.cache = ExpertCache(self.models, plan, self.shm, self.io, control=self.control,
                                 slot_wait=cfg.slot_wait, prefetch=cfg.prefetch,
                                 prefetch_budget=cfg.prefetch_budget)
        self.sessions = Sessions(self.cache)
        self._bind()
        for mo in self.models.values():
            slots = ", ".join(f"{r.n_slots} {p} slots of {r.format.slot_bytes / MiB:.2f} MiB"
                              for p, r in mo.regions.items())
            log.info("model %s: %d layers x %d experts, %s (%s); policy %s, %s", mo.name,
                     mo.n_layer, mo.n_expert, slots, mo.path, mo.policy.name,
                     mo.thresholds.describe(mo.calibrated))
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
        if self.router is not None:
            sd_notify("STOPPING=1")
        if self.cache is not None:
            self.cache.stop()            # requests waiting for a slot answer shutting_down
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
            if self.cache is not None and self.cache.reads_running():
                # a reader is stuck mid-read into the mapping: unlink, keep it mapped till exit
                log.warning("a read is still running; leaving it to the process exit")
                os.unlink(self.shm.path)
            else:
                self.shm.close()         # unmaps and unlinks
        if self.control is not None:
            self.control.close()
        for extra in self.opened.values():
            extra["shm"].close()
            if extra["control"] is not None:
                extra["control"].close()
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
        extra = [seg.path for e in self.opened.values()
                 for seg in (e["shm"], e["control"] and e["control"].seg) if seg is not None]
        for path, ours in ((self.shm and self.shm.path, self.shm is not None),
                           (self.control and self.control.seg.path, self.control is not None),
                           *((p, True) for p in extra),
                           (self.socket_path, self._bound)):
            if ours:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    # ---- startup pieces ------------------------------------------------------------------

    async def _claim_socket(self) -> None:
        """Refuse if a live daemon answers on our socket. A stale socket file stays until
        _bind() replaces it: clients that find it wait for us (a missing file means no
        hobbitd, and they would give up at once)."""
        path = self.socket_path
        if len(self._new_socket_path().encode()) > SUN_PATH_MAX:
            raise InputError(f"socket path {path} is longer than {SUN_PATH_MAX - 10} bytes; "
                             "choose a shorter --socket")
        if not os.path.lexists(path):
            return
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise InputError(f"{path} exists and is not a socket; refusing to replace it")
        if await self._probe(path):
            raise DaemonError("socket_in_use", f"another hobbitd is serving on {path}")
        self._stale_socket = True

    def _new_socket_path(self) -> str:
        return os.path.join(os.path.dirname(self.socket_path), f".{os.getpid()}.new")

    async def _probe(self, path: str) -> bool:
        """True if something answers a HELLO on ipc://path within PROBE_S."""
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(f"ipc://{path}")
            await s.send_multipart(m.encode(m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(),
                                            name=PROBE))
            if not await s.poll(PROBE_S * 1000):
                return False
            await s.send_multipart(m.encode(m.Cmd.BYE))   # do not leave a session behind
            await asyncio.sleep(0.01)                     # give the BYE a moment to leave
            return True
        finally:
            s.close(linger=0)

    def _bind(self) -> None:
        """Listen on a new socket file and rename it over the path: at no moment is there
        no file there while we start (a client started meanwhile waits, as for a restart)."""
        path, new = self.socket_path, self._new_socket_path()
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE + 1024)
        old = os.umask(0o117)            # the socket file is born 0660: no window of 0777
        try:
            self.router.bind(f"ipc://{new}")
            os.chmod(new, 0o660)
            os.rename(new, path)         # atomic: the stale file, then ours
        except (zmq.ZMQError, OSError) as e:
            self.router.close(linger=0)
            self.router = None
            if os.path.lexists(new):
                os.unlink(new)
            raise DaemonError("socket_in_use", f"cannot listen on {path}: {e}") from None
        finally:
            os.umask(old)
        self._bound = True
        if self._stale_socket:
            log.info("replaced stale socket %s", path)

    # ---- receiving -----------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            raw = await self.router.recv_multipart(copy=False)   # frames carry the peer
            self._peer = raw[-1]
            frames = [f.bytes for f in raw]
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
                self.sessions.drop(s, "said BYE")
            return
        if s is None:
            if cmd in (m.Cmd.HEARTBEAT, m.Cmd.HINT, m.Cmd.RELEASE, m.Cmd.USED):
                return    # they have no answer; a stale client learns at its next REQUEST
            rid = msg.get("id") if isinstance(msg.get("id"), int) else None
            return self._error(ident, "no_session", "no session: say HELLO first", rid)
        handler = {m.Cmd.REQUEST: self._on_request, m.Cmd.HINT: self._on_hint,
                   m.Cmd.RELEASE: self._on_release, m.Cmd.STATS: self._on_stats,
                   m.Cmd.RESIDENT: self._on_resident, m.Cmd.USED: self._on_used,
                   m.Cmd.HITS: lambda s, msg: None,
                   m.Cmd.HEARTBEAT: lambda s, msg: None}.get(cmd)
        if handler is None:
            return self._error(ident, "unknown_command", f"{cmd.name} is not a client command")
        if msg.get("release") or msg.get("hits"):
            self._apply_batched(s, msg)
        handler(s, msg)

    def _send(self, ident: bytes, cmd: m.Cmd, **fields) -> None:
        # ROUTER sends never block: a reply to a vanished client is dropped by ZeroMQ
        fut = self.router.send_multipart([ident, *m.encode(cmd, **fields)])
        fut.add_done_callback(_log_send_error)

    def _error(self, ident: bytes, code: str, message: str, rid: int | None = None) -> None:
        extra = {} if rid is None else {"id": rid}
        self._send(ident, m.Cmd.ERROR, code=code, message=message, **extra)

    def _hello(self, ident: bytes, msg: dict) -> None:
        if msg["version"] != m.VERSION:
            return self._error(ident, "bad_version", f"protocol version {msg['version']}; "
                                                     f"hobbitd speaks {m.VERSION}")
        path, peer = msg.get("model"), _peer_pid(self._peer)
        if path is not None and self.cfg.model_dirs and not self._serves(path):
            task = asyncio.create_task(self._hello_on_demand(ident, msg, path, peer))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            return
        self._welcome(ident, msg, peer)

    async def _hello_on_demand(self, ident: bytes, msg: dict, path, peer: int | None) -> None:
        """A HELLO for a model not served yet: open it (if allowed), then welcome."""
        try:
            await self.open_on_demand(path)
        except HobbitError as e:      # not allowed, not a model we can serve, no room
            return self._error(ident, e.code, str(e))
        except Exception as e:        # a bug: tell the client, keep serving
            log.exception("internal error opening %s", path)
            return self._error(ident, "internal", f"hobbitd: {e!r}")
        self._welcome(ident, msg, peer)

    def _can_open(self) -> list[str]:
        """GGUFs inside the model folders not served yet (walked only when there are folders)."""
        if not self.cfg.model_dirs:
            return []
        served = {os.path.realpath(mo.path) for mo in self.models.values()}
        return [p for p in listed_models(self.cfg.model_dirs) if p not in served]

    def _serves(self, path) -> bool:
        real = os.path.realpath(path) if isinstance(path, str) else None
        return any(os.path.realpath(mo.path) == real for mo in self.models.values())

    async def open_on_demand(self, path: str) -> None:
        """Serve the GGUF at `path` too, if it is allowed (hobbitd/model_dirs.py): opened
        on a thread, given the share of the cache plan_added says (taken from the other
        models by their use: slots nobody holds go at once, the rest when released) in a
        segment and control block of its own. HobbitError (one line) if it cannot be."""
        real = allowed_model(path, self.cfg.models, self.cfg.model_dirs)
        async with self._opening:
            if self._serves(real) or self.cache.stopping:
                return
            name, n = model_name(real), 1
            while name in self.models:         # another folder's file of the same name
                n += 1
                name = f"{model_name(real)}-{n}"
            mo = await asyncio.to_thread(open_served, real, name, self.opts)
            try:
                shrink, plan, total = plan_added(self.models, mo, self.cache_size, self.cfg.low_share)
            except InputError as e:
                raise InputError(f"cannot open {real}: {e}") from None
            free = _shm_free()
            if free is not None and total > free:
                raise InputError(f"cannot open {real}: it needs {total / MiB:.0f} MiB of shared "
                                 f"memory but {SHM_DIR} has {free / MiB:.0f} MiB free")
            shm = Segment(new_name(), total, create=True)
            block = None
            try:
                if self.control is not None:
                    lay = control.layout([(name, p, mo.n_layer, mo.n_expert, k) for _, p, _, _, k in plan])
                    block = control.ControlBlock.create(shm.name + "-ctl", lay)
            except OSError as e:           # nothing half-made left in /dev/shm
                shm.close()
                raise InputError(f"cannot open {real}: its control block: {e}") from None
            self.cache.shrink(shrink)
            self.cache.add_model(mo, plan, shm, block)
            self.opened[name] = {"shm": shm, "control": block}
            log.info("opened %s on demand as %s: %s; %s", real, name,
                     ", ".join(f"{r.n_slots} {p} slots" for p, r in mo.regions.items()),
                     ", ".join(f"{m_} {p} down to {k}" for (m_, p), k in shrink.items())
                     or "nothing taken from the others")

    def _model_info(self, name: str) -> dict:
        info = self.models[name].info()
        extra = self.opened.get(name)
        if extra is not None:
            info.update(shm=extra["shm"].name, shm_size=extra["shm"].size)
            if extra["control"] is not None:
                cb = extra["control"]
                info["control"] = {"shm": cb.seg.name, "size": cb.seg.size,
                                   "rows_offset": cb.layout.rows_offset,
                                   "n_slots": cb.layout.n_slots}
        return info

    def _welcome(self, ident: bytes, msg: dict, peer: int | None) -> None:
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) else None
        if self.sessions.get(ident) is None and len(self.sessions) >= self.cfg.max_sessions:
            return self._error(ident, "too_many_sessions", f"hobbitd serves {len(self.sessions)} "
                               f"clients, its limit (max_sessions {self.cfg.max_sessions})")
        s = self.sessions.open(ident, pid, str(msg.get("name", ""))[:64], peer)
        extra = {}
        if self.control is not None:
            lay = self.control.layout
            extra["control"] = {"shm": self.control.seg.name, "size": self.control.seg.size,
                                "rows_offset": lay.rows_offset, "n_slots": lay.n_slots,
                                "row": self.cache.owners[s.sid].row}
        self._send(ident, m.Cmd.WELCOME, version=m.VERSION, shm=self.shm.name,
                   shm_size=self.shm.size, heartbeat_s=self.cfg.client_timeout / 3,
                   models={n: self._model_info(n) for n in self.models}, **extra)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            self.sessions.reap(self.cfg.client_timeout)
            self.cache.sweep()        # memory of slots given up to a model opened on demand
            if self.cfg.owner_pid and not pid_alive(self.cfg.owner_pid):
                log.info("owner pid %d exited: stopping", self.cfg.owner_pid)
                self.owner_gone = True
                self.stop()

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            hits = sum(mo.hits + mo.waits for mo in self.models.values())
            misses = sum(mo.misses for mo in self.models.values())
            sd_notify(f"STATUS=serving {len(self.models)} models to {len(self.sessions)} "
                      f"clients; {hits} hits, {misses} misses")

    # ---- commands ------------------------------------------------------------------------

    def _on_request(self, s: Session, msg: dict) -> None:
        """Answer SLOTS at once when every expert is a hit, else from a task that waits
        for the misses' reads. Field types were checked by decode(); ranges here."""
        try:
            mo = self.cache.model(msg["model"])
            layer, experts = msg["layer"], msg["experts"]
            mo.check(layer, experts)
            self.cache.check_pins(s.sid, mo, len(experts), self.cfg.client_pin_share)
        except RequestError as e:
            return self._error(s.ident, e.code, str(e), msg["id"])
        scores = msg.get("scores") or [0.0] * len(experts)   # no scores: all important
        s.note_request()
        seq, token = msg.get("seq"), msg.get("token")
        if isinstance(seq, int) and isinstance(token, int):
            mo.policy.begin(s.sid, seq, token, layer)
            s.count_forward(seq, token, msg.get("tokens"))
        slots = self.cache.try_hit(s.sid, mo, layer, experts, scores)
        if slots is not None:
            return self._reply_slots(s, msg["id"], slots)
        s.inflight += 1              # before the task starts: the reaper must not drop s
        t = asyncio.create_task(self._serve_request(s, mo, layer, experts, scores, msg["id"]))
        self._requests.add(t)
        t.add_done_callback(self._requests.discard)

    async def _serve_request(self, s: Session, mo: ModelCache, layer: int, experts: list,
                             scores: list, rid: int) -> None:
        try:
            try:
                slots = await self.cache.acquire(s.sid, mo, layer, experts, scores)
            except RequestError as e:
                if "stale:" in str(e):
                    log.warning("%s", e)
                if s.alive:
                    return self._error(s.ident, e.code, str(e), rid)
            except Exception as e:
                if s.alive:
                    log.error("request %s failed", rid, exc_info=e)
                    return self._error(s.ident, "internal", f"hobbitd: {e!r}", rid)
            if not s.alive:           # BYE or a new HELLO meanwhile: it holds none of these
                return self._error(s.ident, "no_session", "the session ended during the "
                                   "request; say HELLO again", rid)
            self._reply_slots(s, rid, slots)
        except asyncio.CancelledError:
            self._error(s.ident, "shutting_down", "hobbitd is shutting down", rid)
            raise
        finally:
            s.inflight -= 1
            s.last_seen = max(s.last_seen, time.monotonic())   # it was waiting on us

    def _reply_slots(self, s: Session, rid: int, slots: list) -> None:
        self._send(s.ident, m.Cmd.SLOTS, id=rid, slots=[
            None if g is None else [g.region.precision, g.index] for g in slots])
        s.replied_at = time.monotonic()

    def _on_hint(self, s: Session, msg: dict) -> None:
        """Prefetch for a client's lookahead (ExpertCache.hint); the budget is the compute
        time the client says comes before its next request, else its measured time between
        requests (decode steps only: a prompt's pauses exceed GAP_MAX_S)."""
        try:
            mo = self.cache.model(msg["model"])
            mo.check(msg["layer"], [])
            for layer, experts in zip(msg["layers"], msg["experts"]):
                mo.check(layer, experts)
        except RequestError as e:
            return self._error(s.ident, e.code, f"HINT: {e}")
        compute_s = msg.get("compute_s")
        self.cache.hint(s.sid, mo, msg["layers"], msg["experts"], msg["scores"],
                        s.gap_s if compute_s is None else float(compute_s))

    def _on_release(self, s: Session, msg: dict) -> None:
        mo = self.models.get(msg["model"])
        if mo is None:
            return self._error(s.ident, "unknown_model", f"RELEASE: no model {msg['model']!r}")
        self.cache.release(s.sid, mo, [tuple(item) for item in msg["slots"]
                                       if isinstance(item, list) and len(item) == 2])

    def _apply_batched(self, s: Session, msg: dict) -> None:
        """A message's batched fields, before the message itself: releases of slots hobbitd
        gave (RELEASE's), and hits the client pinned itself in its control-block row (HITS',
        ExpertCache.count_hits; they also place the client in its sequence, and count its
        forward when no request of that forward reached us)."""
        mo = self.models.get(msg["model"]) if isinstance(msg.get("model"), str) else None
        if mo is None:
            return
        if msg.get("release"):
            self.cache.release(s.sid, mo, [tuple(item) for item in msg["release"]
                                           if isinstance(item, list) and len(item) == 2])
        hits = msg.get("hits")
        if hits:
            seq, token = msg.get("seq"), msg.get("token")
            if isinstance(seq, int) and isinstance(token, int) and isinstance(hits[-1], list) \
                    and hits[-1] and isinstance(hits[-1][0], int):
                mo.policy.begin(s.sid, seq, token, hits[-1][0])
                s.count_forward(seq, token, msg.get("tokens"))
            self.cache.count_hits(s.sid, mo, hits)

    def _on_resident(self, s: Session, msg: dict) -> None:
        """Every expert of the model pinned for the session, or how far loading them is
        (ExpertCache.resident); answered at once, never waiting for reads."""
        try:
            mo = self.cache.model(msg["model"])
        except RequestError as e:
            return self._error(s.ident, e.code, str(e), msg["id"])
        self._send(s.ident, m.Cmd.RESIDENT_REPLY, id=msg["id"], **self.cache.resident(s.sid, mo))

    def _on_used(self, s: Session, msg: dict) -> None:
        mo = self.models.get(msg["model"])
        if mo is None:
            return self._error(s.ident, "unknown_model", f"USED: no model {msg['model']!r}")
        s.count_forward(msg.get("seq"), msg.get("token"), msg.get("tokens"), msg.get("forwards", 1))
        self.cache.count_used(s.sid, mo, msg["uses"])

    def _on_stats(self, s: Session, msg: dict) -> None:
        self._send(s.ident, m.Cmd.STATS_REPLY, stats=self.stats())

    def stats(self) -> dict:
        io = self.io
        return {"uptime_s": round(time.monotonic() - self.started, 3),
                "clients": len(self.sessions), "sessions": self.sessions.stats(),
                "models": {n: mo.stats() for n, mo in self.models.items()},
                "model_dirs": self.cfg.model_dirs,
                "can_open": self._can_open(),
                "io": {"bytes_read": io.bytes_read, "reads": io.reads,
                       "direct_reads": io.direct_reads, "pending": io.pending(),
                       "read_seconds": round(io.read_seconds, 6)}}


def _remove_stale_segments() -> None:
    """Shared memory of hobbitd processes that died (SIGKILL, OOM) before removing it."""
    for name, size in remove_stale():
        log.info("removed %s (%.0f MiB) left by a hobbitd that is gone", name, size / MiB)


def _shm_free() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _peer_pid(frame) -> int | None:
    """The sending process's pid, as the kernel reported it for the unix socket (ZeroMQ's
    Peer-Address "host:uid:gid:pid" on ipc); None when unknown."""
    try:
        pid = int(frame.get("Peer-Address").rsplit(":", 1)[1])
    except (AttributeError, IndexError, ValueError, zmq.ZMQError):
        return None
    return pid if pid > 0 else None


def _log_send_error(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())
