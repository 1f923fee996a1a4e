"""hobbitd serving high precision from a repacked image (`hobbit-cli convert --repack`,
issue #30): the client computes on the slots with ggml's repacked kernels and its own dense
weights repacked, so its logits are llama.cpp's with its repacking to the bit, per layer
(a quarter cache) and in one graph (every expert cached); a stale image is not served, a
corrupt expert is refused by its checksum."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from daemon_util import connect, hello, recv, release, request, run_daemon, send, stats
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.repack import Repacker
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model
from hobbit.loader import companion
from hobbit.loader.layout import PARTS, gguf_experts
from hobbit.protocol import messages as m

from conftest import llama_oracle
from test_cache import flip_byte

AVX2 = "avx2" in open("/proc/cpuinfo").read()
pytestmark = pytest.mark.skipif(not AVX2, reason="ggml repacks Q4_K on AVX2")

MODEL = dict(experts=8, top_k=2, heads=8, kv_heads=4, type="Q4_K", d_model=256)
PROMPT = "The old lighthouse keeper climbed the spiral stairs every evening."
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


@pytest.fixture(scope="module")
def made(synth, tmp_path_factory):
    """(model, image): the synthetic Q4_K model in a folder of its own, its repacked image
    made by the CLI next to it."""
    path = str(tmp_path_factory.mktemp("repacked") / "m.gguf")
    shutil.copy(synth(**MODEL), path)
    r = subprocess.run([*CLI, "convert", path, "--repack", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    image = companion.repacked_path(path)
    assert r.stdout.startswith(image)
    return path, image


def cache_bytes(model, fraction):
    src = gguf_experts(open_model(model))
    return int(fraction * src.n_layer * src.n_expert * src.format.slot_bytes)


def test_the_image_holds_the_experts_as_ggml_repacks_them(made):
    path, image = made
    w = open_model(path)
    high = gguf_experts(w)
    src, _ = companion.open_repacked(w, image, high)
    assert src.format.layer_repacked == ((True,) * 3,) * high.n_layer  # Q4_K everywhere
    rp = Repacker()
    with open(image, "rb") as f:
        for il, e in [(0, 0), (2, 5)]:
            f.seek(companion.slot_image_offset(src, il, e))
            slot = np.frombuffer(f.read(src.format.slot_bytes), np.uint8)
            for p, ((off, n), at) in enumerate(zip(high.ranges(il, e), src.format.offsets(il))):
                raw = np.ascontiguousarray(w.readers[0].data[off : off + n])
                mine = np.empty(n, np.uint8)
                assert rp.repack(high.format.types(il)[p], high.format.shapes[p], raw.ctypes.data, mine.ctypes.data)
                assert slot[at : at + n].tobytes() == mine.tobytes() != raw.tobytes(), PARTS[p]
    rp.free()


def _greedy(model, ref, prompt, steps=8) -> float:
    """Greedy steps of model against the llama.cpp oracle ref: the largest |difference|."""
    a = model.forward(prompt)
    ref.eval(prompt)
    worst = 0.0
    for _ in range(steps):
        r = np.array(ref.scores[ref.n_tokens - 1])
        worst = max(worst, float(np.abs(a - r).max()))
        t = int(np.argmax(r))
        a = model.forward([t])
        ref.eval([t])
    return worst


@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_through_hobbitd_the_logits_are_llama_cpp_with_repacking(made, tmp_path, fraction):
    """A quarter cache: per-layer segments on the slots; every expert cached: one graph."""
    path, _ = made
    prompt = Tokenizer(path).encode(PROMPT)
    ref = llama_oracle(path, n_ctx=256, repack=True)
    with run_daemon([path], cache_bytes(path, fraction), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        model = Model(open_model(path), RunOptions(n_ctx=256), experts=client)
        try:
            assert client.regions["high"].format.any_repacked and model.repacked  # dense too
            worst = _greedy(model, ref, prompt)
            if fraction == 1.0:
                assert client.resident() is not None  # the later steps ran in one graph
        finally:
            model.close()
            client.close()
    assert worst == 0.0


def test_without_the_image_or_with_repack_off_the_gguf_is_served(made, tmp_path):
    path, _ = made
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path, repack="off") as d:
        s = connect(d.socket)
        region = hello(s)["models"]["m"]["regions"]["high"]
        assert "layer_repacked" not in region["format"]
        s.close(linger=0)


def test_a_stale_image_is_not_served(made, tmp_path):
    """The model rewritten after convert --repack (a new mtime): one log line, the GGUF's
    experts served, and the client computes as llama.cpp --no-repack does."""
    src, image = made
    path = str(tmp_path / "m.gguf")
    shutil.copy(src, path)
    shutil.copy(image, companion.repacked_path(path))
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        s = connect(d.socket)
        region = hello(s)["models"]["m"]["regions"]["high"]
        assert "layer_repacked" not in region["format"]
        s.close(linger=0)
        assert "stale" in d.stderr and "serving the GGUF's experts" in d.stderr


def test_a_corrupt_expert_in_the_image_is_refused_by_its_checksum(made, tmp_path):
    path, mine = _served_copy(made, tmp_path)
    img, _ = companion.open_repacked(open_model(path), mine, gguf_experts(open_model(path)))
    flip_byte(mine, companion.slot_image_offset(img, 1, 2) + 1000)
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        s = connect(d.socket)
        assert "layer_repacked" in hello(s)["models"]["m"]["regions"]["high"]["format"]
        assert stats(s)["models"]["m"]["hobbit"]["repacked_image"] == mine
        send(s, m.Cmd.REQUEST, id=7, model="m", layer=1, experts=[2])
        cmd, msg = recv(s, 10)
        assert cmd == m.Cmd.ERROR and msg["code"] == "checksum" and "repacked image" in msg["message"], msg
        release(s, "m", request(s, "m", 1, [3], rid=8))  # the others are served
        s.close(linger=0)
    assert os.path.exists(mine)


def test_an_image_this_ggml_would_lay_out_otherwise_is_refused_by_the_client(made, tmp_path):
    """An image that says its parts are repacked but holds other bytes (another CPU's or
    ggml's layout; here the file's own): the client fails with one line, computing nothing."""
    from dataclasses import replace

    from hobbit.compute.make.convert import write_slots
    from hobbit.compute.progress import progress_bar
    from hobbit.protocol.errors import ModelError

    src, _ = made
    path = str(tmp_path / "m.gguf")
    shutil.copy2(src, path)
    w = open_model(path)
    high = gguf_experts(w)
    fmt = replace(high.format, layer_repacked=((True,) * 3,) * high.n_layer)

    def as_in_the_file(key):
        slot = np.zeros(fmt.slot_bytes, np.uint8)
        for (off, n), at in zip(high.ranges(*key), fmt.offsets(key[0])):
            slot[at : at + n] = w.readers[0].data[off : off + n]
        return slot

    header = {
        "kind": companion.REPACKED_KIND,
        "source": companion.source_identity(w),
        "n_layer": high.n_layer,
        "n_expert": high.n_expert,
        "format": fmt.to_wire(),
        "crc32": [[0] * high.n_expert for _ in range(high.n_layer)],
    }
    bar = progress_bar(high.total_bytes, "", enabled=False, unit="B")
    write_slots(high, fmt, header, as_in_the_file, companion.repacked_path(path), bar, 1, "repacked image")
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        try:
            with pytest.raises(ModelError, match="repacked layout this process's ggml does not compute with"):
                Model(open_model(path), RunOptions(n_ctx=256), experts=client)
        finally:
            client.close()


def test_local_experts_over_the_mmapped_image_compute_as_llama_cpp_with_repacking(made):
    """Without hobbitd: LocalExperts maps the image (no copy), the segmented forward marks
    its views and repacks the dense weights: llama.cpp-with-repack's logits to the bit."""
    from hobbit.compute.engine.experts import LocalExperts

    path, image = made
    w = open_model(path)
    model = Model(w, RunOptions(n_ctx=256), experts=LocalExperts(w, repacked=image))
    try:
        assert model.repacked
        worst = _greedy(model, llama_oracle(path, n_ctx=256, repack=True), Tokenizer(path).encode(PROMPT))
    finally:
        model.close()
    assert worst == 0.0


