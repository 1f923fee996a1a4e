"""The prepared models under the user's data folder ($XDG_DATA_HOME/hobbit/models):
`hobbit-cli models` lists them (and what a running hobbitd serves), `hobbit-cli prepare`
builds the default MoE (or a variant) with moefy (build/moefy.py)."""
from __future__ import annotations

import os
import time

from ...hobbitd.config import default_model_file, models_dir
from ...protocol.errors import ModelError
from .moefy import (CLUSTERINGS, EXPERT_TYPES, MoefyOptions, build_moe, default_model_path,
                    default_options, model_name)
from .pull import split_name


def describe(path: str) -> dict:
    """What a prepared model is: size, experts, top-k and the moefy recipe (if any)."""
    from ..engine.weights import open_model

    w = open_model(path)
    info = {"path": path, "bytes": os.path.getsize(path), "experts": w.args.n_expert,
            "top_k": w.args.n_expert_used, "name": w.field("general.name")}
    for key in w.reader.fields:
        if key.startswith("hobbit.moefy."):
            info[key[len("hobbit.moefy."):]] = w.field(key)
    return info


def list_models() -> list[dict]:
    d = models_dir()
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        split = split_name(name)
        if name.endswith(".gguf") and not (split and split.no > 1):   # a split model: its first part
            try:
                out.append(describe(os.path.join(d, name)))
            except ModelError as e:
                out.append({"path": os.path.join(d, name), "error": str(e)})
    return out


# ---- command line ---------------------------------------------------------------------------------

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
    served = {name: {"path": ms.get("path"), "mode": ms.get("hobbit", {}).get("mode"),
                     "holds_all": ms.get("holds_all")} for name, ms in st.get("models", {}).items()}
    return {"served": served, "model_dirs": st.get("model_dirs", []),
            "can_open": st.get("can_open", [])}


def cmd_models(args) -> int:
    import json

    from ...hobbitd.config import default_socket

    models = list_models()
    default = default_model_file()
    socket = args.socket or default_socket()
    daemon = served_models(socket)
    if args.json:
        print(json.dumps({"dir": models_dir(), "default": default, "models": models,
                          "socket": socket, **(daemon or {"served": None})}))
        return 0
    if daemon is None:
        print(f"hobbitd at {socket}: not running (commands start a private one for their model)")
    else:
        print(f"hobbitd at {socket} serves:")
        for name, m in daemon["served"].items():
            print(f"  {name}  {m['path']}  {m['mode'] or ''}{'  (every expert cached)' if m['holds_all'] else ''}")
        if not daemon["served"]:
            print("  (nothing yet)")
        if daemon["model_dirs"]:
            print(f"and opens when asked for (from {', '.join(daemon['model_dirs'])}):")
            for path in daemon["can_open"]:
                print(f"  {path}")
            if not daemon["can_open"]:
                print("  (no other GGUF there)")
    print(f"{models_dir()}:")
    if not models:
        print("  (none prepared yet: hobbit-cli prepare builds the default model)")
    for m in models:
        if "error" in m:
            print(f"  {os.path.basename(m['path'])}: unreadable ({m['error']})")
            continue
        mark = "  (default)" if m["path"] == default else ""
        print(f"  {os.path.basename(m['path'])}  {m['bytes'] / 2**20:.1f} MiB  E={m['experts']} "
              f"K={m['top_k']}  recipe {m.get('recipe', '-')}{mark}")
    return 0


def cmd_prepare(args) -> int:
    opts = MoefyOptions(experts=args.experts, top_k=args.top_k, temperature=args.temperature,
                        expert_type=args.expert_type.upper(), clustering=args.clustering,
                        calib_tokens=args.calib_tokens)
    t0 = time.perf_counter()
    if not (args.out or args.source or opts != default_options()):
        path = default_model_path(build=True, progress=not args.quiet)
    else:
        path = args.out or os.path.join(models_dir(), model_name(opts) + ".gguf")
        if os.path.exists(path) and not args.force and not args.out:
            print(f"{path}: already prepared (--force rebuilds)")
            return 0
        build_moe(path, opts=opts, source=args.source, progress=not args.quiet)
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, ready ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("models", prog="hobbit-cli models", help="list the prepared models",
                       description="List what the running hobbitd serves (at --socket, "
                                   "$HOBBIT_SOCKET or the default socket), then the models prepared "
                                   "under the user's data folder ($XDG_DATA_HOME/hobbit/models): "
                                   "path, size, experts, top-k, recipe.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="hobbitd socket (default: $HOBBIT_SOCKET, else the system or user default)")
    p.set_defaults(func=cmd_models)

    d = default_options()
    p = sub.add_parser("prepare", prog="hobbit-cli prepare",
                       help="build the default MoE model now (otherwise built on first use)",
                       description="Build the default real-text MoE from SmolLM2-135M-Instruct "
                                   "(deterministic, a few minutes, once). With options, build a "
                                   "variant for experiments.")
    p.add_argument("--experts", type=int, default=d.experts, metavar="E",
                   help=f"experts per layer, dividing the FFN width (default {d.experts})")
    p.add_argument("--top-k", type=int, default=d.top_k, metavar="K",
                   help=f"experts used per token (default {d.top_k})")
    p.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help="router sharpness: gate weights follow predicted contribution**T; "
                        f"0 = uniform weights (default {d.temperature})")
    p.add_argument("--expert-type", default=d.expert_type, metavar="TYPE",
                   help=f"type of the re-quantised down experts: {' '.join(EXPERT_TYPES)} "
                        f"(default {d.expert_type})")
    p.add_argument("--clustering", default=d.clustering, choices=CLUSTERINGS,
                   help=f"how neurons are grouped into experts (default {d.clustering})")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens, metavar="N",
                   help=f"calibration tokens the dense model writes (default {d.calib_tokens})")
    p.add_argument("--source", metavar="GGUF", default=None,
                   help="the dense llama GGUF to split (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="where to write a variant (default: the models folder)")
    p.add_argument("--force", action="store_true", help="rebuild a variant that exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)
