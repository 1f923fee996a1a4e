"""hobbitd's commands of a session on the expert cache: REQUEST, HINT, RELEASE, RESIDENT,
USED, and the batched releases and hits any of them may carry.

Commands turns a session's messages into calls on loader/cache.py's ExpertCache and their
results or RequestErrors into replies (Replies, on the daemon's ROUTER). A REQUEST all of
whose experts are cached is answered at once (ExpertCache.try_hit); one with misses is
served by a task (ExpertCache.acquire), so other clients go on meanwhile. Field types were
checked by protocol.messages.decode(); ranges are checked here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

import zmq

from ..loader.cache import ExpertCache
from ..loader.model_cache import ModelCache
from ..protocol import messages as m
from ..protocol.errors import FILE_CHANGED, RequestError
from .sessions import Session
from .watch import FileWatch

log = logging.getLogger("hobbitd")


class Replies:
    """Messages to clients on the ROUTER (ROUTER_MANDATORY). Sends never block: a reply
    to a vanished client is dropped (a failed send logged); one to a client whose queue of
    answers is full (it does not read them) is dropped and `unread(ident)` told."""

    def __init__(self, router, unread: Callable[[bytes], None]):
        self.router, self.unread = router, unread

    def send(self, ident: bytes, cmd: m.Cmd, **fields) -> None:
        fut = self.router.send_multipart([ident, *m.encode(cmd, **fields)], flags=zmq.DONTWAIT)
        if fut.done() and not fut.cancelled() and isinstance(fut.exception(), zmq.Again):
            return self.unread(ident)
        fut.add_done_callback(_log_send_error)

    def error(self, ident: bytes, code: str, message: str, rid: int | None = None) -> None:
        extra = {} if rid is None else {"id": rid}
        self.send(ident, m.Cmd.ERROR, code=code, message=message, **extra)


class Commands:
    def __init__(
        self,
        cache: ExpertCache,
        out: Replies,
        pin_share: float,
        max_requests: int,
        spawn: Callable[[Coroutine], None],
        watch: FileWatch,
    ):
        """pin_share: the share of a model's slots one session may pin (pin_limit beyond);
        max_requests: a session's requests waiting for reads at once (busy beyond); spawn:
        run a coroutine as a task the daemon drains at shutdown; watch: the served files'
        (a request of a changed one waits for it to be opened again)."""
        self.cache, self.out, self.pin_share, self.spawn = cache, out, pin_share, spawn
        self.max_requests, self.watch = max_requests, watch

    def request(self, s: Session, msg: dict) -> None:
        """Answer SLOTS at once when every expert is a hit, else from a task that waits
        for the misses' reads."""
        try:
            mo = self.cache.model(msg["model"])
            layer, experts = msg["layer"], msg["experts"]
            mo.check(layer, experts)
            self.cache.check_pins(s.sid, mo, len(experts), self.pin_share)
            fresh = self.watch.fresh(mo)  # a stat: never serve a changed file's cache
            if fresh:
                self.watch.check(mo, msg.get("epoch"))
        except RequestError as e:
            return self.out.error(s.ident, e.code, str(e), msg["id"])
        scores = msg.get("scores") or [0.0] * len(experts)  # no scores: all important
        s.note_request()
        seq, token = msg.get("seq"), msg.get("token")
        if isinstance(seq, int) and isinstance(token, int):
            mo.policy.begin(s.sid, seq, token, layer)
            s.count_forward(seq, token, msg.get("tokens"))
        slots = self.cache.try_hit(s.sid, mo, layer, experts, scores) if fresh else None
        if slots is not None:
            return self._reply_slots(s, msg["id"], slots)
        if s.inflight >= self.max_requests:  # a client waits for each answer: this one floods
            return self.out.error(
                s.ident, "busy", f"{s.inflight} requests of this client are being served (max_requests)", msg["id"]
            )
        s.inflight += 1  # before the task starts: the reaper must not drop s
        self.spawn(self._serve_request(s, mo, layer, experts, scores, msg["id"], msg.get("epoch")))

    async def _serve_request(
        self, s: Session, mo: ModelCache, layer: int, experts: list, scores: list, rid: int, epoch=None
    ) -> None:
        try:
            try:
                await self.watch.settle(mo)  # its file changed: opened again first
                self.watch.check(mo, epoch)
                slots = await self.cache.acquire(s.sid, mo, layer, experts, scores)
            except RequestError as e:
                if e.code == FILE_CHANGED:
                    log.warning("%s", e)
                if s.alive:
                    return self.out.error(s.ident, e.code, str(e), rid)
            except Exception as e:
                if s.alive:
                    log.error("request %s failed", rid, exc_info=e)
                    return self.out.error(s.ident, "internal", f"hobbitd: {e!r}", rid)
            if not s.alive:  # BYE or a new HELLO meanwhile: it holds none of these
                return self.out.error(
                    s.ident, "no_session", "the session ended during the request; say HELLO again", rid
                )
            self._reply_slots(s, rid, slots)
        except asyncio.CancelledError:
            self.out.error(s.ident, "shutting_down", "hobbitd is shutting down", rid)
            raise
        finally:
            s.inflight -= 1
            s.last_seen = max(s.last_seen, time.monotonic())  # it was waiting on us

    def _reply_slots(self, s: Session, rid: int, slots: list) -> None:
        self.out.send(
            s.ident, m.Cmd.SLOTS, id=rid, slots=[None if g is None else [g.region.precision, g.index] for g in slots]
        )
        s.replied_at = time.monotonic()

    def hint(self, s: Session, msg: dict) -> None:
        """Prefetch for a client's lookahead (ExpertCache.hint); the budget is the compute
        time the client says comes before its next request, else its measured time between
        requests (decode steps only: a prompt's pauses exceed GAP_MAX_S)."""
        try:
            mo = self.cache.model(msg["model"])
            mo.check(msg["layer"], [])
            for layer, experts in zip(msg["layers"], msg["experts"]):
                mo.check(layer, experts)
        except RequestError as e:
            return self.out.error(s.ident, e.code, f"HINT: {e}")
        if not self.watch.fresh(mo) or mo.broken is not None:
            return  # nothing worth reading ahead of a changed file
        compute_s = msg.get("compute_s")
        self.cache.hint(
            s.sid, mo, msg["layers"], msg["experts"], msg["scores"], s.gap_s if compute_s is None else float(compute_s)
        )

    def release(self, s: Session, msg: dict) -> None:
        mo = self.cache.models.get(msg["model"])
        if mo is None:
            return self.out.error(s.ident, "unknown_model", f"RELEASE: no model {msg['model']!r}")
        self.cache.release(
            s.sid, mo, [tuple(item) for item in msg["slots"] if isinstance(item, list) and len(item) == 2]
        )

    def apply_batched(self, s: Session, msg: dict) -> None:
        """A message's batched fields, before the message itself: releases of slots hobbitd
        gave (RELEASE's), and hits the client pinned itself in its control-block row (HITS',
        ExpertCache.count_hits; they also place the client in its sequence, and count its
        forward when no request of that forward reached us)."""
        mo = self.cache.models.get(msg["model"]) if isinstance(msg.get("model"), str) else None
        if mo is None:
            return
        if msg.get("release"):
            self.cache.release(
                s.sid, mo, [tuple(item) for item in msg["release"] if isinstance(item, list) and len(item) == 2]
            )
        hits = msg.get("hits")
        if hits:
            seq, token = msg.get("seq"), msg.get("token")
            if (
                isinstance(seq, int)
                and isinstance(token, int)
                and isinstance(hits[-1], list)
                and hits[-1]
                and isinstance(hits[-1][0], int)
            ):
                mo.policy.begin(s.sid, seq, token, hits[-1][0])
                s.count_forward(seq, token, msg.get("tokens"))
            self.cache.count_hits(s.sid, mo, hits)

    def resident(self, s: Session, msg: dict) -> None:
        """Every expert of the model pinned for the session, or how far loading them is
        (ExpertCache.resident); answered at once, never waiting for reads."""
        try:
            mo = self.cache.model(msg["model"])
            if not self.watch.fresh(mo):
                raise RequestError(FILE_CHANGED, f"{mo.path} changed while hobbitd served it; run the client again")
            self.watch.check(mo, msg.get("epoch"))
        except RequestError as e:
            return self.out.error(s.ident, e.code, str(e), msg["id"])
        self.out.send(s.ident, m.Cmd.RESIDENT_REPLY, id=msg["id"], **self.cache.resident(s.sid, mo))

    def used(self, s: Session, msg: dict) -> None:
        mo = self.cache.models.get(msg["model"])
        if mo is None:
            return self.out.error(s.ident, "unknown_model", f"USED: no model {msg['model']!r}")
        s.count_forward(msg.get("seq"), msg.get("token"), msg.get("tokens"), msg.get("forwards", 1))
        self.cache.count_used(s.sid, mo, msg["uses"])


def _log_send_error(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())
