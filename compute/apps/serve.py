"""hobbit-cli serve: an OpenAI-compatible HTTP server on aiohttp.

Endpoints: POST /v1/chat/completions and /v1/completions (JSON, or server-sent events with
"stream": true), GET /v1/models, /health, /metrics (Prometheus text).

Concurrency: the server holds `parallel` seats (the "slots" of its /health and metrics;
not the cache slots of loader/pool.py); a seat is one Model with its own KV cache and its
own hobbitd connection, so all seats share the daemon's one expert cache. A request
takes a free seat (the one whose cached tokens share the longest prefix with its prompt,
so a conversation's next turn computes only the new tokens) and generates in a worker
thread; when every seat is busy, requests wait in arrival order, up to `max_queue` waiting,
beyond which they get 503. A client that disconnects stops its generation at the next token.

Request → seat → tokens: handle_completion() parses (api.parse), waits for a seat
(Seats.take), runs Seat.generate in a thread, which pushes text pieces to an asyncio queue
that the handler streams or collects.

A model file changed under the server (seats.py) is opened again: a request that found the
change before its first piece of text is answered from the new file; one cut by it
mid-answer gets 503 model_changed, and the next request the new file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import api
from .api import ApiError
from .seats import ClientGone, ModelFiles, Seat, Seats
from ...protocol.errors import FILE_CHANGED, HobbitError, InputError

log = logging.getLogger("hobbit.serve")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1  # seats generating at once
    max_queue: int = 16  # requests waiting for a seat before 503
    n_ctx: int = 2048
    n_threads: int = 0
    api_key: str | None = None  # when set, requests need "Authorization: Bearer KEY"


class Server:
    """The seats, the tokenizer, the counters; the aiohttp handlers are its methods."""

    def __init__(self, opts: ServeOptions, seats: list[Seat], files: ModelFiles, daemon_socket: str | None):
        self.opts, self.files = opts, files
        self.name = os.path.basename(opts.model).removesuffix(".gguf")
        self.seats = Seats(seats, opts.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=len(seats) + 1, thread_name_prefix="hobbit-gen")
        self.daemon_socket = daemon_socket
        self._stats_client = None
        self._stats_lock = threading.Lock()
        self.started = int(time.time())
        from .metrics import ServerMetrics

        self.metrics = ServerMetrics(self)

    # ---- the data path ---------------------------------------------------------------

    async def handle_completion(self, request, chat: bool):
        from aiohttp import web

        endpoint = request.path
        try:
            try:
                body = await request.json(loads=json.loads)
            except (ValueError, UnicodeDecodeError):
                raise ApiError(400, "the request body is not valid JSON") from None
            job = api.parse(body, chat, self.name)
            ids = self._tokens(job)
            seat = await self.seats.take(ids)
        except ApiError as e:
            self.metrics.request(endpoint, e.status)
            return _error(e)
        try:
            if job.stream:
                return await self._stream(request, seat, ids, job)
            pieces = []
            result = await self._run(request, seat, ids, job, pieces.append)
            self.metrics.request(endpoint, 200)
            return web.json_response(
                api.response(
                    job,
                    "".join(pieces),
                    result["finish"],
                    api.usage(result["prompt_tokens"], result["completion_tokens"]),
                )
            )
        except ApiError as e:
            self.metrics.request(endpoint, e.status)
            return _error(e)
        except ClientGone:
            self.metrics.request(endpoint, 499)  # nginx's "client closed request"
            return web.Response(status=499)
        finally:
            await self.seats.give(seat)

    def _tokens(self, job: api.Job) -> list:
        n_ctx = self.opts.n_ctx
        if job.chat:
            try:
                text = self.files.tok.chat_prompt(job.messages)
            except HobbitError as e:
                raise ApiError(400, str(e), "messages") from None
            ids = self.files.tok.encode(text, parse_special=True)
        elif isinstance(job.prompt, list):
            ids = list(job.prompt)
            n_vocab = self.files.weights.args.n_vocab
            bad = [t for t in ids if not 0 <= t < n_vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is out of range 0..{n_vocab - 1}", "prompt")
        else:
            ids = self.files.tok.encode(job.prompt)
        if len(ids) >= n_ctx:
            raise ApiError(
                400,
                f"this model's context holds {n_ctx} tokens; the prompt has "
                f"{len(ids)} (shorten it, or restart serve with a larger --ctx)",
                "messages" if job.chat else "prompt",
                "context_length_exceeded",
            )
        return ids

    async def _run(self, request, seat: Seat, ids: list, job: api.Job, on_piece) -> dict:
        """Generate in a worker thread; each piece reaches on_piece (an async-side callable
        or coroutine function) in order. A disconnected client cancels the seat's generation.
        The model file found changed before the first piece: opened again, and the answer
        generated on the new file (once)."""
        loop = asyncio.get_running_loop()
        sent: list = []

        def counted(piece):
            sent.append(piece)
            return on_piece(piece)

        retried = False
        while True:
            try:
                return await self._generate(request, seat, ids, job, counted)
            except HobbitError as e:
                if e.code != FILE_CHANGED:
                    log.error("generation failed: %s", e)
                    raise ApiError(503, f"generation failed: {e}", code="daemon_error") from None
                log.warning("%s: opening it again", e)
                try:
                    await loop.run_in_executor(self.pool, self.files.reopen, seat.version)
                except HobbitError as again:
                    log.error("%s", again)
                    raise ApiError(
                        503, f"the model file changed and cannot be opened again: {again}", code="model_changed"
                    ) from None
                if sent or retried:
                    raise ApiError(
                        503, "the model file changed during this answer; ask again", code="model_changed"
                    ) from None
            retried = True
            ids = self._tokens(job)  # with the file's tokenizer as it is now

    async def _generate(self, request, seat: Seat, ids: list, job: api.Job, on_piece) -> dict:
        """One generation of _run; HobbitError as the seat raised it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        emit = lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece)
        work = loop.run_in_executor(self.pool, seat.generate, ids, job, emit)
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        gone = False
        try:
            while (piece := await queue.get()) is not None:
                gone = gone or request.transport is None or request.transport.is_closing()
                if gone:
                    seat.cancel.set()  # the client went away mid-answer: stop at the next token
                    continue
                r = on_piece(piece)
                if asyncio.iscoroutine(r):
                    await r
        except BaseException as e:
            seat.cancel.set()  # stop, and free the seat only once the thread is done
            await asyncio.wait([work])
            if isinstance(e, ConnectionError):
                raise ClientGone() from None
            raise
        if gone:
            raise ClientGone()
        try:
            result = work.result()
        except InputError as e:
            raise ApiError(400, str(e)) from None
        self.metrics.generated(result)
        if result["finish"] == "cancelled":  # not by this client: the server is stopping
            raise ApiError(503, "the server is shutting down; the answer was cut short", code="shutting_down")
        return result

    async def _stream(self, request, seat: Seat, ids: list, job: api.Job):
        from aiohttp import web

        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        send = lambda obj: resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        if job.chat:
            await send(api.chunk(job, role=True))
        try:
            result = await self._run(request, seat, ids, job, lambda piece: send(api.chunk(job, piece)))
        except ClientGone:
            self.metrics.request(request.path, 499)
            return resp
        except ApiError as e:  # the status line is sent already: say it in the stream
            self.metrics.request(request.path, e.status)
            try:
                await send(e.body())
                await resp.write(b"data: [DONE]\n\n")
            except ConnectionError:
                pass
            return resp
        try:
            await send(api.chunk(job, finish=result["finish"]))
            if job.include_usage:
                await send(api.chunk(job, use=api.usage(result["prompt_tokens"], result["completion_tokens"])))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            self.metrics.request(request.path, 499)
            return resp
        self.metrics.request(request.path, 200)
        return resp

    # ---- the other endpoints -----------------------------------------------------------

    async def handle_models(self, request):
        from aiohttp import web

        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.name,
                        "object": "model",
                        "created": self.started,
                        "owned_by": "hobbit",
                        "path": os.path.realpath(self.opts.model),
                        "n_ctx": self.opts.n_ctx,
                    }
                ],
            }
        )

    async def handle_health(self, request):
        from aiohttp import web

        body = {
            "status": "ok",
            "model": self.name,
            "slots": len(self.seats.all),
            "slots_idle": len(self.seats.free),
            "waiting": self.seats.waiting,
        }
        if self.daemon_socket:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.pool, self.daemon_stats)
                body["hobbitd"] = self.daemon_socket
            except HobbitError as e:
                body.update(status="error", error=f"hobbitd: {e}")
                return web.json_response(body, status=503)
        return web.json_response(body)

    async def handle_metrics(self, request):
        from aiohttp import web

        loop = asyncio.get_running_loop()
        text, ctype = await loop.run_in_executor(self.pool, self.metrics.render)
        return web.Response(body=text, headers={"Content-Type": ctype})

    def daemon_stats(self) -> dict:
        """hobbitd's STATS (blocking; call from a worker thread). DaemonError when it is gone."""
        from ..client.expert_client import ExpertClient
        from ...protocol.errors import DaemonError

        with self._stats_lock:
            try:
                if self._stats_client is None:
                    self._stats_client = ExpertClient(
                        self.daemon_socket, None, timeout=2, retries=0, reconnect_s=0
                    )  # /health: say 503 now
                return self._stats_client.stats()
            except DaemonError:
                if self._stats_client is not None:
                    self._stats_client.close()
                self._stats_client = None
                raise

    def close(self) -> None:
        for s in self.seats.all:
            s.cancel.set()
        self.pool.shutdown(wait=True)
        for s in reversed(self.seats.all):  # the first seat's client may own a private hobbitd
            s.model.close()
            if s.model.experts is not None:
                s.model.experts.close()
        if self._stats_client is not None:
            self._stats_client.close()


