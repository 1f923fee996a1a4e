"""A model's recommended sampling travels with it: a GGUF's general.sampling.* keys are the
defaults of generate, serve and chat; flags and request fields override them; bad values are
one line. The default model carries values under which it answers a simple question."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from serve_util import run_serve
from hobbit.compute.engine.sampling import SamplingOptions, SamplingSettings, model_sampling, resolve

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
SMALL = dict(experts=0, layers=2, d_model=128, d_ff=256, heads=4, kv_heads=2)
# min-p 1 keeps only the best token: greedy, whatever the temperature and the seed
GREEDY_BY_MIN_P = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0)


def _generate(model: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "generate", model, "-p", "Once upon a time", "-n", "12", "--ctx", "256", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_the_keys_synth_writes_are_the_keys_read(synth, tmp_path):
    from hobbit.compute.engine.weights import open_model

    out = str(tmp_path / "keys.gguf")
    size = ["--experts", "0", "--layers", "1", "--d-model", "64", "--d-ff", "128", "--heads", "2", "--kv-heads", "1"]
    r = subprocess.run(
        [
            *CLI,
            "synth",
            out,
            *size,
            "--sampling",
            "temp=0.25,top_k=7,top_p=0.5,min_p=0.125,penalty_repeat=1.1,penalty_last_n=32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    want = SamplingSettings(temperature=0.25, top_k=7, top_p=0.5, min_p=0.125, penalty_repeat=1.1, penalty_last_n=32)
    assert model_sampling(open_model(out)) == want
    assert model_sampling(open_model(synth(**SMALL))) == SamplingSettings()  # no keys: all unset
    r = subprocess.run([*CLI, "synth", out, *size, "--sampling", "min_p=2"], capture_output=True, text=True)
    _one_line_error(r, "--sampling min_p 2.0", "between 0 and 1")
    r = subprocess.run([*CLI, "synth", out, *size, "--sampling", "penalty_repeat=0"], capture_output=True, text=True)
    _one_line_error(r, "--sampling penalty_repeat 0.0", "greater than 0")


def test_generate_takes_the_models_sampling_and_flags_override_it(synth):
    model = synth(**SMALL, sampling=GREEDY_BY_MIN_P)
    greedy = _generate(model, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    for seed in ("1", "2"):  # the model's min-p 1: the greedy tokens at any seed
        r = _generate(model, "--seed", seed)
        assert r.returncode == 0 and r.stdout == greedy.stdout, (r.stdout, greedy.stdout, r.stderr)
    r = _generate(model, "--seed", "1", "--min-p", "0")  # the flag wins: sampled at temperature 1
    assert r.returncode == 0 and r.stdout != greedy.stdout, r.stderr


def test_bad_sampling_values_are_one_line(synth):
    model = synth(**SMALL)
    _one_line_error(_generate(model, "--min-p", "1.5"), "--min-p 1.5", "between 0 and 1")
    _one_line_error(_generate(model, "--min-p", "nan"), "--min-p nan")
    _one_line_error(_generate(model, "--temperature", "nan"), "--temperature nan")
    _one_line_error(_generate(model, "--repeat-penalty", "0"), "--repeat-penalty 0.0", "greater than 0")
    _one_line_error(_generate(model, "--repeat-penalty", "nan"), "--repeat-penalty nan")
    _one_line_error(_generate(model, "--repeat-last-n", "-2"), "--repeat-last-n -2", "from -1")
    _one_line_error(_generate(model, "--frequency-penalty", "inf"), "--frequency-penalty inf", "finite")
    bad = synth(**SMALL, sampling=SamplingSettings(penalty_last_n=-5))
    _one_line_error(_generate(bad), "general.sampling.penalty_last_n = -5")
    bad = synth(**SMALL, sampling=SamplingSettings(min_p=2.0))
    _one_line_error(_generate(bad), "general.sampling.min_p = 2.0", "between 0 and 1")
    r = subprocess.run([*CLI, "chat", bad], input="hi\n", capture_output=True, text=True, timeout=120)
    _one_line_error(r, "general.sampling.min_p = 2.0")


def test_generate_takes_the_models_penalties_and_flags_override_them(smollm2, tmp_path):
    """A file's penalty_repeat / penalty_last_n (on SmolLM2: a random model seldom repeats a
    token, so a penalty above 1 shows only on a real one) sample as the same values given as
    flags; --repeat-penalty 1 turns the file's off."""
    keyed = _with_keys(smollm2, str(tmp_path / "keyed.gguf"), temp=0.0, penalty_repeat=1.1, penalty_last_n=32)
    by_file = _generate(keyed)
    by_flags = _generate(smollm2, "--temperature", "0", "--repeat-penalty", "1.1", "--repeat-last-n", "32")
    off = _generate(keyed, "--repeat-penalty", "1")
    greedy = _generate(smollm2, "--temperature", "0")
    for r in (by_file, by_flags, off, greedy):
        assert r.returncode == 0, r.stderr
    assert by_file.stdout == by_flags.stdout
    assert off.stdout == greedy.stdout != by_file.stdout


