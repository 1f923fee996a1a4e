"""Choosing the next token from logits: greedy, or temperature with top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingOptions:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    seed: int | None = None


class Sampler:
    def __init__(self, opts: SamplingOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray) -> int:
        o = self.opts
        if o.temperature <= 0:
            return int(np.argmax(logits))
        idx = candidates(logits, o.top_k)  # best first (dividing by a temperature keeps the order)
        z = logits[idx].astype(np.float64) / o.temperature
        p = np.exp(z - z[0])
        p /= p.sum()
        if o.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), o.top_p)) + 1  # smallest set with mass >= top_p
            idx, p = idx[:keep], p[:keep] / p[:keep].sum()
        return int(self.rng.choice(idx, p=p))


def candidates(z: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of z, largest first (k <= 0: all of them). Only the
    k are sorted: sorting a 150k-260k vocabulary for every token cost ~15 ms (BENCHMARKS.md)."""
    if k <= 0 or k >= z.size:
        return np.argsort(-z, kind="stable")
    kth = np.partition(z, z.size - k)[z.size - k]  # the k-th largest value
    top = np.flatnonzero(z >= kth)  # ascending: ties keep the lower index first
    return top[np.argsort(-z[top], kind="stable")][:k]
