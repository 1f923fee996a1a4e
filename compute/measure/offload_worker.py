"""The worker of `bench offload` (measure/bench_offload.py): one engine, run inside the
memory cgroup of its run as `python -m hobbit.compute.measure.offload_worker SPEC`.

SPEC is one JSON object: {"engine": "hobbit" | "llamacpp", "model", "runs": [[prompt,
decode], ...], "threads" (0: the engine's default), and for hobbit "socket" (a running
hobbitd) and "lookahead"; "skip": leave out that many prompt tokens, so that concurrent
clients get different prompts}. It prints one JSON object: {"runs": [...]} (see worker()).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from ...protocol.errors import HobbitError


def worker(spec: dict) -> dict:
    """One engine over the runs; returns per run: prefill s, decode tok/s, bytes read per
    decoded token, greedy tokens, and for hobbit the per-token time split and the
    prefill's seconds of compute and of waiting for experts."""
    from ..engine.ggml import physical_cores
    from ..engine.model import RunOptions
    from ..runs import ThroughDaemon, open_run
    from .engines import bench_prompt
    from .engines import HobbitEngine, LlamaCppEngine

    ctx = max(p + n for p, n in spec["runs"]) + 8
    if spec["engine"] == "llamacpp":
        # no repacked copies in anonymous memory: the limited runs could not hold them
        eng = LlamaCppEngine(spec["model"], ctx, spec["threads"] or physical_cores(), repack=False)
        timing = None
    else:
        opts = RunOptions(n_ctx=ctx, n_threads=spec["threads"], lookahead=spec["lookahead"])
        eng = HobbitEngine(
            open_run(spec["model"], opts, ThroughDaemon(spec["socket"], autostart=False, quiet=True), tokenizer=False)
        )
        timing = eng.model.timing
    out = []
    try:
        for n_prompt, n_decode in spec["runs"]:
            prompt = bench_prompt(spec["model"], n_prompt, spec.get("skip", 0))
            before = timing and (timing.compute_s, timing.expert_wait_s)
            t0 = time.perf_counter()
            logits = eng.prefill(prompt)
            prefill_s = time.perf_counter() - t0
            tokens = [int(np.argmax(logits))]
            timing0 = timing and (timing.compute_s, timing.expert_wait_s)
            b0, t0, start = eng.bytes_read(), time.perf_counter(), time.time()
            for _ in range(n_decode):
                tokens.append(int(np.argmax(eng.step(tokens[-1]))))
            decode_s = time.perf_counter() - t0
            r = {
                "prompt": n_prompt,
                "decode": n_decode,
                "prefill_s": prefill_s,
                "decode_start": start,
                "decode_end": time.time(),  # wall clock: clients overlap
                "decode_tok_s": n_decode / decode_s,
                "bytes_per_token": (eng.bytes_read() - b0) / n_decode,
                "tokens": tokens,
            }
            if before:
                r["prefill_split_s"] = {"compute": timing0[0] - before[0], "expert_wait": timing0[1] - before[1]}
            if timing0:
                c = timing.compute_s - timing0[0]
                w = timing.expert_wait_s - timing0[1]
                r["split_ms"] = {
                    "compute": 1e3 * c / n_decode,
                    "expert_wait": 1e3 * w / n_decode,
                    "other": 1e3 * (decode_s - c - w) / n_decode,
                }
            out.append(r)
    finally:
        eng.close()
    return {"runs": out}


if __name__ == "__main__":  # one JSON spec in, one JSON result out
    try:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    except HobbitError as e:
        print(f"bench offload worker: {e}", file=sys.stderr)
        sys.exit(1)
