"""Bad input gets one clear line on stderr, a non-zero exit, and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import gguf
import pytest

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
MODEL = dict(layers=2, d_model=256, d_ff=512, experts=4, top_k=2, heads=8, kv_heads=4, type="Q8_0")


def run_cli(*args, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == ""


def _truncated(src, dst, nbytes):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(nbytes))
    return str(dst)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    assert_one_line_error(run_cli("generate", str(path), "-p", "hi"), str(path), "no such file")


def _without_root_bypass():
    """In the child (preexec_fn): as root, drop the capabilities that let root read any
    file (CAP_DAC_OVERRIDE 1, CAP_DAC_READ_SEARCH 2) from the bounding set, so the exec'd
    CLI is refused a mode-000 file as any user is (CI runs the suite as root)."""
    import ctypes

    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("command", [["generate", "--no-daemon", "-p", "hi"], ["convert"]])
def test_a_model_the_user_may_not_read(synth, tmp_path, command):
    path = tmp_path / "locked.gguf"
    shutil.copy(synth(**MODEL), path)
    path.chmod(0)
    argv = [*CLI, command[0], str(path), *command[1:]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, preexec_fn=_without_root_bypass)
    assert_one_line_error(r, str(path), "cannot read it (Permission denied)")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("hello, I am not a model\n")
    assert_one_line_error(run_cli("generate", str(path), "-p", "hi"), "not a GGUF")


@pytest.mark.parametrize("keep", [64, 2_000_000, 60_000_000])
def test_truncated_gguf(tmp_path, smollm2, keep):
    """Cut inside the header, inside the tokenizer metadata, inside the tensor data."""
    path = _truncated(smollm2, tmp_path / "cut.gguf", keep)
    assert_one_line_error(run_cli("generate", path, "-p", "hi"), path, "truncated")


def test_unsupported_architecture(tmp_path):
    path = str(tmp_path / "mamba.gguf")
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert_one_line_error(
        run_cli("generate", path, "-p", "hi"), "'mamba'", "supported: llama, qwen3moe, olmoe, qwen2moe, phimoe"
    )


def test_prompt_longer_than_context(smollm2):
    r = run_cli("generate", smollm2, "-p", "word " * 200, "--ctx", "64")
    assert_one_line_error(r, "context", "--ctx")


def test_generate_prints_only_the_continuation(smollm2):
    r = run_cli("generate", smollm2, "-p", "The capital of France is", "-n", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "The capital of France" not in r.stdout
    assert r.stderr == ""
