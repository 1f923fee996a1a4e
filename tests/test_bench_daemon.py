"""The daemon-side benchmark harnesses run end to end (no timing assertions: speed is
measured by the commands, side by side, never asserted in tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from hobbit.compute.engine import ggml

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
MODEL = dict(layers=8, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
# the shape test_hobbit_techniques builds too (the session's synth fixture makes it once)
SMALL = dict(layers=2, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2, type="Q8_0")


def cli_json(*args, timeout=600):
    r = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_bench_io_reports_engine_and_dd(synth):
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    r = cli_json("bench", "io", synth(**MODEL), "--repeat", "1")
    assert r["engine_MBps"] > 0 and r["dd_MBps"] > 0 and r["ratio"] > 0
    assert r["experts"] == 64 and "method" in r


@pytest.mark.slow
def test_bench_ablation_converts_the_companion_and_runs_every_configuration(synth, tmp_path):
    """A fresh model without a companion: the ablation converts it first (no hand-made
    `convert`), then runs (a)-(e); uncalibrated, (b)-(d) ask for the paper's thresholds."""
    from hobbit.loader.companion import companion_path

    model = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), model)
    proc = subprocess.run(
        [
            *CLI,
            "bench",
            "ablation",
            model,
            "--cache",
            "0.5",
            "--prompt-tokens",
            "8",
            "-n",
            "6",
            "--rounds",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert "no low-precision companion: converting" in proc.stderr
    assert os.path.exists(companion_path(model, ggml.Q4_K))
    assert r["thresholds"] == "--t1 0.6 --t2 0.9"
    assert set(r["configs"]) == set("abcde") and r["rounds"] == 2
    a, d, e = r["configs"]["a"], r["configs"]["d"], r["configs"]["e"]
    assert a["kld_vs_a"] == 0.0 and a["daemon"]["hits_low"] + a["daemon"]["misses_low"] == 0
    assert e["daemon"]["hits_high"] + e["daemon"]["misses_high"] == 0  # low precision only
    for c in r["configs"].values():
        assert c["decode_tok_s"] > 0 and c["daemon"]["requested"] > 0
        assert len(c["decode_tok_s_rounds"]) == len(c["speedup_vs_a_rounds"]) == 2
        assert min(c["decode_tok_s_rounds"]) <= c["decode_tok_s"] <= max(c["decode_tok_s_rounds"])
        assert c["split_ms"]["compute"] > 0 and c["split_ms"]["expert_wait"] > 0
    assert a["speedup_vs_a_rounds"] == [1.0, 1.0]
    assert d["prefetch"], "(d) hints the coming layers, so prefetch accuracy is recorded"
    assert r["configs"]["b"]["daemon"]["misses_low"] + r["configs"]["b"]["daemon"]["skipped"] > 0


def test_bench_ablation_refuses_a_too_small_cache_before_running(synth, tmp_path):
    """Preconditions first: a cache hobbitd would refuse is one line at once, not after (a)."""
    model = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), model)
    r = subprocess.run(
        [*CLI, "bench", "ablation", model, "--cache", "0.05"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "[ablation] round" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "cache size" in last and "too small" in last and "minimum cache size" in last, r.stderr


def _memory_cgroup_reason():
    """Why the limited runs cannot be made here, or None."""
    from hobbit.compute.measure.memcgroup import CgroupUnavailable, MemoryCgroup, drop_page_cache

    try:
        drop_page_cache()
        MemoryCgroup(1 << 30).close()
    except CgroupUnavailable as e:
        return str(e)
    return None


@pytest.mark.slow
def test_bench_offload_quick_runs_every_engine_in_the_limit(tmp_path):
    """--quick end to end: llama.cpp unlimited and limited, hobbit high-only + LRU and with
    every technique, in memory cgroups; hobbit at high precision decodes llama.cpp's tokens."""
    env_cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    import os

    r = subprocess.run(
        [*CLI, "bench", "offload", "--quick", "--json", "--sweep", "150%", "--plot", str(tmp_path / "plots")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env_cache},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    res = out["results"]
    assert "error" not in res["llamacpp_unlimited"], res["llamacpp_unlimited"]
    reason = _memory_cgroup_reason()
    if reason is not None:  # said so in the report, not measured: the test cannot check it
        assert set(out["not_measured"]) == {"llamacpp_limited", "hobbit_high_lru", "hobbit"}
        pytest.skip(f"limited runs not possible here: {reason}")
    for key in ("llamacpp_limited", "hobbit_high_lru", "hobbit"):
        assert "error" not in res[key], res[key]
        assert res[key]["peak_memory"] <= out["cgroup_limit"]
        for run in res[key]["runs"]:
            assert run["decode_tok_s"] > 0 and len(run["tokens"]) == run["decode"] + 1
    for run in res["hobbit_high_lru"]["runs"]:
        assert run["tokens_equal_to_unlimited"] == 1.0  # same GGUF, same greedy tokens
        assert run["bytes_per_token"] > 0 and run["x_llamacpp_limited"] > 0
        assert set(run["split_ms"]) == {"compute", "expert_wait", "other"}
    assert out["io_floor"]["tok_s"] > 0 and out["hobbit_cache"] < out["budget"]
    assert out["sweep"][0]["llamacpp_tok_s"] > 0 and out["sweep"][0]["hobbit_tok_s"] > 0
    for png in out["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(out["plots"]) == 2
    two = out["clients"]["2"]  # 2 llama.cpp processes vs 2 clients of one / two hobbitd
    for key in ("llamacpp", "hobbit_shared", "hobbit_separate"):
        assert not two[key]["errors"] and two[key]["total_tok_s"] > 0, two[key]
    assert len(two["hobbit_separate"]["daemons"]) == 2 and len(two["hobbit_shared"]["daemons"]) == 1
    assert all(0 <= two[k]["hit_ratio"] <= 1 for k in ("hobbit_shared", "hobbit_separate"))


def test_bench_offload_bad_budget_is_one_clear_line():
    r = subprocess.run(
        [*CLI, "bench", "offload", "--quick", "--budget", "lots"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--budget" in lines[0], r.stderr


def test_bench_fit_runs_every_engine_side_by_side(synth):
    """Every expert cached: llama.cpp, in-process, hobbitd one graph and per layer give the
    same greedy tokens; the one-graph forward never waits for hobbitd, and each hobbit
    engine's time per token is split (the per-layer one, warm, may not wait either: its
    cached experts are pinned without asking)."""
    r = cli_json("bench", "fit", synth(**MODEL), "-n", "4", "--repeat", "1", "--prompt-tokens", "8")
    assert list(r["engines"]) == ["llamacpp", "in_process", "resident", "per_layer"]
    for name, e in r["engines"].items():
        assert e["tokens_match"] is True, name
        assert e["decode_tok_s"] > 0 and e["prefill_tok_s"] > 0
    one, per = r["engines"]["resident"]["ms_per_token"], r["engines"]["per_layer"]["ms_per_token"]
    assert one["wait"] == 0 and one["compute"] > 0
    assert per["compute"] > 0 and per["wait"] >= 0 and per["client_other"] > 0 and per["daemon_cpu"] >= 0
    assert r["engines"]["llamacpp"]["decode_ratio"] == 1.0
    assert r["hit_path_ms_per_layer"] == pytest.approx(
        (per["wait"] + per["client_other"] - one["wait"] - one["client_other"]) / r["n_moe_layer"]
    )


def test_bench_soak_loses_nothing(synth):
    """The soak's short form: two `generate` clients and a `serve` on one hobbitd for ~25 s,
    a client SIGKILLed every 4 s and hobbitd SIGKILLed and restarted once: every answer that
    completes is the in-process one, no client fails (serve answers on across the restart),
    and afterwards hobbitd holds no pins and no daemon left anything in /dev/shm or its
    socket folder."""
    r = cli_json(
        "bench",
        "soak",
        synth(**MODEL),
        "--clients",
        "2",
        "--minutes",
        "0.4",
        "-n",
        "8",
        "--kill-every",
        "4",
        "--daemon-kills",
        "1",
        timeout=600,
    )
    assert r["daemon_kills"] == 1 and r["clients_killed"] >= 2
    assert r["answers"] >= 2 and r["wrong"] == 0, r
    assert r["errors"] == {}, r["errors"]
    sv = r["serve"]
    assert sv["answers"] >= 2 and sv["correct"] == sv["answers"] and sv["errors"] == {}, sv
    assert r["serve_exit"] == 0
    assert r["pins_after"] == 0 and r["sessions_after"] == 0
    assert r["leftover_shm"] == [] and r["leftover_files"] == []
    assert r["daemon_exit"] == 0
    assert len(r["rss_mib"]) >= 10


def test_bench_soak_with_the_model_file_replaced_serves_nothing_wrong(synth):
    """The soak with the model file (a copy) replaced under load every 3 s, by an atomic
    rename and by a rewrite in place in turn: every answer that completes is the in-process
    text of a version the file held while it ran (both versions are answered), every failed
    one a clear one-line error; nothing crashes, hobbitd ends clean."""
    r = cli_json(
        "bench",
        "soak",
        synth(**MODEL),
        "--clients",
        "2",
        "--minutes",
        "0.35",
        "-n",
        "8",
        "--kill-every",
        "100",
        "--daemon-kills",
        "0",
        "--replace-every",
        "3",
        timeout=600,
    )
    assert r["replacements"]["rename"] >= 2 and r["replacements"]["in_place"] >= 2, r
    assert r["wrong"] == 0 and r["errors"] == {}, r
    assert min(r["answers_by_version"]) >= 1, r
    sv = r["serve"]
    assert sv["correct"] == sv["answers"], sv
    assert r["pins_after"] == 0 and r["leftover_shm"] == [] and r["leftover_files"] == [], r
    assert r["daemon_exit"] == 0


def test_bench_ablation_scores_perplexity_through_each_configuration(synth, tmp_path):
    """--ppl-text scores the text through each configuration's own hobbitd, one token per
    forward as decoding runs: (a) is the exact reference, (b) with the paper's thresholds
    at a quarter cache loads some experts low or skips them, so its perplexity moves."""
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The {w} river flows past the mill number {i}." for i, w in enumerate(["old"] * 150)))
    model = str(tmp_path / "m.gguf")  # its companion is made beside it, not beside the shared file
    shutil.copy(synth(**SMALL), model)
    r = cli_json(
        "bench", "ablation", model, "--cache", "0.5", "--configs", "ab", "--rounds", "1",
        "--prompt-tokens", "8", "-n", "2", "--ppl-text", str(text), "--ppl-chunks", "1",
    )  # fmt: skip
    p = r["perplexity"]
    assert set(p) == {"a", "b"} and p["a"]["chunks"] == p["b"]["chunks"] == 1, p
    assert p["a"]["vs_a"] == 0.0 and 1 < p["a"]["ppl"] < float("inf"), p
    assert p["b"]["ppl"] != p["a"]["ppl"], p
