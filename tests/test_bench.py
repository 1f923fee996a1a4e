"""`hobbit-cli bench compute --json` end to end on SmolLM2 (tiny sizes, no timing checks)."""

import json
import os
import subprocess
import sys

from conftest import smollm2_path

SMOL = smollm2_path()  # the test extra installs it; a missing model fails, never skips

SPEEDS = (
    "hobbit_decode_tok_s",
    "llamacpp_decode_tok_s",
    "ratio",
    "hobbit_prefill_tok_s",
    "llamacpp_prefill_tok_s",
    "prefill_ratio",
)


def test_bench_compute_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "hobbit.compute.apps.cli",
        "bench",
        "compute",
        SMOL,
        "--prompt-tokens",
        "16",
        "-n",
        "4",
        "--repeat",
        "1",
        "--json",
        "--out",
        str(out),
    ]
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


def test_bench_companions_json(synth, tmp_path):
    """Each candidate's companion is written, scored all-low against all-high, and removed."""
    path = synth(layers=2, d_model=256, d_ff=512, experts=4, top_k=2, heads=4, kv_heads=2, type="Q8_0")
    cmd = [
        sys.executable,
        "-m",
        "hobbit.compute.apps.cli",
        "bench",
        "companions",
        path,
        "--types",
        "q4_k,Q2_K,Q8_0",
        "--tokens",
        "128",
        "--ctx",
        "64",
        "-q",
        "--json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    rows = {c["type"]: c for c in r["candidates"]}
    assert list(rows) == ["Q4_K", "Q2_K"]  # Q8_0 is not smaller than Q8_0 experts
    assert r["expert_types"] == ["Q8_0"] and r["default"] == "Q4_K"
    assert rows["Q2_K"]["expert_bytes"] < rows["Q4_K"]["expert_bytes"] < r["expert_bytes"]
    assert 0 < rows["Q4_K"]["kld"] < rows["Q2_K"]["kld"]  # 2.6 bits lose more than 4.5
    assert rows["Q4_K"]["scored"] == 62  # 2 chunks of 64, half scored
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]
