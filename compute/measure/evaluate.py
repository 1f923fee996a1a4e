"""Accuracy the way the field measures it: perplexity and KL divergence on a text file.

Perplexity follows llama.cpp's `llama-perplexity` (tools/perplexity/perplexity.cpp,
`perplexity()`), step for step:
  - the whole file is read (one trailing newline dropped, as `-f` does) and tokenized
    with the model's own BOS rule (SmolLM2 adds no BOS);
  - it is cut into n_chunk = n_tokens // ctx chunks of ctx tokens (--chunks takes the
    first N); each chunk starts from an empty KV cache, and when the model adds BOS its
    first token is replaced by BOS;
  - all logits are computed and the tokens ctx/2+1 .. ctx-1 are scored, each by the
    log-softmax of the previous position's logits (ctx/2 - 1 scores per chunk);
  - ppl = exp(mean NLL), with llama.cpp's standard error: ppl * sqrt(var(NLL) / (n - 1)).

KL divergence compares the model under test with a reference on the same scored
positions: mean KL(reference || model) in nats, top-1 agreement (llama.cpp's "same top
p"), and the perplexity of both.

Both take a *scorer*: anything with logit_pieces(tokens, first) and reset() (a Model,
in-process or through hobbitd), or a plain function tokens -> (T, V) logits (an adapter over
llama.cpp, a test's oracle). So the model under test may compute some experts in low
precision while the reference runs everything in high precision. A Model's logits are taken
one batch at a time and scored BLOCK rows at a time: at a 262k vocabulary a chunk of 512
positions' logits would be 512 MiB, and their float64 log-probabilities twice that.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...protocol.errors import InputError
from ..divergence import BLOCK, kl_rows, log_softmax
from ..progress import progress_bar

if TYPE_CHECKING:  # only named: importing runs loads the engine
    from ..runs import ThroughDaemon

# ---- text and scorers --------------------------------------------------------------------------


def read_text(path: str) -> str:
    """The file's text as llama.cpp's `-f` reads it: everything, one trailing newline dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the text file ({e.strerror or e})") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8", errors="replace")


def tokenize_text(tok, text: str) -> list[int]:
    """All tokens of the text, with BOS first if the model adds one (llama.cpp's
    common_tokenize(ctx, text, add_special=true, parse_special=false))."""
    return tok.encode(text, add_special=True, parse_special=False)


def model_adds_bos(tok) -> bool:
    """Whether the model's vocabulary asks for BOS (llama_vocab_get_add_bos)."""
    return tok.add_bos


def as_scorer(model):
    """A function (tokens, first) -> the logits of rows first..T-1 in consecutive pieces,
    each call from an empty context."""
    if callable(model) and not hasattr(model, "logit_pieces"):
        return lambda tokens, first: iter([np.asarray(model(tokens))[first:]])

    def score(tokens, first):
        model.reset()
        return model.logit_pieces(tokens, first)

    return score


def _blocks(pieces, n_rows: int):
    """The first n_rows rows of an iterator of (rows, V) pieces, re-cut into BLOCK-row blocks."""
    held: list[np.ndarray] = []
    have = done = 0
    for piece in pieces:
        held.append(np.asarray(piece))
        have += len(held[-1])
        while have >= BLOCK or (have and done + have >= n_rows):
            rows = np.concatenate(held) if len(held) > 1 else held[0]
            take = min(BLOCK, n_rows - done)
            yield rows[:take]
            done += take
            held, have = ([rows[take:]], len(rows) - take) if len(rows) > take else ([], 0)
            if done == n_rows:
                return
    if done < n_rows:
        raise ValueError(f"the scorer gave {done} rows of logits, {n_rows} were expected")


def _chunks(tokens, ctx: int, chunks: int | None, add_bos: bool, bos: int | None):
    """The evaluated chunks (lists of ctx tokens), llama.cpp's way."""
    if ctx < 4:
        raise InputError(f"--ctx {ctx} must be at least 4")
    if len(tokens) < 2 * ctx:
        raise InputError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {ctx} "
            f"needs at least {2 * ctx} (lower --ctx or use a longer text)"
        )
    n_max = len(tokens) // ctx
    if chunks is not None and chunks < 1:
        raise InputError(f"--chunks {chunks} must be at least 1")
    n = n_max if chunks is None else min(chunks, n_max)
    out = []
    for i in range(n):
        chunk = list(tokens[i * ctx : (i + 1) * ctx])
        if add_bos and bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def _ppl_stats(nll_sum: float, nll2_sum: float, count: int) -> dict:
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan")
    return {"ppl": ppl, "ppl_stderr": stderr, "nll": mean}


# ---- perplexity -------------------------------------------------------------------------------


