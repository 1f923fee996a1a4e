"""`hobbit-cli plan MODEL [--memory SIZE] [--prompt N]`: the command line of measure/plan.py.

stdout gets the plan (or its JSON with --json); the probes' progress goes to stderr."""

from __future__ import annotations

import json
import sys

MiB = 1 << 20


def cmd_plan(args) -> int:
    from ...hobbitd.config import parse_size
    from ...protocol.errors import InputError
    from ..measure.plan import PlanOptions, make_plan, plan_json

    memory = None
    if args.memory is not None:
        try:
            memory = parse_size(args.memory)
        except InputError as e:
            raise InputError(f"--memory: {e}") from None
    say = None if args.json or args.quiet else (lambda text: print(f"[plan] {text}", file=sys.stderr, flush=True))
    plan = make_plan(PlanOptions(args.model, memory, args.prompt, args.ctx), say)
    if args.json:
        print(json.dumps(plan_json(plan), indent=1))
    else:
        print_plan(plan)
    return 0


def print_plan(plan) -> None:
    s, p, f = plan.sizing, plan.probes, plan.forecast
    gb = lambda n: f"{n / 1e9:.2f} GB"
    mib = lambda n: f"{n / MiB:6.0f} MiB"
    print(
        f"plan: {plan.model}: {gb(plan.file_bytes)}, {gb(plan.expert_bytes)} of experts "
        f"({plan.n_layer} MoE layers x {plan.n_expert} experts, top-{plan.top_k})"
    )
    print(f"memory: {s.memory / MiB:.0f} MiB, {s.memory_source}")
    print(f"  processes' allowance      {mib(s.allowance)}  hobbitd's and the client's own (interpreters, buffers)")
    print(f"  client's resident weights {mib(s.client_weights)}  every tensor but the routed experts")
    room = "in the allowance" if plan.kv_bytes <= s.allowance // 2 else "over half the allowance: add it to --memory"
    print(f"  client's KV cache         {mib(plan.kv_bytes)}  at {plan.ctx} tokens of context ({room})")
    held = f"{f.cache_slots} slots, {f.hit_share:.0%} of the experts"
    bound = "; bounded by the free shared memory" if s.shm_bound else ""
    print(f"  hobbitd's cache           {mib(s.cache)}  {held}{bound} (what hobbitd --cache-size auto takes)")
    print(
        f"probes ({p.seconds:.1f} s): direct reads {p.decode_read_Bps / 1e9:.2f} GB/s ({p.decode_batch} random "
        f"expert{'s' * (p.decode_batch > 1)} at once), {p.prompt_read_Bps / 1e9:.2f} GB/s ({p.prompt_batch} "
        f"neighbours at once); compute {1e3 * p.decode_s:.1f} ms a decode step on {p.client_threads} "
        f"thread{'s' * (p.client_threads > 1)} ({1e3 * p.decode_all_s:.1f} ms on {p.all_threads}), "
        f"{p.prompt_s:.2f} s the prompt; the lookahead predicts {p.prefetch_recall:.0%} of a layer's experts"
    )
    print(f"forecast (routing {plan.routing}; hobbitd as it runs by default: prefetch on):")
    low, high = f.decode_tok_s_range
    print(
        f"  hobbit exact    {f.decode_tok_s:6.2f} tok/s decoding after {plan.prompt} prompt tokens: "
        f"{1e3 * f.decode_compute_s:.0f} ms compute + {f.bytes_per_token / 1e6:.0f} MB read in "
        f"{1e3 * f.decode_read_s:.0f} ms a token, up to {1e3 * f.decode_hidden_s:.0f} ms of it behind the compute "
        f"(prefetch: {low:.2f}-{high:.2f} tok/s from hiding none to all)"
    )
    lossy = "     -" if f.lossy_tok_s is None else f"{f.lossy_tok_s:6.2f} tok/s"
    print(f"  hobbit lossy    {lossy}  {f.lossy_note}")
    print(
        f"  first token     {f.ttft_s:6.2f} s for {plan.prompt} prompt tokens: {f.prompt_compute_s:.2f} s compute + "
        f"{f.prompt_read_bytes / 1e9:.2f} GB read in {f.prompt_read_s:.2f} s"
    )
    print(f"  llama.cpp       {f.llama_tok_s:6.2f} tok/s in the same memory: {f.llama_note}")


DESCRIPTION = """What hobbit will do with MODEL in a given memory, from the file's headers and a
few seconds of probes on this machine (no root, no hobbitd): the memory the client needs, the
cache hobbitd takes (the same rule as hobbitd --cache-size auto), and the expected decode
speed (exact, and lossy where the model is calibrated), the time to the first token and
llama.cpp's expected speed in the same memory. The probes read a few dozen experts of MODEL
by direct I/O and time the engine on a few of its experts. Routing is assumed uniform."""


MEMORY_HELP = (
    "memory hobbitd and the client may use together, e.g. 8G or 1912M (as systemd's MemoryMax= or "
    "`bench offload`'s cgroup limit: its --budget plus 512 MiB); default: what is available now, the "
    "machine's or its memory cgroup's if smaller"
)
OPTIONS = {  # flags: add_argument's keywords
    ("--memory",): dict(metavar="SIZE", help=MEMORY_HELP),
    ("--prompt",): dict(
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens: the time to the first token is for N, decode speed after them (default 512)",
    ),
    ("--ctx",): dict(
        type=int,
        default=2048,
        metavar="N",
        help="context in tokens the KV cache is sized for (default 2048, as chat's)",
    ),
    ("--json",): dict(action="store_true", help="print the plan as JSON (every figure, in bytes and seconds)"),
    ("--quiet", "-q"): dict(action="store_true", help="no progress lines on stderr"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("plan", prog="hobbit-cli plan", description=DESCRIPTION, help="forecast a model's speed here")
    p.add_argument("model", metavar="MODEL", help="a MoE GGUF (a split model: its first part)")
    for flags, kw in OPTIONS.items():
        p.add_argument(*flags, **kw)
    p.set_defaults(func=cmd_plan)
