"""hobbit-cli serve's seats: a seat is one Model with its own KV cache and hobbitd
connection, used by one request at a time; Seats hands them out (compute/apps/serve.py).

The seats share the model's weights and tokenizer (ModelFiles). When the model file changes
under the server (rewritten, replaced, truncated: engine/file_guard.py or hobbitd say
FILE_CHANGED), the server opens it again (ModelFiles.reopen) and each seat follows before
its next generation (Seat.follow: a new Model and hobbitd session on the new version), so a
long-running server serves the file as it is now instead of failing until restarted.
"""

from __future__ import annotations

import asyncio
import threading
import time

from . import api
from .api import ApiError
from ..engine.model import Model
from ..engine.sampling import SamplingSettings, model_sampling
from ..engine.tokenizer import Tokenizer
from ..engine.weights import Weights, open_model


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class ModelFiles:
    """The model's weights, tokenizer and recommended sampling as of the file's latest
    opening (`version` counts them), shared by the seats; reopen() is thread-safe."""

    def __init__(self, path: str, weights: Weights, tok: Tokenizer):
        self.path = path
        self.weights, self.tok = weights, tok
        self.sampling: SamplingSettings = model_sampling(weights)  # a bad general.sampling.* key: refused
        self.version = 0
        self._lock = threading.Lock()

    def reopen(self, seen: int) -> None:
        """Open the file again after it changed, unless it was since version `seen`.
        ModelError when it is no longer a model hobbit runs (the old version stays, and so
        does the error until the file is fixed). The old weights stay mapped for the seats
        still on them (garbage once the last one follows)."""
        with self._lock:
            if self.version != seen:
                return
            weights = open_model(self.path)
            tok = Tokenizer(self.path)
            self.weights, self.tok, self.sampling = weights, tok, model_sampling(weights)
            self.version += 1

    def current(self) -> tuple[int, Weights]:
        """(version, weights) of the latest opening, read together."""
        with self._lock:
            return self.version, self.weights


class Seat:
    """One Model and the tokens its KV cache holds. Used by one request at a time."""

    def __init__(self, index: int, model: Model, files: ModelFiles):
        self.index, self.model, self.files = index, model, files
        self.version = files.version  # the opening of the file self.model computes on
        self.tokens: list[int] = []
        self.cancel = threading.Event()

    @property
    def tok(self) -> Tokenizer:
        return self.files.tok

    def follow(self) -> None:
        """Move to the file's latest opening, if this seat is not on it: a new Model (and,
        through hobbitd, a new session, which gets the daemon's new epoch of the file; a
        private daemon passes to it). HobbitError when hobbitd cannot serve the new file."""
        version, weights = self.files.current()
        if self.version == version:
            return
        from ..runs import Run

        old = self.model
        self.model = Run(self.files.path, weights, self.files.tok, old).another().model
        if old.experts is not None:
            self.model.experts.private, old.experts.private = old.experts.private, None
        self.version, self.tokens = version, []
        old.close()
        if old.experts is not None:
            old.experts.close()

    def shared_prefix(self, ids: list) -> int:
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):  # at least one token is always computed
            if a != b:
                break
            n += 1
        return n

    def generate(self, ids: list, job: api.Job, emit) -> dict:
        """Generate for `job` after prompt `ids`, calling emit(piece) from this thread for
        each piece of text (stop sequences already cut). Returns the finish reason and
        counts. Runs in a worker thread; self.cancel stops it at the next token."""
        from ..engine.generate import TextStream, generate_tokens
        from ..engine.sampling import Sampler, resolve

        self.follow()
        model = self.model
        keep = self.shared_prefix(ids)
        if not model.resumable(keep):  # a sliding window already moved past it
            keep = 0
        if keep == 0:
            model.reset()  # a new sequence for the daemon's cache policy
        model.n_past = keep
        self.tokens = ids[:keep]
        room = model.n_ctx - len(ids) + 1  # the last generated token needs no KV slot
        limit = min(job.max_tokens or room, room)
        sampler = Sampler(resolve(api.sampling(job), self.files.sampling, builtin=api.DEFAULTS))
        text, stop = TextStream(self.tok), api.StopText(job.stop)
        gen, finish = [], "length"
        t_first = None
        try:
            for token in generate_tokens(model, ids[keep:], limit, sampler, stop=self._eog, cached=ids[:keep]):
                t_first = t_first or time.perf_counter()
                gen.append(token)
                piece = stop.push(text.push(token))
                if piece:
                    emit(piece)
                if stop.stopped:
                    finish = "stop"
                    break
                if self.cancel.is_set():
                    finish = "cancelled"
                    break
            else:
                if len(gen) < limit and model.n_past < model.n_ctx:
                    finish = "stop"  # an end-of-generation token
            tail = stop.push(text.flush()) + stop.flush()
            if tail:
                emit(tail)
        finally:
            self.tokens = (ids + gen)[: model.n_past]
        t1 = time.perf_counter()
        return {
            "finish": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(gen),
            "computed_prompt_tokens": len(ids) - keep,
            "decode_tok_s": (len(gen) - 1) / (t1 - t_first) if t_first and len(gen) > 1 else 0.0,
        }

    def _eog(self, token: int) -> bool:
        return self.tok.is_eog(token)


class Seats:
    """The free seats; take() waits (FIFO) for one, preferring the longest cached prefix."""

    def __init__(self, seats: list[Seat], max_queue: int):
        self.all, self.free = seats, list(seats)
        self.max_queue = max_queue
        self.waiting = 0
        self._cond = asyncio.Condition()

    async def take(self, ids: list) -> Seat:
        async with self._cond:
            if not self.free and self.waiting >= self.max_queue:
                raise ApiError(
                    503,
                    f"the server is busy: {self.waiting} requests are waiting for a slot; try again later",
                    code="server_busy",
                )
            self.waiting += 1
            try:
                await self._cond.wait_for(lambda: self.free)
            finally:
                self.waiting -= 1
            seat = max(self.free, key=lambda s: s.shared_prefix(ids))
            self.free.remove(seat)
            seat.cancel.clear()
            return seat

    async def give(self, seat: Seat) -> None:
        async with self._cond:
            self.free.append(seat)
            self._cond.notify()