def perplexity(
    model,
    tokens,
    ctx: int = 512,
    chunks: int | None = None,
    progress: bool = False,
    add_bos: bool = False,
    bos: int | None = None,
) -> dict:
    """llama.cpp's perplexity of `model` (a scorer, see the module docstring) on `tokens`.

    Returns {"ppl", "ppl_stderr", "nll", "chunks", "ctx", "scored", "per_chunk" (running
    ppl after each chunk, as llama.cpp prints), "seconds"}."""
    score = as_scorer(model)
    todo = _chunks(tokens, ctx, chunks, add_bos, bos)
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    running = []
    t0 = time.perf_counter()
    with progress_bar(len(todo), "perplexity", progress, "chunk") as bar:
        for chunk in todo:
            targets = np.asarray(chunk[first + 1 : ctx])  # row i of the logits predicts token i + 1
            at = 0
            for logits in _blocks(score(chunk, first), targets.size):
                target = targets[at : at + len(logits)]
                nll = -log_softmax(logits)[np.arange(target.size), target]
                nll_sum += float(nll.sum())
                nll2_sum += float((nll * nll).sum())
                count += target.size
                at += len(logits)
            running.append(math.exp(nll_sum / count))
            bar.set_postfix(ppl=f"{running[-1]:.4f}")
            bar.update(1)
    return {
        **_ppl_stats(nll_sum, nll2_sum, count),
        "chunks": len(todo),
        "ctx": ctx,
        "scored": count,
        "per_chunk": running,
        "seconds": time.perf_counter() - t0,
    }


# ---- KL divergence ----------------------------------------------------------------------------


def kld(
    model,
    reference,
    tokens,
    ctx: int = 512,
    chunks: int | None = None,
    progress: bool = False,
    add_bos: bool = False,
    bos: int | None = None,
) -> dict:
    """Mean KL(reference || model) per scored token, top-1 agreement and both perplexities.

    `model` and `reference` are scorers; the same object twice is computed once (the
    divergence is then exactly 0). Returns {"kld", "kld_stderr", "kld_p99", "kld_max",
    "top1_agree", "delta_p_rms", "ppl", "ppl_stderr", "ref_ppl", "ref_ppl_stderr",
    "ln_ppl_ratio", "chunks", "ctx", "scored", "seconds"}."""
    same = reference is model
    score, ref_score = as_scorer(model), as_scorer(reference)
    todo = _chunks(tokens, ctx, chunks, add_bos, bos)
    first = ctx // 2
    acc = {"nll": 0.0, "nll2": 0.0, "ref_nll": 0.0, "ref_nll2": 0.0, "kld": 0.0, "kld2": 0.0, "dp2": 0.0, "same": 0}
    klds = []
    count = 0
    t0 = time.perf_counter()
    with progress_bar(len(todo), "kl-divergence", progress, "chunk") as bar:
        for chunk in todo:
            targets = np.asarray(chunk[first + 1 : ctx])  # row i of the logits predicts token i + 1
            ref_blocks = _blocks(ref_score(chunk, first), targets.size)
            our_blocks = ref_blocks if same else _blocks(score(chunk, first), targets.size)
            at = 0
            for ref_logits in ref_blocks:
                ref = log_softmax(ref_logits)
                ours = ref if same else log_softmax(next(our_blocks))
                target = targets[at : at + len(ref)]
                at += len(ref)
                _add_kld_block(acc, klds, ref, ours, target)
            count += targets.size
            bar.set_postfix(kld=f"{acc['kld'] / count:.5f}", top1=f"{acc['same'] / count:.3f}")
            bar.update(1)
    klds = np.concatenate(klds)
    mean = acc["kld"] / count
    var = max(acc["kld2"] / count - mean * mean, 0.0)
    ours_stats = _ppl_stats(acc["nll"], acc["nll2"], count)
    ref_stats = _ppl_stats(acc["ref_nll"], acc["ref_nll2"], count)
    return {
        "kld": mean,
        "kld_stderr": math.sqrt(var / (count - 1)) if count > 1 else float("nan"),
        "kld_p99": float(np.percentile(klds, 99)),
        "kld_max": float(klds.max()),
        "top1_agree": acc["same"] / count,
        "delta_p_rms": math.sqrt(acc["dp2"] / count),
        **ours_stats,
        "ref_ppl": ref_stats["ppl"],
        "ref_ppl_stderr": ref_stats["ppl_stderr"],
        "ln_ppl_ratio": ours_stats["nll"] - ref_stats["nll"],
        "chunks": len(todo),
        "ctx": ctx,
        "scored": count,
        "seconds": time.perf_counter() - t0,
    }


def _add_kld_block(acc: dict, klds: list, ref: np.ndarray, ours: np.ndarray, target: np.ndarray) -> None:
    """Add one block of rows (log-probabilities of the reference and the model) to kld()'s sums."""
    rows = np.arange(target.size)
    kl = kl_rows(ref, ours)
    nll, ref_nll = -ours[rows, target], -ref[rows, target]
    acc["nll"] += float(nll.sum())
    acc["nll2"] += float((nll * nll).sum())
    acc["ref_nll"] += float(ref_nll.sum())
    acc["ref_nll2"] += float((ref_nll * ref_nll).sum())
    acc["kld"] += float(kl.sum())
    acc["kld2"] += float((kl * kl).sum())
    dp = np.exp(-nll) - np.exp(-ref_nll)
    acc["dp2"] += float((dp * dp).sum())
    acc["same"] += int((ours.argmax(axis=1) == ref.argmax(axis=1)).sum())
    klds.append(kl)


