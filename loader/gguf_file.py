"""A GGUF file opened for what both sides need: its metadata and its tensor table.

`open_gguf(path)` validates the file up front and raises ModelError with one line naming
the file and the reason (missing, a folder, not a GGUF, unreadable header, a tensor past
the end). Tensor data is never copied: the file is mmapped read-only, so every process
opening the same file shares its pages through the page cache. The daemon reads expert
offsets from it (loader/layout.py); the compute side builds its weights on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..protocol.errors import ModelError
from .identity import FileIdentity, identity

WILLNEED_CHUNK = 1 << 20  # bytes per read-ahead request (GGUFFile.will_need)

GGUF_MAGIC = b"GGUF"

# The architectures hobbit runs: the one list. compute/engine/weights.py's ARCHS (each
# one's graph options) and compute/make/synth_archs.py's SYNTH_ARCHS (each one's synthetic
# file) are keyed by it, in its order, and refuse to import otherwise.
SUPPORTED_ARCHS = (
    "llama",
    "qwen3moe",
    "olmoe",
    "qwen2moe",
    "phimoe",
    "gpt-oss",
    "granitemoe",
    "glm4moe",
    "bailingmoe2",
    "ernie4_5-moe",
    "deepseek2",
    "smallthinker",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int  # ggml type
    shape: tuple  # ggml order: ne0 (contiguous) first
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """An open GGUF: path, metadata (`field`), tensor table, and the shared read-only mmap
    (`reader.data`, a numpy uint8 view of the whole file)."""

    def __init__(self, path: str, reader, tensors: dict[str, TensorInfo], ident: FileIdentity | None = None):
        self.path = path
        self.identity = ident  # the file's stat before it was mapped (loader/identity.py)
        self.reader = reader
        self.tensors = tensors
        self._base = reader.data.ctypes.data

    @property
    def arch(self) -> str:
        return self.field("general.architecture", "")

    def address(self, name: str) -> int:
        """Where tensor `name`'s data is in this process's mapping."""
        return self._base + self.tensors[name].offset

    def will_need(self, skip=()) -> int:
        """Start reading every tensor not named in `skip` into the page cache, in the
        background (POSIX_FADV_WILLNEED): a first forward then finds them in memory instead
        of faulting them in from flash a few pages at a time. The bytes asked for."""
        asked = 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for name, t in self.tensors.items():
                if name in skip:
                    continue
                # the kernel reads at most its readahead window (read_ahead_kb) per call
                for at in range(t.offset, t.offset + t.nbytes, WILLNEED_CHUNK):
                    n = min(WILLNEED_CHUNK, t.offset + t.nbytes - at)
                    os.posix_fadvise(fd, at, n, os.POSIX_FADV_WILLNEED)
                asked += t.nbytes
        finally:
            os.close(fd)
        return asked

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        """A metadata value that must be there; ModelError naming the key otherwise."""
        value = self.field(key)
        if value is None:
            raise ModelError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return value

    def check_architecture(self) -> str:
        """The file's architecture; ModelError listing the supported ones otherwise."""
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(
                f"{self.path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        return arch


def open_gguf(path: str) -> GGUFFile:
    """Open and validate a GGUF; raise ModelError naming the file and the reason."""
    import struct

    from .gguf_reader import GGUFHeaderReader  # deferred: importing gguf costs ~0.2 s

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a GGUF file")
    ident = identity(path)  # before the mmap: a change after it shows as another identity
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFHeaderReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError, struct.error) as e:
        raise ModelError(
            f"{path}: unreadable GGUF header ({e or type(e).__name__}); the file is truncated or corrupt"
        ) from None
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        info = TensorInfo(
            t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes)
        )
        if info.offset + info.nbytes > size:
            raise ModelError(
                f"{path}: truncated: tensor {t.name} ends at byte {info.offset + info.nbytes}, file has {size}"
            )
        tensors[t.name] = info
    return GGUFFile(path, reader, tensors, ident)
