"""Generation through the real hobbitd: same text as in-process, shared warm cache,
concurrent clients, and a daemon SIGKILLed under a generating client (restarted or not)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from daemon_util import connect, hello, run_daemon, stats
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.engine.weights import open_model
from hobbit.loader.layout import gguf_experts

MODEL = dict(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
PROMPT = "The quick brown fox jumps over the lazy dog. Then"
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def generate(model, *flags, n=24):
    r = subprocess.run(
        [*CLI, "generate", model, "-p", PROMPT, "-n", str(n), "--temperature", "0", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def model_stats(socket) -> dict:
    s = connect(socket)
    try:
        hello(s)
        return next(iter(stats(s)["models"].values()))
    finally:
        s.close(linger=0)


def cache_bytes(model, fraction):
    src = gguf_experts(open_model(model))
    return int(fraction * src.n_layer * src.n_expert * src.format.slot_bytes)


@pytest.fixture(scope="module")
def model(synth):
    return synth(**MODEL)


@pytest.fixture(scope="module")
def reference(model):
    return generate(model, "--no-daemon")


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_generate_through_daemon_prints_what_in_process_prints(model, reference, tmp_path, fraction):
    with run_daemon([model], cache_bytes(model, fraction), tmp_path) as d:
        assert generate(model, "--socket", d.socket) == reference
        if fraction < 1:
            m = model_stats(d.socket)
            assert m["misses"] > m["regions"]["high"]["slots"], "a small cache must evict"


def test_second_process_finds_the_experts_warm(model, reference, tmp_path):
    with run_daemon([model], cache_bytes(model, 1.0), tmp_path) as d:
        generate(model, "--socket", d.socket)
        before = model_stats(d.socket)
        assert generate(model, "--socket", d.socket) == reference
        after = model_stats(d.socket)
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    assert hits / (hits + misses) >= 0.9, (hits, misses)


def test_four_clients_at_once_all_correct(model, reference, tmp_path):
    with run_daemon([model], cache_bytes(model, 0.5), tmp_path) as d:
        procs = [
            subprocess.Popen(
                [*CLI, "generate", model, "-p", PROMPT, "-n", "24", "--temperature", "0", "--socket", d.socket],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out == reference


def test_a_model_that_fits_the_cache_is_read_whole_at_start(model, tmp_path):
    """hobbitd reads every expert of a model its cache holds whole as it starts (behind
    any client's reads, uncounted), so a client's first requests hit; --no-preload reads
    only what is asked for."""
    src = gguf_experts(open_model(model))
    total = src.n_layer * src.n_expert
    for sub in ("preload", "on-request"):
        (tmp_path / sub).mkdir()
    with run_daemon([model], cache_bytes(model, 1.0), tmp_path / "preload") as d:
        deadline = time.monotonic() + 30
        while (m := model_stats(d.socket))["regions"]["high"]["ready"] < total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m["holds_all"] and m["regions"]["high"]["ready"] == total, m
        assert m["bytes_read"] >= src.total_bytes, m
        assert (m["requested"], m["misses"]) == (0, 0), m
        assert f"reading its {total} experts, which fit the cache" in d.stderr
        generate(model, "--socket", d.socket, n=4)
        m = model_stats(d.socket)
        assert m["misses"] == 0 and m["hits"] > 0, m
    with run_daemon([model], cache_bytes(model, 1.0), tmp_path / "on-request", no_preload=True) as d:
        time.sleep(0.5)
        m = model_stats(d.socket)
        assert m["regions"]["high"]["ready"] == 0 and m["bytes_read"] == 0, m


def test_every_expert_cached_runs_one_graph_per_forward(model, tmp_path):
    """A cache that holds every expert (not read ahead: --no-preload): hobbitd reads them
    all at the first ask and pins them for the client, which then computes each forward in
    one graph with no request: the in-process logits to the bit, USED notes for the counts
    (one-token forwards summed)."""
    import numpy as np

    from hobbit.compute.engine.model import Model, RunOptions

    w = open_model(model)
    a = w.args
    with run_daemon([model], cache_bytes(model, 1.0), tmp_path, no_preload=True) as d:
        client = ExpertClient(d.socket, model)
        ours = Model(w, RunOptions(n_ctx=128), experts=client)
        ref = Model(open_model(model), RunOptions(n_ctx=128))
        try:
            assert set(client.regions) == {"high"}  # nothing is evicted: no low copies
            token, trips = [1, 5, 9, 13], []
            for _ in range(12):
                p, q = ours.forward(token), ref.forward(token)
                np.testing.assert_array_equal(p, q)
                token = [int(np.argmax(q))]
                trips.append(client.round_trips)
                if client.resident() is None:  # still reading: try again
                    continue
            stats = client.stats()  # also sends the one-token forwards summed so far
            m = next(iter(stats["models"].values()))
            session = next(s for s in stats["sessions"] if s["pid"] == os.getpid())
        finally:
            ours.close()
            ref.close()
            client.close()
    # each of the 11 decode steps counted once, whether reported alone or summed (USED)
    assert (session["prompt_tokens"], session["tokens"]) == (4, 11), session
    assert m["holds_all"] and m["misses"] == a.n_layer * a.n_expert and m["skipped"] == 0
    first = next(i for i, t in enumerate(trips) if i and t == trips[i - 1])
    assert trips[first:] == [trips[first]] * (len(trips) - first), trips  # no more asks
    assert first < 6, trips
    assert m["regions"]["high"]["pinned"] == a.n_layer * a.n_expert
    # every forward's expert uses count as hits: 4 prompt tokens, then one per step
    assert m["hits"] + m["misses"] + m["waits"] >= (4 + 11) * a.n_layer * a.n_expert_used


def test_a_cached_layer_costs_no_message(model, tmp_path):
    """The per-layer path (resident off) once the experts are cached: each layer's experts
    are found in the control block's directory and pinned by the client itself, so a
    forward sends at most one message (the HITS report) and waits for none; the logits are
    the in-process ones to the bit and hobbitd counts every use as a hit."""
    import numpy as np

    from hobbit.compute.engine.model import Model, RunOptions

    w = open_model(model)
    a = w.args
    with run_daemon([model], cache_bytes(model, 1.0), tmp_path) as d:
        client = ExpertClient(d.socket, model)
        ours = Model(w, RunOptions(n_ctx=128, resident=False), experts=client)
        ref = Model(open_model(model), RunOptions(n_ctx=128))
        try:
            for layer in range(a.n_layer):  # warm: read every expert
                client.release(client.request(layer, list(range(a.n_expert))))
            before = client.stats()
            trips, local = client.round_trips, client.local_hits
            token = [1, 5, 9, 13]
            for _ in range(8):
                p, q = ours.forward(token), ref.forward(token)
                np.testing.assert_array_equal(p, q)
                token = [int(np.argmax(q))]
            trips, local = client.round_trips - trips, client.local_hits - local
            after = client.stats()
        finally:
            ours.close()
            ref.close()
            client.close()
    m0, m1 = (next(iter(s["models"].values())) for s in (before, after))
    assert trips == 0, "a forward on cached experts asked hobbitd for them"
    assert local == 8 * a.n_layer
    # each forward's distinct experts per layer count once: at least top-k per layer
    assert m1["hits"] - m0["hits"] == m1["requested"] - m0["requested"] >= 8 * a.n_layer * a.n_expert_used
    assert m1["misses"] == m0["misses"]
    assert m1["regions"]["high"]["pinned"] == 0  # every pin released after use


def _generate_through_a_crash(model, tmp_path, deadline, restart, fraction=1.0):
    """`hobbit-cli generate` through a hobbitd started here (with `fraction` of the experts'
    slots), frozen (SIGSTOP) once it printed its first text, its hobbitd SIGKILLed, then let
    go again; with `restart` a new hobbitd is started on the same socket. (returncode,
    stdout, stderr, seconds from the kill to the client's exit)."""
    size = cache_bytes(model, fraction)
    with run_daemon([model], size, tmp_path) as d:
        cli = subprocess.Popen(
            [
                *CLI,
                "generate",
                model,
                "-p",
                PROMPT,
                "-n",
                "24",
                "--temperature",
                "0",
                "--socket",
                d.socket,
                "--reconnect-deadline",
                str(deadline),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            first = os.read(cli.stdout.fileno(), 1)  # mid-generation from here on (unbuffered)
            cli.send_signal(signal.SIGSTOP)
            d.proc.kill()
            d.proc.wait()
            t0 = time.monotonic()
            cli.send_signal(signal.SIGCONT)
            if restart:
                with run_daemon([model], size, tmp_path):
                    out, err = cli.communicate(timeout=120)
            else:
                out, err = cli.communicate(timeout=120)
            return cli.returncode, (first + out).decode(), err.decode(), time.monotonic() - t0
        finally:
            cli.kill()
            d.died()


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_generate_survives_a_daemon_sigkill_and_restart(model, reference, tmp_path, fraction):
    """SIGKILL hobbitd mid-generation, a new one on the same socket: the client remaps,
    re-pins (every expert cached: the one-graph path) or asks again for the layer it waited
    on (a quarter cached: per layer), and prints the uninterrupted text."""
    rc, out, err, _ = _generate_through_a_crash(model, tmp_path, 60, restart=True, fraction=fraction)
    assert rc == 0, err
    assert out == reference
    assert "lost hobbitd" in err and "reconnected to hobbitd" in err


def test_generate_exits_when_no_daemon_comes_back(model, tmp_path):
    """No new hobbitd within the deadline: one line on stderr and a non-zero exit, in time."""
    rc, out, err, took = _generate_through_a_crash(model, tmp_path, 2, restart=False)
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hobbit-cli: error: hobbitd at ") and "is gone" in last, err
    assert "Traceback" not in err
    assert took < 2 + 3, took


def test_a_client_started_while_its_daemon_restarts_waits_for_it(model, reference, tmp_path):
    """hobbitd SIGKILLed (its socket file left behind) and restarted a moment later, as
    systemd does: a `generate` started in between waits for the new one (up to its
    reconnect deadline) instead of failing, and prints the usual text."""
    size = cache_bytes(model, 0.25)
    with run_daemon([model], size, tmp_path) as d:
        d.proc.kill()
        d.proc.wait()
        assert os.path.exists(d.socket)
        cli = subprocess.Popen(
            [
                *CLI,
                "generate",
                model,
                "-p",
                PROMPT,
                "-n",
                "24",
                "--temperature",
                "0",
                "--socket",
                d.socket,
                "--reconnect-deadline",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            waiting = cli.stderr.readline()  # once it found nobody at the socket
            assert "waiting up to 60 s" in waiting, waiting + cli.communicate()[1]
            time.sleep(0.5)
            assert cli.poll() is None
            with run_daemon([model], size, tmp_path):
                out, err = cli.communicate(timeout=120)
        finally:
            cli.kill()
            d.died()
    assert cli.returncode == 0, err
    assert out == reference


def test_models_lists_what_the_running_daemon_serves(model, tmp_path):
    """`hobbit-cli models` asks the hobbitd at the socket what it serves (and says so when
    none runs there)."""
    import json

    with run_daemon([model], cache_bytes(model, 0.25), tmp_path) as d:
        r = subprocess.run([*CLI, "models", "--socket", d.socket, "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        served = json.loads(r.stdout)["served"]
        assert [m["path"] for m in served.values()] == [os.path.realpath(model)]
        assert "exact" in next(iter(served.values()))["mode"]
    r = subprocess.run([*CLI, "models", "--socket", d.socket], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "not running" in r.stdout.splitlines()[0], r.stdout + r.stderr


def test_a_daemon_with_model_folders_opens_a_model_asked_for_by_path(model, reference, synth, tmp_path):
    """Models on demand: hobbitd started with one model and a model folder serves a second
    model from the folder when a client asks for it by path (text equal to in-process),
    its share of the cache taken from the first (which still answers right); a file outside
    the folder, also through a symlink inside it, is refused with one line."""
    import json
    import shutil

    folder, outside = tmp_path / "models", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    other = str(folder / "other.gguf")
    shutil.copy(synth(**{**MODEL, "seed": 1}), other)
    stray = str(outside / "stray.gguf")
    shutil.copy(model, stray)
    os.symlink(stray, folder / "link.gguf")
    want = generate(other, "--no-daemon")
    assert want != reference
    with run_daemon([model], cache_bytes(model, 0.5), tmp_path, flags=["--model-dir", str(folder)]) as d:
        r = subprocess.run([*CLI, "models", "--socket", d.socket, "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(r.stdout)["can_open"] == [os.path.realpath(other)], r.stdout
        first = model_stats(d.socket)["regions"]["high"]["slots"]
        assert generate(model, "--socket", d.socket) == reference  # its slots filled
        s = connect(d.socket)
        segment = os.path.join("/dev/shm", hello(s)["shm"])
        held = os.stat(segment).st_blocks
        assert generate(other, "--socket", d.socket) == want
        served = stats(s)["models"]
        s.close(linger=0)
        assert os.stat(segment).st_blocks < held  # the slots given up went back to the system
        assert sorted(ms["path"] for ms in served.values()) == sorted(map(os.path.realpath, [model, other]))
        mine = next(ms for ms in served.values() if ms["path"] == os.path.realpath(model))
        assert mine["regions"]["high"]["slots"] < first  # its share went to the other
        assert generate(model, "--socket", d.socket) == reference
        assert "opened " + os.path.realpath(other) in d.stderr
        for path in (str(folder / "link.gguf"), stray):
            r = subprocess.run(
                [*CLI, "generate", path, "-p", PROMPT, "-n", "4", "--socket", d.socket],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode != 0 and r.stdout == "", r.stdout
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "not one of hobbitd's models nor inside its model folders" in r.stderr, r.stderr


def _resident_share(path: str, ranges) -> float:
    """The share of the pages of `ranges` [(offset, nbytes)] of file `path` in the page
    cache (mincore)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, np.uint8)
        failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
        del view
    if failed:
        raise OSError(ctypes.get_errno(), "mincore")
    pages = [p for off, n in ranges for p in range(off // mmap.PAGESIZE, -(-(off + n) // mmap.PAGESIZE))]
    return sum(vec[p] & 1 for p in pages) / len(pages)


def test_a_client_reads_ahead_the_weights_it_computes_with(model, tmp_path):
    """A Model whose experts come from hobbitd asks the kernel at once to read the tensors it
    reads itself (attention, routers, embeddings, output) into the page cache, and not the
    routed experts, which it never reads from the file: a first prompt on a cold page cache
    finds them in memory instead of faulting them in from flash a few pages at a time."""
    import shutil

    from hobbit.compute.engine.model import Model, RunOptions

    path = str(tmp_path / "m.gguf")
    shutil.copy(model, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages can be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    w = open_model(path)
    experts = [(t.offset, t.nbytes) for n, t in w.tensors.items() if "_exps." in n]
    own = [(t.offset, t.nbytes) for n, t in w.tensors.items() if "_exps." not in n]
    with run_daemon([path], cache_bytes(path, 1.0), tmp_path) as d:
        # the page cache was dropped (reading the header read ahead into the first tensor)
        assert _resident_share(path, own) < 0.9
        client = ExpertClient(d.socket, path)
        Model(w, RunOptions(n_ctx=64), experts=client)
        deadline = time.monotonic() + 10
        while _resident_share(path, own) < 0.99 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _resident_share(path, own) >= 0.99
        assert _resident_share(path, experts) < 0.5
        client.close()
