"""hobbit-cli pull: the real huggingface_hub client against a local Hub (tests/hub_util.py),
in real processes; no network beyond 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hobbit.compute.make.pull import RemoteFile, choose, quant_label
from hobbit.compute.make.synth import SynthOptions, make_synthetic
from hobbit.protocol.errors import InputError
from hub_util import Cut, LocalHub

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
REPO = "test/Tiny-MoE-GGUF"
SPLIT = [f"Q4_K_M/Tiny-MoE-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
TOKEN = "hf_local_test_token"
HTTP_CHUNK = 10 << 20  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: what reaches the disk at once


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> tuple[bytes, bytes]:
    """Two synthetic MoE GGUFs: a small one (8 MiB) and one past a download chunk (15 MiB)."""
    d = tmp_path_factory.mktemp("ggufs")
    out = []
    for name, kw in (("small", dict(layers=1, d_model=64, d_ff=64)), ("big", dict(layers=2, d_model=128, d_ff=256))):
        make_synthetic(str(d / name), SynthOptions(experts=4, top_k=2, heads=2, kv_heads=1, **kw))
        out.append((d / name).read_bytes())
    assert len(out[1]) > HTTP_CHUNK + (2 << 20)
    return out[0], out[1]


@pytest.fixture
def hub(ggufs):
    small, big = ggufs
    third = len(small) // 3
    hub = LocalHub().start()
    hub.add(
        REPO,
        {
            "README.md": b"# a tiny MoE\n",
            "Tiny-MoE-Q8_0.gguf": small,
            "Tiny-MoE-BF16.gguf": big,
            "mmproj-Tiny-MoE-F16.gguf": b"a projector",
            SPLIT[0]: small[:third],
            SPLIT[1]: small[third : 2 * third],
            SPLIT[2]: small[2 * third :],
        },
    )
    yield hub
    hub.stop()


@pytest.fixture
def env(tmp_path, hub) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        HOBBIT_SOCKET=str(tmp_path / "no-hobbitd.sock"),
        HF_TOKEN=TOKEN,
        NO_PROXY="127.0.0.1",
        no_proxy="127.0.0.1",
    )
    return env


def models(env) -> str:
    return os.path.join(env["XDG_DATA_HOME"], "hobbit", "models")


def cli(env, *args, timeout=60):
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0 and r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_quant_is_pulled_verified_and_listed(env, hub, ggufs):
    r = cli(env, "pull", f"{REPO}:q8_0")  # the quant in any case
    assert r.returncode == 0, r.stderr
    path = os.path.join(models(env), "Tiny-MoE-Q8_0.gguf")
    assert r.stdout == path + "\n"
    assert "sha256 verified" in r.stderr and f"hobbit-cli chat {path}" in r.stderr
    assert sha(open(path, "rb").read()) == sha(ggufs[0])
    assert files_under(models(env)) == ["Tiny-MoE-Q8_0.gguf"]  # no staging left
    assert {s.authorization for s in hub.requests} == {f"Bearer {TOKEN}"}  # HF_TOKEN

    listed = cli(env, "models")
    assert listed.returncode == 0, listed.stderr
    assert "Tiny-MoE-Q8_0.gguf  8.1 MiB  E=4 K=2" in listed.stdout

    n_gets = len(hub.gets(".gguf"))
    again = cli(env, "pull", f"{REPO}:Q8_0")
    assert again.returncode == 0 and again.stdout == path + "\n" and "already pulled" in again.stderr
    assert len(hub.gets(".gguf")) == n_gets


def test_a_split_model_comes_whole_without_its_mmproj(env, hub, ggufs):
    """All parts, from a listing without LFS metadata (a mirror's): sizes and sha256 from
    each part's HEAD (X-Linked-Size, X-Linked-Etag)."""
    hub.lfs_listing = False
    r = cli(env, "pull", f"{REPO}:Q4_K_M", "--quiet")
    assert r.returncode == 0, r.stderr
    names = [os.path.basename(p) for p in SPLIT]
    assert r.stdout == os.path.join(models(env), names[0]) + "\n" and r.stderr == ""
    assert files_under(models(env)) == names
    joined = b"".join(open(os.path.join(models(env), n), "rb").read() for n in names)
    assert joined == ggufs[0]
    assert not [s for s in hub.requests if "mmproj" in s.path]
    assert [s.path.rsplit("/", 1)[1] for s in hub.requests if s.method == "HEAD"] == names
    listed = cli(env, "models").stdout  # one entry: the first part
    assert names[0] in listed and names[1] not in listed and names[2] not in listed


def test_a_dropped_connection_resumes_in_the_same_pull(env, hub, ggufs):
    hub.cut[(REPO, "Tiny-MoE-BF16.gguf")] = Cut(HTTP_CHUNK + (1 << 20), "drop")
    r = cli(env, "pull", f"{REPO}:BF16")
    assert r.returncode == 0, r.stderr
    assert [s.range for s in hub.gets("Tiny-MoE-BF16.gguf")] == [None, f"bytes={HTTP_CHUNK}-"]
    assert open(r.stdout.strip(), "rb").read() == ggufs[1]


def test_a_killed_pull_resumes_where_it_stopped(env, hub, ggufs):
    """The first pull gets one chunk and then silence, and is killed; the second asks for
    the rest only (Range) and ends with the whole file, verified."""
    hub.cut[(REPO, "Tiny-MoE-BF16.gguf")] = Cut(HTTP_CHUNK + (1 << 20), "stall")
    first = subprocess.Popen(
        [*CLI, "pull", f"{REPO}:BF16", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    staged = os.path.join(models(env), ".pull", f"{sha(ggufs[1])}.part")
    deadline = time.monotonic() + 30
    while not (os.path.exists(staged) and os.path.getsize(staged) >= HTTP_CHUNK):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert files_under(models(env)) == [os.path.join(".pull", os.path.basename(staged))]

    r = cli(env, "pull", f"{REPO}:BF16")
    assert r.returncode == 0, r.stderr
    assert [s.range for s in hub.gets("Tiny-MoE-BF16.gguf")] == [None, f"bytes={HTTP_CHUNK}-"]
    assert open(r.stdout.strip(), "rb").read() == ggufs[1]
    assert files_under(models(env)) == ["Tiny-MoE-BF16.gguf"]


def test_a_corrupted_byte_is_refused_and_nothing_stays(env, hub, ggufs):
    bad = bytearray(ggufs[0])
    bad[len(bad) // 2] ^= 0x01
    hub.serve_instead[(REPO, "Tiny-MoE-Q8_0.gguf")] = bytes(bad)
    r = cli(env, "pull", f"{REPO}:Q8_0")
    assert_one_line_error(r, "Tiny-MoE-Q8_0.gguf", "sha256")
    assert files_under(models(env)) == []


def test_an_unknown_quant_lists_the_quants_there(env, hub):
    assert_one_line_error(cli(env, "pull", f"{REPO}:Q5_K_M"), "no Q5_K_M", "BF16, Q4_K_M, Q8_0")
    assert_one_line_error(cli(env, "pull", REPO), f"{REPO}:QUANT", "BF16, Q4_K_M, Q8_0")
    assert not hub.gets(".gguf")


def test_no_such_repo_and_no_network_in_one_line(env, hub):
    assert_one_line_error(cli(env, "pull", "test/Nothing-Here"), "test/Nothing-Here", "no such model repo")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        env = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{s.getsockname()[1]}"}
        assert_one_line_error(cli(env, "pull", f"{REPO}:Q8_0"), "cannot reach", env["HF_ENDPOINT"])


def test_choice_of_files():
    """Quant labels and file choice on names as the Hub's repos write them (no server)."""
    assert quant_label("Qwen3-30B-A3B-UD-Q4_K_XL.gguf") == "UD-Q4_K_XL"
    assert quant_label("llama-2-7b.Q4_K_M.gguf") == "Q4_K_M"
    assert quant_label("BF16/Qwen3-235B-A22B-BF16-00001-of-00010.gguf") == "BF16"
    assert quant_label("gpt-oss-120b-mxfp4-00001-of-00003.gguf") == "mxfp4"
    assert quant_label("Qwen2.5-7B-Instruct.gguf") is None
    files = [
        RemoteFile(p, 1, "0" * 64)
        for p in (
            "Q4_K_M/M-Q4_K_M-00001-of-00002.gguf",
            "Q4_K_M/M-Q4_K_M-00002-of-00002.gguf",
            "M-UD-Q4_K_XL.gguf",
            "M-Q4_K.gguf",
            "mmproj-M-F16.gguf",
            "M-IQ2_XXS-00002-of-00002.gguf",
        )
    ]
    assert [p.path for p in choose("r", files, "q4_k_m", None).parts] == [files[0].path, files[1].path]
    assert choose("r", files, "Q4_K", None).parts == (files[3],)  # not Q4_K_M's
    assert choose("r", files, "Q4_K_XL", None).parts == (files[2],)  # inside UD-Q4_K_XL
    assert choose("r", files, None, files[1].path).parts == (files[0], files[1])
    with pytest.raises(InputError, match="no F16 GGUF; quants there: IQ2_XXS, Q4_K, Q4_K_M, UD-Q4_K_XL"):
        choose("r", files, "F16", None)  # the mmproj is no model
    with pytest.raises(InputError, match="split in 2 parts but the repo has parts 2"):
        choose("r", files, "IQ2_XXS", None)
