"""hobbit-cli: the command line. Each subcommand builds its options and runs them;
library code raises HobbitError, and only this module turns errors into exit codes."""

from __future__ import annotations

import argparse
import sys

from ...protocol.errors import HobbitError
from .cli_sampling import add_sampling_options, choose_sampling, sampling_flags

USAGE = """hobbit-cli COMMAND [options]   (hobbit-cli COMMAND --help for details)

Run Mixture-of-Experts LLMs whose experts do not fit in memory, fast.
"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ctx", type=int, default=2048, metavar="N", help="context length in tokens (KV cache size; default 2048)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="compute threads (default: physical cores, one fewer through hobbitd)",
    )


def _socket(args) -> str:
    from ...hobbitd.config import default_socket

    return args.socket or default_socket()


def cmd_generate(args) -> int:
    from ..engine.generate import TextStream, generate_tokens
    from ..engine.model import RunOptions
    from ..engine.sampling import Sampler
    from ..runs import ThroughDaemon, open_run
    from ...protocol.errors import InputError

    flags = sampling_flags(args)
    prompt, sampling = [], []

    def check(weights, tok):  # before hobbitd is asked: a bad prompt (or sampling key) starts none
        sampling.append(choose_sampling(flags, weights)[0])
        text = tok.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
        prompt.extend(tok.encode(text, parse_special=args.chat))
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= args.ctx:
            raise InputError(
                f"the prompt has {len(prompt)} tokens; the context holds {args.ctx} (raise --ctx or shorten the prompt)"
            )

    run = open_run(
        args.model, RunOptions(n_ctx=args.ctx, n_threads=args.threads), ThroughDaemon.from_args(args), check=check
    )
    sampler = Sampler(sampling[0])
    stream = TextStream(run.tok)
    out = sys.stdout
    for token in generate_tokens(run.model, prompt, args.n_predict, sampler, stop=run.tok.is_eog):
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, run_chat
    from ..engine.model import RunOptions
    from ..engine.sampling import Sampler
    from ..runs import ThroughDaemon, open_run

    flags = sampling_flags(args)
    chosen = []  # a bad general.sampling.* key is refused before hobbitd is asked
    run = open_run(
        args.model,
        RunOptions(n_ctx=args.ctx, n_threads=args.threads),
        ThroughDaemon.from_args(args),
        check=lambda weights, tok: chosen.append(choose_sampling(flags, weights)),
    )
    run.tok.chat_prompt([{"role": "user", "content": "x"}])  # fail early without a template
    opts, said = chosen[0]
    where = f"through hobbitd at {run.experts.socket_path}" if run.experts else "in-process"
    print(f"hobbit chat: {run.path} ({where})", file=sys.stderr)
    print(f"hobbit chat: sampling {said}", file=sys.stderr)
    sampler = Sampler(opts)
    return run_chat(ChatSession(run.model, run.tok, sampler, args.n_predict))


def cmd_serve(args) -> int:
    import os

    from .serve import ServeOptions, bind, serve
    from ..runs import ThroughDaemon, resolve_model
    from ...protocol.errors import InputError

    if args.parallel < 1 or args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise InputError(
            f"--parallel {args.parallel} --max-queue {args.max_queue} --port {args.port}: "
            "need at least 1 slot, a queue of 0 or more, and a port in 0..65535"
        )
    sock = bind(args.host, args.port)  # a port in use fails now, not after the model loads
    try:
        path = resolve_model(args.model)
    except BaseException:
        sock.close()
        raise
    opts = ServeOptions(
        model=path,
        host=args.host,
        port=args.port,
        parallel=args.parallel,
        max_queue=args.max_queue,
        n_ctx=args.ctx,
        n_threads=args.threads,
        api_key=args.api_key or os.environ.get("HOBBIT_API_KEY") or None,
    )
    return serve(opts, ThroughDaemon.from_args(args), sock)


def _add_daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-daemon",
        action="store_true",
        help="compute in this process, reading experts from the mmapped GGUF instead of asking hobbitd",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="hobbitd socket (default: $HOBBIT_SOCKET, else the system or user default)",
    )
    p.add_argument(
        "--reconnect-deadline",
        type=float,
        default=None,
        metavar="S",
        help="when hobbitd goes away: how long to look for one again at the socket before giving up (default 30)",
    )


def cmd_convert(args) -> int:
    import os
    import time

    from ..engine import ggml
    from ..engine.weights import open_model
    from ...loader.companion import auto_low_type
    from ..make.convert import convert, convert_repacked
    from ...loader.layout import gguf_experts
    from ...protocol.errors import InputError, ModelError

    weights = open_model(args.model)
    if not weights.args.is_moe:
        raise ModelError(f"{args.model}: a dense model has no experts to convert")
    high = gguf_experts(weights)
    if args.repack:
        if args.low:
            raise InputError("--repack writes the high-precision experts: give it without --low")
        t0 = time.perf_counter()
        path = convert_repacked(weights, out=args.out, progress=not args.quiet)
        print(f"{path}: {os.path.getsize(path) / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
        return 0
    if args.low:
        low = ggml.TYPES_BY_NAME.get(args.low.upper())
        if low is None:
            raise InputError(f"--low {args.low}: unknown type (try Q4_0, Q4_K, Q3_K, Q2_K)")
    else:
        low = auto_low_type(high.format, args.model)
    t0 = time.perf_counter()
    path = convert(weights, low, out=args.out, progress=not args.quiet)
    size = os.path.getsize(path)
    print(
        f"{path}: {ggml.type_name(low)} experts, {size / 2**20:.1f} MiB "
        f"({size / high.total_bytes:.0%} of the high-precision "
        f"experts), {time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_stats(args) -> int:
    import json

    from ..client.expert_client import ExpertClient

    client = ExpertClient(_socket(args), None, timeout=5, retries=0, reconnect_s=0)
    try:
        st = client.stats()
    finally:
        client.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"hobbitd: up {st.get('uptime_s', 0):.0f} s, {st.get('clients', 0)} clients")
    for name, ms in st.get("models", {}).items():
        total = ms.get("hits", 0) + ms.get("misses", 0)
        rate = ms.get("hits", 0) / total if total else 0.0
        print(
            f"  {name}: hits {ms.get('hits', 0)}  misses {ms.get('misses', 0)}  hit ratio {rate:.1%}  "
            f"read {ms.get('bytes_read', 0) / 2**20:.1f} MiB at {ms.get('read_MBps', 0):.0f} MB/s"
        )
        h = ms.get("hobbit", {})
        print(f"    {h.get('mode', '?')}, policy {h.get('policy', '?')}, low type {h.get('low_type') or '-'}")
        f = ms.get("file") or {}
        if f.get("error"):  # its file changed into something hobbitd cannot serve
            print(f"    not served: {f['error']}")
        elif f.get("changes"):
            print(f"    its file changed {f['changes']} times while served; served from the file as it is now")
        for prec, r in ms.get("regions", {}).items():
            print(
                f"    {prec:5s} slots {r['ready']}/{r['slots']} filled, {r['pinned']} pinned, "
                f"{r['slot_bytes'] / 2**20:.2f} MiB each"
            )
    return 0


def cmd_top(args) -> int:
    from .top import run_top
    from ...protocol.errors import InputError

    if args.interval <= 0:
        raise InputError(f"--interval {args.interval:g}: must be more than 0 seconds")
    return run_top(_socket(args), args.interval, args.count)


def build_parser() -> argparse.ArgumentParser:
    from . import cli_bench, cli_make, cli_measure, plan_cli, pull_cli

    parser = argparse.ArgumentParser(prog="hobbit-cli", usage=USAGE)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "generate",
        prog="hobbit-cli generate",
        help="generate text from a prompt",
        description="Generate a continuation of --prompt and print only the generated text on stdout.",
    )
    p.add_argument("model", metavar="MODEL", help="path to a GGUF model")
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    add_sampling_options(p, 128)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_daemon_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        prog="hobbit-cli chat",
        help="chat with a model in the terminal",
        description="Chat with MODEL using its own chat template, through hobbitd "
        "(the running one, else a private one for the session). "
        "Without MODEL: the default MoE made from SmolLM2-135M-Instruct, "
        "built on first use. Type /reset, /stats or /quit.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="path to a GGUF model, or 'default' (the default)")
    add_sampling_options(p, 512)
    _add_daemon_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve",
        prog="hobbit-cli serve",
        help="an OpenAI-compatible HTTP server",
        description="Serve MODEL over HTTP with OpenAI's API: POST /v1/chat/completions "
        'and /v1/completions ("stream": true for server-sent events), '
        "GET /v1/models, /health and /metrics (Prometheus). --parallel "
        "slots generate at once, each with its own KV cache, all sharing "
        "hobbitd's expert cache; further requests wait in arrival order "
        "(up to --max-queue, then 503). Stop with Ctrl-C or SIGTERM.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help="path to a GGUF model, or 'default' (the default MoE)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0: any free port)")
    p.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="requests generated at once, one KV cache each (default 1)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        metavar="N",
        help="requests that may wait for a slot before new ones get 503 (default 16)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $HOBBIT_API_KEY, else none)",
    )
    _add_daemon_options(p)
    _add_run_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "convert",
        prog="hobbit-cli convert",
        help="make the low-precision companion file of a MoE model",
        description="Re-quantise every expert of MODEL to a smaller type and write "
        "the companion file hobbitd reads on low-precision misses "
        "(next to the model, or under ~/.cache/hobbit).",
    )
    p.add_argument("model", metavar="MODEL", help="path to a MoE GGUF")
    p.add_argument(
        "--low",
        metavar="TYPE",
        default=None,
        help="ggml type of the low-precision experts (default: Q4_K for 8/16-bit "
        "experts, Q4_0 where rows are not 256-blocks; Q3_K for 5/6-bit ones, "
        "Q2_K for 4-bit ones)",
    )
    p.add_argument(
        "--repack",
        action="store_true",
        help="write the repacked image instead: the experts in ggml's CPU repacked layout, "
        "which hobbitd serves in high precision when it is next to the model (as llama.cpp "
        "repacks at load: faster decode, logits equal to llama.cpp's with its repacking)",
    )
    p.add_argument("--out", metavar="PATH", default=None, help="where to write it")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "stats",
        prog="hobbit-cli stats",
        help="what the running hobbitd has cached and read",
        description="Per model: cache occupancy by precision, hits, misses, bytes "
        "read and read bandwidth; connected clients.",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--socket", metavar="PATH", default=None, help="hobbitd socket")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "top",
        prog="hobbit-cli top",
        help="a live view of the running hobbitd",
        description="Redraw every --interval seconds: per model, cache occupancy by "
        "precision, hit/miss/skip rates, read MB/s and prefetch accuracy; "
        "per client, tokens per second. Rates are over the last interval. "
        "Ctrl-C quits. Piped, frames follow each other (like top -b).",
    )
    p.add_argument("--interval", "-d", type=float, default=1.0, metavar="S", help="seconds between frames (default 1)")
    p.add_argument(
        "--count", "-n", type=int, default=None, metavar="N", help="stop after N frames (default: until Ctrl-C)"
    )
    p.add_argument("--socket", metavar="PATH", default=None, help="hobbitd socket")
    p.set_defaults(func=cmd_top)

    cli_make.add_models_parsers(sub)
    pull_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    cli_measure.add_eval_parser(sub)
    cli_measure.add_routing_parser(sub)
    cli_make.add_calibrate_parser(sub)
    cli_make.add_synth_parser(sub)
    cli_bench.add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except HobbitError as e:
        print(f"hobbit-cli: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
