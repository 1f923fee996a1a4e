"""Choosing the next token from logits: greedy, or temperature with top-k / top-p / min-p,
after llama.cpp's repetition penalties over the recent tokens.

Three layers of settings meet here. `SamplingSettings` is what one source says, each field
None where it says nothing: a command's flags, a request's fields, or a GGUF's
`general.sampling.*` keys (`model_sampling`). `resolve(...)` takes each field from the first
source that sets it (flag or request > model file > built-in), giving the `SamplingOptions`
a `Sampler` runs with.

The Sampler's steps are llama.cpp's chain (penalties, top-k, top-p, min-p, then the draw),
except that top-p has always measured the mass after temperature here (llama.cpp: before);
min-p, like llama.cpp's, looks at the logits before temperature. The penalties look at the
token history (prompt and generated tokens, as llama.cpp's samplers accept them), which the
caller passes with the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    # llama.cpp's penalties (llama_sampler_init_penalties) on the tokens among the last
    # penalty_last_n of the history: a logit > 0 divided by penalty_repeat, one <= 0
    # multiplied by it; then count * penalty_freq + penalty_present subtracted
    penalty_repeat: float = 1.0  # 1: off
    penalty_last_n: int = 64  # 0: off; -1: the whole history (the context)
    penalty_freq: float = 0.0  # OpenAI's frequency_penalty; 0: off
    penalty_present: float = 0.0  # OpenAI's presence_penalty; 0: off


@dataclass(frozen=True)
class SamplingSettings:
    """What one source sets; None: unset (the next source decides)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    penalty_repeat: float | None = None
    penalty_last_n: int | None = None
    penalty_freq: float | None = None
    penalty_present: float | None = None

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
    # llama.cpp refuses a penalty whose float32 inverse is not finite: the smallest normal float32
    "penalty_repeat": (False, float(np.finfo(np.float32).tiny), math.inf, "must be a number greater than 0"),
    "penalty_last_n": (True, -1, 2**31 - 1, "must be a whole number from -1 (the whole context) to 2147483647"),
    "penalty_freq": (False, -math.inf, math.inf, "must be a finite number"),
    "penalty_present": (False, -math.inf, math.inf, "must be a finite number"),
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


_LABELS = {
    "temperature": "temp",
    "top_k": "top-k",
    "top_p": "top-p",
    "min_p": "min-p",
    "penalty_repeat": "repeat-penalty",
    "penalty_last_n": "repeat-last-n",
    "penalty_freq": "frequency-penalty",
    "penalty_present": "presence-penalty",
}
_PENALTIES = ("penalty_repeat", "penalty_last_n", "penalty_freq", "penalty_present")


def settings_text(s: SamplingSettings) -> str:
    """'temp 0.2, top-p 0.9': the fields s sets ('' when none)."""
    return ", ".join(f"{label} {getattr(s, name):g}" for name, label in _LABELS.items() if getattr(s, name) is not None)


def describe(opts: SamplingOptions, flags: SamplingSettings, model: SamplingSettings) -> str:
    """'temp 0.2 (model), top-k 3 (model), top-p 0.95 (built-in), min-p 0 (flag)': what
    opts samples with and where each value came from (chat says it when it starts); the
    penalties only when they are on."""

    def source(name: str) -> str:
        if getattr(flags, name) is not None:
            return "flag"
        return "model" if getattr(model, name) is not None else "built-in"

    shown = [n for n in _LABELS if n not in _PENALTIES or penalises(opts)]
    return ", ".join(f"{_LABELS[name]} {getattr(opts, name):g} ({source(name)})" for name in shown)


# The GGUF keys llama.cpp reads (common_init_sampler_from_model; gguf.Keys.General.SAMPLING_*)
# and the fields they set. The others name samplers hobbit does not have (ignored_keys).
MODEL_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "penalty_repeat",
    "general.sampling.penalty_last_n": "penalty_last_n",
}


def _whole(name: str) -> bool:
    return _LIMITS[name][0]


def parse_keys(text: str) -> SamplingSettings:
    """'temp=0.2,top_p=0.9' (the general.sampling.* names) as settings, checked; InputError
    naming the item otherwise (`hobbit-cli synth --sampling` writes them into a model)."""
    got: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        name = MODEL_KEYS.get("general.sampling." + key.strip())
        try:
            number = (int if name and _whole(name) else float)(value)
        except ValueError:
            number = None
        if name is None or number is None:
            keys = ", ".join(k.removeprefix("general.sampling.") for k in MODEL_KEYS)
            raise InputError(f"--sampling {item!r}: want KEY=NUMBER with KEY one of {keys}")
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
            v = int(v) if _whole(name) and float(v).is_integer() else float(str(np.float32(v)))
        if v is not None:
            got[name] = v
    try:
        return SamplingSettings(**got).check()
    except SamplingValueError as e:
        key = next(k for k, n in MODEL_KEYS.items() if n == e.field)
        raise ModelError(f"{gguf.path}: {key} = {e.value}: {e.rule}") from None


