"""How often chat's first answer names the right thing at each sampling: the measurement
behind the default model's recommended sampling (make/recipe.py SAMPLING, BENCHMARKS.md).

    python -m hobbit.compute.apps.sweep_sampling [SETTINGS...] [--model GGUF] [--seeds 1-10]

For each setting (the SETTINGS table, or those given as temp=T,top_k=K,top_p=P,min_p=M) it
starts a fresh chat per seed, asks QUESTION, caps the answer at 24 tokens and counts the
answers holding WANT. Each setting is exactly what it says: unset fields are the built-in
values, never the model file's.
"""

from __future__ import annotations

import argparse
import io

from ..engine.sampling import SamplingOptions, SamplingSettings, parse_keys, resolve, settings_text

QUESTION, WANT = "What is the capital of France?", "Paris"

SETTINGS = (
    SamplingSettings(),  # the built-in 0.8 / 40 / 0.95
    SamplingSettings(temperature=0.2, top_k=3),
    SamplingSettings(temperature=0.3, top_k=5),
    SamplingSettings(min_p=0.05),
    SamplingSettings(min_p=0.1),
    SamplingSettings(min_p=0.2),
    SamplingSettings(min_p=0.3),
    SamplingSettings(min_p=0.5),
    SamplingSettings(min_p=0.6),
    SamplingSettings(temperature=0.5, min_p=0.2),
    SamplingSettings(temperature=0.3, min_p=0.2),
    SamplingSettings(temperature=0.2, min_p=0.2),
    SamplingSettings(temperature=0.1),
    SamplingSettings(temperature=0.2, top_p=0.9),
    SamplingSettings(temperature=0.2, top_k=40, top_p=0.9, min_p=0.05),
)


def count(run, settings: SamplingSettings, seeds: range, n_predict: int = 24) -> list[str]:
    """The first answers of a chat per seed at settings (over the built-in defaults)."""
    from .chat import ChatSession
    from ..engine.sampling import Sampler

    answers = []
    for seed in seeds:
        opts = resolve(SamplingSettings(seed=seed), settings, builtin=SamplingOptions())
        run.model.reset()
        answers.append(ChatSession(run.model, run.tok, Sampler(opts), n_predict).answer(QUESTION, out=io.StringIO()))
    return answers


def main(argv=None) -> int:
    from ..engine.model import RunOptions
    from ..runs import open_run, resolve_model

    p = argparse.ArgumentParser(prog="python -m hobbit.compute.apps.sweep_sampling")
    p.add_argument("--model", default=None, help="GGUF (default: the default model)")
    p.add_argument("settings", nargs="*", help="temp=T,top_k=K,top_p=P,min_p=M (default: the SETTINGS table)")
    p.add_argument("--seeds", default="1-10", help="first-last seed (default 1-10)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    args = p.parse_args(argv)
    first, _, last = args.seeds.partition("-")
    seeds = range(int(first), int(last or first) + 1)
    table = [parse_keys(s) for s in args.settings] or list(SETTINGS)
    run = open_run(resolve_model(args.model), RunOptions(n_ctx=512, n_threads=args.threads), None)
    try:
        print(f"| sampling (unset: built-in) | names {WANT} (seeds {args.seeds}) |\n|---|---|")
        for settings in table:
            hits = sum(WANT in a for a in count(run, settings, seeds))
            what = settings_text(settings) or "built-in (temp 0.8, top-k 40, top-p 0.95)"
            print(f"| {what} | {hits}/{len(seeds)} |", flush=True)
    finally:
        run.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
