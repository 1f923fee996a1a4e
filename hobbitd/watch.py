"""hobbitd's watch over the files it serves: a changed file is never mixed with its cache.

Each served model's files (the GGUF, its companion) are stat'ed (loader/identity.py says
what counts as a change) before a request of the model is served, at every HELLO, and every
REAP_EVERY_S for the clients that pin their hits themselves and so send no requests; every
read is checked again after it completed (loader/reads.py). On a change the model's cached
experts are dropped and its epoch moves on (loader/freshness.py), then the files are opened
again on a thread: a model of the same layout is served again, from the new bytes; another
layout, a truncated or unreadable file leaves the model failing its requests with one line
naming the file (`ModelCache.broken`), until the file changes again. Requests and HELLOs
that arrive meanwhile wait for that. A client learns of a change by the epoch of the model
(WELCOME's model info) its requests carry: another epoch is answered ERROR file_changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

from ..loader.cache import ExpertCache
from ..loader.freshness import adopt, invalidate
from ..loader.identity import identity
from ..loader.io_engine import IOEngine
from ..loader.model_cache import ModelCache
from ..loader.precision import HIGH
from ..loader.served import ModelOptions, open_served
from ..protocol.errors import FILE_CHANGED, HobbitError, RequestError

log = logging.getLogger("hobbitd")

OPEN_TRIES = 3  # a file still being written while opened again is opened again


class FileWatch:
    def __init__(self, cache: ExpertCache, io: IOEngine, opts: ModelOptions, spawn: Callable[[Coroutine], None]):
        self.cache, self.io, self.opts, self.spawn = cache, io, opts, spawn
        self._opening: dict[str, asyncio.Future] = {}  # model name -> done when opened again

    def fresh(self, mo: ModelCache) -> bool:
        """Whether mo may be answered now: its files unchanged (one stat each) and not being
        opened again. On a change its cache is dropped and the files opened again (settle()
        waits for it). A broken model is fresh while its file stays as it is (check() fails it)."""
        if mo.name in self._opening:
            return False
        if not mo.changed():
            return True
        freed = invalidate(mo)
        log.warning(
            "%s changed while served (rewritten, truncated or replaced): %d cached experts dropped; opening it again",
            mo.path,
            freed,
        )
        mo.broken = f"{mo.path} changed while hobbitd served it and is being opened again"
        self._opening[mo.name] = asyncio.get_running_loop().create_future()
        self.spawn(self._reopen(mo))
        return False

    def all_fresh(self) -> bool:
        """fresh() of every model (each one checked)."""
        return all([self.fresh(mo) for mo in list(self.cache.models.values())])

    async def settle(self, mo: ModelCache | None = None) -> None:
        """Wait until mo (None: every model) is no longer being opened again."""
        futs = [f for name, f in self._opening.items() if mo is None or name == mo.name]
        if futs:
            await asyncio.gather(*(asyncio.shield(f) for f in futs))

    async def settled(self, then: Callable, *args) -> None:
        """then(*args) once no model is being opened again (a HELLO's welcome)."""
        await self.settle()
        then(*args)

    @staticmethod
    def check(mo: ModelCache, epoch) -> None:
        """RequestError file_changed when mo cannot be served (its file changed into
        something hobbitd cannot serve), or when the client asking knew it at another epoch
        (it computes on its own mmap of the file as it was then)."""
        if mo.broken is not None:
            raise RequestError(FILE_CHANGED, mo.broken)
        if isinstance(epoch, int) and epoch != mo.epoch:
            raise RequestError(FILE_CHANGED, f"{mo.path} changed after this client opened it; run the client again")

    async def _reopen(self, mo: ModelCache) -> None:
        fut = self._opening[mo.name]
        try:
            for path in {w.path for ws in mo.files.values() for w in ws}:
                self.io.forget(path)  # a rename put another file there
            mo.broken = await self._open_again(mo)
            if mo.broken is None:
                log.info("%s opened again: served from its new bytes", mo.path)
                self.cache.preload(mo)
            else:
                mo.watch_files()  # as it is now: a further change tries again
                log.warning("%s", mo.broken)
        finally:
            del self._opening[mo.name]
            fut.set_result(None)

    async def _open_again(self, mo: ModelCache) -> str | None:
        """None when mo serves its files as they are now, else why not (one line)."""
        for _ in range(OPEN_TRIES):
            before = identity(mo.path)
            try:
                new = await asyncio.to_thread(open_served, mo.path, mo.name, self.opts)
            except HobbitError as e:
                return f"{mo.path} changed while hobbitd served it and cannot be served now: {e}"
            except Exception as e:  # a file half written can fail the parser in any way
                return f"{mo.path} changed while hobbitd served it and cannot be served now: {e!r}"
            if new.files[HIGH][0].identity == before:
                return adopt(mo, new)
        return f"{mo.path} keeps changing while hobbitd opens it; it serves it again once it stays as it is"
