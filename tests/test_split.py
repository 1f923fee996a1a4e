"""Split GGUFs (llama.cpp's gguf-split): a model in 3 parts, opened by its first part, gives
llama.cpp's tokens and logits in-process and through hobbitd; convert, calibration and the
model folders take it; a missing or wrong part is one line naming the file."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from daemon_util import daemon_args, run_daemon
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.split import parse_split_size, split_gguf
from hobbit.hobbitd.model_dirs import allowed_model, listed_models
from hobbit.loader.companion import open_companion
from hobbit.loader.gguf_file import open_gguf
from hobbit.loader.gguf_reader import GGUFHeaderReader
from hobbit.loader.gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS
from hobbit.loader.layout import PARTS, gguf_experts
from hobbit.protocol.errors import InputError, ModelError, RequestError
from test_archs import expert_cache_bytes
from test_daemon_lifecycle import run_failing
from test_parity import assert_parity

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
MODEL = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
SPLIT_KEYS = [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS]


def test_the_split_keys_are_gguf_py_s():
    import gguf

    split = gguf.Keys.Split
    assert SPLIT_KEYS == [split.LLM_KV_SPLIT_NO, split.LLM_KV_SPLIT_COUNT, split.LLM_KV_SPLIT_TENSORS_COUNT]


def three_parts(source: str, prefix: str) -> list[str]:
    """`source` split by gguf-split's rule in 3 parts, the first ending right after a layer's
    gate experts, so that layer's expert parts lie in two files."""
    f = open_gguf(source)
    size = 0
    for name, t in f.tensors.items():
        size += -(-t.nbytes // 32) * 32
        if name.endswith("ffn_gate_exps.weight"):
            paths = split_gguf(source, prefix, size)
            if len(paths) == 3:
                return paths
            for p in paths:
                os.remove(p)
    raise AssertionError("no 3-part split of the test model")


@pytest.fixture(scope="module")
def parts(synth, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("split")
    return three_parts(synth(**MODEL), str(folder / "moe"))


def linked(parts: list[str], folder) -> list[str]:
    """The parts hard-linked into `folder` (names kept): a private copy to break."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for p in parts:
        dst = os.path.join(folder, os.path.basename(p))
        os.link(p, dst)
        out.append(dst)
    return out


def test_parts_are_written_as_gguf_split_writes_them(synth, parts):
    """Named PREFIX-0000i-of-00003.gguf; the first part holds every metadata key, then the
    split keys; the others only the split keys; tensors in the source's order; an expert's
    gate and up/down in different files, as gguf-split cuts between any two tensors."""
    source = open_gguf(synth(**MODEL))
    assert [os.path.basename(p) for p in parts] == [f"moe-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    readers = [GGUFHeaderReader(p) for p in parts]
    meta = [k for k in source.reader.fields if not k.startswith("GGUF.")]
    assert [k for k in readers[0].fields if not k.startswith("GGUF.")] == meta + SPLIT_KEYS
    for i, r in enumerate(readers):
        if i:
            assert [k for k in r.fields if not k.startswith("GGUF.")] == SPLIT_KEYS
        assert [r.fields[k].contents() for k in SPLIT_KEYS] == [i, 3, len(source.tensors)]
    assert [t.name for r in readers for t in r.tensors] == list(source.tensors)
    f = open_gguf(parts[0])
    assert f.paths == tuple(parts)
    src = gguf_experts(f)
    assert any(len(set(src.part_file[layer][: len(PARTS)])) > 1 for layer in range(src.n_layer))
    for name in source.tensors:  # the same bytes, wherever they are
        assert bytes(f.data(name)) == bytes(source.data(name))


def test_in_process_matches_llama_cpp(parts):
    """llama.cpp opens the split model by its first part, and so do we."""
    assert_parity(parts[0], n_decode=16)


def test_hobbitd_opens_it_on_demand_from_a_folder_and_matches_llama_cpp(parts, tmp_path):
    """A model folder holding the 3 parts: `hobbit-cli models` and hobbitd list the model
    once, by its first part; hobbitd opens it when a client asks for it by that path and,
    caching a quarter of its expert bytes, gives llama.cpp's tokens and logits."""
    folder = tmp_path / "data" / "hobbit" / "models"
    mine = linked(parts, folder)
    assert listed_models([str(folder)]) == [mine[0]]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    with run_daemon([], expert_cache_bytes(mine[0], 0.25), tmp_path, flags=["--model-dir", str(folder)]) as d:
        r = subprocess.run([*CLI, "models", "--socket", d.socket, "--json"], capture_output=True, text=True, env=env)
        listing = json.loads(r.stdout)
        assert listing["can_open"] == [mine[0]], listing
        assert [m["path"] for m in listing["models"]] == [mine[0]], listing
        assert listing["models"][0]["bytes"] == sum(os.path.getsize(p) for p in mine)
        client = ExpertClient(d.socket, mine[0])
        try:
            assert set(client.regions) == {"high"}
            assert_parity(mine[0], experts=client, n_decode=16)
            m = next(iter(client.stats()["models"].values()))
        finally:
            client.close()
        assert m["misses"] > m["regions"]["high"]["slots"], "a quarter cache must evict"
        assert m["misses_low"] == 0 and m["skipped"] == 0


def test_convert_and_calibrate_take_it_and_hobbitd_serves_them(synth, parts, tmp_path):
    """`convert` makes one companion for the whole model (named after its first part), whose
    every expert is the one converted from the unsplit file; `calibrate` tunes the model,
    and hobbitd serves it with both and the calibration."""
    mine = linked(parts, tmp_path / "m")
    whole = linked([synth(**MODEL)], tmp_path / "whole")[0]
    for path in (mine[0], whole):
        r = subprocess.run([*CLI, "convert", path, "--low", "Q4_K", "-q"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    made = glob.glob(str(tmp_path / "m" / "*.hobbit"))
    assert [os.path.basename(p) for p in made] == [f"{os.path.basename(mine[0])}.q4_k.hobbit"]
    low, crcs = open_companion(open_gguf(mine[0]), made[0])
    assert crcs == open_companion(open_gguf(whole), whole + ".q4_k.hobbit")[1]  # image by image
    text = tmp_path / "calib.txt"
    text.write_text("The river flows through the valley and the old mill turns slowly. " * 20)
    r = subprocess.run(
        [*CLI, "calibrate", mine[0], "--text", str(text), "--tokens", "64", "--kld", "1", "--low", "Q4_K", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    calib = json.loads(r.stdout)
    assert calib["companion"] == os.path.basename(made[0])
    with run_daemon([mine[0]], expert_cache_bytes(mine[0], 0.25), tmp_path) as d:
        client = ExpertClient(d.socket, mine[0])
        try:
            assert "low" in client.regions
            st = next(iter(client.stats()["models"].values()))["hobbit"]
        finally:
            client.close()
    assert st["calibrated"] and (st["t1"], st["t2"]) == (calib["t1"], calib["t2"]), st


def one_line(e: ModelError) -> str:
    text = str(e)
    assert "\n" not in text
    return text


def test_a_missing_or_wrong_part_is_one_line_naming_the_file(parts, tmp_path):
    mine = linked(parts, tmp_path / "m")
    # opened by a later part: refused, naming the first part
    with pytest.raises(ModelError) as e:
        open_model(mine[1])
    assert one_line(e.value).startswith(f"{mine[1]}: part 2 of 3 of a split model") and mine[0] in str(e.value)
    # a wrong part: the second in the third's place
    os.remove(mine[2])
    os.link(parts[1], mine[2])
    with pytest.raises(ModelError) as e:
        open_model(mine[0])
    assert one_line(e.value).startswith(f"{mine[2]}: part 3 of 3 of ") and "says it is part 2 of 3" in str(e.value)
    # a missing part: the engine, the CLI and hobbitd each say so in one line
    os.remove(mine[2])
    with pytest.raises(ModelError) as e:
        open_model(mine[0])
    assert one_line(e.value) == f"{mine[2]}: part 3 of 3 of {os.path.basename(mine[0])}: no such file"
    r = subprocess.run(
        [*CLI, "generate", mine[0], "--no-daemon", "-p", "Hi", "-n", "1"], capture_output=True, text=True
    )
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"hobbit-cli: error: {e.value}"], r.stderr
    line = run_failing(daemon_args([mine[0]], "4M", str(tmp_path / "d.sock")))
    assert line == f"hobbitd: error: {e.value}"


def test_a_split_written_by_gguf_py_opens_and_matches_llama_cpp(synth, tmp_path):
    """Another writer's parts (gguf-py's GGUFWriter with split_max_size, which counts
    unpadded sizes) open by their first part too: the reader follows the keys, not our
    writer's habits."""
    import gguf
    import numpy as np

    from hobbit.compute.make.gguf_writer import copied_fields

    src = open_gguf(synth(**MODEL))
    w = gguf.GGUFWriter(tmp_path / "g.gguf", src.arch, split_max_size=16 * 10**6)
    for key, value, vtype, sub in copied_fields(
        src.reader, lambda k: not k.startswith("GGUF.") and k != "general.architecture"
    ):
        w.add_key_value(key, value, vtype, sub)
    for name, t in src.tensors.items():
        rows = int(np.prod(t.shape[1:]))
        data = np.asarray(src.data(name)).reshape(*t.shape[1:][::-1], t.nbytes // rows)  # bytes, numpy order
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(t.type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    first = str(tmp_path / "g-00001-of-00003.gguf")
    assert open_gguf(first).paths == tuple(str(tmp_path / f"g-0000{i}-of-00003.gguf") for i in (1, 2, 3))
    assert_parity(first, n_decode=8)


def test_synth_writes_a_split_model_from_the_command_line(tmp_path):
    """`hobbit-cli synth OUT --split-max-size SIZE`: the parts beside OUT, named as
    gguf-split names them, the first part printed, nothing else left; a size smaller than
    the first tensor is refused in one line, as gguf-split refuses it."""
    out = tmp_path / "t.gguf"
    flags = ["--layers", "2", "--d-model", "128", "--d-ff", "256", "--heads", "4", "--kv-heads", "2"]
    r = subprocess.run([*CLI, "synth", str(out), *flags, "--split-max-size", "7M"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = [f"t-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert sorted(os.listdir(tmp_path)) == names
    assert r.stdout.startswith(f"{tmp_path / names[0]}: ") and "in 3 parts" in r.stdout, r.stdout
    assert len(open_gguf(str(tmp_path / names[0])).paths) == 3
    r = subprocess.run(
        [*CLI, "synth", str(tmp_path / "u.gguf"), *flags, "--split-max-size", "1M"], capture_output=True, text=True
    )
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "no tensor" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == names


@pytest.mark.parametrize("text, n", [("7M", 7 * 10**6), ("2g", 2 * 10**9), ("4096", 4096)])
def test_split_sizes_count_as_gguf_split_counts(text, n):
    assert parse_split_size(text) == n


@pytest.mark.parametrize("text", ["", "0", "1.5G", "3T", "M"])
def test_a_bad_split_size_is_refused(text):
    with pytest.raises(InputError):
        parse_split_size(text)


def test_a_part_linked_from_outside_the_model_folder_is_not_served(parts, tmp_path):
    """hobbitd reads every part of a model a client asks for, so each must be inside its
    model folders, as the first part must (a link inside leading out does not count)."""
    folder = tmp_path / "models"
    mine = linked(parts[:2], folder)
    assert allowed_model(mine[0], [], [str(folder)]) == mine[0]  # a missing part: open_gguf says so
    os.symlink(parts[2], folder / os.path.basename(parts[2]))
    with pytest.raises(RequestError) as e:
        allowed_model(mine[0], [], [str(folder)])
    assert e.value.code == "not_allowed" and f"its part {parts[2]} is outside" in str(e.value)
