"""Progress bars (compute/progress.py): drawn on a terminal only, and every bar ends at 100 %."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

from hobbit.compute.progress import progress_bar

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
MODEL = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")


def _in_a_terminal(argv) -> tuple[int, str]:
    """Run argv with stderr on a pseudo-terminal; (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.communicate(timeout=300)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_convert_draws_a_bar_on_a_terminal_that_ends_at_100_and_none_when_piped(synth, tmp_path):
    path = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), path)
    rc, screen = _in_a_terminal([*CLI, "convert", path])
    assert rc == 0, screen
    states = re.findall(r"convert to Q4_K:\s+(\d+)%", screen)
    assert states and states[-1] == "100", screen
    os.remove(path + ".q4_k.hobbit")
    piped = subprocess.run([*CLI, "convert", path], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "%|" not in piped.stderr and "\r" not in piped.stderr, piped.stderr


def test_a_bar_whose_work_ends_short_closes_at_its_total(monkeypatch):
    """Work done in fewer units than estimated (calibration text whose prompts end early,
    as 5905 of 6000 tokens): the bar still ends at 100 %; one left by an error does not."""

    class Tty:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    for fails in (False, True):
        err = Tty()
        monkeypatch.setattr(sys, "stderr", err)
        try:
            with progress_bar(6000, "calibration", unit="tok") as bar:
                bar.update(5905)
                if fails:
                    raise ValueError("stopped")
        except ValueError:
            pass
        last = re.findall(r"calibration:\s+(\d+)%[^\r\n]*?(\d+)/6000", err.text)[-1]
        assert last == (("98", "5905") if fails else ("100", "6000")), err.text
