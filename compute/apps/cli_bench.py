"""hobbit-cli bench KIND: each kind's parser and the command that builds its options, runs
the measurement of compute/measure/ and prints its report (a table, or --json; --out
also writes the JSON). cli.py adds the `bench` parser to its own."""

from __future__ import annotations

import argparse
import json
import os

from ...protocol.errors import InputError
from ..measure import bench_companions, bench_fit, bench_slots, bench_soak


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        prog="hobbit-cli bench",
        help="benchmarks (compute: our engine vs llama.cpp)",
        description="Benchmarks. Run `hobbit-cli bench KIND --help` for each kind.",
    )
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    _add_compute_parser(kinds)
    _add_io_parser(kinds)
    _add_ablation_parser(kinds)
    _add_offload_parser(kinds)
    _add_slots_parser(kinds)
    _add_companions_parser(kinds)
    _add_fit_parser(kinds)
    _add_soak_parser(kinds)


def _add_output_options(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")


def _report(args, report: dict, table) -> int:
    if getattr(args, "out", None):
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        table(report)
    return 0


def write_json(path: str, report: dict) -> None:
    """Write the report atomically: a temporary file next to it, then os.replace."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _add_compute_parser(kinds) -> None:
    p = kinds.add_parser(
        "compute",
        prog="hobbit-cli bench compute",
        help="prefill/decode tok/s of hobbit vs llama.cpp, same GGUF",
        description="Time our engine and llama-cpp-python side by side on the "
        "same GGUF (all weights in memory), check they produce the "
        "same greedy tokens, and report tok/s and ratios.",
    )
    p.add_argument("model", metavar="MODEL", help="path to a GGUF model")
    p.add_argument(
        "--prompt-tokens", type=int, default=128, metavar="N", help="prompt length for the prefill (default 128)"
    )
    p.add_argument("-n", "--n-decode", type=int, default=64, metavar="N", help="greedy decode steps (default 64)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="threads for both engines (default: number of physical cores)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="rounds per engine, alternating; medians are reported (default 3)",
    )
    p.add_argument("--ctx", type=int, default=1024, metavar="N", help="context length (default 1024)")
    _add_output_options(p)
    p.set_defaults(func=cmd_compute)


def cmd_compute(args) -> int:
    from ..measure.bench import ComputeOptions, format_compute, run_compute

    report = run_compute(
        ComputeOptions(args.model, args.prompt_tokens, args.n_decode, args.threads, args.repeat, args.ctx)
    )
    return _report(args, report, lambda r: print(format_compute(r)))


def _add_io_parser(kinds) -> None:
    p = kinds.add_parser(
        "io",
        prog="hobbit-cli bench io",
        help="the daemon's I/O engine vs dd (direct I/O), same file",
        description="Read every expert of MODEL through hobbit's I/O engine and the "
        "whole file with `dd bs=4M iflag=direct`, alternating, and "
        "report MB/s of each and their ratio.",
    )
    p.add_argument("model", metavar="MODEL", help="path to a MoE GGUF")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="rounds (default 3)")
    p.add_argument("--io-threads", type=int, default=4, metavar="N", help="reader threads (default 4)")
    _add_output_options(p)
    p.set_defaults(func=cmd_io)


def cmd_io(args) -> int:
    from ..measure import bench_io

    return _report(args, bench_io.run(args.model, args.repeat, args.io_threads), bench_io.print_table)


def _add_ablation_parser(kinds) -> None:
    p = kinds.add_parser(
        "ablation",
        prog="hobbit-cli bench ablation",
        help="HOBBIT's techniques switched on one by one, same prompts",
        description="(a) high precision only + LRU, (b) + dynamic loading, (c) + "
        "prefetch, (d) + multidimensional cache (= hobbit), (e) low "
        "precision only; each with a fresh hobbitd and the same cache "
        "size. Converts the low-precision companion first if it is missing.",
    )
    p.add_argument("model", metavar="MODEL", help="path to a MoE GGUF")
    p.add_argument(
        "--cache",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="cache size as a fraction of the expert bytes (default 0.25)",
    )
    p.add_argument(
        "--prompt-tokens", type=int, nargs="+", default=[16, 128], metavar="N", help="prompt lengths (default 16 128)"
    )
    p.add_argument("-n", "--n-decode", type=int, default=32, metavar="N", help="tokens decoded per prompt (32)")
    p.add_argument("--configs", default="abcde", help="which configurations to run (default abcde)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="rounds, each running every configuration in turn; medians are reported (default 3)",
    )
    p.add_argument(
        "--ppl-text",
        metavar="FILE",
        default=None,
        help="also score each configuration's perplexity on FILE through its hobbitd (e.g. "
        "WikiText-2's wiki.test.raw), beside (a)'s: the quality check users know",
    )
    p.add_argument(
        "--ppl-chunks", type=int, default=40, metavar="N", help="512-token chunks of --ppl-text scored (default 40)"
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_ablation)


def cmd_ablation(args) -> int:
    from ..measure import bench_ablation

    if args.rounds < 1:
        raise InputError(f"--rounds {args.rounds}: must be at least 1")
    if args.ppl_text is not None and not os.path.isfile(args.ppl_text):
        raise InputError(f"--ppl-text {args.ppl_text}: no such file")
    if args.ppl_chunks < 1:
        raise InputError(f"--ppl-chunks {args.ppl_chunks}: must be at least 1")
    r = bench_ablation.run(
        args.model, args.cache, tuple(args.prompt_tokens), args.n_decode, set(args.configs), args.rounds
    )
    if args.ppl_text is not None:
        r["perplexity"] = bench_ablation.perplexities(r, args.ppl_text, args.ppl_chunks)
    return _report(args, r, bench_ablation.print_table)


def _size(text: str) -> int:
    from ...hobbitd.config import parse_size

    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_offload_parser(kinds) -> None:
    from ..measure.bench_offload import MiB

    p = kinds.add_parser(
        "offload",
        prog="hobbit-cli bench offload",
        help="hobbit vs llama.cpp on one MoE file under one memory budget",
        description="llama.cpp and hobbit (high only + LRU, and all techniques) "
        "in memory cgroups of the same limit after dropping the page "
        "cache, llama.cpp unlimited as the ceiling, and the I/O floor. "
        "Needs root (or a delegated cgroup) for the limited runs.",
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a MoE GGUF (default: a synthetic Mixtral-layout model with 4.2 GiB of "
        "experts, made once under ~/.cache/hobbit/bench)",
    )
    p.add_argument(
        "--budget",
        default=None,
        metavar="SIZE",
        help="memory for the model's weights: a size (1G) or a share of its expert "
        "bytes (25%%); hobbitd's cache is this minus the non-expert weights "
        "(default 25%%; --quick 125%%)",
    )
    p.add_argument(
        "--allowance",
        type=_size,
        default=512 * MiB,
        metavar="SIZE",
        help="memory on top of the budget for the processes themselves, the same for both engines (default 512M)",
    )
    p.add_argument(
        "--runs",
        default=None,
        metavar="P:N,...",
        help="prompt:decoded token counts (default 16:32,128:128; --quick 16:8)",
    )
    p.add_argument(
        "--clients",
        default=None,
        metavar="N,...",
        help="also run N clients at once (the first run's sizes): N llama.cpp "
        "processes vs N hobbit clients on one hobbitd vs N hobbitd with 1/N of "
        "the cache each; the limit grows by 256M per extra client "
        "(default 2,4; --quick 2; '' for none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="compute threads (default: each engine's own default; with N clients "
        "at once, cores / N for either engine)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="B,...",
        help="also run llama.cpp and hobbit limited to each of these budgets (the first "
        "run's sizes), e.g. 10%%,25%%,50%%,100%%",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write PNG plots to DIR: tok/s against the budget (sweeps 10%%,25%%,50%%,100%% "
        "unless --sweep says otherwise) and hobbit's per-token time split; needs "
        "matplotlib (pip install 'hobbit[plot]')",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small synthetic model and short runs: checks the harness in ~1 minute"
    )
    p.add_argument(
        "--quantize",
        metavar="FTYPE",
        help="the synthetic model as llama.cpp's quantizer writes it (e.g. Q4_K_M: "
        "Q6_K down experts on some layers), beside the default uniform Q8_0",
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_offload)


def cmd_offload(args) -> int:
    from ..measure.bench_offload import OffloadOptions, budget_bytes, run
    from ..measure.bench_offload_report import plot, print_table, pyplot

    runs = args.runs or ("16:8" if args.quick else "16:32,128:128")
    try:
        pairs = [[int(x) for x in item.split(":")] for item in runs.split(",")]
        if any(len(pr) != 2 or min(pr) < 1 for pr in pairs):
            raise ValueError
    except ValueError:
        raise InputError(f"--runs {runs!r}: expected PROMPT:DECODE pairs such as 16:32,128:128") from None
    budget = args.budget or ("125%" if args.quick else "25%")  # quick: 90% of the experts cached
    budget_bytes(budget, 1)  # a malformed budget fails now, before any model is made
    clients = (
        [int(x) for x in args.clients.split(",") if x] if args.clients is not None else ([2] if args.quick else [2, 4])
    )
    if any(n < 2 for n in clients):
        raise InputError(f"--clients {args.clients}: counts of at least 2, e.g. 2,4 (or '' for none)")
    sweep = [b for b in (args.sweep or "").split(",") if b]
    for b in sweep:
        budget_bytes(b, 1)
    if args.plot and not sweep:
        sweep = ["10%", "25%", "50%", "100%"]
    if args.plot:
        pyplot()  # missing matplotlib fails now, not after the runs
    if args.quantize:
        from ..make.quantize import ftype_value

        ftype_value(args.quantize)  # an unknown file type fails before the model is made
    r = run(
        OffloadOptions(
            args.model, budget, args.allowance, pairs, clients, args.threads, args.quick, sweep, args.quantize
        )
    )
    if args.plot:
        r["plots"] = plot(r, args.plot)
    return _report(args, r, print_table)


def _dims(text: str) -> tuple:
    try:
        D, F = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not D,F (two whole numbers)") from None
    if D <= 0 or F <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: dimensions must be positive")
    return D, F


def _add_slots_parser(kinds) -> None:
    p = kinds.add_parser(
        "slots",
        prog="hobbit-cli bench slots",
        help="shared memory for a model's experts: largest-layer slots vs size classes",
        description=bench_slots.__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", metavar="MODEL", help="a MoE GGUF (e.g. made by `synth --quantize Q4_K_M`)")
    p.add_argument(
        "--dims",
        metavar="D,F",
        type=_dims,
        help="recompute the bytes for these dimensions, with the file's per-layer types (e.g. 2048,768: Qwen3-30B-A3B)",
    )
    p.add_argument("--experts", type=int, metavar="E", help="experts per layer (default: the file's)")
    _add_output_options(p)
    p.set_defaults(func=cmd_slots)


def cmd_slots(args) -> int:
    return _report(args, bench_slots.run(args.model, args.dims, args.experts), bench_slots.print_table)


def _add_companions_parser(kinds) -> None:
    p = kinds.add_parser(
        "companions",
        prog="hobbit-cli bench companions",
        help="low-precision companion types: bytes and divergence, side by side",
        description=bench_companions.__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", metavar="MODEL", help="a MoE GGUF")
    p.add_argument(
        "--types",
        metavar="T,T,...",
        type=lambda s: [x.strip().upper() for x in s.split(",")],
        help=f"candidate types (default: those of {','.join(bench_companions.CANDIDATES)} smaller than the experts)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        help="text to score (default: a built-in paragraph, repeated; a real text measures a trained model better)",
    )
    p.add_argument("--tokens", type=int, default=512, metavar="N", help="tokens scored (default 512)")
    p.add_argument("--ctx", type=int, default=128, metavar="N", help="tokens per chunk (default 128)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_output_options(p)
    p.set_defaults(func=cmd_companions)


def cmd_companions(args) -> int:
    r = bench_companions.run(args.model, args.types, args.text, args.tokens, args.ctx, progress=not args.quiet)
    return _report(args, r, bench_companions.print_table)


def _add_fit_parser(kinds) -> None:
    p = kinds.add_parser(
        "fit",
        prog="hobbit-cli bench fit",
        help="every expert cached: llama.cpp vs hobbit in-process vs through hobbitd",
        description=bench_fit.__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("model", metavar="MODEL", help="a MoE GGUF")
    p.add_argument("--prompt-tokens", type=int, default=8, metavar="N", help="prompt length (default 8)")
    p.add_argument("-n", "--n-decode", type=int, default=64, metavar="N", help="decode steps (default 64)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="interleaved rounds (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="threads (default: physical cores; hobbitd's per-layer path one fewer)",
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_fit)


def cmd_fit(args) -> int:
    r = bench_fit.run(args.model, args.prompt_tokens, args.n_decode, args.repeat, args.threads)
    return _report(args, r, bench_fit.print_table)


def _add_soak_parser(kinds) -> None:
    p = kinds.add_parser(
        "soak",
        prog="hobbit-cli bench soak",
        help="clients on one hobbitd for minutes, with client and daemon SIGKILLs",
        description=bench_soak.__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument(
        "model", metavar="MODEL", nargs="?", help="a MoE GGUF (default: bench offload's small synthetic model)"
    )
    p.add_argument("--clients", type=int, default=4, metavar="N", help="client slots (default 4)")
    p.add_argument("--minutes", type=float, default=1.0, metavar="M", help="how long (default 1)")
    p.add_argument("-n", "--n-tokens", type=int, default=16, metavar="N", help="tokens per answer (default 16)")
    p.add_argument(
        "--kill-every", type=float, default=5.0, metavar="S", help="SIGKILL a random client every S seconds (default 5)"
    )
    p.add_argument(
        "--daemon-kills",
        type=int,
        default=1,
        metavar="K",
        help="SIGKILL and restart hobbitd K times, spread over the run (default 1)",
    )
    p.add_argument(
        "--cache",
        type=float,
        default=0.25,
        metavar="F",
        help="hobbitd's cache as a share of the expert bytes (default 0.25)",
    )
    p.add_argument("--no-serve", action="store_true", help="no `serve` client, only `generate` ones")
    p.add_argument(
        "--replace-every",
        type=float,
        default=0.0,
        metavar="S",
        help="replace the model file (a copy) every S seconds, by a rename and in place in turn (default: never)",
    )
    _add_output_options(p)
    p.set_defaults(func=cmd_soak)


def cmd_soak(args) -> int:
    r = bench_soak.run(
        args.model,
        args.clients,
        args.minutes,
        args.n_tokens,
        args.kill_every,
        args.daemon_kills,
        args.cache,
        serve=not args.no_serve,
        replace_every=args.replace_every,
    )
    return _report(args, r, bench_soak.print_table)
