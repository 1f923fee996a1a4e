"""A served model file changed under hobbitd and its clients (issue #31, points 1 and 4):
rewritten in place with another model's experts, restored, replaced by a rename, truncated
while a client generates. Never a mixed text: either the in-process text of the file as it
is, or one line saying the file changed; never SIGBUS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from daemon_util import SlotView, call, connect, hello, release, request, run_daemon, stats
from serve_util import run_serve
from hobbit.compute.engine.weights import open_model
from hobbit.loader.gguf_file import open_gguf
from hobbit.loader.layout import gguf_experts
from hobbit.protocol import messages as m

MODEL = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
PROMPT = "The quick brown fox jumps over the lazy dog. Then"
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def generate(model, *flags, n=16) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "generate", model, "-p", PROMPT, "-n", str(n), "--temperature", "0", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )


def in_process(model) -> str:
    r = generate(model, "--no-daemon")
    assert r.returncode == 0, r.stderr
    return r.stdout


def one_line_error(r: subprocess.CompletedProcess, path: str) -> None:
    """r failed with one line naming the file (no traceback, no signal)."""
    assert r.returncode not in (0, 135, -7), (r.returncode, r.stderr)  # -7: SIGBUS
    errors = [line for line in r.stderr.splitlines() if not line.startswith("hobbit: ")]  # not the notes
    assert len(errors) == 1 and errors[0].startswith("hobbit-cli: error: ") and path in errors[0], r.stderr


def text_or_error(r: subprocess.CompletedProcess, expected: str, path: str) -> None:
    if r.returncode == 0:
        assert r.stdout == expected, "a text that is not the file's"
    else:
        one_line_error(r, path)


def expert_ranges(path: str) -> list[tuple[int, int]]:
    """(offset, nbytes) of every routed-expert tensor in the file."""
    f = open_gguf(path)
    return [(t.offset, t.nbytes) for name, t in f.tensors.items() if "_exps." in name]


def dd_experts(src: str, dst: str) -> None:
    """Copy src's expert tensors over dst's, in place (dd conv=notrunc): same size, the
    inode and the header kept."""
    for offset, n in expert_ranges(dst):
        subprocess.run(
            ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=notrunc", "status=none"]
            + ["iflag=skip_bytes,count_bytes", "oflag=seek_bytes", f"skip={offset}", f"seek={offset}", f"count={n}"],
            check=True,
            timeout=60,
        )


def cache_bytes(model, fraction):
    src = gguf_experts(open_model(model))
    return int(fraction * src.n_layer * src.n_expert * src.format.slot_bytes)


def model_file_stats(socket) -> dict:
    s = connect(socket)
    try:
        hello(s)
        return next(iter(stats(s)["models"].values()))["file"]
    finally:
        s.close(linger=0)


@pytest.fixture(scope="module")
def models(synth):
    """Two models of one layout, other weights: (a, b)."""
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    return synth(**MODEL), synth(**MODEL, seed=1)


@pytest.fixture(scope="module")
def texts(models):
    a, b = models
    ta, tb = in_process(a), in_process(b)
    assert ta != tb
    return ta, tb


def test_a_file_rewritten_in_place_is_never_mixed_and_its_restore_is_served(models, texts, tmp_path):
    """Another model's experts copied over the served file (dd conv=notrunc): the next
    generation through hobbitd is the rewritten file's in-process text (hobbitd dropped the
    cached experts and opened the file again), or one line; after the original bytes are
    copied back, the original text again."""
    a, b = models
    path = str(tmp_path / "m.gguf")
    shutil.copy(a, path)
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        r = generate(path, "--socket", d.socket)
        assert r.returncode == 0 and r.stdout == texts[0], r.stderr  # its cache warm
        dd_experts(b, path)
        rewritten = in_process(path)
        assert rewritten != texts[0]
        text_or_error(generate(path, "--socket", d.socket), rewritten, path)
        dd_experts(a, path)
        r = generate(path, "--socket", d.socket)
        assert r.returncode == 0 and r.stdout == texts[0], r.stderr
        st = model_file_stats(d.socket)
        assert st["changes"] == 2 and st["error"] is None, st
        assert "changed while served" in d.stderr


def test_a_file_renamed_over_the_served_one_gives_its_own_text(models, texts, tmp_path):
    """A new file renamed over the served path (atomic): hobbitd reads the new file, never
    the old one it had open, so a generation gives the new file's text (or one line)."""
    a, b = models
    path = str(tmp_path / "m.gguf")
    shutil.copy(a, path)
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        r = generate(path, "--socket", d.socket)
        assert r.returncode == 0 and r.stdout == texts[0], r.stderr
        shutil.copy(b, path + ".new")
        os.replace(path + ".new", path)
        text_or_error(generate(path, "--socket", d.socket), texts[1], path)
        r = generate(path, "--socket", d.socket)
        assert r.returncode == 0 and r.stdout == texts[1], r.stderr


