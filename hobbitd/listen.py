"""hobbitd's socket: claiming its path (no live daemon there) and binding the ROUTER.

A stale socket file (a dead hobbitd's) stays until bind_router() renames ours over it:
clients that find it wait for us (a missing file means no hobbitd, and they would give up
at once).
"""

from __future__ import annotations

import asyncio
import os
import stat

import zmq
import zmq.asyncio

from ..protocol import messages as m
from ..protocol.errors import DaemonError, InputError
from .sessions import PROBE

PROBE_S = 0.5  # how long a live daemon on our socket has to answer a HELLO
SUN_PATH_MAX = 107  # bytes in a unix socket path (sockaddr_un.sun_path minus the NUL)


async def claim_socket(ctx: zmq.asyncio.Context, path: str) -> bool:
    """Whether a stale socket file is at `path` (to be replaced); InputError for a path too
    long or not a socket, DaemonError socket_in_use if a live daemon answers there."""
    if len(_new_socket_path(path).encode()) > SUN_PATH_MAX:
        raise InputError(f"socket path {path} is longer than {SUN_PATH_MAX - 10} bytes; choose a shorter --socket")
    if not os.path.lexists(path):
        return False
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise InputError(f"{path} exists and is not a socket; refusing to replace it")
    if await _probe(ctx, path):
        raise DaemonError("socket_in_use", f"another hobbitd is serving on {path}")
    return True


def _new_socket_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.getpid()}.new")


async def _probe(ctx: zmq.asyncio.Context, path: str) -> bool:
    """True if something answers a HELLO on ipc://path within PROBE_S."""
    s = ctx.socket(zmq.DEALER)
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


def bind_router(ctx: zmq.asyncio.Context, path: str, hwm: int) -> zmq.asyncio.Socket:
    """The daemon's ROUTER, listening on a new socket file renamed over `path`: at no moment
    is there no file there while we start (a client started meanwhile waits, as for a
    restart). At most `hwm` messages queued each way per client; ROUTER_MANDATORY, so that
    a client's full queue of answers is an error (zmq.Again) rather than a silent loss.
    DaemonError socket_in_use if it cannot listen."""
    new = _new_socket_path(path)
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.MAXMSGSIZE, m.MAX_MESSAGE + 1024)
    router.setsockopt(zmq.SNDHWM, hwm)  # per client: its unread answers
    router.setsockopt(zmq.RCVHWM, hwm)  # per client: beyond, a flood waits in the client
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    old = os.umask(0o117)  # the socket file is born 0660: no window of 0777
    try:
        router.bind(f"ipc://{new}")
        os.chmod(new, 0o660)
        os.rename(new, path)  # atomic: the stale file, then ours
    except (zmq.ZMQError, OSError) as e:
        router.close(linger=0)
        if os.path.lexists(new):
            os.unlink(new)
        raise DaemonError("socket_in_use", f"cannot listen on {path}: {e}") from None
    finally:
        os.umask(old)
    return router
