"""How a memory size is shared between hobbitd's expert cache and the processes around it:
the one rule behind `hobbitd --cache-size auto`, `hobbit-cli plan` and `bench offload`.

Within `memory` bytes (a memory cgroup's limit such as systemd's MemoryMax=, or what is
available now) hobbit needs:
  - PROCESS_ALLOWANCE for the processes themselves: hobbitd's and one client's
    interpreters, ggml's compute buffers, the client's KV cache at a few thousand tokens
    of context (a longer context needs its KV cache on top: `plan` says so);
  - the client's resident weights: every tensor of the model but the routed experts and
    the rows read on use (loader/layout.client_resident_bytes);
  - hobbitd's cache: the rest, at most what the shared-memory folder has free (/dev/shm
    is often half the machine's memory).
`bench offload` measures with this split: its cgroup limit is its budget plus the
allowance, and hobbitd's cache the budget less the client's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.errors import InputError, ModelError
from .memory_limit import available_memory

MiB = 1 << 20
PROCESS_ALLOWANCE = 512 * MiB


@dataclass(frozen=True)
class Sizing:
    """One split of `memory` bytes. memory_source says where the figure came from (the
    flag, the cgroup, the machine); cache may be negative: the memory does not hold the
    client (check() says so)."""

    memory: int
    memory_source: str
    allowance: int
    client_weights: int  # bytes of the models' non-expert weights a client keeps resident
    cache: int  # hobbitd's expert cache: memory - allowance - client_weights, or shm_free
    shm_free: int | None = None  # bytes free in the shared-memory folder; None: not known

    def check(self, what: str = "the memory") -> None:
        """InputError when the memory leaves hobbitd's cache nothing."""
        if self.cache <= 0:
            raise InputError(
                f"{what} ({self.memory / MiB:.0f} MiB) is smaller than what a client needs "
                f"({self.client_weights / MiB:.0f} MiB of non-expert weights) plus the "
                f"{self.allowance / MiB:.0f} MiB allowance for the processes: nothing is left for hobbitd's cache"
            )

    @property
    def shm_bound(self) -> bool:
        """The shared-memory folder, not the memory, set the cache's size."""
        return (
            self.shm_free is not None
            and self.cache == self.shm_free < self.memory - self.allowance - self.client_weights
        )


def size_memory(
    memory: int | None, client_weights: int, shm_free: int | None = None, allowance: int = PROCESS_ALLOWANCE
) -> Sizing:
    """The split of `memory` bytes (None: what this process may still take, the machine's
    available memory or its memory cgroup's headroom if smaller) between the processes'
    allowance, a client's resident weights and hobbitd's cache, which gets at most
    shm_free bytes (None: no bound)."""
    if memory is None:
        memory, source = available_memory(), "available now (the machine's, or its memory cgroup's headroom if smaller)"
    else:
        source = "given"
    cache = memory - allowance - client_weights
    return Sizing(
        memory, source, allowance, client_weights, cache if shm_free is None else min(cache, shm_free), shm_free
    )


def client_weights(paths: list[str]) -> int:
    """Bytes of non-expert weights a client of each model keeps resident, summed (one
    client per model). ModelError for a file that cannot be opened."""
    from .gguf_file import open_gguf  # deferred: importing gguf costs ~0.2 s
    from .layout import client_resident_bytes

    total = 0
    for path in paths:
        try:
            total += client_resident_bytes(open_gguf(path))
        except OSError as e:
            raise ModelError(f"{path}: {e.strerror or e}") from None
    return total
