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
import signal
import subprocess
import sys
import tempfile
import time

from ...protocol.errors import DaemonError

START_TIMEOUT = 120.0    # seconds: opening a GGUF and mapping the cache takes a few


class PrivateDaemon:
    """A hobbitd subprocess owned by this process (see the module docstring)."""

    def __init__(self, model_path: str, cache_size: str | None = None):
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base or not os.access(base, os.W_OK):
            base = None
        self.folder = tempfile.mkdtemp(prefix="hobbit-", dir=base)    # mode 0700
        self.socket = os.path.join(self.folder, "hobbitd.sock")
        self.log_path = os.path.join(self.folder, "hobbitd.log")
        cmd = [sys.executable, "-m", "hobbit.hobbitd.main", "--model", model_path,
               "--socket", self.socket]
        if cache_size:
            cmd += ["--cache-size", str(cache_size)]
        env = {k: v for k, v in os.environ.items() if k not in ("HOBBIT_SOCKET", "NOTIFY_SOCKET")}
        with open(self.log_path, "w") as log:
            # its own process group: Ctrl-C in the terminal interrupts our answer, not it
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        atexit.register(self.stop)

    def wait_ready(self, model_path: str, timeout: float = START_TIMEOUT):
        """An ExpertClient once the daemon answers; DaemonError if it exits or times out."""
        from .expert_client import ExpertClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError("no_daemon", f"the private hobbitd exited ({self.proc.returncode}): "
                                               f"{self.log_tail()}")
            if os.path.exists(self.socket):
                try:
                    return ExpertClient(self.socket, model_path, timeout=5, retries=0)
                except DaemonError as e:
                    if e.code != "timeout":
                        raise
            time.sleep(0.05)
        self.stop()
        raise DaemonError("timeout", f"the private hobbitd did not answer within {timeout:g} s")

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path) as f:
                text = f.read().strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def daemon_running(socket: str) -> bool:
    """Whether a hobbitd answers at `socket` (a leftover socket file does not count)."""
    from .expert_client import ExpertClient

    if not os.path.exists(socket):
        return False
    try:
        ExpertClient(socket, None, timeout=2, retries=0).close()
        return True
    except DaemonError:
        return False


def connect(model_path: str, socket: str, autostart: bool = True, quiet: bool = False):
    """An ExpertClient for `model_path`: through the hobbitd at `socket` when one answers,
    else (autostart) through a private one, stopped with the client. Says which on stderr."""
    from .expert_client import ExpertClient

    if daemon_running(socket):
        client = ExpertClient(socket, model_path)
        if not quiet:
            print(f"hobbit: using hobbitd at {socket}", file=sys.stderr)
        return client
    if not autostart:
        raise DaemonError("no_daemon", f"no hobbitd answers at {socket} "
                                       "(start hobbitd, or use --no-daemon)")
    if not quiet:
        print(f"hobbit: no hobbitd at {socket}; starting a private one for this session",
              file=sys.stderr)
    daemon = PrivateDaemon(model_path)
    try:
        client = daemon.wait_ready(model_path)
    except BaseException:
        daemon.stop()
        raise
    client.private = daemon
    return client
