"""Perplexity and KL divergence: llama.cpp's method, checked against llama.cpp itself."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from hobbit.compute.apps.cli_measure import add_eval_parser
from hobbit.compute.measure import evaluate
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model
from hobbit.protocol.errors import InputError

from conftest import DENSE_CHUNKS, wikitext_path


def test_perplexity_of_dense_smollm2_agrees_with_llama_cpp(smollm2, wiki_tokens, dense_llama_ppl):
    """Our engine and llama.cpp (same method, all logits) on the first 3 chunks of 512."""
    tok = Tokenizer(smollm2)
    assert not evaluate.model_adds_bos(tok), "SmolLM2 adds no BOS; llama.cpp replaces nothing"
    ours = evaluate.perplexity(Model(open_model(smollm2), RunOptions(n_ctx=512)), wiki_tokens, chunks=DENSE_CHUNKS)
    ref = dense_llama_ppl
    assert ours["chunks"] == ref["chunks"] == DENSE_CHUNKS
    assert ours["scored"] == DENSE_CHUNKS * 255
    assert abs(ours["ppl"] / ref["ppl"] - 1) < 0.01, (ours["ppl"], ref["ppl"])
    assert 5 < ours["ppl"] < 100  # a real model on real text
    assert ours["ppl_stderr"] > 0


def test_kld_of_a_model_against_itself_is_zero(smollm2, wiki_tokens):
    w = open_model(smollm2)
    a, b = Model(w, RunOptions(n_ctx=256)), Model(w, RunOptions(n_ctx=256))
    r = evaluate.kld(a, b, wiki_tokens, ctx=256, chunks=2)
    assert r["kld"] < 1e-6 and r["kld_max"] < 1e-4
    assert r["top1_agree"] == 1.0
    assert r["ppl"] == pytest.approx(r["ref_ppl"], rel=1e-6)
    same = evaluate.kld(a, a, wiki_tokens, ctx=256, chunks=2)  # one object: computed once
    assert same["kld"] == 0.0 and same["top1_agree"] == 1.0
    assert same["ppl"] == pytest.approx(r["ppl"], rel=1e-6)


class _Uniform:
    """A fake model: uniform logits over V tokens; records what it was fed."""

    def __init__(self, V=7):
        self.V, self.fed = V, []

    def reset(self):
        pass

    def logit_pieces(self, tokens, first):
        self.fed.append(list(tokens))
        return iter([np.zeros((len(tokens) - first, self.V), np.float32)])


def test_chunks_and_scored_positions_follow_llama_cpp():
    m = _Uniform(V=200)
    tokens = list(range(5, 5 + 100))
    r = evaluate.perplexity(m, tokens, ctx=16)
    assert r["chunks"] == 100 // 16 and len(m.fed) == 6
    assert m.fed[1] == tokens[16:32]  # chunk i is tokens[i*ctx:(i+1)*ctx]
    assert r["scored"] == 6 * (16 // 2 - 1)  # ctx/2+1 .. ctx-1
    assert r["ppl"] == pytest.approx(200.0)  # uniform over V
    r = evaluate.perplexity(m, tokens, ctx=16, chunks=2, add_bos=True, bos=1)
    assert r["chunks"] == 2 and m.fed[-1][0] == 1 and m.fed[-1][1:] == tokens[17:32]


def test_scored_token_is_the_next_one():
    """Logits that put all mass on token t+1 at position t give ppl 1."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6] * 4

    def oracle(chunk):
        out = np.full((len(chunk), 10), -50.0, np.float32)
        for i in range(len(chunk) - 1):
            out[i, chunk[i + 1]] = 50.0
        return out

    assert evaluate.perplexity(oracle, tokens, ctx=8)["ppl"] == pytest.approx(1.0)
    r = evaluate.kld(lambda c: np.zeros((len(c), 10), np.float32), oracle, tokens, ctx=8)
    assert r["kld"] == pytest.approx(math.log(10), rel=1e-6)  # KL(one-hot || uniform)
    assert r["ppl"] == pytest.approx(10.0) and r["ref_ppl"] == pytest.approx(1.0)
    assert r["top1_agree"] == 0.0  # uniform's argmax is token 0, never the next token


def test_too_short_text_is_an_input_error():
    with pytest.raises(InputError, match="at least 32"):
        evaluate.perplexity(_Uniform(), list(range(20)), ctx=16)
    with pytest.raises(InputError, match="--chunks"):
        evaluate.perplexity(_Uniform(), list(range(40)), ctx=16, chunks=0)


def _run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_cli_prints_one_json_object(smollm2, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(wikitext_path().read_text(encoding="utf-8")[:20000], encoding="utf-8")
    assert (
        _run_cli(
            [
                "eval",
                "ppl",
                smollm2,
                "--text",
                str(text),
                "--ctx",
                "128",
                "--chunks",
                "2",
                "--json",
                "--no-daemon",
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["chunks"] == 2 and r["ctx"] == 128 and r["scored"] == 2 * 63 and r["ppl"] > 1
    assert r["daemon"] is False
    assert (
        _run_cli(
            [
                "eval",
                "kld",
                smollm2,
                "--text",
                str(text),
                "--ctx",
                "128",
                "--chunks",
                "1",
                "--reference",
                "high",
                "--json",
                "--no-daemon",
                "--quiet",
            ]
        )
        == 0
    )
    k = json.loads(capsys.readouterr().out)
    assert k["kld"] == 0.0 and k["top1_agree"] == 1.0