def test_a_file_truncated_while_a_client_generates_ends_it_with_one_line(models, tmp_path):
    """The served file cut short (before its output tensor, which every forward reads from
    the client's mmap) while a client generates: the client ends with one line naming the
    file and a non-zero exit, never SIGBUS (135); hobbitd serves on and says so."""
    a, _ = models
    path = str(tmp_path / "m.gguf")
    shutil.copy(a, path)
    cut = open_gguf(path).tensors["output.weight"].offset + 4096
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        p = subprocess.Popen(
            [*CLI, "generate", path, "-p", PROMPT, "-n", "2000", "--temperature", "0", "--socket", d.socket],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        p.stdout.read(1)  # it generates
        time.sleep(0.2)
        os.truncate(path, cut)  # waits for the client's lease, where it holds one
        out, err = p.communicate(timeout=120)
        one_line_error(subprocess.CompletedProcess(p.args, p.returncode, out, err), path)
        st = model_file_stats(d.socket)
        assert st["changes"] >= 1 and "truncated" in st["error"], st


def test_a_rewritten_file_is_served_from_its_new_bytes_at_a_new_epoch(models, tmp_path):
    """The wire: after an in-place rewrite a request of the epoch the client was welcomed
    with is answered file_changed (before any slot of it), a new HELLO gets the new epoch
    and the file's new identity, and every slot then holds the new file's bytes (what was a
    hit before the rewrite too)."""
    a, b = models
    path = str(tmp_path / "m.gguf")
    shutil.copy(a, path)
    with run_daemon([path], "8M", tmp_path) as d:
        sock = connect(d.socket)
        info = hello(sock)["models"]["m"]
        assert info["epoch"] == 0 and info["file"] == [*_stat(path)]
        release(sock, "m", request(sock, "m", 0, [0, 1]))  # cached
        dd_experts(b, path)
        cmd, msg = call(sock, m.Cmd.REQUEST, id=2, model="m", layer=0, experts=[0], epoch=0)
        assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "file_changed", 2), msg
        assert path in msg["message"]
        info = hello(sock)["models"]["m"]
        assert info["epoch"] == 1 and info["file"] == [*_stat(path)]
        view = SlotView(sock.welcome, "m", path)
        try:
            for rid, (layer, experts) in enumerate([(0, [0, 1]), (3, [7])], 3):
                slots = request(sock, "m", layer, experts, rid=rid)
                for slot, e in zip(slots, experts):
                    view.check(slot, layer, e)
                release(sock, "m", slots)
        finally:
            view.close()
        sock.close(linger=0)


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def test_serve_answers_from_the_file_as_it_is_now(models, texts, tmp_path):
    """serve through hobbitd while its model file is replaced, truncated and restored: each
    answer is the in-process text of the file as it is (serve opens it again, no restart),
    a file that is no longer a model gets 503 with one line naming it, never a traceback."""
    a, b = models
    path = str(tmp_path / "m.gguf")
    shutil.copy(a, path)

    def replace(src: str) -> None:
        shutil.copy(src, path + ".new")
        os.replace(path + ".new", path)

    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        with run_serve(path, "--ctx", "256", log_path=tmp_path / "serve.log", socket=d.socket) as s:

            def answer() -> tuple[int, dict]:
                return s.complete(prompt=PROMPT, max_tokens=16, temperature=0)

            for src, text in ((a, texts[0]), (b, texts[1]), (a, texts[0])):
                replace(src)
                status, body = answer()
                assert status == 200 and body["choices"][0]["text"] == text[:-1], (body, s.log)
            os.truncate(path, os.path.getsize(path) // 2)
            status, body = answer()
            assert status == 503 and body["error"]["code"] == "model_changed", body
            assert path in body["error"]["message"] and "\n" not in body["error"]["message"], body
            replace(b)
            status, body = answer()
            assert status == 200 and body["choices"][0]["text"] == texts[1][:-1], (body, s.log)
