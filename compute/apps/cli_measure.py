"""hobbit-cli's commands that measure a model on a text: eval (perplexity, KL divergence)
and routing. Each builds its options from the command line, runs the library function of
compute/measure/ and prints the result (one line, or --json); cli.py adds these parsers to
its own (`bench` is in cli_bench.py)."""

from __future__ import annotations

import json
import os

from ..measure.evaluate import EvalOptions, eval_kld, eval_ppl
from ..measure.routing_stats import RoutingOptions, format_stats, route_text


def _eval_options(args) -> EvalOptions:
    from ..runs import ThroughDaemon

    return EvalOptions(
        args.model,
        args.text,
        ctx=args.ctx,
        chunks=args.chunks,
        threads=args.threads,
        daemon=ThroughDaemon.from_args(args),
        progress=not args.quiet,
        verbose=args.verbose,
    )


def cmd_ppl(args) -> int:
    r = eval_ppl(_eval_options(args), llama_cpp=args.llama_cpp)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{os.path.basename(r['model'])} ({r['engine']}): PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f} "
            f"over {r['chunks']} chunks of {r['ctx']} tokens ({r['scored']} scored, {r['seconds']:.1f} s)"
        )
    return 0


def cmd_kld(args) -> int:
    r = eval_kld(_eval_options(args), args.reference)
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{os.path.basename(r['model'])} vs {args.reference}: mean KLD = {r['kld']:.6f} +/- "
            f"{r['kld_stderr']:.6f}, top-1 agreement {r['top1_agree']:.2%}, PPL {r['ppl']:.4f} "
            f"(reference {r['ref_ppl']:.4f}) over {r['chunks']} chunks of {r['ctx']} tokens"
        )
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        prog="hobbit-cli eval",
        help="perplexity and KL divergence on a text",
        description="Accuracy on a text file, measured as llama.cpp measures it.",
    )
    kinds = p.add_subparsers(dest="eval_kind", metavar="KIND")
    kinds.required = True

    def common(q):
        q.add_argument(
            "model", metavar="MODEL", help="path to a GGUF model, or 'default' (the default MoE, built on first use)"
        )
        q.add_argument("--text", required=True, metavar="FILE", help="the text to score (UTF-8)")
        q.add_argument(
            "--ctx",
            type=int,
            default=512,
            metavar="N",
            help="tokens per chunk; the second half of each is scored (default 512)",
        )
        q.add_argument(
            "--chunks", type=int, default=None, metavar="N", help="score only the first N chunks (default: all)"
        )
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        q.add_argument(
            "--threads",
            type=int,
            default=0,
            metavar="N",
            help="compute threads (default: physical cores, one fewer through hobbitd)",
        )
        q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        q.add_argument("--verbose", "-v", action="store_true", help="say how long tokenizing took")
        q.add_argument(
            "--no-daemon",
            action="store_true",
            help="compute in this process, experts read from the mmapped GGUF (default for dense models)",
        )
        q.add_argument(
            "--socket",
            metavar="PATH",
            default=None,
            help="hobbitd socket (default: $HOBBIT_SOCKET, else the system or user default)",
        )

    q = kinds.add_parser(
        "ppl",
        prog="hobbit-cli eval ppl",
        help="perplexity (llama.cpp's method)",
        description="Perplexity of MODEL on FILE as llama-perplexity computes it: "
        "chunks of --ctx tokens, each from an empty cache, the second "
        "half of each scored.",
    )
    common(q)
    q.add_argument(
        "--llama-cpp",
        action="store_true",
        help="score with llama.cpp (llama-cpp-python, all logits) instead of hobbit: "
        "the reference figure on the same chunks",
    )
    q.set_defaults(func=cmd_ppl)

    q = kinds.add_parser(
        "kld",
        prog="hobbit-cli eval kld",
        help="KL divergence against a reference",
        description="Mean KL(reference || MODEL) per scored token, top-1 "
        "agreement and both perplexities, on llama.cpp's chunks.",
    )
    common(q)
    q.add_argument(
        "--reference",
        required=True,
        metavar="high|MODEL",
        help="'high': the same model with every expert in high precision, in-process; "
        "or the path of another GGUF with the same vocabulary (e.g. the dense model)",
    )
    q.set_defaults(func=cmd_kld)


def cmd_routing(args) -> int:
    r = route_text(
        RoutingOptions(
            args.model,
            args.text,
            tokens=args.tokens,
            ctx=args.ctx,
            t1=args.t1,
            t2=args.t2,
            threads=args.threads,
            progress=not args.quiet,
        )
    )
    if args.json:
        print(json.dumps(r))
    else:
        print(format_stats(r))
    return 0


def add_routing_parser(sub) -> None:
    p = sub.add_parser(
        "routing",
        prog="hobbit-cli routing",
        help="how a MoE routes a text",
        description="Route a text through MODEL in-process and print, per layer, "
        "expert popularity (skew) and how often a token reuses the "
        "previous token's experts, against random routing.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default="default",
        help="path to a MoE GGUF, or 'default' (the default MoE)",
    )
    p.add_argument("--text", required=True, metavar="FILE", help="the text to route (UTF-8)")
    p.add_argument(
        "--tokens", type=int, default=8192, metavar="N", help="route the first N tokens of the text (default 8192)"
    )
    p.add_argument(
        "--ctx", type=int, default=512, metavar="N", help="tokens per chunk, each from an empty cache (default 512)"
    )
    p.add_argument("--t1", type=float, default=0.6, help="HOBBIT's high-precision threshold (default 0.6)")
    p.add_argument("--t2", type=float, default=0.9, help="HOBBIT's skip threshold (default 0.9)")
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="compute threads (default: number of physical cores)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_routing)
