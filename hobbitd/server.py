"""hobbitd's server: the ZeroMQ ROUTER, sessions, the models served, and the lifecycle.

The cache of expert slots is loader/cache.py's ExpertCache, the sessions hobbitd/sessions.py's,
the shared memory hobbitd/memory.py's; this module opens the models, says HELLO and BYE,
and hands a session's other commands to hobbitd/commands.py.

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
from collections.abc import Coroutine
from dataclasses import fields

import zmq
import zmq.asyncio

from ..loader import control
from ..loader.memory_limit import available_memory
from ..loader.cache import ExpertCache
from ..loader.io_engine import IOEngine
from ..loader.model_cache import ModelCache
from ..loader.served import ModelOptions, model_name, open_served, open_served_all, plan_added, plan_cache
from ..loader.shm import SHM_DIR, pid_alive
from ..protocol import messages as m
from ..protocol.errors import DaemonError, HobbitError, InputError, ProtocolError
from .commands import Commands, Replies
from .config import AUTO_CACHE_SHARE, DaemonConfig, default_socket
from .memory import ModelMemory, make_memory, remove_stale_segments
from .model_dirs import allowed_model, listed_models
from .notify import sd_notify
from .sessions import PROBE, Sessions
from .watch import FileWatch

log = logging.getLogger("hobbitd")

MiB = 1 << 20
PROBE_S = 0.5  # how long a live daemon on our socket has to answer a HELLO
DRAIN_S = 2.0  # shutdown: how long in-flight requests may run before shutting_down
REAP_EVERY_S = 0.5
STATUS_EVERY_S = 10.0
CLOSE_LINGER_MS = 100  # not 0: the shutting_down answers just queued should still go out
SUN_PATH_MAX = 107  # bytes in a unix socket path (sockaddr_un.sun_path minus the NUL)


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
        self._peer: zmq.Frame | None = None  # the frame last received (its metadata: the peer)
        self.owner_gone = False  # stopped because owner_pid exited
        self.started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------

    async def startup(self) -> None:
        """Raise HobbitError (nothing left behind) if the daemon cannot serve."""
        cfg = self.cfg
        self.opts = ModelOptions(**{f.name: getattr(cfg, f.name) for f in fields(ModelOptions)})
        # with model folders a daemon may start empty: clients ask for their models
        self.models = open_served_all(cfg.models, self.opts) if cfg.models or not cfg.model_dirs else {}
        size = self.cache_size = cfg.cache_size or int(available_memory() * AUTO_CACHE_SHARE)
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
        )
        self.sessions = Sessions(self.cache)
        self._bind()
        self.out = Replies(self.router)
        self.watch = FileWatch(self.cache, self.io, self.opts, self.spawn)
        self.commands = Commands(self.cache, self.out, cfg.client_pin_share, self.spawn, self.watch)
        for mo in self.models.values():
            slots = ", ".join(
                f"{r.n_slots} {p} slots of {r.format.slot_bytes / MiB:.2f} MiB" for p, r in mo.regions.items()
            )
            log.info(
                "model %s: %d layers x %d experts, %s (%s); policy %s, %s",
                mo.name,
                mo.n_layer,
                mo.n_expert,
                slots,
                mo.path,
                mo.policy.name,
                mo.thresholds.describe(mo.calibrated),
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
        """Refuse if a live daemon answers on our socket. A stale socket file stays until
        _bind() replaces it: clients that find it wait for us (a missing file means no
        hobbitd, and they would give up at once)."""
        path = self.socket_path
        if len(self._new_socket_path().encode()) > SUN_PATH_MAX:
            raise InputError(f"socket path {path} is longer than {SUN_PATH_MAX - 10} bytes; choose a shorter --socket")
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
        assert self.ctx is not None  # startup() made it first
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(f"ipc://{path}")
            await s.send_multipart(m.encode(m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name=PROBE))
            if not await s.poll(PROBE_S * 1000):
                return False
            await s.send_multipart(m.encode(m.Cmd.BYE))  # do not leave a session behind
            await asyncio.sleep(0.01)  # give the BYE a moment to leave
            return True
        finally:
            s.close(linger=0)

    def _bind(self) -> None:
        """Listen on a new socket file and rename it over the path: at no moment is there
        no file there while we start (a client started meanwhile waits, as for a restart)."""
        assert self.ctx is not None  # startup() made it first
        path, new = self.socket_path, self._new_socket_path()
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self.router = router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE + 1024)
        old = os.umask(0o117)  # the socket file is born 0660: no window of 0777
        try:
            router.bind(f"ipc://{new}")
            os.chmod(new, 0o660)
            os.rename(new, path)  # atomic: the stale file, then ours
        except (zmq.ZMQError, OSError) as e:
            router.close(linger=0)
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
        assert self.router is not None  # startup() bound it
        while True:
            raw = await self.router.recv_multipart(copy=False)  # frames carry the peer
            self._peer = raw[-1]
            frames = [f.bytes for f in raw]
            try:
                self._dispatch(frames[0], frames[1:])
            except Exception as e:  # a bug: tell the client, keep serving
                log.exception("internal error handling a message")
                self.out.error(frames[0], "internal", f"hobbitd: {e!r}")

    def _dispatch(self, ident: bytes, frames: list) -> None:
        s = self.sessions.get(ident)
        if s is not None:
            s.last_seen = time.monotonic()  # any message counts as a heartbeat
        try:
            cmd, msg = m.decode(frames)
        except ProtocolError as e:
            self.out.error(ident, e.code, str(e))
            return
        if cmd == m.Cmd.HELLO:
            return self._hello(ident, msg)
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

    def _hello(self, ident: bytes, msg: dict) -> None:
        if msg["version"] != m.VERSION:
            return self.out.error(
                ident, "bad_version", f"protocol version {msg['version']}; hobbitd speaks {m.VERSION}"
            )
        path, peer = msg.get("model"), _peer_pid(self._peer)
        if not self.watch.all_fresh():  # a served file changed: welcome with it opened again
            return self.spawn(self.watch.settled(self._hello_open, ident, msg, path, peer))
        self._hello_open(ident, msg, path, peer)

    def _hello_open(self, ident: bytes, msg: dict, path, peer: int | None) -> None:
        if path is not None and self.cfg.model_dirs and not self._serves(path):
            return self.spawn(self._hello_on_demand(ident, msg, path, peer))
        self._welcome(ident, msg, peer)

    async def _hello_on_demand(self, ident: bytes, msg: dict, path, peer: int | None) -> None:
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
                "opened %s on demand as %s: %s; %s",
                real,
                name,
                ", ".join(f"{r.n_slots} {p} slots" for p, r in mo.regions.items()),
                ", ".join(f"{m_} {p} down to {k}" for (m_, p), k in shrink.items()) or "nothing taken from the others",
            )

    def _model_info(self, name: str) -> dict:
        info = self.models[name].info()
        mem = self.opened.get(name)
        if mem is not None:
            info.update(shm=mem.shm.name, shm_size=mem.shm.size)
            if mem.control is not None:
                info["control"] = mem.control.to_wire()
        return info

    def _welcome(self, ident: bytes, msg: dict, peer: int | None) -> None:
        assert self.cache is not None and self.memory is not None  # startup() made them
        pid = msg.get("pid") if isinstance(msg.get("pid"), int) else None
        if self.sessions.get(ident) is None and len(self.sessions) >= self.cfg.max_sessions:
            return self.out.error(
                ident,
                "too_many_sessions",
                f"hobbitd serves {len(self.sessions)} clients, its limit (max_sessions {self.cfg.max_sessions})",
            )
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


def _peer_pid(frame) -> int | None:
    """The sending process's pid, as the kernel reported it for the unix socket (ZeroMQ's
    Peer-Address "host:uid:gid:pid" on ipc); None when unknown."""
    try:
        pid = int(frame.get("Peer-Address").rsplit(":", 1)[1])
    except (AttributeError, IndexError, ValueError, zmq.ZMQError):
        return None
    return pid if pid > 0 else None
