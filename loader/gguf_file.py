"""A GGUF file opened for what both sides need: its metadata and its tensor table.

`open_gguf(path)` validates the file up front and raises ModelError with one line naming
the file and the reason (missing, a folder, not a GGUF, unreadable header, a tensor past
the end). Tensor data is never copied: the file is mmapped read-only, so every process
opening the same file shares its pages through the page cache. The daemon reads expert
offsets from it (loader/layout.py); the compute side builds its weights on it.

A model split by gguf-split (loader/gguf_split.py) is opened by its first part, as
llama.cpp opens it: the other parts are found by name and validated (each one's split.no
and split.count, the tensors' total against split.tensors.count), and one GGUFFile holds
the tensors of all of them, each tensor's `file` saying which part it is in. The metadata
is the first part's (gguf-split writes it there only).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from dataclasses import dataclass

from ..protocol.errors import ModelError
from .gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, split_name, split_path, split_prefix
from .identity import FileIdentity

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
    offset: int  # absolute byte offset in its file
    nbytes: int
    file: int = 0  # which file of the model holds it: an index into GGUFFile.paths


class GGUFFile:
    """An open GGUF: path (the first part's, for a split model), metadata (`field`), tensor
    table, and the shared read-only mmaps of its files (`readers[i].data`, a numpy uint8
    view of file `paths[i]`; `reader` is the first one, the metadata's)."""

    def __init__(self, path: str, reader, tensors: dict[str, TensorInfo], readers: tuple = (), identities: tuple = ()):
        self.path = path
        self.reader = reader
        self.tensors = tensors
        self.readers = readers or (reader,)
        self.paths = (path, *(r.path for r in self.readers[1:]))
        # each file's stat before it was mapped (loader/identity.py): a change after it shows
        # as another identity; () when not known
        self.identities: tuple[FileIdentity | None, ...] = identities
        self._bases = tuple(r.data.ctypes.data for r in self.readers)

    @property
    def identity(self) -> FileIdentity | None:
        """The (first) file's identity when it was mapped."""
        return self.identities[0] if self.identities else None

    @property
    def arch(self) -> str:
        return self.field("general.architecture", "")

    @property
    def total_bytes(self) -> int:
        """Bytes of every file of the model."""
        return sum(r.data.size for r in self.readers)

    def address(self, name: str) -> int:
        """Where tensor `name`'s data is in this process's mapping."""
        t = self.tensors[name]
        return self._bases[t.file] + t.offset

    def base(self, file: int) -> int:
        """Where file `file` (an index into paths) starts in this process's mapping."""
        return self._bases[file]

    def data(self, name: str):
        """Tensor `name`'s bytes: a read-only numpy uint8 view of the mapping (no copy)."""
        t = self.tensors[name]
        return self.readers[t.file].data[t.offset : t.offset + t.nbytes]

    def will_need(self, skip=()) -> int:
        """Start reading every tensor not named in `skip` into the page cache, in the
        background (POSIX_FADV_WILLNEED): a first forward then finds them in memory instead
        of faulting them in from flash a few pages at a time. The bytes asked for."""
        asked = 0
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            for name, t in self.tensors.items():
                if name in skip:
                    continue
                # the kernel reads at most its readahead window (read_ahead_kb) per call
                for at in range(t.offset, t.offset + t.nbytes, WILLNEED_CHUNK):
                    n = min(WILLNEED_CHUNK, t.offset + t.nbytes - at)
                    os.posix_fadvise(fds[t.file], at, n, os.POSIX_FADV_WILLNEED)
                asked += t.nbytes
        finally:
            for fd in fds:
                os.close(fd)
        return asked

    def read_by_rows(self, names) -> None:
        """Tell the kernel that tensors `names` are read a few rows at a time (MADV_RANDOM over
        their pages in this process's mapping): a fault then reads its page, not megabytes
        around it. Without it one token's embedding row brought in 8 MB of a 262k vocabulary's
        embedding (large folios' read-around), and a short chat most of the matrix."""
        page = mmap.PAGESIZE
        for name in names:
            t = self.tensors[name]
            start = self.address(name)
            aligned = start // page * page
            if _libc().madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + t.nbytes - aligned), mmap.MADV_RANDOM):
                raise OSError(ctypes.get_errno(), f"{self.path}: madvise of {name} failed")

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


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_gguf(path: str) -> GGUFFile:
    """Open and validate a GGUF, or a split model by its first part; raise ModelError
    naming the file and the reason."""
    reader = _read_header(path)
    tensors: dict[str, TensorInfo] = {}
    _add_tensors(tensors, reader, 0)
    count = _split_key(reader, SPLIT_COUNT, 1)
    if count <= 1:
        return GGUFFile(path, reader, tensors, identities=(reader.identity,))
    readers = [reader, *_other_parts(path, reader, count)]
    for i, r in enumerate(readers[1:], 1):
        _add_tensors(tensors, r, i)
    want = _split_key(reader, SPLIT_TENSORS, None)
    if want != len(tensors):
        raise ModelError(
            f"{path}: split model has {len(tensors)} tensors in its {count} parts, but {SPLIT_TENSORS} says {want}"
        )
    return GGUFFile(path, reader, tensors, tuple(readers), tuple(r.identity for r in readers))


