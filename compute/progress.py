"""Progress bars for long work (building, converting, evaluating): tqdm on stderr.

One place decides how a bar looks: shown on a terminal only (piped output would get
hundreds of redraws), and ending at 100 %: work that finishes short of its estimate
(calibration text whose last prompt ends early, a chunk count rounded) closes its bar at
its total, so what stays on the screen says done. A bar left by an error keeps its count.
"""

from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A bar over `total` units, a context manager (or close() it); a silent one when
    disabled or stderr is no terminal. Leaving the `with` without an exception (or
    close(done=True)) shows it at total."""
    from tqdm import tqdm  # deferred: most commands draw no bar

    class Bar(tqdm):
        def close(self, done: bool = False):
            if done and not self.disable and self.total is not None and self.n < self.total:
                self.update(self.total - self.n)
            super().close()

        def __exit__(self, exc_type, exc, tb):
            self.close(done=exc_type is None)

    return Bar(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        file=sys.stderr,
        disable=not enabled or not sys.stderr.isatty(),
        leave=True,
    )
