"""Choosing the next token from logits: greedy, or temperature with top-k / top-p / min-p.

Three layers of settings meet here. `SamplingSettings` is what one source says, each field
None where it says nothing: a command's flags, a request's fields, or a GGUF's
`general.sampling.*` keys (`model_sampling`). `resolve(...)` takes each field from the first
source that sets it (flag or request > model file > built-in), giving the `SamplingOptions`
a `Sampler` runs with.

The Sampler's steps are llama.cpp's chain (top-k, top-p, min-p, then the draw), except that
top-p has always measured the mass after temperature here (llama.cpp: before); min-p, like
llama.cpp's, looks at the logits before temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from ...protocol.errors import InputError, ModelError


@dataclass(frozen=True)
class SamplingOptions:
    """What a Sampler runs with: every field decided (the defaults are the built-in ones)."""

    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95  # 1.0: off
    seed: int | None = None
    min_p: float = 0.0  # 0: off; keeps tokens with p >= min_p * p(best token), as llama.cpp


@dataclass(frozen=True)
class SamplingSettings:
    """What one source sets; None: unset (the next source decides)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None

    def check(self) -> SamplingSettings:
        """self, or SamplingValueError naming the first field out of its range (NaN, inf and
        a fraction where a whole number belongs are out of range)."""
        for name, (whole, lo, hi, rule) in _LIMITS.items():
            v = getattr(self, name)
            if v is None:
                continue
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or (whole and v != int(v)) or not lo <= v <= hi:
                raise SamplingValueError(name, v, rule)
        return self


# field: (a whole number, lowest, highest, the rule in words)
_LIMITS = {
    "temperature": (False, 0.0, math.inf, "must be a number of at least 0"),
    "top_k": (True, 0, math.inf, "must be a whole number of at least 0"),
    "top_p": (False, 0.0, 1.0, "must be a number between 0 and 1"),
    "min_p": (False, 0.0, 1.0, "must be a number between 0 and 1"),
    "seed": (True, -math.inf, math.inf, "must be a whole number"),
}


class SamplingValueError(InputError):
    """A sampling setting out of its range; `field` names it (callers spell it their way)."""

    def __init__(self, field: str, value, rule: str):
        super().__init__(f"{field} {value}: {rule}")
        self.field, self.value, self.rule = field, value, rule


def resolve(*sources: SamplingSettings, builtin: SamplingOptions) -> SamplingOptions:
    """Each field from the first source that sets it, else from builtin: the sources in
    precedence order, e.g. resolve(flags, model_sampling(weights), builtin=SamplingOptions())."""
    got = {}
    for f in fields(SamplingSettings):
        v = next((getattr(s, f.name) for s in sources if getattr(s, f.name) is not None), None)
        if v is not None:
            got[f.name] = v
    return replace(builtin, **got)


_LABELS = {"temperature": "temp", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p"}


def settings_text(s: SamplingSettings) -> str:
    """'temp 0.2, top-p 0.9': the fields s sets ('' when none)."""
    return ", ".join(f"{label} {getattr(s, name):g}" for name, label in _LABELS.items() if getattr(s, name) is not None)


def describe(opts: SamplingOptions, flags: SamplingSettings, model: SamplingSettings) -> str:
    """'temp 0.2 (model), top-k 3 (model), top-p 0.95 (built-in), min-p 0 (flag)': what
    opts samples with and where each value came from (chat says it when it starts)."""

    def source(name: str) -> str:
        if getattr(flags, name) is not None:
            return "flag"
        return "model" if getattr(model, name) is not None else "built-in"

    return ", ".join(f"{label} {getattr(opts, name):g} ({source(name)})" for name, label in _LABELS.items())


# The GGUF keys llama.cpp reads (common_init_sampler_from_model; gguf.Keys.General.SAMPLING_*)
# and the fields they set. The others (xtc, mirostat, penalties, sequence) are not implemented.
MODEL_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
}


def parse_keys(text: str) -> SamplingSettings:
    """'temp=0.2,top_p=0.9' (the general.sampling.* names) as settings, checked; InputError
    naming the item otherwise (`hobbit-cli synth --sampling` writes them into a model)."""
    got: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        name = MODEL_KEYS.get("general.sampling." + key.strip())
        try:
            number = (int if name == "top_k" else float)(value)
        except ValueError:
            number = None
        if name is None or number is None:
            raise InputError(f"--sampling {item!r}: want KEY=NUMBER with KEY one of temp, top_k, top_p, min_p")
        got[name] = number
    try:
        return SamplingSettings(**got).check()
    except SamplingValueError as e:
        raise InputError(f"--sampling {e.field} {e.value}: {e.rule}") from None


def model_sampling(gguf) -> SamplingSettings:
    """The sampling a GGUF recommends (gguf: a GGUFFile; its .field(key) reads metadata): its
    general.sampling.* keys, unset where absent. A value that is not a number in range is a
    ModelError naming the file and key."""
    got = {}
    for key, name in MODEL_KEYS.items():
        v = gguf.field(key)
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            # the float32 a file holds, as its shortest decimal (0.2, not 0.20000000298...)
            v = int(v) if name == "top_k" and float(v).is_integer() else float(str(np.float32(v)))
        if v is not None:
            got[name] = v
    try:
        return SamplingSettings(**got).check()
    except SamplingValueError as e:
        key = next(k for k, n in MODEL_KEYS.items() if n == e.field)
        raise ModelError(f"{gguf.path}: {key} = {e.value}: {e.rule}") from None


class Sampler:
    def __init__(self, opts: SamplingOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token; ModelError if a logit is NaN or +inf (no token can be chosen:
        the model's weights or activations are not finite). -inf is a masked token."""
        o = self.opts
        if not (logits < np.inf).all():  # one pass; NaN compares False
            raise ModelError("the model's logits are NaN or infinite (its weights or activations are not finite)")
        if o.temperature <= 0:
            return int(np.argmax(logits))
        k = o.top_k
        if o.min_p > 0:
            # llama.cpp's min-p: keep logits >= max + log(min_p) (p_i >= min_p * p_max), on the
            # logits before temperature (its chain: top-k, top-p, min-p, then temperature)
            floor = np.float32(np.max(logits)) + np.log(np.float32(o.min_p))
            if o.top_p >= 1.0:  # then nothing but top-k needs the others: sort only the survivors
                k = min(k if k > 0 else logits.size, int(np.count_nonzero(logits >= floor)))
        idx = candidates(logits, k)  # best first (dividing by a temperature keeps the order)
        z = logits[idx].astype(np.float64) / o.temperature
        p = np.exp(z - z[0])
        p /= p.sum()
        if o.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), o.top_p)) + 1  # smallest set with mass >= top_p
            idx, p = idx[:keep], p[:keep] / p[:keep].sum()
        if o.min_p > 0:
            keep = int(np.count_nonzero(logits[idx] >= floor))  # a prefix: idx is best first
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