# ---- a model on a text file (hobbit-cli eval) --------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    model: str | None  # a GGUF path; "default" or None: the default MoE
    text: str  # the text file to score
    ctx: int = 512  # tokens per chunk; the second half of each is scored
    chunks: int | None = None  # score only the first N chunks; None: all
    threads: int = 0  # 0: physical cores (one fewer through hobbitd)
    batch: int | None = None  # tokens per forward; None: min(ctx, 512). 1 scores as decoding runs
    daemon: ThroughDaemon | None = None  # experts through hobbitd (MoE only); None: in-process
    progress: bool = True
    verbose: bool = False  # say how long tokenizing took


def _open(path: str, opts: EvalOptions, daemon: bool):
    """A run of ctx tokens: through hobbitd when asked and the model is a MoE, else in-process."""
    from ..engine.model import RunOptions
    from ..runs import open_run

    run_opts = RunOptions(n_ctx=opts.ctx, n_batch=opts.batch or min(opts.ctx, 512), n_threads=opts.threads)
    return open_run(path, run_opts, opts.daemon if daemon else None)


def _text_tokens(opts: EvalOptions, tok) -> list[int]:
    t0 = time.perf_counter()
    tokens = tokenize_text(tok, read_text(opts.text))
    if opts.verbose:
        print(f"{opts.text}: {len(tokens)} tokens ({time.perf_counter() - t0:.1f} s to tokenize)", file=sys.stderr)
    return tokens


def eval_ppl(opts: EvalOptions, llama_cpp: bool = False) -> dict:
    """perplexity() of opts.model on opts.text, scored by hobbit or (llama_cpp) by
    llama.cpp; the result with the model, the text, the engine and the token count."""
    from ..engine.tokenizer import Tokenizer
    from ..runs import resolve_model

    path = resolve_model(opts.model)
    if llama_cpp:
        tok, run, score, where = Tokenizer(path), None, _llama_cpp_scorer(path, opts), {"engine": "llama.cpp"}
    else:
        run = _open(path, opts, daemon=True)
        tok, score, where = run.tok, run.model, {"engine": "hobbit", "daemon": run.experts is not None}
    try:
        tokens = _text_tokens(opts, tok)
        r = perplexity(
            score,
            tokens,
            ctx=opts.ctx,
            chunks=opts.chunks,
            progress=opts.progress,
            add_bos=model_adds_bos(tok),
            bos=tok.bos,
        )
    finally:
        if run is not None:
            run.close()
    return {"model": path, "text": opts.text, **where, "tokens": len(tokens), **r}


def _llama_cpp_scorer(path: str, opts: EvalOptions):
    """llama.cpp (llama-cpp-python, all logits) as a scorer: each chunk from an empty cache."""
    import llama_cpp

    from ..engine.ggml import physical_cores
    from ..engine.tokenizer import quiet_stderr

    n = opts.threads or physical_cores()
    with quiet_stderr():
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=opts.ctx,
            n_batch=min(opts.ctx, 512),
            logits_all=True,
            flash_attn=True,
            verbose=False,
            n_threads=n,
            n_threads_batch=n,
        )

    def score(tokens):
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    return score


def eval_kld(opts: EvalOptions, reference: str) -> dict:
    """kld() of opts.model against reference: "high" (the same file, every expert in high
    precision, in-process) or another GGUF with the same vocabulary; the result with the
    model, the reference, the text and the token count."""
    from ..runs import resolve_model

    path = resolve_model(opts.model)
    run = _open(path, opts, daemon=True)
    model, ref_run = run.model, None
    try:
        if reference == "high":
            # the same file, every expert in high precision, in-process
            ref_path = path
            ref_run = model if run.experts is None else _open(path, opts, daemon=False)
        else:
            ref_path = resolve_model(reference)
            ref_run = _open(ref_path, opts, daemon=False)
            if ref_run.weights.args.n_vocab != run.weights.args.n_vocab:
                raise InputError(
                    f"--reference {ref_path}: its vocabulary ({ref_run.weights.args.n_vocab} "
                    f"tokens) is not the model's ({run.weights.args.n_vocab})"
                )
        tokens = _text_tokens(opts, run.tok)
        r = kld(
            model,
            ref_run if ref_run is model else ref_run.model,
            tokens,
            ctx=opts.ctx,
            chunks=opts.chunks,
            progress=opts.progress,
            add_bos=model_adds_bos(run.tok),
            bos=run.tok.bos,
        )
    finally:
        run.close()
        if ref_run is not None and ref_run is not model:
            ref_run.close()
    return {
        "model": path,
        "reference": reference,
        "reference_model": ref_path,
        "text": opts.text,
        "daemon": run.experts is not None,
        "tokens": len(tokens),
        **r,
    }
