"""Progress bars for long work (building, converting, evaluating): tqdm on stderr.

One place decides how a bar looks: shown on a terminal only (piped output would get
hundreds of redraws), cleared when done, and closed at 100 % by whoever finishes the work.
"""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar over `total` units; a silent one when disabled or stderr is no terminal."""
    from tqdm import tqdm   # deferred: most commands draw no bar

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                disable=not enabled or not sys.stderr.isatty(), leave=False)
