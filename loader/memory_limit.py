"""How much memory this process may still take: the machine's available memory, or its memory
cgroup's headroom where that is smaller (systemd's MemoryMax=, a container's limit).

A cgroup's headroom is its limit minus what it holds that the kernel cannot reclaim: its
usage less the file pages it caches (active_file + inactive_file; shared memory is not among
them: tmpfs and /dev/shm pages stay until they are removed). psutil alone sees the machine's
free memory, so a daemon under MemoryMax=2G on a 24 GiB machine would size its cache to 11 GiB
and be killed for it.
"""

from __future__ import annotations

import os

import psutil

ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 60  # cgroup v1 writes "unlimited" as a number near 2**63


def available_memory() -> int:
    """Bytes this process may still allocate: the smaller of the machine's available memory
    and its memory cgroup's headroom (no cgroup, or none readable: the machine's)."""
    machine = psutil.virtual_memory().available
    headroom = cgroup_headroom()
    return machine if headroom is None else max(0, min(machine, headroom))


def cgroup_headroom() -> int | None:
    """The memory cgroup's limit minus its unreclaimable usage, in bytes; None when this
    process is in no limited memory cgroup (or the files cannot be read)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in lines:  # v1: "4:memory:/a/b"
        if "memory" in controllers.split(","):
            return _v1_headroom(os.path.join(ROOT, "memory", path.lstrip("/")))
    for hid, _, path in lines:  # v2: "0::/a/b"
        if hid == "0":
            return _v2_headroom(os.path.join(ROOT, path.lstrip("/")))
    return None


def _read_stat(folder: str) -> dict[str, int]:
    with open(os.path.join(folder, "memory.stat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f if line.strip())}


def _read_int(folder: str, name: str) -> int | None:
    try:
        with open(os.path.join(folder, name)) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def _v1_headroom(folder: str) -> int | None:
    try:
        stat = _read_stat(folder)
        usage = _read_int(folder, "memory.usage_in_bytes")
    except (OSError, ValueError):
        return None
    limit = stat.get("hierarchical_memory_limit", NO_LIMIT)  # the tightest of its ancestors
    if limit >= NO_LIMIT or usage is None:
        return None
    reclaimable = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
    return limit - (usage - reclaimable)


def _v2_headroom(folder: str) -> int | None:
    """The smallest headroom of the cgroup and its ancestors that have a memory.max."""
    best = None
    while folder.startswith(ROOT) and len(folder) > len(ROOT):
        limit = _read_int(folder, "memory.max")
        usage = _read_int(folder, "memory.current")
        if limit is not None and usage is not None:
            try:
                stat = _read_stat(folder)
            except (OSError, ValueError):
                stat = {}
            room = limit - (usage - stat.get("active_file", 0) - stat.get("inactive_file", 0))
            best = room if best is None else min(best, room)
        folder = os.path.dirname(folder)
    return best
