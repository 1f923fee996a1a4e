"""Start and stop a hobbitd subprocess: the one way compute (connect, the benches) and the
tests run `python -m hobbit.hobbitd.main`.

`DaemonProcess(models, socket, cache_size=..., log_path=..., **options)` starts it with
--socket, --cache-size, one --model per model and each option as a flag (name_with_under
-> --name-with-under VALUE; True: a bare flag; None/False: left out); its stdout and stderr
go to log_path. `wait_ready()` returns once it answers a HELLO at the socket, or raises
DaemonError (with the last lines of its log) if it exits or stays silent; `stop()` sends
SIGTERM (or another signal), waits, kills it if it does not stop, and returns the exit code.
Whenever it is found dead (stop(), died()), what it left behind is removed: its shared
memory and its socket file (only the one it bound: not a new daemon's on the same path).
"""

from __future__ import annotations

import os
import signal
import socket as pysocket
import subprocess
import sys
import time

from ...loader.shm import remove_stale
from ...protocol.errors import DaemonError, NoFreeSession

START_TIMEOUT = 120.0  # seconds: opening a GGUF and mapping the cache takes a few
STOP_TIMEOUT = 15.0  # seconds a stopping hobbitd gets before it is killed


def daemon_command(models, socket: str, cache_size=None, flags=(), **options) -> list[str]:
    """The hobbitd command line: models, socket, cache size, then `options` as flags (see
    the module docstring) and raw `flags` as they are."""
    cmd = [sys.executable, "-m", "hobbit.hobbitd.main", "--socket", socket]
    if cache_size is not None:
        cmd += ["--cache-size", str(cache_size)]
    for path in models:
        cmd += ["--model", str(path)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:  # 0 is a value (--t1 0)
            cmd += [flag, str(value)]
    return cmd + list(flags)


def daemon_answers(socket: str, timeout: float = 2.0) -> bool:
    """Whether a hobbitd answers a HELLO at `socket` (a leftover socket file does not count).
    One that answers it has no free session answers: its client is told why when it asks."""
    from .expert_client import ExpertClient

    if not os.path.exists(socket):
        return False
    try:
        ExpertClient(socket, None, timeout=timeout, retries=0, reconnect_s=0).close()
        return True
    except NoFreeSession:
        return True
    except DaemonError:
        return False


def _listening(path: str) -> bool:
    """Whether a process accepts connections on unix socket `path` (refused: a leftover)."""
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class DaemonProcess:
    """A hobbitd subprocess (see the module docstring). preexec runs in the child before
    hobbitd starts (e.g. entering a memory cgroup); own_session puts it in its own process
    group, so Ctrl-C in the terminal reaches only this process; env defaults to ours;
    append_log: add to log_path (several daemons, one log) rather than start it afresh."""

    def __init__(
        self,
        models,
        socket: str,
        *,
        log_path: str,
        cache_size=None,
        flags=(),
        env: dict | None = None,
        preexec=None,
        own_session: bool = False,
        append_log: bool = False,
        **options,
    ):
        self.socket, self.log_path = socket, log_path
        self.killed = False  # stop() had to kill it
        self._socket_ino: int | None = None  # the socket file it bound (seen once it answered)
        self._cmd = daemon_command(models, socket, cache_size, flags, **options)
        self._popen = dict(env=env, preexec_fn=preexec, start_new_session=own_session)
        self._start("a" if append_log else "w")

    def _start(self, mode: str) -> None:
        with open(self.log_path, mode) as log:
            self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **self._popen)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Start it again (same command, same socket, its log appended) after it died. Its
        socket file stays for the new one to replace, as systemd keeps the folder
        (RuntimeDirectoryPreserve=restart): clients started meanwhile wait for it."""
        self.died(keep_socket=True)
        self._start("a")
        self.wait_ready(timeout)

    def died(self, keep_socket: bool = False) -> bool:
        """Whether it has exited; if so, its leftovers are removed (see the module docstring)."""
        if self.proc.poll() is None:
            return False
        remove_stale(self.proc.pid)
        if keep_socket:
            return True
        try:
            if (
                self._socket_ino is not None
                and os.lstat(self.socket).st_ino == self._socket_ino
                and not _listening(self.socket)
            ):  # not a new daemon's (inodes get reused)
                os.unlink(self.socket)
        except OSError:
            pass
        self._socket_ino = None
        return True

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of its log, joined with ' | '."""
        text = self.log().strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once it answers at the socket; DaemonError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError("no_daemon", f"hobbitd exited ({self.proc.returncode}): {self.log_tail()}")
            if daemon_answers(self.socket, timeout=5):
                try:
                    self._socket_ino = os.lstat(self.socket).st_ino
                except OSError:
                    pass
                return
            time.sleep(0.05)
        raise DaemonError("timeout", f"hobbitd did not answer within {timeout:g} s: {self.log_tail()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signal it (if still running), wait, kill it after `timeout`; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            rc = self.proc.wait()
        self.died()
        return rc

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
