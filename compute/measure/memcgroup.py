"""A memory limit for one benchmark run: a child memory cgroup, and dropping the page cache.

`MemoryCgroup(limit)` makes a child of this process's own memory cgroup (cgroup v2, or the
v1 memory hierarchy) limited to `limit` bytes, page cache included; a process started with
`preexec_fn=cg.enter` runs inside it, and so do its children. `close()` removes it once
those processes have exited. Both need the right to write the cgroup files (root, or a
delegated cgroup); where that is missing the constructor raises CgroupUnavailable saying
why, so a benchmark can say which figures it could not measure fairly.
"""

from __future__ import annotations

import os

from ...protocol.errors import HobbitError

ROOT = "/sys/fs/cgroup"


class CgroupUnavailable(HobbitError):
    pass


def _own_cgroup() -> tuple[str, int]:
    """(folder of this process's memory cgroup, version)."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in lines:  # v1: "4:memory:/a/b"
        if "memory" in controllers.split(","):
            return os.path.join(ROOT, "memory", path.lstrip("/")), 1
    for hid, _, path in lines:  # v2 only: "0::/a/b", memory enabled there
        if hid == "0" and os.path.exists(os.path.join(ROOT, "cgroup.controllers")):
            folder = os.path.join(ROOT, path.lstrip("/"))
            with open(os.path.join(ROOT, "cgroup.controllers")) as c:
                if "memory" in c.read().split():
                    return folder, 2
    raise CgroupUnavailable("no memory cgroup controller on this machine")


class MemoryCgroup:
    def __init__(self, limit: int, name: str = "hobbit-bench"):
        parent, self.version = _own_cgroup()
        self.path = os.path.join(parent, f"{name}-{os.getpid()}-{id(self):x}")
        try:
            os.mkdir(self.path)
        except OSError as e:
            raise CgroupUnavailable(f"cannot create a memory cgroup under {parent}: {e.strerror}") from None
        try:
            if self.version == 2:
                self._write("memory.max", str(limit))
                self._write("memory.swap.max", "0")
            else:
                self._write("memory.limit_in_bytes", str(limit))
        except OSError as e:
            self.close()
            raise CgroupUnavailable(f"cannot limit the memory of {self.path}: {e.strerror}") from None
        self.limit = limit

    def _write(self, name: str, value: str) -> None:
        if self.version == 2 and name == "memory.swap.max" and not os.path.exists(os.path.join(self.path, name)):
            return  # no swap accounting: nothing to turn off
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def enter(self) -> None:
        """Move the calling process into the cgroup (for subprocess preexec_fn)."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def peak(self) -> int | None:
        """Most memory the cgroup has held (bytes, page cache included), if the kernel says."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass  # a process is still inside; the folder goes when it is removed later

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_page_cache() -> None:
    """Write dirty pages back and drop the page cache (needs root); CgroupUnavailable if not
    allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as e:
        raise CgroupUnavailable(f"cannot drop the page cache (/proc/sys/vm/drop_caches: {e.strerror})") from None
