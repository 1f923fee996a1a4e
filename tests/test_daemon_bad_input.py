"""Bad input to hobbitd gets a typed error and one line, never `internal` or a traceback in
its log (issue 31): a model path with a NUL byte, a router whose weights are NaN (in exact
mode its experts would have been skipped silently), scores that are not finite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np

from daemon_util import SYNTH, call, connect, hello, run_daemon
from hobbit.loader.gguf_file import open_gguf
from hobbit.protocol import messages as m

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def test_a_model_path_with_a_nul_byte_is_a_bad_request(synth, tmp_path):
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path, model_dir=str(tmp_path)) as d:
        s = connect(d.socket)
        try:
            cmd, msg = call(
                s, m.Cmd.HELLO, version=m.VERSION, pid=os.getpid(), name="nul", model=str(tmp_path / "a\0b.gguf")
            )
            assert (cmd, msg["code"]) == (m.Cmd.ERROR, "bad_request"), msg
            assert "NUL" in msg["message"] and "\n" not in msg["message"]
            hello(s)  # and it serves on
        finally:
            s.close(linger=0)
    assert "internal" not in d.stderr, d.stderr  # stop() checked: exit 0, no traceback


def nan_router_model(src: str, dst) -> str:
    """A copy of `src` whose layer 1 router row of expert 3 is NaN: every token's router
    logits, probabilities and scores in that layer are NaN."""
    shutil.copy(src, dst)
    t = open_gguf(str(dst)).tensors["blk.1.ffn_gate_inp.weight"]
    assert t.type == 0  # F32
    w = np.memmap(dst, dtype=np.float32, mode="r+", offset=t.offset, shape=t.shape[::-1])  # (E, D)
    w[3, :] = np.nan
    w.flush()
    del w
    return str(dst)


def test_nan_router_scores_fail_the_request_in_exact_mode(synth, tmp_path):
    """Exact mode skips nothing: a NaN score passes no threshold, so it must stop the
    generation with one line rather than skip the expert."""
    path = nan_router_model(synth(**SYNTH), tmp_path / "nan.gguf")
    with run_daemon([path], "4M", tmp_path) as d:
        r = subprocess.run(
            [*CLI, "generate", path, "-p", "Hello there", "-n", "4", "--temperature", "0", "--socket", d.socket],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert "MoE layer 1" in last and "NaN or inf" in last, r.stderr
        # the wire too: a REQUEST or HINT whose scores are not finite is refused
        s = connect(d.socket)
        try:
            w = hello(s)
            model = next(iter(w["models"]))
            nan = float("nan")
            cmd, msg = call(s, m.Cmd.REQUEST, id=1, model=model, layer=0, experts=[0, 1], scores=[0.0, nan])
            assert (cmd, msg["code"]) == (m.Cmd.ERROR, "bad_request"), msg
            hint = dict(model=model, layer=0, layers=[1], experts=[[0]], scores=[[float("inf")]])
            cmd, msg = call(s, m.Cmd.HINT, **hint)
            assert (cmd, msg["code"]) == (m.Cmd.ERROR, "bad_request"), msg
        finally:
            s.close(linger=0)


def test_nan_router_in_process_is_one_line(synth, tmp_path):
    """In process (no thresholds, one graph) a NaN router makes NaN logits: sampling says
    so in one line rather than print a greedy token of NaNs or raise an IndexError."""
    path = nan_router_model(synth(**SYNTH), tmp_path / "nan.gguf")
    for temperature in ("0", "0.8"):
        r = subprocess.run(
            [*CLI, "generate", path, "-p", "Hello there", "-n", "4", "--temperature", temperature, "--no-daemon"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "logits are NaN or infinite" in r.stderr, r.stderr
