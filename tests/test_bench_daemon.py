"""The daemon-side benchmark harnesses run end to end (no timing assertions: speed is
measured by the commands, side by side, never asserted in tests)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "hobbit.compute.cli"]
MODEL = dict(layers=8, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")


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
def test_bench_ablation_runs_every_configuration(synth, tmp_path):
    model = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), model)
    subprocess.run([*CLI, "convert", model, "-q"], check=True, capture_output=True, timeout=300)
    r = cli_json("bench", "ablation", model, "--cache", "0.5", "--prompt-tokens", "8", "-n", "6",
                 "--rounds", "2")
    assert set(r["configs"]) == set("abcde") and r["rounds"] == 2
    a, d, e = r["configs"]["a"], r["configs"]["d"], r["configs"]["e"]
    assert a["kld_vs_a"] == 0.0 and a["daemon"]["hits_low"] + a["daemon"]["misses_low"] == 0
    assert e["daemon"]["hits_high"] + e["daemon"]["misses_high"] == 0      # low precision only
    for c in r["configs"].values():
        assert c["decode_tok_s"] > 0 and c["daemon"]["requested"] > 0
        assert len(c["decode_tok_s_rounds"]) == len(c["speedup_vs_a_rounds"]) == 2
        assert min(c["decode_tok_s_rounds"]) <= c["decode_tok_s"] <= max(c["decode_tok_s_rounds"])
        assert c["split_ms"]["compute"] > 0 and c["split_ms"]["expert_wait"] > 0
    assert a["speedup_vs_a_rounds"] == [1.0, 1.0]
    assert d["prefetch"], "(d) hints the coming layers, so prefetch accuracy is recorded"
