"""The sampler's cost per token at the vocabularies people run, beside sorting the whole
vocabulary (what it did before): `python -m hobbit.compute.measure.bench_sampling [--json]`.
Best of 5 rounds of 20 calls each, on random logits (the cost does not depend on them)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ..engine.sampling import Sampler, SamplingOptions

VOCABULARIES = (32000, 151936, 201088, 262144)


def _best_ms(f, logits: np.ndarray, rounds: int = 5, calls: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f(logits)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def measure() -> list[dict]:
    opts = SamplingOptions(seed=1)  # the defaults: temperature 0.8, top-k 40, top-p 0.95
    rng = np.random.default_rng(0)
    rows = []
    for V in VOCABULARIES:
        logits = (rng.standard_normal(V) * 3).astype(np.float32)

        def whole_sort(z: np.ndarray) -> np.ndarray:
            return np.argsort(-(z.astype(np.float64) / opts.temperature), kind="stable")[: opts.top_k]

        ours, sort = _best_ms(Sampler(opts), logits), _best_ms(whole_sort, logits)
        rows.append({"vocabulary": V, "sampler_ms": ours, "whole_sort_ms": sort, "ratio": sort / ours})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m hobbit.compute.measure.bench_sampling", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    rows = measure()
    if p.parse_args().json:
        print(json.dumps(rows))
        return 0
    print(f"{'vocabulary':>10}  {'sampler ms':>10}  {'sort ms':>8}  ratio")
    for r in rows:
        print(f"{r['vocabulary']:>10}  {r['sampler_ms']:>10.2f}  {r['whole_sort_ms']:>8.2f}  {r['ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
