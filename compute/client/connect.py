"""Find the experts' provider for a run: the running hobbitd, or a private one.

`connect(model_path, socket, autostart)` returns an ExpertClient. When no hobbitd answers
at the socket (no socket file, or a stale one left by a crash) and autostart is on, a
private hobbitd is started for this process only: its socket lives in a fresh 0700 folder
under $XDG_RUNTIME_DIR (else the temp folder), it serves just this model, and it is
stopped when the client is closed or this process exits. Its log goes to a file in that
folder; if it fails to start, the last lines of that log are the error.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time

from ...loader.shm import pid_alive
from ...protocol.errors import DaemonError
from .connection import RECONNECT_S
from .daemon import START_TIMEOUT, DaemonProcess, daemon_answers


PRIVATE_FILES = {"hobbitd.sock", "hobbitd.log"}


def _sweep_private_folders(base: str) -> None:
    """Remove the folders of private daemons whose owner and daemon both died (SIGKILLed
    together: neither could clean up): ours by name (hobbit-PID-...), holding only what a
    private daemon writes, its owner pid gone, nobody answering at its socket."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != "hobbit" or not parts[1].isdigit():
            continue
        path = os.path.join(base, name)
        try:
            if (
                not os.path.isdir(path)
                or os.path.islink(path)
                or os.stat(path).st_uid != os.getuid()
                or not set(os.listdir(path)) <= PRIVATE_FILES
                or pid_alive(int(parts[1]))
            ):
                continue
        except OSError:
            continue
        if not daemon_answers(os.path.join(path, "hobbitd.sock"), timeout=0.5):
            shutil.rmtree(path, ignore_errors=True)


class PrivateDaemon(DaemonProcess):
    """A hobbitd subprocess owned by this process (see the module docstring)."""

    def __init__(self, model_path: str, cache_size: str | None = None):
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base or not os.access(base, os.W_OK):
            base = None
        _sweep_private_folders(base or tempfile.gettempdir())
        # mode 0700; named by its owner's pid, so that a later owner can tell it is dead
        self.folder = tempfile.mkdtemp(prefix=f"hobbit-{os.getpid()}-", dir=base)
        env = {k: v for k, v in os.environ.items() if k not in ("HOBBIT_SOCKET", "NOTIFY_SOCKET")}
        super().__init__(
            [model_path],
            os.path.join(self.folder, "hobbitd.sock"),
            log_path=os.path.join(self.folder, "hobbitd.log"),
            cache_size=cache_size,
            env=env,
            own_session=True,
            owner_pid=os.getpid(),
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        try:
            super().wait_ready(timeout)
        except DaemonError as e:
            self.stop()
            raise DaemonError(e.code, f"the private {e}") from None

    def stop(self, *args, **kwargs) -> int:
        rc = super().stop(*args, **kwargs)
        shutil.rmtree(self.folder, ignore_errors=True)
        return rc


def _wait_for_restart(socket: str, deadline_s: float, quiet: bool) -> None:
    """A socket file nobody answers at: its hobbitd died and may be restarting (systemd
    restarts it within seconds), so look again with backoff for up to deadline_s seconds,
    as a client that lost its daemon does."""
    deadline = time.monotonic() + deadline_s
    if not quiet:
        print(
            f"hobbit: hobbitd at {socket} does not answer; waiting up to {deadline_s:.0f} s for it to restart",
            file=sys.stderr,
        )
    pause = 0.1
    while time.monotonic() < deadline and not daemon_answers(socket):
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 1.0)


def connect(
    model_path: str, socket: str, autostart: bool = True, quiet: bool = False, reconnect_s: float = RECONNECT_S
):
    """An ExpertClient for `model_path`: through the hobbitd at `socket` when one answers,
    else (autostart) through a private one, stopped with the client. Says which on stderr,
    and (unless quiet) when the daemon is lost and found again; reconnect_s: how long the
    client looks for a hobbitd again once its own is gone."""
    from .expert_client import ExpertClient

    if not autostart and not daemon_answers(socket) and os.path.exists(socket):
        _wait_for_restart(socket, reconnect_s, quiet)
    if daemon_answers(socket):
        client = ExpertClient(socket, model_path, reconnect_s=reconnect_s)
        if not quiet:
            print(f"hobbit: using hobbitd at {socket}", file=sys.stderr)
            client.announce = announce
        return client
    if not autostart:
        raise DaemonError("no_daemon", f"no hobbitd answers at {socket} (start hobbitd, or use --no-daemon)")
    if not quiet:
        print(f"hobbit: no hobbitd at {socket}; starting a private one for this session", file=sys.stderr)
    daemon = PrivateDaemon(model_path)
    try:
        daemon.wait_ready()
        client = ExpertClient(daemon.socket, model_path, timeout=5, retries=0, reconnect_s=reconnect_s)
    except BaseException:
        daemon.stop()
        raise
    client.private = daemon
    if not quiet:
        client.announce = announce
    return client


def announce(line: str) -> None:
    """How a command's client tells the user it lost and found hobbitd (one line on stderr)."""
    print(line, file=sys.stderr, flush=True)