def _with_keys(src: str, dst: str, **keys) -> str:
    """A copy of the GGUF src with more general.sampling.* keys (gguf's add_sampling_KEY)."""
    import gguf
    import numpy as np

    from hobbit.compute.make.gguf_writer import TensorEntry, copied_fields, write_gguf

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    for key, value, vtype, sub in copied_fields(reader, lambda k: not k.startswith(("GGUF.", "general.architecture"))):
        w.add_key_value(key, value, vtype, sub)
    for key, value in keys.items():
        getattr(w, f"add_sampling_{key}")(value)
    tensors = {t.name: t for t in reader.tensors}
    entries = [
        TensorEntry(t.name, int(t.tensor_type), tuple(int(n) for n in t.shape), int(t.n_bytes))
        for t in tensors.values()
    ]
    write_gguf(w, entries, lambda e: [tensors[e.name].data.view(np.uint8).reshape(-1)])
    return dst


def test_samplers_hobbit_does_not_have_are_said_once(synth, tmp_path):
    from hobbit.compute.engine.sampling import ignored_keys
    from hobbit.compute.engine.weights import open_model

    plain = synth(**SMALL)
    odd = _with_keys(plain, str(tmp_path / "odd.gguf"), mirostat=2, xtc_probability=0.5, sequence="top_k;temperature")
    lines = ignored_keys(open_model(odd))
    assert [line.split()[2] for line in lines] == ["mirostat", "xtc", "the"], lines
    assert all(line.startswith("model recommends ") and line.endswith(": ignored") for line in lines)

    r = _generate(odd, "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == _generate(plain, "--temperature", "0").stdout  # sampled as without them
    said = [line for line in r.stderr.splitlines() if "recommends" in line]
    assert said == [f"hobbit-cli: {line}" for line in lines], r.stderr

    # keys that leave those samplers off, and hobbit's own order: nothing to say
    quiet = _with_keys(
        plain,
        str(tmp_path / "quiet.gguf"),
        mirostat=0,
        xtc_probability=0.0,
        sequence="penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature",
    )
    assert ignored_keys(open_model(quiet)) == []


@pytest.fixture(scope="module")
def served(synth, tmp_path_factory):
    """serve, in-process (a dense model), of a synthetic model whose file says min-p 1."""
    log_path = tmp_path_factory.mktemp("serve-sampling") / "serve.log"
    model = synth(**SMALL, sampling=GREEDY_BY_MIN_P)
    with run_serve(model, "--ctx", "256", log_path=log_path) as s:
        yield s


def _complete(served, body: bytes) -> tuple[int, dict]:
    status, text = served.post("/v1/completions", body)
    return status, json.loads(text)


def test_serve_takes_the_models_sampling_and_request_fields_override_it(served):
    def text(**fields) -> str:
        status, body = _complete(
            served, json.dumps({"prompt": "Once upon a time", "max_tokens": 12, **fields}).encode()
        )
        assert status == 200, body
        return body["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(seed=1) == text(seed=2) == greedy  # the model's min-p 1, not OpenAI's defaults
    assert text(seed=1, min_p=0) != greedy  # the request's field wins


def test_serve_takes_the_penalties_from_the_request(served):
    """repeat_penalty / repeat_last_n (llama.cpp's server's names) and OpenAI's
    frequency_penalty / presence_penalty: a random model seldom repeats a token, so penalties
    that reward repeats (below 1, negative) are the ones that show."""

    def text(**fields) -> str:
        body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, **fields}
        status, answer = _complete(served, json.dumps(body).encode())
        assert status == 200, answer
        return answer["choices"][0]["text"]

    greedy = text()
    assert text(repeat_penalty=1.0, frequency_penalty=0, presence_penalty=0) == greedy  # neutral values
    assert text(repeat_penalty=0.5) != greedy
    assert text(presence_penalty=-2) != greedy
    assert text(frequency_penalty=-2) != greedy
    assert text(repeat_penalty=0.5, repeat_last_n=0) == greedy  # a window of 0: off


def test_serve_refuses_bad_sampling_values_with_400(served):
    for body, param in (
        (b'{"prompt": "hi", "min_p": 1.5}', "min_p"),
        (b'{"prompt": "hi", "min_p": NaN}', "min_p"),
        (b'{"prompt": "hi", "top_p": NaN}', "top_p"),
        (b'{"prompt": "hi", "repeat_penalty": 0}', "repeat_penalty"),
        (b'{"prompt": "hi", "repeat_penalty": -1}', "repeat_penalty"),
        (b'{"prompt": "hi", "repeat_penalty": NaN}', "repeat_penalty"),
        (b'{"prompt": "hi", "repeat_last_n": -2}', "repeat_last_n"),
        (b'{"prompt": "hi", "frequency_penalty": 2.5}', "frequency_penalty"),
        (b'{"prompt": "hi", "presence_penalty": Infinity}', "presence_penalty"),
    ):
        status, answer = _complete(served, body)
        assert status == 400 and answer["error"]["param"] == param, answer
        assert answer["error"]["code"] == "invalid_value" and "\n" not in answer["error"]["message"], answer


# ---- the default model ------------------------------------------------------------------------

QUESTION = "What is the capital of France?"


def test_the_default_model_names_paris_at_its_recommended_sampling(default_moe):
    """chat's first answer, at the sampling the model file recommends, names Paris for at
    least 8 of seeds 1-10 (answers capped at 24 tokens)."""
    from hobbit.compute.apps.chat import ChatSession
    from hobbit.compute.engine.model import RunOptions
    from hobbit.compute.engine.sampling import Sampler
    from hobbit.compute.make import recipe
    from hobbit.compute.runs import open_run

    run = open_run(default_moe, RunOptions(n_ctx=512, n_threads=1), None)  # the tokens of any thread count
    try:
        recommended = model_sampling(run.weights)
        assert recommended == recipe.SAMPLING  # the build wrote the recipe's measured values
        answers = []
        for seed in range(1, 11):
            opts = resolve(SamplingSettings(seed=seed), recommended, builtin=SamplingOptions())
            run.model.reset()
            answers.append(ChatSession(run.model, run.tok, Sampler(opts), 24).answer(QUESTION, out=io.StringIO()))
    finally:
        run.close()
    assert sum("Paris" in a for a in answers) >= 8, answers


def test_chat_says_the_sampling_it_uses(default_moe):
    r = subprocess.run(
        [*CLI, "chat", default_moe, "--no-daemon", "--top-k", "5", "-n", "8"],
        input="/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "sampling" in line]
    assert len(said) == 1, r.stderr
    assert "(model)" in said[0] and "top-k 5 (flag)" in said[0], said
