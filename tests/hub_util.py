"""A local Hugging Face Hub for tests: the endpoints huggingface_hub's model_info and
http_get use, served by aiohttp on 127.0.0.1 at a free port (point HF_ENDPOINT at `url`).

- GET /api/models/{repo}[/revision/{rev}]: id, sha and siblings with size, blobId and the LFS
  object (size, sha256), as the Hub answers with ?blobs=true; 404 with X-Error-Code
  RepoNotFound / RevisionNotFound as the Hub sends them.
- GET and HEAD /{repo}/resolve/{rev}/{path}: the bytes, with X-Repo-Commit, ETag,
  X-Linked-Etag, X-Linked-Size; `Range: bytes=N-` gets 206 and Content-Range.
`lfs_listing = False` lists names only, as some mirrors do (size and sha256 then come from
each file's HEAD). Misbehaviour on demand: `serve_instead` serves other bytes than the listing's sha256 names;
`cut` ends the first GET of a file after N bytes, dropping the connection ("drop") or going
silent until the client goes away ("stall"). `requests` logs what was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from typing import NamedTuple

from aiohttp import web

COMMIT = "c0ffee" + "0" * 34
CHUNK = 1 << 20


class Seen(NamedTuple):
    method: str
    path: str
    range: str | None
    authorization: str | None


class Cut(NamedTuple):
    after: int  # bytes of the body sent before the cut
    how: str  # "drop": close the connection; "stall": send nothing more


class LocalHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> {path: bytes}
        self.serve_instead: dict[tuple[str, str], bytes] = {}
        self.cut: dict[tuple[str, str], Cut] = {}  # used once, then forgotten
        self.requests: list[Seen] = []
        self.lfs_listing = True
        self.url = ""

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        self.repos[repo] = dict(files)

    def gets(self, path_suffix: str) -> list[Seen]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)]

    # ---- lifecycle ----

    def start(self) -> LocalHub:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self._info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self._info)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.+}", self._resolve)  # HEAD too
        self.runner = web.AppRunner(app, handler_cancellation=True)
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.SockSite(self.runner, sock).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10), "the local hub did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # ---- endpoints ----

    def _repo(self, request):
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        rev = request.match_info.get("rev", "main")
        self.requests.append(
            Seen(request.method, request.path, request.headers.get("Range"), request.headers.get("Authorization"))
        )
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        if rev not in ("main", COMMIT):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        return repo, self.repos[repo]

    async def _info(self, request):
        repo, files = self._repo(request)
        siblings = [
            {
                "rfilename": path,
                "size": len(data),
                "blobId": _git_sha1(data),
                "lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134},
            }
            for path, data in files.items()
        ]
        if not self.lfs_listing:
            siblings = [{"rfilename": s["rfilename"]} for s in siblings]
        return web.json_response({"id": repo, "sha": COMMIT, "siblings": siblings})

    async def _resolve(self, request):
        repo, files = self._repo(request)
        path = request.match_info["path"]
        if path not in files:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        listed = files[path]
        data = self.serve_instead.get((repo, path), listed)
        sha = hashlib.sha256(listed).hexdigest()
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{sha}"',
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(listed)),
            "Accept-Ranges": "bytes",
        }
        start = 0
        rng = request.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if rng else 200
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers, "Content-Length": str(len(data) - start)})
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        cut = self.cut.pop((repo, path), None)
        body = data[start : start + cut.after] if cut else data[start:]
        for i in range(0, len(body), CHUNK):
            await resp.write(body[i : i + CHUNK])
        if cut and cut.how == "drop":
            request.transport.abort()
        elif cut:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)
        else:
            await resp.write_eof()
        return resp


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