# The sequence's names of the samplers hobbit has (llama.cpp's names and aliases,
# common_sampler_types_from_names), and hobbit's order of them. Its other samplers (dry,
# typ_p, top_n_sigma, xtc) stay off in llama.cpp unless settings no GGUF key holds turn
# them on; adaptive_p replaces the draw.
_SEQUENCE_NAMES = {
    **dict.fromkeys(("penalties",), "penalties"),
    **dict.fromkeys(("top_k", "top-k", "topk"), "top_k"),
    **dict.fromkeys(("top_p", "top-p", "topp", "nucleus"), "top_p"),
    **dict.fromkeys(("min_p", "min-p", "minp"), "min_p"),
    **dict.fromkeys(("temperature", "temp"), "temperature"),
}
_ORDER = ["penalties", "top_k", "top_p", "min_p", "temperature"]


def ignored_keys(gguf) -> list[str]:
    """One line per sampler the GGUF recommends that hobbit does not implement, e.g. 'model
    recommends mirostat sampling (general.sampling.mirostat = 2); hobbit does not implement
    it: ignored'; [] when none. Keys that leave a sampler off (mirostat 0, xtc_probability 0)
    and a sequence that is hobbit's order say nothing: the file is then sampled as llama.cpp
    would sample it."""

    def number(key: str, default: float) -> float:
        v = gguf.field(key)
        return float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else default

    out = []
    mirostat = number("general.sampling.mirostat", 0)
    if mirostat != 0:
        out.append(f"mirostat sampling (general.sampling.mirostat = {mirostat:g}); hobbit does not implement it")
    xtc = number("general.sampling.xtc_probability", 0)
    if xtc > 0 and number("general.sampling.xtc_threshold", 0.1) <= 0.5:  # llama.cpp: > 0.5 is off
        out.append(f"xtc sampling (general.sampling.xtc_probability = {xtc:g}); hobbit does not implement it")
    seq = gguf.field("general.sampling.sequence")
    if isinstance(seq, str):
        names = [n.strip().lower() for n in seq.split(";") if n.strip()]
        ours = [_SEQUENCE_NAMES[n] for n in names if n in _SEQUENCE_NAMES]
        if ours != _ORDER or any(n.replace("-", "_") in ("adaptive_p", "adaptivep") for n in names):
            out.append(
                f"the sampler sequence '{seq}' (general.sampling.sequence); hobbit samples in its own "
                f"order ({';'.join(_ORDER)})"
            )
    return [f"model recommends {line}: ignored" for line in out]


def penalises(o: SamplingOptions) -> bool:
    """Whether o's penalties change anything (llama.cpp's is_disabled, negated)."""
    return o.penalty_last_n != 0 and (o.penalty_repeat != 1 or o.penalty_freq != 0 or o.penalty_present != 0)


def penalise(logits: np.ndarray, history: Sequence[int], o: SamplingOptions) -> np.ndarray:
    """A float32 copy of logits with llama.cpp's penalties (llama_sampler_penalties_apply) on
    the tokens among the last o.penalty_last_n of history (-1: all of it), in float32 as it
    computes them. Only those distinct tokens change: the cost is the copy and a sort of last_n."""
    recent = history[-o.penalty_last_n :] if o.penalty_last_n > 0 else history
    out = np.array(logits, np.float32)  # (V,)
    if len(recent) == 0 or not penalises(o):
        return out
    ids, counts = np.unique(np.asarray(recent, np.int64), return_counts=True)  # (R,) distinct tokens, R <= N
    inside = (ids >= 0) & (ids < out.size)  # llama.cpp: a token the logits do not hold changes nothing
    ids, counts = ids[inside], counts[inside]
    z = out[ids]  # (R,)
    repeat = np.float32(o.penalty_repeat)
    # a negative logit divided would become more likely: multiplied instead, as llama.cpp
    z = np.where(z <= 0, z * repeat, z / repeat)
    z -= counts.astype(np.float32) * np.float32(o.penalty_freq) + np.float32(o.penalty_present)
    out[ids] = z
    return out


class Sampler:
    def __init__(self, opts: SamplingOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token; ModelError if a logit is NaN or +inf (no token can be chosen:
        the model's weights or activations are not finite). -inf is a masked token.
        history: the tokens so far, the prompt's and the generated ones, oldest first (the
        penalties look at its last penalty_last_n)."""
        o = self.opts
        if not (logits < np.inf).all():  # one pass; NaN compares False
            raise ModelError("the model's logits are NaN or infinite (its weights or activations are not finite)")
        if penalises(o) and len(history):
            logits = penalise(logits, history, o)
        if o.temperature <= 0:
            return int(np.argmax(logits))
        k = o.top_k
        if o.min_p > 0:
            # llama.cpp's min-p: keep logits >= max + log(min_p) (p_i >= min_p * p_max), on the
            # logits before temperature (its chain: penalties, top-k, top-p, min-p, then temperature)
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
