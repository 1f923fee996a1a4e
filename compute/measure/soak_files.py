"""The soak's model file replaced under load: two versions of one model, swapped in turn by
an atomic rename and by a rewrite in place, with a timeline of which version the path held.

The second version is the first with each layer's experts rotated by one (expert e's bytes
are expert e+1's): a valid model of the same layout and types whose greedy text differs.
An answer is right when it equals the in-process text of a version the file held while the
answer ran (from its start to its end; a mixed text equals neither), and an error is clear
when it is one line of `hobbit-cli: error:` with no traceback and no signal.
"""

from __future__ import annotations

import os
import shutil
import time

from ...protocol.errors import InputError

KINDS = ("rename", "in_place")


def expert_ranges(path: str) -> list[tuple[int, int, int]]:
    """(offset, nbytes, n_expert) of every stacked routed-expert tensor of the GGUF."""
    from ...loader.gguf_file import open_gguf

    f = open_gguf(path)
    if len(f.paths) > 1:
        raise InputError(f"{path}: a split model; bench soak replaces single-file models only")
    n_expert = int(f.require(f"{f.arch}.expert_count"))
    return [(t.offset, t.nbytes, n_expert) for name, t in f.tensors.items() if "_exps." in name]


def make_rotated(src: str, out: str) -> None:
    """out: src with every layer's experts rotated by one (see the module docstring)."""
    shutil.copyfile(src, out)
    with open(src, "rb") as fi, open(out, "r+b") as fo:
        for offset, nbytes, n_expert in expert_ranges(src):
            fi.seek(offset)
            data = fi.read(nbytes)
            step = nbytes // n_expert
            fo.seek(offset)
            fo.write(data[step:] + data[:step])


class Replacer:
    """The served path and its two versions (pristine copies); replace() swaps them."""

    def __init__(self, model: str, work: str):
        os.makedirs(os.path.join(work, "versions"), exist_ok=True)
        self.versions = [os.path.join(work, "versions", f"v{i}.gguf") for i in range(2)]
        shutil.copyfile(model, self.versions[0])
        make_rotated(model, self.versions[1])
        self.path = os.path.join(work, os.path.basename(model))
        shutil.copyfile(self.versions[0], self.path)
        self.current = 0
        self.timeline: list[tuple[float, float, int]] = [(0.0, time.monotonic(), 0)]  # (from, until, version)
        self.counts = dict.fromkeys(KINDS, 0)
        self._ranges = expert_ranges(self.path)

    def replace(self, kind: str) -> None:
        """Put the other version at the path: "rename" (a copy renamed over it) or
        "in_place" (its experts' bytes written over the file's, as dd conv=notrunc; the
        write waits while clients hold leases on the file)."""
        new = 1 - self.current
        t0 = time.monotonic()
        if kind == "rename":
            tmp = self.path + ".new"
            shutil.copyfile(self.versions[new], tmp)
            os.replace(tmp, self.path)
        else:
            with open(self.versions[new], "rb") as fi, open(self.path, "r+b") as fo:
                for offset, nbytes, _ in self._ranges:
                    fi.seek(offset)
                    fo.seek(offset)
                    fo.write(fi.read(nbytes))
        self.timeline.append((t0, time.monotonic(), new))  # in between while written
        self.current = new
        self.counts[kind] += 1

    def held(self, t0: float, t1: float) -> set[int]:
        """The versions the path held at some moment of [t0, t1] (both during a write)."""
        out = set()
        for i, (start, _, v) in enumerate(self.timeline):  # v: from its write's start
            gone = self.timeline[i + 1][1] if i + 1 < len(self.timeline) else float("inf")
            if start <= t1 and gone >= t0:  # to the end of the next write
                out.add(v)
        return out


def clear_error(returncode: int, stderr: str) -> bool:
    """One line of `hobbit-cli: error:`, an exit code, no traceback, no signal."""
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("hobbit: ")]
    return returncode > 0 and len(lines) == 1 and lines[0].startswith("hobbit-cli: error: ")
