"""KL divergence and entropy of next-token distributions, given as logits: the one definition
evaluation (measure/evaluate.py), calibration and the ablation bench use.

Computed in float64, as llama.cpp sums exp() in double; the model's probabilities are
clipped at FLOOR before taking logs, and a row's divergence is never negative.
"""

from __future__ import annotations

import math

import numpy as np

FLOOR = 1e-12
BLOCK = 32  # rows of logits taken at once (float64 log-probabilities: BLOCK x V x 8 bytes, a few)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, float64."""
    z = np.asarray(logits).astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def kl_rows(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || model) per row, from log-probabilities (log_softmax)."""
    kl = (np.exp(ref_logp) * (ref_logp - np.maximum(logp, math.log(FLOOR)))).sum(axis=-1)
    return np.maximum(kl, 0.0)


def entropy_rows(logp: np.ndarray) -> np.ndarray:
    """Entropy (nats) per row, from log-probabilities (log_softmax): log V for a uniform row."""
    return -(np.exp(logp) * logp).sum(axis=-1)


def mean_kld(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(reference || model) over rows of next-token logits."""
    return float(kl_rows(log_softmax(ref_logits), log_softmax(logits)).mean())
