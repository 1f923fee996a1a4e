"""Split GGUFs as llama.cpp's gguf-split writes them: the names of the parts and their keys.

A model over the Hub's 50 GB per file comes as PREFIX-00001-of-0000N.gguf ... each part a
whole GGUF (own header, own alignment) holding some of the tensors, in file order. Every
part carries split.no (u16, 0-based), split.count (u16) and split.tensors.count (i32, the
model's total); the first part also carries all the model's metadata. llama.cpp opens the
model by its first part and derives the others' names from it (llama_split_prefix,
llama_split_path); loader/gguf_file.py does the same.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

# gguf.Keys.Split's names, spelled here: importing gguf costs ~0.2 s
SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"

# llama_split_path's format: PREFIX-%05d-of-%05d.gguf, the part number 1-based
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


class SplitName(NamedTuple):
    stem: str  # the name before -0000N-of-0000M.gguf
    no: int  # 1-based part number
    parts: int  # how many parts (split.count)


def split_name(path: str) -> SplitName | None:
    """A split GGUF part's name (gguf-split's NAME-00001-of-00003.gguf), None otherwise."""
    m = SPLIT_RE.match(os.path.basename(path))
    return SplitName(m["stem"], int(m["no"]), int(m["count"])) if m else None


def split_path(prefix: str, index: int, count: int) -> str:
    """The path of part `index` (0-based, as split.no) of `count` (llama_split_path)."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def split_prefix(path: str, index: int, count: int) -> str | None:
    """The prefix of `path` if it is named as part `index` of `count`, else None
    (llama_split_prefix)."""
    postfix = f"-{index + 1:05d}-of-{count:05d}.gguf"
    if len(path) <= len(postfix) or not path.endswith(postfix):
        return None
    return path[: -len(postfix)]


def is_later_part(path: str) -> bool:
    """A part other than the first by its name: never listed nor opened as a model."""
    s = split_name(path)
    return s is not None and s.no > 1