def _error(e: ApiError):
    from aiohttp import web

    return web.json_response(e.body(), status=e.status)


def build_app(server: Server):
    """The aiohttp application: routes, plus middleware that answers every error (unknown
    route, wrong method, bad key, a bug) in OpenAI's error JSON."""
    from aiohttp import web

    @web.middleware
    async def errors(request, handler):
        if server.opts.api_key and request.path.startswith("/v1/"):
            if request.headers.get("Authorization") != f"Bearer {server.opts.api_key}":
                server.metrics.request(request.path, 401)
                return _error(
                    ApiError(
                        401,
                        "invalid or missing API key (Authorization: Bearer KEY)",
                        code="invalid_api_key",
                        type="authentication_error",
                    )
                )
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            server.metrics.request("other", e.status)
            what = {404: f"no endpoint {request.path}", 405: f"{request.method} is not allowed on {request.path}"}
            return _error(ApiError(e.status, what.get(e.status, e.reason)))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            server.metrics.request(request.path, 500)
            return _error(ApiError(500, "internal server error (see the server's log)"))

    app = web.Application(middlewares=[errors], client_max_size=8 << 20)
    app.router.add_post("/v1/chat/completions", lambda r: server.handle_completion(r, chat=True))
    app.router.add_post("/v1/completions", lambda r: server.handle_completion(r, chat=False))
    app.router.add_get("/v1/models", server.handle_models)
    app.router.add_get("/health", server.handle_health)
    app.router.add_get("/metrics", server.handle_metrics)
    return app


