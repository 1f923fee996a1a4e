"""The sampling flags of hobbit-cli generate and chat: the options, their check before any
model is opened, and the choice of each value (flag > the model file's general.sampling.* >
built-in). cli.py adds the options to its parsers."""

from __future__ import annotations

import argparse
import sys

from ...protocol.errors import InputError
from ..engine.sampling import (
    SamplingOptions,
    SamplingSettings,
    SamplingValueError,
    describe,
    ignored_keys,
    model_sampling,
    resolve,
)

# each SamplingSettings field's flag, spelled as llama.cpp's CLI spells it
FLAGS = {
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "seed": "--seed",
    "penalty_repeat": "--repeat-penalty",
    "penalty_last_n": "--repeat-last-n",
    "penalty_freq": "--frequency-penalty",
    "penalty_present": "--presence-penalty",
}


def add_sampling_options(p: argparse.ArgumentParser, n_predict: int) -> None:
    p.add_argument(
        "-n", "--n-predict", type=int, default=n_predict, help=f"most tokens to generate (default {n_predict})"
    )
    # None: unset, so the model file's general.sampling.* keys decide, else the built-in value
    p.add_argument(
        "--temperature",
        "--temp",
        type=float,
        default=None,
        help="sampling temperature; 0 = greedy (default: the model's, else 0.8)",
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the K best; 0 = all (default: the model's, else 40)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's, else 0.95)")
    p.add_argument(
        "--min-p",
        type=float,
        default=None,
        help="drop tokens less likely than MIN_P times the best one, 0..1 (default: the model's, else 0 = off)",
    )
    p.add_argument(
        "--repeat-penalty",
        type=float,
        default=None,
        metavar="F",
        help="penalise the tokens among the last --repeat-last-n, as llama.cpp: a logit above 0 divided by F, "
        "one below multiplied (default: the model's, else 1.0 = off)",
    )
    p.add_argument(
        "--repeat-last-n",
        type=int,
        default=None,
        metavar="N",
        help="how many of the latest tokens (prompt and generated) the penalties look at; 0 = off, "
        "-1 = the whole context (default: the model's, else 64)",
    )
    p.add_argument(
        "--frequency-penalty",
        type=float,
        default=None,
        metavar="F",
        help="subtract F times its count from a recent token's logit (default 0 = off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=None,
        metavar="F",
        help="subtract F from a recent token's logit (default 0 = off)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def sampling_flags(args) -> SamplingSettings:
    """The sampling flags given (None where not), checked before any model is opened."""
    flags = SamplingSettings(**{name: getattr(args, flag[2:].replace("-", "_")) for name, flag in FLAGS.items()})
    try:
        return flags.check()
    except SamplingValueError as e:
        raise InputError(f"{FLAGS[e.field]} {e.value}: {e.rule}") from None


def choose_sampling(flags: SamplingSettings, weights) -> tuple[SamplingOptions, str]:
    """(SamplingOptions, a line saying them and their sources): the flags, else the model
    file's general.sampling.* keys, else the built-in defaults. Says on stderr, once, each
    sampler the file recommends that hobbit does not implement."""
    model = model_sampling(weights)
    for line in ignored_keys(weights):
        print(f"hobbit-cli: {line}", file=sys.stderr)
    opts = resolve(flags, model, builtin=SamplingOptions())
    return opts, describe(opts, flags, model)