def _read_header(path: str, part: str = ""):
    """The header of one file (a GGUFHeaderReader); ModelError naming it otherwise. part:
    what the file is to the model, said in the error ("part 2 of 3 of X: ")."""
    import struct

    from .gguf_reader import GGUFHeaderReader  # deferred: importing gguf costs ~0.2 s

    try:  # what the user may not read, or a path no file can have, is one line too
        if os.path.isdir(path):
            raise ModelError(f"{path}: {part}is a directory, not a GGUF file")
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise ModelError(f"{path}: {part}no such file") from None
    except OSError as e:
        raise ModelError(f"{path}: {part}cannot read it ({e.strerror})") from None
    except ValueError:  # a NUL byte in the path
        raise ModelError(f"{path!r}: not a file path (it holds a NUL byte)") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: {part}not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return GGUFHeaderReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError, struct.error) as e:
        raise ModelError(
            f"{path}: {part}unreadable GGUF header ({e or type(e).__name__}); the file is truncated or corrupt"
        ) from None


def _add_tensors(tensors: dict[str, TensorInfo], reader, file: int) -> None:
    """Add the tensor table of `reader` (file `file` of the model) to `tensors`."""
    size = reader.data.size
    for t in reader.tensors:
        info = TensorInfo(
            t.name, int(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset), int(t.n_bytes), file
        )
        if info.offset + info.nbytes > size:
            raise ModelError(
                f"{reader.path}: truncated: tensor {t.name} ends at byte {info.offset + info.nbytes}, file has {size}"
            )
        if t.name in tensors:  # within a file the reader refuses it; across parts, here
            raise ModelError(f"{reader.path}: tensor {t.name} is also in another part of the model")
        tensors[t.name] = info


def _split_key(reader, key: str, default):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ModelError(f"{reader.path}: GGUF metadata key {key!r} is missing (a split model's part)")
        return default
    value = f.contents()
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelError(f"{reader.path}: GGUF metadata key {key!r} is not an integer")
    return value


def _other_parts(path: str, first, count: int) -> list:
    """The headers of parts 2..count of the split model whose first part `first` is at
    `path`, found by name as llama.cpp finds them; ModelError naming the part at fault."""
    no = _split_key(first, SPLIT_NO, None)
    if no != 0:
        s = split_name(path)
        hint = f"; open {split_path(os.path.join(os.path.dirname(path), s.stem), 0, count)}" if s else ""
        raise ModelError(
            f"{path}: part {no + 1} of {count} of a split model; a split model opens by its first part{hint}"
        )
    prefix = split_prefix(path, 0, count)
    if prefix is None:
        raise ModelError(
            f"{path}: first part of a model split in {count}, but not named as one "
            f"(…-00001-of-{count:05d}.gguf), so its other parts cannot be found"
        )
    out = []
    for i in range(1, count):
        part_path = split_path(prefix, i, count)
        where = f"part {i + 1} of {count} of {os.path.basename(path)}: "
        r = _read_header(part_path, where)
        got_no, got_count = _split_key(r, SPLIT_NO, None), _split_key(r, SPLIT_COUNT, None)
        if (got_no, got_count) != (i, count):
            raise ModelError(
                f"{part_path}: {where}the file says it is part {got_no + 1} of {got_count} "
                "(a part of another model or another split?)"
            )
        out.append(r)
    return out
