"""The one "is this process alive" check (loader.shm.pid_alive), on real processes: a live
one, one that exited and was reaped, a zombie, and a pid whose start time is not the one
first seen (pids are reused)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from hobbit.loader.shm import pid_alive


def test_a_live_process_is_alive_and_known_by_its_start_time():
    me = os.getpid()
    started = psutil.Process(me).create_time()
    assert pid_alive(me) and pid_alive(me, started)
    assert not pid_alive(me, started - 10.0)  # another process that had our pid
    assert not pid_alive(0) and not pid_alive(-1)


def test_an_exited_process_and_a_zombie_are_not():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert not pid_alive(child.pid) and not pid_alive(child.pid, started)
    child.wait()
    assert not pid_alive(child.pid)
