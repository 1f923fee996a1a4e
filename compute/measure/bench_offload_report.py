"""`hobbit-cli bench offload`'s report drawn: the table (print_table) and the PNG plots
(plot: tok/s against the budget, hobbit's per-token time split) of what
measure/bench_offload.py's run() returns."""

from __future__ import annotations

import os

import numpy as np

from ...protocol.errors import InputError
from .bench_ablation import BLIND_LABEL
from .bench_offload import MiB


def pyplot():
    """matplotlib.pyplot drawing to files; InputError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'hobbit[plot]'") from None
    return plt


def plot(report: dict, folder: str) -> list[str]:
    """PNG plots: tok/s against the budget; hobbit's per-token time split. Returns the paths."""
    plt = pyplot()
    os.makedirs(folder, exist_ok=True)
    paths = []
    pts = sorted(report["sweep"], key=lambda p: p["budget"])
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [100 * p["share_of_experts"] for p in pts]
        for key, label in (("llamacpp_tok_s", "llama.cpp (mmap)"), ("hobbit_tok_s", "hobbit")):
            xs = [xi for xi, p in zip(x, pts) if p.get(key)]
            ax.plot(xs, [p[key] for p in pts if p.get(key)], marker="o", label=label)
        ax.set_xlabel("memory budget, % of the expert bytes")
        ax.set_ylabel("decode tok/s")
        ax.set_yscale("log")
        ax.set_title(os.path.basename(report["model"]), fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend()
        paths.append(os.path.join(folder, "tok_s_vs_budget.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    bars = [
        (f"{label}\n{run['prompt']}->{run['decode']}", run["split_ms"])
        for key, label in (("hobbit_high_lru", "high+LRU"), ("hobbit", "hobbit"))
        for run in report["results"].get(key, {}).get("runs", [])
        if "split_ms" in run
    ]
    if bars:
        fig, ax = plt.subplots(figsize=(6, 4))
        bottom = np.zeros(len(bars))
        for part in ("compute", "expert_wait", "other"):
            v = np.array([sp[part] for _, sp in bars])
            ax.bar([b[0] for b in bars], v, bottom=bottom, label=part.replace("_", " "))
            bottom += v
        ax.set_ylabel("ms per decoded token")
        ax.legend()
        paths.append(os.path.join(folder, "time_split.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def print_table(r: dict) -> None:
    print(
        f"bench offload: {r['model']} ({r['file_bytes'] / 2**30:.2f} GiB, experts "
        f"{r['expert_bytes'] / 2**30:.2f} GiB); budget {r['budget'] / MiB:.0f} MiB "
        f"({r['budget'] / r['expert_bytes']:.0%} of the expert bytes) + {r['allowance'] / MiB:.0f} MiB "
        f"for the processes = cgroup limit {r['cgroup_limit'] / MiB:.0f} MiB; hobbitd cache "
        f"{r['hobbit_cache'] / MiB:.0f} MiB"
    )
    for key in ("hobbit_high_lru", "hobbit"):
        st = r["results"].get(key, {}).get("settings")
        if st:
            print(f"{key}: policy {st['policy']}, {st['mode']}" + (f" {BLIND_LABEL}" if _blind(st) else ""))
    blind = _blind(r["results"].get("hobbit", {}).get("settings"))
    print(
        f"{'run':34s} {'prompt':>6s} {'out':>4s} {'prefill s':>9s} {'tok/s':>7s} {'x llama':>7s} "
        f"{'MB/tok':>7s} {'floor':>6s} {'same tok':>8s} {'ms/tok: compute':>15s} {'wait':>6s} "
        f"{'other':>6s} {'peak MiB':>8s}"
    )
    labels = {
        "llamacpp_unlimited": "llama.cpp, no limit (ceiling)",
        "llamacpp_limited": "llama.cpp, limited",
        "hobbit_high_lru": "hobbit high only + LRU, limited",
        "hobbit": "hobbit (all techniques), limited",
    }
    for key, label in labels.items():
        r_ = r["results"].get(key)
        if r_ is None:
            print(f"{label:34s} not measured: {r['not_measured'].get(key, '?')}")
            continue
        if "error" in r_:
            print(f"{label:34s} failed: {r_['error']}")
            continue
        peak = r_.get("peak_memory")
        for run in r_["runs"]:
            sp = run.get("split_ms")
            print(
                f"{label:34s} {run['prompt']:6d} {run['decode']:4d} {run['prefill_s']:9.2f} "
                f"{run['decode_tok_s']:7.2f} {_f(run.get('x_llamacpp_limited'), '7.2f')} "
                f"{run['bytes_per_token'] / 1e6:7.1f} {_f(run.get('share_of_io_floor'), '6.0%')} "
                f"{run.get('tokens_equal_to_unlimited', 1.0):8.0%} "
                f"{_f(sp and sp['compute'], '15.1f')} {_f(sp and sp['expert_wait'], '6.1f')} "
                f"{_f(sp and sp['other'], '6.1f')} {_f(peak and peak / MiB, '8.0f')}"
                + (f" {BLIND_LABEL}" if blind and key == "hobbit" else "")
            )
    if r["clients"]:
        print(f"{'clients':7s} {'engine':48s} {'total tok/s':>11s} {'x llama':>7s} {'hit ratio':>9s} {'peak MiB':>8s}")
    for n, by in r["clients"].items():
        base = by["llamacpp"].get("total_tok_s")
        for key, label in (
            ("llamacpp", f"{n} llama.cpp processes"),
            ("hobbit_shared", f"{n} hobbit clients, one shared hobbitd"),
            ("hobbit_separate", f"{n} hobbit clients, {n} hobbitd with 1/{n} cache each"),
        ):
            c = by[key]
            tot = c.get("total_tok_s")
            ratio = tot / base if tot and base else None
            peak = c.get("peak_memory")
            print(
                f"{n:7s} {label:48s} {_f(tot, '11.2f')} {_f(ratio, '7.2f')} "
                f"{_f(c.get('hit_ratio'), '9.1%')} {_f(peak and peak / MiB, '8.0f')}"
                + (f"  failed: {c['errors'][0]}" if c["errors"] else "")
                + (f" {BLIND_LABEL}" if blind and key != "llamacpp" else "")
            )
    for pt in r.get("sweep", []):
        print(
            f"sweep: budget {pt['budget'] / MiB:.0f} MiB ({pt['share_of_experts']:.0%} of the expert "
            f"bytes): llama.cpp {_f(pt.get('llamacpp_tok_s'), '.2f')} tok/s, hobbit "
            f"{_f(pt.get('hobbit_tok_s'), '.2f')} tok/s"
            + (f" ({pt['hobbit_error']})" if pt.get("hobbit_error") else "")
            + (f" {BLIND_LABEL}" if blind else "")
        )
    for path in r.get("plots", []):
        print(f"plot: {path}")
    f = r["io_floor"]
    print(
        f"I/O floor: {f['bytes_per_token'] / 1e6:.1f} MB of experts per token at best "
        f"(top-k experts of every layer, the cache's share hit) / {f['direct_io_Bps'] / 1e6:.0f} MB/s "
        f"(direct I/O now, the faster of hobbit's I/O engine and dd) = {_f(f['tok_s'], '.2f')} tok/s"
    )
    print(
        "method: each limited run drops the page cache first and runs its processes in one "
        "memory cgroup of the limit; decode tok/s = greedy tokens / wall time after the "
        "prefill; MB/tok = bytes read from storage per decoded token (llama.cpp: the worker's "
        "/proc/self/io read_bytes; hobbit: hobbitd's bytes read); same tok = greedy tokens equal "
        "to the unlimited llama.cpp run's; peak = the cgroup's peak memory, page cache included"
    )


def _blind(settings: dict | None) -> bool:
    """Whether hobbitd's settings (its stats' "hobbit") serve a lossy mode a blind
    calibration chose: its quality is unjudged."""
    return bool(settings and settings.get("blind") and not settings.get("exact"))


def _f(x, fmt: str) -> str:
    width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
    return f"{x:{fmt}}" if x is not None else " " * max(width - 1, 0) + "-"
