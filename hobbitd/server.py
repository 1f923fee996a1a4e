"""hobbitd's server: the ZeroMQ ROUTER, sessions, the models served, and the lifecycle.

The cache of expert slots is loader/cache.py's ExpertCache, the sessions hobbitd/sessions.py's,
the shared memory hobbitd/memory.py's; this module opens the models, says HELLO and BYE,
and hands a session's other commands to hobbitd/commands.py.

Lifecycle: startup() (open models, plan the cache, claim the socket, remove the shared
memory dead hobbitd processes left, create ours and the I/O engine, start reading each model
that fits the cache whole) → serve() until stop() → shutdown() (answer or drain what is in
flight, close, unlink the shared memory, remove the socket). One asyncio loop runs it all;
disk reads happen on the IOEngine's threads, so the loop never blocks on flash.

Pins. A slot named in a SLOTS reply is pinned once for the requesting session: it is never
evicted or overwritten until that session RELEASEs it, says BYE, its process exits (the
kernel's pid for the connection, checked every REAP_EVERY_S), or it goes silent for longer
than client_timeout with no request in flight. One session may pin at most
client_pin_share of a model's slots (pin_limit); at most max_sessions at once, of which
max_sessions_per_process of one process and max_sessions_per_user of one user.

Fairness (issue 31). Messages are served one client at a time in turn, from queues of at
most INBOX_MAX each (hobbitd/inbox.py); at most max_requests of a client's requests are
served at once (beyond: busy). A client that does not read its answers is dropped with a
log line, its pins released, its later messages ignored and its connection cut (it
reconnects as a client without a session, cut again at its next full queue): either its
queue filled (it sends faster than it is served) or its answers did (ROUTER_HWM of them
unread: the ROUTER is ROUTER_MANDATORY, so a full queue of answers is an error, not a
silent loss).

Oversized messages: the ROUTER's MAXMSGSIZE is MAX_MESSAGE + 1 KiB. A body a little over
MAX_MESSAGE is answered ERROR too_large; beyond the socket limit ZeroMQ drops the message and
disconnects that peer without an answer (the daemon never buffers a huge message).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import fields

import zmq
import zmq.asyncio

from ..loader import control
from ..loader.cache import ExpertCache
from ..loader.io_engine import IOEngine
from ..loader.model_cache import ModelCache
from ..loader.served import ModelOptions, model_name, open_served, open_served_all, plan_added, plan_cache
from ..loader.shm import SHM_DIR, pid_alive
from ..protocol import messages as m
from ..protocol.errors import TOO_MANY_SESSIONS, HobbitError, InputError, ProtocolError
from .commands import Commands, Replies
from .config import DaemonConfig, auto_cache_size, default_socket
from .inbox import Inbox, Message, disconnect
from .listen import bind_router, claim_socket
from .memory import ModelMemory, make_memory, remove_stale_segments
from .model_dirs import allowed_model, listed_models
from .notify import sd_notify
from .sessions import Limits, Peer, Sessions
from .watch import FileWatch

log = logging.getLogger("hobbitd")

MiB = 1 << 20
DRAIN_S = 2.0  # shutdown: how long in-flight requests may run before shutting_down
REAP_EVERY_S = 0.5
STATUS_EVERY_S = 10.0
CLOSE_LINGER_MS = 100  # not 0: the shutting_down answers just queued should still go out
INBOX_MAX = 64  # messages of one client waiting to be served; a client waits for each
# answer, so it has a few (a request, a hint, a heartbeat); more: it floods (dropped)
ROUTER_HWM = 256  # answers queued for one client that does not read them; more: dropped
RECEIVE_MAX = 256  # messages taken in before a round of service (one of each client)


def _preloading(n: int) -> str:  # a log line's end
    return f"; reading its {n} experts, which fit the cache (behind the clients' reads)" if n else ""


class Daemon:
    # Made by startup() and used only once it returned. The attributes that may be None are
    # those shutdown() may find unmade after a failed startup.
    sessions: Sessions
    commands: Commands
    out: Replies
    watch: FileWatch

    def __init__(self, cfg: DaemonConfig):
        self.cfg = cfg
        self.socket_path = os.path.abspath(cfg.socket or default_socket())
        self.models: dict[str, ModelCache] = {}
        self.cache: ExpertCache | None = None
        self.memory: ModelMemory | None = None  # the configured models' slots
        self.opened: dict[str, ModelMemory] = {}  # those of each model opened on demand
        self._opening = asyncio.Lock()  # one model opened on demand at a time
        self.io: IOEngine | None = None
        self.ctx: zmq.asyncio.Context | None = None
        self.router: zmq.asyncio.Socket | None = None
        self._stop = asyncio.Event()
        self._requests: set[asyncio.Task] = set()
        self._bound = False
        self._stale_socket = False  # a dead hobbitd's socket file is at our path
        self.inbox = Inbox(INBOX_MAX)
        self.owner_gone = False  # stopped because owner_pid exited
        self.started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        """Raise HobbitError (nothing left behind) if the daemon cannot serve."""
        cfg = self.cfg
        self.opts = ModelOptions(**{f.name: getattr(cfg, f.name) for f in fields(ModelOptions)})
        # with model folders a daemon may start empty: clients ask for their models
        self.models = open_served_all(cfg.models, self.opts) if cfg.models or not cfg.model_dirs else {}
        size = self.cache_size = cfg.cache_size or auto_cache_size(cfg.memory, [mo.path for mo in self.models.values()])
        plan, total = plan_cache(self.models, size, cfg.low_share)
        self.ctx = zmq.asyncio.Context()
        await self._claim_socket()
        remove_stale_segments()
        # with a control block clients may pin their hits themselves
        mem = self.memory = make_memory(
            self.models,
            plan,
            total,
            control.fence_available(),
            "the cache",
            f"; lower --cache-size or enlarge {SHM_DIR}",
        )
        self.io = IOEngine(cfg.io_threads, cfg.io_limit or None, cfg.direct_io)
        self.cache = ExpertCache(
            self.models,
            plan,
            mem.shm,
            self.io,
            control=mem.control,
            slot_wait=cfg.slot_wait,
            prefetch=cfg.prefetch,
            prefetch_budget=cfg.prefetch_budget,
            preload=cfg.preload,
        )
        self.sessions = Sessions(self.cache)
        self._bind()
        self.out = Replies(self.router, self._unread)
        self.watch = FileWatch(self.cache, self.io, self.opts, self.spawn)
        self.commands = Commands(self.cache, self.out, cfg.client_pin_share, cfg.max_requests, self.spawn, self.watch)
        for mo in self.models.values():
            slots = ", ".join(
                f"{r.n_slots} {p} slots of {r.format.slot_bytes / MiB:.2f} MiB" for p, r in mo.regions.items()
            )
            log.info(
                "model %s: %d layers x %d experts, %s (%s); policy %s, %s%s",
                mo.name,
                mo.n_layer,
                mo.n_expert,
                slots,
                mo.path,
                mo.policy.name,
                mo.thresholds.describe(mo.calibrated),
                _preloading(self.cache.preload(mo)),
            )
        log.info(
            "listening on %s, shared memory %s (%.0f MiB), %d I/O threads%s",
            self.socket_path,
            mem.shm.path,
            total / MiB,
            self.cfg.io_threads,
            f", limit {self.cfg.io_limit / MiB:.0f} MiB/s" if self.cfg.io_limit else "",
        )

    async def serve(self) -> None:
        """Receive and answer until stop(). Raises if a service task dies (a bug)."""
        assert self.memory is not None  # startup() made it
        sd_notify(f"READY=1\nSTATUS=serving {len(self.models)} models, cache {self.memory.shm.size / MiB:.0f} MiB")
        services = [self._receive(), self._reap()]
        if os.environ.get("NOTIFY_SOCKET"):
            services.append(self._status())
        tasks = [asyncio.create_task(c) for c in services]
        stopped = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopped:
                    t.result()  # re-raise what killed a service task
        finally:
            for t in [stopped, *tasks]:
                t.cancel()
            await asyncio.gather(stopped, *tasks, return_exceptions=True)

    def stop(self) -> None:
        """Ask serve() to return (safe from a signal handler)."""
        self._stop.set()

    def spawn(self, coro: Coroutine) -> None:
        """Run coro as a task that shutdown() drains (a request served while others go on)."""
        task = asyncio.create_task(coro)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def shutdown(self, drain: float = DRAIN_S) -> None:
        """Release everything startup() made; safe after a failed or partial startup."""
        if self.router is not None:
            sd_notify("STOPPING=1")
        if self.cache is not None:
            self.cache.stop()  # requests waiting for a slot answer shutting_down
        if self._requests:
            _, pending = await asyncio.wait(self._requests, timeout=drain)
            for t in pending:
                t.cancel()  # each answers ERROR shutting_down
            await asyncio.gather(*pending, return_exceptions=True)
        if self.router is not None:
            self.router.close(linger=CLOSE_LINGER_MS)
        if self.io is not None:
            await asyncio.to_thread(self.io.close)
            await asyncio.sleep(0)  # run the completions the readers just scheduled
        if self.cache is not None and self.cache.reads_running():
            # a reader is stuck mid-read into the mapping: unlink, keep it mapped till exit
            log.warning("a read is still running; leaving it to the process exit")
            for path in self._memory_files():
                os.unlink(path)
        else:
            for mem in self._memories():
                mem.close()  # unmaps and unlinks
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
        for path in self._memory_files() + ([self.socket_path] if self._bound else []):
            try:
                os.unlink(path)
            except OSError:
                pass

    def _memories(self) -> list[ModelMemory]:
        return ([self.memory] if self.memory is not None else []) + list(self.opened.values())

    def _memory_files(self) -> list[str]:
        return [path for mem in self._memories() for path in mem.files()]

    # ---- startup pieces ------------------------------------------------------------------

    async def _claim_socket(self) -> None:
        assert self.ctx is not None  # startup() made it first
        self._stale_socket = await claim_socket(self.ctx, self.socket_path)

    def _bind(self) -> None:
        assert self.ctx is not None  # startup() made it first
        self.router = bind_router(self.ctx, self.socket_path, ROUTER_HWM)
        self._bound = True
        if self._stale_socket:
            log.info("replaced stale socket %s", self.socket_path)

    # ---- receiving -----------------------------------------------------------------------

    async def _receive(self) -> None:
        """Take in what was received (up to RECEIVE_MAX messages), serve one message of
        each client that has one, let the other tasks run, and again."""
        router = self.router
        assert router is not None  # startup() bound it
        taker: zmq.Socket = zmq.Socket.shadow(router.underlying)  # the same socket, for reads that never wait
        while True:
            if not self.inbox:
                await router.poll()  # until a message is there
            for _ in range(RECEIVE_MAX):
                try:
                    raw = taker.recv_multipart(zmq.DONTWAIT, copy=False)
                except zmq.Again:
                    break
                got = Message(raw[0].bytes, [f.bytes for f in raw[1:]], raw[-1])  # frames carry the peer
                if not self.inbox.put(got):
                    self._flooding(got.ident, f"sends faster than it is served ({INBOX_MAX} messages waiting)", raw[-1])
            for _ in range(len(self.inbox)):  # a round: one message of each client
                msg = self.inbox.take()
                if msg is None:  # a client dropped during the round
                    break
                try:
                    self._dispatch(msg)
                except Exception as e:  # a bug: tell the client, keep serving
                    log.exception("internal error handling a message")
                    self.out.error(msg.ident, "internal", f"hobbitd: {e!r}")
            await asyncio.sleep(0)

    def _unread(self, ident: bytes) -> None:
        """Replies: `ident`'s queue of answers is full."""
        self._flooding(ident, f"leaves its answers unread ({ROUTER_HWM} waiting)")

    def _flooding(self, ident: bytes, why: str, frame: zmq.Frame | None = None) -> None:
        """Drop the client at `ident` (it does not read its answers), ignore it from now on,
        and cut its connection when `frame`, one of its messages, says which it is."""
        if frame is not None:
            disconnect(frame)
        if self.inbox.ignored(ident):
            return
        self.inbox.ignore(ident)
        s = self.sessions.get(ident)
        if s is not None:
            self.sessions.drop(s, f"does not read its answers: it {why}; dropped")
        elif self.inbox.worth_logging(pid := Peer.of(frame).pid if frame is not None else None):
            log.warning("a client (pid %s) without a session does not read its answers: it %s; cut off", pid, why)

    def _dispatch(self, message: Message) -> None:
        ident, frames = message.ident, message.frames
        s = self.sessions.get(ident)
        if s is not None:
            s.last_seen = time.monotonic()  # any message counts as a heartbeat
        try:
            cmd, msg = m.decode(frames)
        except ProtocolError as e:
            self.out.error(ident, e.code, str(e))
            return
        if cmd == m.Cmd.HELLO:
            return self._hello(ident, msg, Peer.of(message.peer))
        if cmd == m.Cmd.BYE:
            if s is not None:
                self.sessions.drop(s, "said BYE")
            return
        if s is None:
            if cmd in (m.Cmd.HEARTBEAT, m.Cmd.HINT, m.Cmd.RELEASE, m.Cmd.USED):
                return  # they have no answer; a stale client learns at its next REQUEST
            rid = msg.get("id") if isinstance(msg.get("id"), int) else None
            return self.out.error(ident, "no_session", "no session: say HELLO first", rid)
        c = self.commands
        handler = {
            m.Cmd.REQUEST: c.request,
            m.Cmd.HINT: c.hint,
            m.Cmd.RELEASE: c.release,
            m.Cmd.RESIDENT: c.resident,
            m.Cmd.USED: c.used,
            m.Cmd.STATS: lambda s, msg: self.out.send(s.ident, m.Cmd.STATS_REPLY, stats=self.stats()),
            m.Cmd.HITS: lambda s, msg: None,
            m.Cmd.HEARTBEAT: lambda s, msg: None,
        }.get(cmd)
        if handler is None:
            return self.out.error(ident, "unknown_command", f"{cmd.name} is not a client command")
        if msg.get("release") or msg.get("hits"):
            c.apply_batched(s, msg)
        handler(s, msg)

    def _hello(self, ident: bytes, msg: dict, peer: Peer) -> None:
        if msg["version"] != m.VERSION:
            return self.out.error(
                ident, "bad_version", f"protocol version {msg['version']}; hobbitd speaks {m.VERSION}"
            )
        path = msg.get("model")
        if not self.watch.all_fresh():  # a served file changed: welcome with it opened again
            return self.spawn(self.watch.settled(self._hello_open, ident, msg, path, peer))
        self._hello_open(ident, msg, path, peer)

    def _hello_open(self, ident: bytes, msg: dict, path, peer: Peer) -> None:
        if path is not None and self.cfg.model_dirs and not self._serves(path):
            return self.spawn(self._hello_on_demand(ident, msg, path, peer))
        self._welcome(ident, msg, peer)

    async def _hello_on_demand(self, ident: bytes, msg: dict, path, peer: Peer) -> None:
        """A HELLO for a model not served yet: open it (if allowed), then welcome."""
        try:
            await self.open_on_demand(path)
        except HobbitError as e:  # not allowed, not a model we can serve, no room
            return self.out.error(ident, e.code, str(e))
        except Exception as e:  # a bug: tell the client, keep serving
            log.exception("internal error opening %s", path)
            return self.out.error(ident, "internal", f"hobbitd: {e!r}")
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
        assert self.cache is not None and self.memory is not None  # startup() made them
        real = allowed_model(path, self.cfg.models, self.cfg.model_dirs)
        async with self._opening:
            if self._serves(real) or self.cache.stopping:
                return
            name, n = model_name(real), 1
            while name in self.models:  # another folder's file of the same name
                n += 1
                name = f"{model_name(real)}-{n}"
            mo = await asyncio.to_thread(open_served, real, name, self.opts)
            try:
                shrink, plan, total = plan_added(self.models, mo, self.cache_size, self.cfg.low_share)
            except InputError as e:
                raise InputError(f"cannot open {real}: {e}") from None
            try:
                mem = make_memory({name: mo}, plan, total, self.memory.control is not None, f"cannot open {real}: it")
            except OSError as e:
                raise InputError(f"cannot open {real}: its shared memory: {e}") from None
            self.cache.shrink(shrink)
            self.cache.add_model(mo, plan, mem.shm, mem.control)
            self.opened[name] = mem
            log.info(
                "opened %s on demand as %s: %s; %s%s",
                real,
                name,
                ", ".join(f"{r.n_slots} {p} slots" for p, r in mo.regions.items()),
                ", ".join(f"{m_} {p} down to {k}" for (m_, p), k in shrink.items()) or "nothing taken from the others",
                _preloading(self.cache.preload(mo)),
            )

    def _model_info(self, name: str) -> dict:
        info = self.models[name].info()
        mem = self.opened.get(name)
        if mem is not None:
            info.update(shm=mem.shm.name, shm_size=mem.shm.size)
            if mem.control is not None:
                info["control"] = mem.control.to_wire()
        return info

    def _welcome(self, ident: bytes, msg: dict, peer: Peer) -> None:
        assert self.cache is not None and self.memory is not None  # startup() made them
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) else None
        cfg = self.cfg
        limits = Limits(cfg.max_sessions, cfg.max_sessions_per_process, cfg.max_sessions_per_user)
        refused = self.sessions.refusal(ident, peer, pid, limits)
        if refused is not None:
            return self.out.error(ident, TOO_MANY_SESSIONS, refused)
        s = self.sessions.open(ident, pid, str(msg.get("name", ""))[:64], peer)
        mem, extra = self.memory, {}
        if mem.control is not None:
            extra["control"] = {**mem.control.to_wire(), "row": self.cache.owners[s.sid].row}
        self.out.send(
            ident,
            m.Cmd.WELCOME,
            version=m.VERSION,
            shm=mem.shm.name,
            shm_size=mem.shm.size,
            heartbeat_s=self.cfg.client_timeout / 3,
            models={n: self._model_info(n) for n in self.models},
            **extra,
        )

    async def _reap(self) -> None:
        assert self.cache is not None  # startup() made it
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            self.sessions.reap(self.cfg.client_timeout)
            self.watch.all_fresh()  # clients that pin their hits send no requests to check at
            self.cache.sweep()  # memory of slots given up to a model opened on demand
            if self.cfg.owner_pid and not pid_alive(self.cfg.owner_pid):
                log.info("owner pid %d exited: stopping", self.cfg.owner_pid)
                self.owner_gone = True
                self.stop()

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            hits = sum(mo.hits + mo.waits for mo in self.models.values())
            misses = sum(mo.misses for mo in self.models.values())
            sd_notify(
                f"STATUS=serving {len(self.models)} models to {len(self.sessions)} "
                f"clients; {hits} hits, {misses} misses"
            )

    # ---- STATS -------------------------------------------------------------------------

    def stats(self) -> dict:
        io = self.io
        assert io is not None  # startup() made it
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "clients": len(self.sessions),
            "cache_size": self.cache_size,
            "sessions": self.sessions.stats(),
            "models": {n: mo.stats() for n, mo in self.models.items()},
            "model_dirs": self.cfg.model_dirs,
            "can_open": self._can_open(),
            "io": {
                "bytes_read": io.bytes_read,
                "reads": io.reads,
                "direct_reads": io.direct_reads,
                "pending": io.pending(),
                "read_seconds": round(io.read_seconds, 6),
            },
        }
