"""hobbitd with a low-precision companion file: low-precision slots hold exactly the
companion's bytes, a corrupt expert is refused by its checksum (never served), and a
companion whose GGUF changed after `convert` is refused as stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from daemon_util import connect, daemon_args, hello, release, request, run_daemon, send, recv, stats
from hobbit.compute.engine import ggml
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.convert import convert
from hobbit.loader import companion
from hobbit.loader.layout import SlotFormat
from hobbit.loader.precision import PAPER_T1, PAPER_T2
from hobbit.loader.shm import Segment
from hobbit.protocol import messages as m

from test_daemon_lifecycle import run_failing

MODEL = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")


def _model_with_companion(synth, tmp_path):
    path = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), path)
    out = convert(open_model(path), ggml.Q4_0, progress=False)
    return path, out


def test_low_precision_slots_hold_the_companion_bytes(synth, tmp_path):
    path, comp = _model_with_companion(synth, tmp_path)
    src, _ = companion.open_companion(open_model(path), comp)
    with run_daemon([path], "8M", tmp_path, low_only=True) as d:
        s = connect(d.socket)
        w = hello(s)
        region = w["models"]["m"]["regions"]["low"]
        fmt = SlotFormat.from_wire(region["format"])
        seg = Segment(w["shm"], w["shm_size"])
        slots = request(s, "m", 2, [5, 1])
        with open(comp, "rb") as f:
            for e, (prec, i) in zip([5, 1], slots):
                assert prec == "low"
                f.seek(companion.slot_image_offset(src, 2, e))
                want = f.read(fmt.slot_bytes)
                base = region["offset"] + i * fmt.slot_bytes
                assert seg.array[base : base + fmt.slot_bytes].tobytes() == want
        release(s, "m", slots)
        seg.close()
        s.close(linger=0)


def test_a_flipped_byte_is_caught_and_never_served(synth, tmp_path):
    path, comp = _model_with_companion(synth, tmp_path)
    src, _ = companion.open_companion(open_model(path), comp)
    off = companion.slot_image_offset(src, 1, 2) + 1000
    with open(comp, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))
    with run_daemon([path], "8M", tmp_path, low_only=True) as d:
        s = connect(d.socket)
        hello(s)
        send(s, m.Cmd.REQUEST, id=7, model="m", layer=1, experts=[2])
        cmd, msg = recv(s, 10)
        assert cmd == m.Cmd.ERROR and msg["code"] == "checksum" and msg["id"] == 7, msg
        assert "layer 1 expert 2" in msg["message"]
        release(s, "m", request(s, "m", 1, [3], rid=8))  # the daemon keeps serving
        send(s, m.Cmd.REQUEST, id=9, model="m", layer=1, experts=[2])
        cmd, msg = recv(s, 10)
        assert cmd == m.Cmd.ERROR and msg["code"] == "checksum"  # still refused, not cached
        s.close(linger=0)


def test_a_gguf_changed_after_convert_is_refused_as_stale(synth, tmp_path):
    path, comp = _model_with_companion(synth, tmp_path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    line = run_failing(daemon_args([path], "8M", str(tmp_path / "s.sock")))
    assert "stale" in line and comp in line


def test_convert_cli_reports_and_daemon_serves_exactly_until_asked_for_lossy(synth, tmp_path):
    path = str(tmp_path / "m.gguf")
    shutil.copy(synth(**MODEL), path)
    r = subprocess.run(
        [sys.executable, "-m", "hobbit.compute.apps.cli", "convert", path, "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Q4_K experts" in r.stdout and os.path.exists(companion.companion_path(path, ggml.Q4_K))
    # not calibrated: served exactly (every expert high, none skipped; no low slots), and
    # `hobbit-cli stats` says so
    with run_daemon([path], "8M", tmp_path) as d:
        s = connect(d.socket)
        w = hello(s)
        assert set(w["models"]["m"]["regions"]) == {"high"}
        h = stats(s)["models"]["m"]["hobbit"]
        s.close(linger=0)
        out = subprocess.run(
            [sys.executable, "-m", "hobbit.compute.apps.cli", "stats", "--socket", d.socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert h["exact"] and (h["t1"], h["t2"]) == (1.0, 1.0) and not h["calibrated"], h
    assert out.returncode == 0 and "exact: high precision only (not calibrated)" in out.stdout, out
    # a lossy mode when asked for by flag: the companion's low-precision slots are used
    with run_daemon([path], "8M", tmp_path, t1=PAPER_T1, t2=PAPER_T2) as d:
        s = connect(d.socket)
        w = hello(s)
        assert set(w["models"]["m"]["regions"]) == {"high", "low"}
        h = stats(s)["models"]["m"]["hobbit"]
        s.close(linger=0)
    assert not h["exact"] and h["mode"] == "lossy: T1 0.60 T2 0.90", h
