"""`hobbit-cli bench companions MODEL`: which low-precision type to convert a model's experts
to, by bytes and by measured divergence.

For each candidate type smaller than the experts' own, the companion is written (to a
temporary folder) and the model is scored with every routed expert in that type against
the same model in high precision, on the same tokens: the mean KL divergence of the
next-token distributions and top-1 agreement. All-low is the worst a companion can do
(hobbitd uses it only for the less important experts), so it ranks candidates fairly.
"""

from __future__ import annotations

import os
import tempfile

from ...loader import ggml_types as gt
from ...loader.companion import default_low_type, low_format
from ...loader.layout import gguf_experts
from ...loader.precision import Thresholds
from ...protocol.errors import HobbitError, InputError
from ..make.convert import convert
from ..engine.experts import LocalExperts
from ..engine.model import Model, RunOptions
from ..engine.weights import open_model
from .evaluate import kld, read_text, tokenize_text

CANDIDATES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")


def candidates(high, names=CANDIDATES) -> list[int]:
    """The types of `names` whose companion is smaller than every layer's experts and whose
    blocks fit the rows."""
    out = []
    for name in names:
        if name not in gt.TYPES_BY_NAME:
            raise InputError(f"--types: {name!r} is not a ggml type (e.g. {', '.join(CANDIDATES)})")
        t = gt.TYPES_BY_NAME[name]
        try:
            low = low_format(high, t)
        except HobbitError:  # rows not a multiple of its block
            continue
        if all(low.expert_bytes(0) < high.expert_bytes(il) for il in range(high.n_layer)):
            out.append(t)
    return out


def run(
    model: str,
    types: list[str] | None = None,
    text: str | None = None,
    tokens: int = 512,
    ctx: int = 128,
    progress: bool = True,
) -> dict:
    weights = open_model(model)
    if not weights.args.is_moe:
        raise InputError(f"{model}: not a MoE model; companions hold routed experts")
    high = gguf_experts(weights).format
    todo = candidates(high, types or CANDIDATES)
    if not todo:
        raise InputError(f"{model}: none of {', '.join(types or CANDIDATES)} is smaller than its experts")
    from .engines import bench_prompt
    from ..engine.tokenizer import Tokenizer

    toks = tokenize_text(Tokenizer(model), read_text(text))[:tokens] if text else bench_prompt(model, tokens)
    high_bytes = sum(high.expert_bytes(il) for il in range(high.n_layer)) / high.n_layer
    reference = Model(weights, RunOptions(n_ctx=ctx))
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="hobbit-companions-") as tmp:
            for t in todo:
                path = convert(weights, t, os.path.join(tmp, f"{gt.type_name(t)}.hobbit"), progress)
                experts = LocalExperts(weights, path, Thresholds(low_only=True))
                low = Model(weights, RunOptions(n_ctx=ctx), experts=experts)
                try:
                    r = kld(low, reference, toks, ctx=ctx, progress=progress)
                finally:
                    low.close()
                os.unlink(path)
                low_bytes = low_format(high, t).expert_bytes(0)
                rows.append(
                    {
                        "type": gt.type_name(t),
                        "expert_bytes": low_bytes,
                        "smaller": high_bytes / low_bytes,
                        "kld": r["kld"],
                        "kld_stderr": r["kld_stderr"],
                        "top1_agree": r["top1_agree"],
                        "scored": r["scored"],
                    }
                )
    finally:
        reference.close()
    default = default_low_type(high)
    return {
        "model": model,
        "expert_types": [gt.type_name(x) for x in high.type_set],
        "expert_bytes": high_bytes,
        "text": text or "built-in paragraph",
        "ctx": ctx,
        "default": gt.type_name(default) if default is not None else None,
        "candidates": rows,
    }


def print_table(r: dict) -> None:
    print(
        f"bench companions: {r['model']} ({'/'.join(r['expert_types'])} experts, "
        f"{r['expert_bytes']:,.0f} B each on average), every expert low vs all high, "
        f"{r['candidates'][0]['scored']} tokens scored ({r['text']})"
    )
    print(f"  {'type':<6} {'expert B':>10} {'smaller':>8} {'mean KLD':>16} {'top-1':>6}")
    for c in r["candidates"]:
        mark = "  <- convert's default" if c["type"] == r["default"] else ""
        print(
            f"  {c['type']:<6} {c['expert_bytes']:>10,} {c['smaller']:7.2f}x "
            f"{c['kld']:8.5f} ± {c['kld_stderr']:.5f} {c['top1_agree']:6.1%}{mark}"
        )