def load(opts: ServeOptions, daemon) -> Server:
    """Open the model once per seat: the first through `daemon` (a runs.ThroughDaemon,
    which may start a private hobbitd; None: in-process), the others on the same weights,
    tokenizer and hobbitd."""
    from ..engine.model import RunOptions
    from ..engine.sampling import ignored_keys
    from ..runs import open_run

    first = open_run(opts.model, RunOptions(n_ctx=opts.n_ctx, n_threads=opts.n_threads), daemon)
    runs = [first]
    try:
        files = ModelFiles(first.path, first.weights, first.tok)  # a bad general.sampling.* key: refused at start
        for line in ignored_keys(first.weights):
            log.warning("%s", line)
        while len(runs) < opts.parallel:
            runs.append(first.another())
    except BaseException:
        for r in reversed(runs):  # the first one's client may own a private hobbitd
            r.close()
        raise
    seats = [Seat(i, r.model, files) for i, r in enumerate(runs)]
    return Server(opts, seats, files, first.experts.socket_path if first.experts else None)


def bind(host: str, port: int):
    """The server's TCP socket, bound but not yet listening: a port in use is reported
    before the model loads, and nobody connects until it has."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise InputError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def run(server: Server, sock) -> None:
    """Listen on `sock` until SIGINT/SIGTERM, then stop generating, finish the responses
    and close."""
    from aiohttp import web

    o = server.opts
    runner = web.AppRunner(build_app(server), access_log=None, handle_signals=False)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    where = f"through hobbitd at {server.daemon_socket}" if server.daemon_socket else "in-process"
    print(
        f"hobbit serve: {server.name} ({where}), {o.parallel} slot(s), listening on http://{host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("hobbit serve: stopping", file=sys.stderr, flush=True)
    for s in server.seats.all:
        s.cancel.set()  # answers in progress end now (finish_reason "cancelled")
    await runner.cleanup()


def serve(opts: ServeOptions, daemon, sock) -> int:
    """Load opts.model into its seats and serve on `sock` (from bind(); closed here)."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="hobbit serve: %(message)s", stream=sys.stderr)
    try:
        server = load(opts, daemon)
        try:
            uvloop.run(run(server, sock))
        finally:
            server.close()
    finally:
        sock.close()
    return 0