def test_bench_fit_has_a_row_through_hobbitd_serving_the_image(made):
    """bench fit with the image made: a fifth engine, hobbitd serving it in one graph, whose
    greedy tokens are llama.cpp's (with its repacking, the bench's llama.cpp)."""
    import json

    path, _ = made
    r = subprocess.run(
        [*CLI, "bench", "fit", path, "-n", "4", "--repeat", "1", "--prompt-tokens", "8", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    engines = json.loads(r.stdout)["engines"]
    assert list(engines) == ["llamacpp", "in_process", "resident", "per_layer", "repacked"]
    assert engines["repacked"]["tokens_match"] is True
    assert engines["repacked"]["ms_per_token"]["wait"] == 0


def _served_copy(made, tmp_path) -> tuple[str, str]:
    """The model and its image copied (mtimes kept: the image stays valid) to tmp_path."""
    src, image = made
    path = str(tmp_path / "m.gguf")
    shutil.copy2(src, path)
    shutil.copy2(image, companion.repacked_path(path))
    return path, companion.repacked_path(path)


def test_files_changed_under_hobbitd_never_serve_wrong_bytes(made, tmp_path):
    """The image damaged while served: its experts are dropped and checked again, the
    damaged one refused by its crc32; then the model rewritten (its image now stale, the
    slots' layout another): the model fails with one line rather than serve either."""
    path, mine = _served_copy(made, tmp_path)
    img, _ = companion.open_repacked(open_model(path), mine, gguf_experts(open_model(path)))
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        s = connect(d.socket)
        hello(s)
        release(s, "m", request(s, "m", 1, [2, 3], rid=1))
        flip_byte(mine, companion.slot_image_offset(img, 1, 2) + 1000)
        send(s, m.Cmd.REQUEST, id=2, model="m", layer=1, experts=[2])
        cmd, msg = recv(s, 10)
        assert cmd == m.Cmd.ERROR and msg["code"] == "checksum", msg
        release(s, "m", request(s, "m", 1, [3], rid=3))
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        send(s, m.Cmd.REQUEST, id=4, model="m", layer=1, experts=[3])
        cmd, msg = recv(s, 10)
        assert cmd == m.Cmd.ERROR and "restart hobbitd" in msg["message"], msg
        s.close(linger=0)


def test_gpt_oss_mxfp4_experts_with_biases_through_hobbitd(gpt_oss, tmp_path):
    """MXFP4 experts repacked, their F32 biases copied as they are: through hobbitd's image,
    per layer, the logits are llama.cpp's with its repacking to the bit."""
    from hobbit.compute.make.convert import convert_repacked

    path = str(tmp_path / "g.gguf")
    shutil.copy(gpt_oss("MXFP4_MOE"), path)
    image = convert_repacked(open_model(path), progress=False)
    fmt = companion.open_repacked(open_model(path), image, gguf_experts(open_model(path)))[0].format
    assert fmt.layer_repacked == ((True,) * 3 + (False,) * 3,) * fmt.n_layer
    ref = llama_oracle(path, n_ctx=256, repack=True)
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        model = Model(open_model(path), RunOptions(n_ctx=256), experts=client)
        try:
            worst = _greedy(model, ref, Tokenizer(path).encode(PROMPT))
        finally:
            model.close()
            client.close()
    assert worst == 0.0
