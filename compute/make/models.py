"""The prepared models under the user's data folder ($XDG_DATA_HOME/hobbit/models):
`list_models()` lists them and `served_models(socket)` what a running hobbitd serves
(`hobbit-cli models`); `prepare(opts)` builds the default MoE (or a variant) with moefy
(make/moefy.py) (`hobbit-cli prepare`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from ...hobbitd.config import models_dir
from ...protocol.errors import ModelError
from .moefy import MoefyOptions, build_moe, default_model_path, default_options, model_name
from ...loader.gguf_split import is_later_part


def describe(path: str) -> dict:
    """What a prepared model is: size, experts, top-k and the moefy recipe (if any)."""
    from ..engine.weights import open_model

    w = open_model(path)
    info = {
        "path": path,
        "bytes": w.total_bytes,
        "experts": w.args.n_expert,
        "top_k": w.args.n_expert_used,
        "name": w.field("general.name"),
    }
    for key in w.reader.fields:
        if key.startswith("hobbit.moefy."):
            info[key[len("hobbit.moefy.") :]] = w.field(key)
    return info


def list_models() -> list[dict]:
    d = models_dir()
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith(".gguf") and not is_later_part(name):  # a split model: its first part
            try:
                out.append(describe(os.path.join(d, name)))
            except ModelError as e:
                out.append({"path": os.path.join(d, name), "error": str(e)})
    return out


def served_models(socket: str) -> dict | None:
    """What the hobbitd answering at `socket` serves, {"served": {name: {path, mode,
    holds_all}}, "model_dirs": [folder], "can_open": [GGUF path it opens when asked for]};
    None if none answers there."""
    from ..client.daemon import daemon_answers
    from ..client.expert_client import ExpertClient

    if not daemon_answers(socket):
        return None
    client = ExpertClient(socket, None, timeout=5, retries=0, reconnect_s=0)
    try:
        st = client.stats()
    finally:
        client.close()
    served = {
        name: {"path": ms.get("path"), "mode": ms.get("hobbit", {}).get("mode"), "holds_all": ms.get("holds_all")}
        for name, ms in st.get("models", {}).items()
    }
    return {"served": served, "model_dirs": st.get("model_dirs", []), "can_open": st.get("can_open", [])}


@dataclass(frozen=True)
class PrepareOptions:
    moefy: MoefyOptions = MoefyOptions()
    source: str | None = None  # the dense llama GGUF to split; None: SmolLM2-135M-Instruct
    out: str | None = None  # where to write a variant; None: the models folder
    force: bool = False  # rebuild a variant that exists
    progress: bool = True


class Prepared(NamedTuple):
    path: str
    built: bool  # False: the variant was prepared already


def prepare(opts: PrepareOptions) -> Prepared:
    """The default model (built on first use), or the variant opts asks for."""
    if not (opts.out or opts.source or opts.moefy != default_options()):
        return Prepared(default_model_path(build=True, progress=opts.progress), True)
    path = opts.out or os.path.join(models_dir(), model_name(opts.moefy) + ".gguf")
    if os.path.exists(path) and not opts.force and not opts.out:
        return Prepared(path, False)
    build_moe(path, opts=opts.moefy, source=opts.source, progress=opts.progress)
    return Prepared(path, True)
