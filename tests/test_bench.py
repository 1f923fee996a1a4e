"""`hobbit-cli bench compute --json` end to end on SmolLM2 (tiny sizes, no timing checks)."""
import json
import os
import subprocess
import sys

from conftest import smollm2_path

SMOL = smollm2_path()   # the test extra installs it; a missing model fails, never skips

SPEEDS = ("hobbit_decode_tok_s", "llamacpp_decode_tok_s", "ratio", "hobbit_prefill_tok_s",
          "llamacpp_prefill_tok_s", "prefill_ratio")


def test_bench_compute_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "hobbit.compute.apps.cli", "bench", "compute", SMOL,
           "--prompt-tokens", "16", "-n", "4", "--repeat", "1", "--json", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # exactly one JSON object on stdout
    assert json.loads(out.read_text()) == report
    for key in SPEEDS:
        assert report[key] > 0, key
    assert report["tokens_match"] is True
    assert report["tokens_compared"] == 5
    assert report["model_size_bytes"] == os.path.getsize(SMOL)
    assert (report["prompt_tokens"], report["n_decode"], report["repeat"]) == (16, 4, 1)
    assert report["threads"] >= 1 and report["method"]
    for engine in ("hobbit", "llamacpp"):
        assert len(report["rounds"][engine]["prefill_s"]) == 1
        assert len(report["rounds"][engine]["decode_s"]) == 1


def test_bench_compute_missing_model(tmp_path):
    cmd = [sys.executable, "-m", "hobbit.compute.apps.cli", "bench", "compute", str(tmp_path / "no.gguf")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "error" in res.stderr and res.stdout == ""
