"""`hobbit-cli plan`: the memory split and forecast of a model, its bad input, and the
cache it prints being the one `hobbitd --cache-size auto` takes in the same memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon_util import connect, hello, run_daemon, stats

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli", "plan"]
MODEL = dict(layers=2, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2)
MiB = 1 << 20


def plan(*args, timeout=60):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(synth):
    return synth(**MODEL)


def test_plan_prints_the_memory_split_and_a_forecast(model):
    r = plan(model, "--memory", "1G", "--prompt", "16", "--quiet")
    assert r.returncode == 0, r.stderr
    for line in ("memory: 1024 MiB", "client's resident weights", "client's KV cache", "hobbitd's cache"):
        assert line in r.stdout, r.stdout
    assert "tok/s decoding after 16 prompt tokens" in r.stdout and "first token" in r.stdout, r.stdout
    assert "llama.cpp" in r.stdout and "routing uniform (assumed)" in r.stdout, r.stdout
    assert r.stderr == ""


def test_plan_json_and_hobbitd_auto_take_the_same_cache(model, tmp_path):
    """One sizing rule (loader/sizing.py): plan's cache for --memory 1G is the cache
    `hobbitd --cache-size auto --memory 1G` makes."""
    r = plan(model, "--memory", "1G", "--prompt", "16", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    s = p["sizing"]
    assert s["memory"] == 1 << 30 and s["memory_source"] == "given"
    assert s["cache"] == s["memory"] - s["allowance"] - s["client_weights"] > 0
    f = p["forecast"]
    assert f["decode_tok_s"] > 0 and f["ttft_s"] > 0 and f["llama_tok_s"] > 0
    assert f["hit_share"] == 1.0 and f["bytes_per_token"] == 0  # 1 GiB holds every expert
    assert f["lossy_tok_s"] is None and p["kv_bytes"] > 0
    with run_daemon([model], "auto", tmp_path, memory="1G") as d:
        sock = connect(d.socket)
        hello(sock)
        assert stats(sock)["cache_size"] == s["cache"]
        sock.close(linger=0)


def test_plan_counts_the_reads_the_prefetch_hides(synth):
    """With half the experts cached the forecast reads each decode step's misses, and the
    lookahead, measured on the probe's decode steps, hides at most its predicted share of
    the reads behind at most the compute of the segments after the first: the forecast is
    the middle of hiding none and hiding all that."""
    model = synth(**{**MODEL, "layers": 4})
    r = plan(model, "--memory", "1G", "--prompt", "16", "--json")
    s = json.loads(r.stdout)["sizing"]
    half = s["allowance"] + s["client_weights"] + json.loads(r.stdout)["expert_bytes"] // 2
    r = plan(model, "--memory", str(half), "--prompt", "16", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    f, recall, L = p["forecast"], p["probes"]["prefetch_recall"], p["n_layer"]
    assert 0 < f["hit_share"] < 1 and f["bytes_per_token"] > 0
    assert 0 < recall <= 1  # a router a layer ahead predicts some of a random model's experts
    hidden = (L - 1) * recall * min(f["decode_read_s"] / L, f["decode_compute_s"] / (L + 1))
    assert f["decode_hidden_s"] == pytest.approx(hidden) and f["decode_hidden_s"] > 0
    step = f["decode_compute_s"] + f["decode_read_s"]
    assert f["decode_tok_s_range"] == pytest.approx([1 / step, 1 / (step - hidden)])
    assert f["decode_tok_s"] == pytest.approx(1 / (step - hidden / 2))


def test_plan_of_a_model_with_sliding_window_layers(synth):
    """gpt-oss's sliding-window layers: the compute probe jumps to the prompt's last chunk
    after computing the window before it (their ring must hold it) and forecasts decoding
    after the prompt."""
    from conftest import GPT_OSS

    r = plan(synth(**GPT_OSS, type="F16"), "--memory", "1G", "--prompt", "1500", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["probes"]["prompt_s"] > 0 and p["forecast"]["decode_tok_s"] > 0


@pytest.mark.parametrize(
    "args, says",
    [
        (["/no/such/model.gguf"], "no such file"),
        (["MODEL", "--memory", "300M"], "nothing is left for hobbitd's cache"),
        (["MODEL", "--memory", "lots"], "--memory: size 'lots' is not a number"),
        (["MODEL", "--prompt", "4096"], "raise --ctx"),
    ],
)
def test_plan_bad_input_gets_one_line(model, args, says):
    r = plan(*[model if a == "MODEL" else a for a in args])
    assert r.returncode == 1, r.stdout
    assert r.stderr.count("\n") == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""
