"""Which GGUFs a client may ask hobbitd for by path: the configured models, and any GGUF
inside the configured model folders (model_dirs), opened when first asked for.

A path is judged by what it resolves to (os.path.realpath: every symlink followed), so a
link inside a folder cannot lead hobbitd to a file outside it, and a client never makes
hobbitd open anything else.
"""

from __future__ import annotations

import os

from ..loader.gguf_split import is_later_part, split_name, split_path
from ..protocol.errors import RequestError

MAX_LISTED = 1000  # GGUFs `hobbit-cli models` is told about; a folder may hold more


def allowed_model(path: str, models: list[str], dirs: list[str]) -> str:
    """The real path of `path` if hobbitd may serve it: a configured model, or a regular
    .gguf file inside one of `dirs` (the first part of a split model: with its other parts
    inside them too). RequestError not_allowed (one line) otherwise."""
    if not isinstance(path, str) or not os.path.isabs(path):
        raise RequestError("not_allowed", f"model path {path!r} is not absolute")
    real = os.path.realpath(path)
    if real in {os.path.realpath(p) for p in models}:
        return real
    folders = [os.path.realpath(d) for d in dirs]
    if not any(os.path.commonpath([real, d]) == d for d in folders):
        where = ", ".join(dirs) if dirs else "none configured"
        raise RequestError(
            "not_allowed", f"{path} is not one of hobbitd's models nor inside its model folders ({where})"
        )
    if not real.endswith(".gguf") or not os.path.isfile(real):
        raise RequestError("not_allowed", f"{path} is not a .gguf file")
    split = split_name(real)
    if split is not None and split.no == 1:  # the other parts are read too: inside as well
        prefix = os.path.join(os.path.dirname(real), split.stem)
        for i in range(1, split.parts):
            part = os.path.realpath(split_path(prefix, i, split.parts))
            if not any(os.path.commonpath([part, d]) == d for d in folders):
                raise RequestError("not_allowed", f"{path}: its part {part} is outside hobbitd's model folders")
    return real


def listed_models(dirs: list[str]) -> list[str]:
    """The .gguf files inside `dirs` (recursively, links not followed out), sorted; a split
    model once, by its first part (the one it is opened by)."""
    found = set()
    for d in dirs:
        root = os.path.realpath(d)
        for folder, subdirs, files in os.walk(root):
            subdirs.sort()
            for f in files:
                real = os.path.realpath(os.path.join(folder, f))
                if (
                    f.endswith(".gguf")
                    and not is_later_part(f)
                    and os.path.commonpath([real, root]) == root
                    and os.path.isfile(real)
                ):
                    found.add(real)
            if len(found) >= MAX_LISTED:
                break
    return sorted(found)[:MAX_LISTED]
