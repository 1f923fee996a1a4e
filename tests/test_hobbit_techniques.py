"""HOBBIT's three techniques, each on its own: the precision rule at its thresholds, the
adaptive prefetch walk (against the real daemon), the cache policy's order and its reset
per sequence."""

from __future__ import annotations

import numpy as np
import pytest

from hobbit.loader.layout import PAGE
from hobbit.loader.policy import HobbitPolicy, LRUPolicy, PolicyWeights
from hobbit.loader.pool import Region
from hobbit.loader.precision import HIGH, LOW, PAPER_T1, PAPER_T2, SKIP, Thresholds, unimportance


# ---- token-level dynamic loading ----------------------------------------------------------


def test_unimportance_is_the_weight_mass_ranked_above():
    s = unimportance(np.array([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]]))
    np.testing.assert_allclose(s, [[0.0, 0.5, 0.8], [0.0, 0.9, 1.0]])


@pytest.mark.parametrize(
    "score,expected",
    [
        (0.0, HIGH),
        (0.6, HIGH),  # s <= T1: high (the boundary is inclusive)
        (0.6000001, LOW),
        (0.9, LOW),  # T1 < s <= T2: low
        (0.9000001, SKIP),
        (1.0, SKIP),  # s > T2: skipped
    ],
)
def test_miss_precision_at_the_thresholds(score, expected):
    assert Thresholds(0.6, 0.9).on_miss(score) == expected


def test_hits_are_used_as_they_are():
    th = Thresholds(0.6, 0.9)
    assert th.choose(0.0, cached_high=False, cached_low=True) == (LOW, False)  # important, low hit
    assert th.choose(0.8, cached_high=True, cached_low=False) == (HIGH, False)  # unimportant, high hit
    assert th.choose(0.95, cached_high=False, cached_low=True) == (SKIP, False)  # beyond T2: skipped
    assert th.choose(0.0, False, False) == (HIGH, True)


@pytest.mark.parametrize("score", [0.0, 0.5, 0.95, 0.999999, 1.0])
def test_default_thresholds_are_exact(score):
    """Until a model is calibrated (or the user asks for T1/T2): every expert high, none
    skipped, a low copy never used."""
    th = Thresholds()
    assert th.exact and th.on_miss(score) == HIGH
    assert th.choose(score, cached_high=False, cached_low=True) == (HIGH, True)
    assert th.describe(calibrated=False) == "exact: high precision only (not calibrated)"
    assert not Thresholds(PAPER_T1, PAPER_T2).exact


def test_switches_give_the_baselines():
    assert Thresholds(dynamic=False).on_miss(0.99) == HIGH
    assert Thresholds(low_only=True).choose(0.0, True, False) == (LOW, True)


# ---- sequence-level multidimensional cache -------------------------------------------------


class _Fmt:
    slot_bytes = PAGE


def _region(n):
    return Region("m", HIGH, _Fmt, 0, n)


def _use(region, policy, key, sid=1, high=True):
    slot = region.lookup(key) or region.take(key, policy)
    slot.state = "ready"
    policy.touch(slot, sid, high)
    return slot


def test_priority_order_follows_frequency_and_high_precision_use():
    pol = HobbitPolicy(n_layer=4, weights=PolicyWeights(lru=0, lfu=0.5, lhu=0.5, fld=0))
    r = _region(3)
    pol.begin(1, seq=0, token=1, layer=0)
    for _ in range(3):
        _use(r, pol, (0, 1))  # frequent, high precision
    _use(r, pol, (0, 2), high=False)  # once, low importance
    _use(r, pol, (0, 3))  # once, high
    pol.begin(1, 0, token=4, layer=0)
    victim = pol.victim([s for s in r.slots])
    assert victim.key == (0, 2)
    assert pol.priority(r.lookup((0, 1))) > pol.priority(r.lookup((0, 3))) > pol.priority(victim)


def test_layer_distance_keeps_the_next_layers_experts():
    pol = HobbitPolicy(n_layer=4, weights=PolicyWeights(0, 0, 0, 1))
    r = _region(4)
    pol.begin(1, 0, token=1, layer=0)
    for layer in range(4):
        _use(r, pol, (layer, 0))
    pol.begin(1, 0, token=1, layer=2)  # the client is at layer 2
    order = sorted(r.slots, key=pol.priority)
    assert [s.key[0] for s in order] == [2, 1, 0, 3]  # layer 3 is needed next, 2 last


def test_counters_reset_on_a_new_sequence():
    pol = HobbitPolicy(n_layer=2, weights=PolicyWeights(0, 1, 0, 0))
    r = _region(2)
    pol.begin(1, seq=0, token=1, layer=0)
    a = _use(r, pol, (0, 0))
    for _ in range(5):
        _use(r, pol, (0, 0))
    assert pol.priority(a) > 0
    pol.begin(1, seq=1, token=1, layer=0)  # a new sequence: the old counts are gone
    assert pol.priority(a) == 0
    b = _use(r, pol, (0, 1))
    assert pol.victim(r.slots) is a and pol.priority(b) > 0


def test_a_slot_valuable_to_any_client_is_kept():
    pol = HobbitPolicy(n_layer=2, weights=PolicyWeights(0, 1, 0, 0))
    r = _region(2)
    pol.begin(1, 0, token=2, layer=0)
    pol.begin(2, 0, token=2, layer=0)
    a = _use(r, pol, (0, 0), sid=1)
    _use(r, pol, (0, 0), sid=1)
    b = _use(r, pol, (0, 1), sid=2)
    assert pol.victim(r.slots) is b  # client 1 uses `a` twice, client 2 `b` once
    assert pol.priority(a) == 1.0


def test_lru_evicts_the_least_recently_used():
    pol = LRUPolicy()
    r = _region(3)
    for e in (0, 1, 2):
        _use(r, pol, (0, e))
    _use(r, pol, (0, 0))
    assert pol.victim(r.slots).key == (0, 1)


def test_pinned_and_loading_slots_are_never_victims_protected_ones_only_for_a_demand():
    r = _region(3)
    pol = LRUPolicy()
    a, b, c = (_use(r, pol, (0, e)) for e in range(3))
    a.pins[7] += 1
    b.protected = True
    c.state = "loading"
    assert r.take((1, 0), pol, demand=False) is None  # a prefetch never displaces a hint's
    assert r.take((1, 0), pol) is b  # a demand does: a guess never blocks it
    assert not b.protected and r.lookup((0, 1)) is None
    assert r.take((1, 1), pol) is None  # pinned and loading: never


# ---- layer-level adaptive prefetch (the real daemon) ---------------------------------------


def test_prefetch_walks_to_the_first_predicted_miss(synth, tmp_path):
    import os
    import time

    from daemon_util import connect, hello, release, request, run_daemon, send, stats
    from hobbit.protocol import messages as m

    path = synth(layers=4, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
    with run_daemon([path], "16M", tmp_path, no_preload=True) as d:  # only what is asked is read
        s = connect(d.socket)
        hello(s)
        name = os.path.basename(path)[: -len(".gguf")]
        release(s, name, request(s, name, 1, [0, 1]))  # layer 1: cached
        send(
            s,
            m.Cmd.HINT,
            model=name,
            layer=0,
            layers=[1, 2, 3],
            experts=[[0, 1], [2, 3], [4, 5]],
            scores=[[0.0, 0.4], [0.0, 0.4], [0.0, 0.4]],
        )
        for _ in range(50):
            st = stats(s)["models"][name]
            if st["prefetched"] == 2 and st["regions"]["high"]["loading"] == 0:
                break
            time.sleep(0.1)
        assert st["prefetched"] == 2, st  # layer 2's two experts, and not layer 3's
        before = st["hits"]
        release(s, name, request(s, name, 2, [2, 3], rid=2))
        st = stats(s)["models"][name]
        assert st["hits"] - before == 2 and st["prefetch_used"] == 2
        misses = st["misses"]
        release(s, name, request(s, name, 3, [4, 5], rid=3))
        assert stats(s)["models"][name]["misses"] == misses + 2  # the walk stopped before 3
        s.close(linger=0)


@pytest.mark.parametrize("budget, compute_s", [(True, None), (False, None), (True, 10.0)])
def test_prefetch_reads_only_what_flash_delivers_while_the_client_computes(synth, tmp_path, budget, compute_s):
    """A client that asks for its next layer at once leaves no compute time to hide reads
    in: of eight predicted misses (1.7 MB each) only the most important few are prefetched,
    at least one; with the budget off, all eight; and all eight when the hint says a long
    compute comes first (a prompt's next layer: its pauses are not measured as compute)."""
    import os
    import time

    from daemon_util import connect, hello, release, request, run_daemon, send, stats
    from hobbit.protocol import messages as m

    path = synth(layers=4, d_model=512, d_ff=1024, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")
    flags = {} if budget else {"no_prefetch_budget": True}
    with run_daemon([path], "60M", tmp_path, no_preload=True, **flags) as d:
        s = connect(d.socket)
        hello(s)
        name = os.path.basename(path)[: -len(".gguf")]
        release(s, name, request(s, name, 0, [0, 1]))  # misses: the read rate
        release(s, name, request(s, name, 1, [0, 1], rid=2))  # at once: no compute time
        timed = {} if compute_s is None else {"compute_s": compute_s}
        send(s, m.Cmd.HINT, model=name, layer=1, layers=[2], experts=[list(range(8))], scores=[[0.0] * 8], **timed)
        for _ in range(100):
            st = stats(s)["models"][name]
            if st["prefetched"] and st["regions"]["high"]["loading"] == 0:
                break
            time.sleep(0.05)
        if budget and compute_s is None:
            assert 1 <= st["prefetched"] < 8, st
        else:
            assert st["prefetched"] == 8, st
        s.close(linger=0)


# ---- calibration ------------------------------------------------------------------------------


def test_calibration_respects_the_kld_bound_and_hobbitd_uses_it(synth, tmp_path):
    """calibrate picks the cheapest thresholds within the KLD bound (all-high is always
    allowed), saves them beside the companion, and hobbitd serves with them."""
    import glob
    import json
    import os
    import subprocess
    import sys

    from daemon_util import connect, hello, run_daemon, stats

    from hobbit.compute.make.calibrate import BLIND_FLATNESS
    from hobbit.compute.measure.bench_ablation import BLIND_LABEL

    path = synth(layers=2, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2, type="Q8_0")
    cli = [sys.executable, "-m", "hobbit.compute.apps.cli"]
    subprocess.run([*cli, "convert", path, "-q"], check=True, capture_output=True)
    text = tmp_path / "calib.txt"
    text.write_text("The river flows through the valley and the old mill turns slowly. " * 20)
    for bound in ("0", "1"):
        out = subprocess.run(
            [*cli, "calibrate", path, "--text", str(text), "--tokens", "128", "--kld", bound, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        assert r["kld"] <= float(bound), r
        # random weights: next-token distributions near uniform, which no KLD bound can judge
        assert r["blind"] and r["flatness"] >= BLIND_FLATNESS, r
        if bound == "0":  # nothing may differ from all-high: every miss in high precision
            assert r["t1"] == 1.0, r
    assert r["cost"] <= r["lru_cost"], "the chosen policy weights model no more reads than LRU"
    # the low type is chosen too: every type that fits rows of 128 and 256 and saves 1.25x
    # on Q8_0, each measured; the one modelling the fewest reads is kept and served, the
    # companions made only to be measured are gone (convert's Q4_0 was there before)
    assert [c["type"] for c in r["candidates"]] == ["Q5_0", "IQ4_NL", "Q4_0"], r["candidates"]
    assert r["cost"] == min(c["cost"] for c in r["candidates"]), r["candidates"]
    chosen = f"{path}.{r['low_type'].lower()}.hobbit"
    assert sorted(glob.glob(path + ".*.hobbit")) == sorted({chosen, path + ".q4_0.hobbit"})
    with run_daemon([path], "4M", tmp_path) as d:
        s = connect(d.socket)
        hello(s)
        name = os.path.basename(path)[: -len(".gguf")]
        st = stats(s)["models"][name]["hobbit"]
        s.close(linger=0)
        top = subprocess.run(
            [*cli, "top", "--socket", d.socket, "--count", "1"], capture_output=True, text=True, timeout=60
        )
    assert "calibrated blind: random weights, quality unjudged" in top.stdout, top.stdout + top.stderr
    assert st["calibrated"] and (st["t1"], st["t2"]) == (r["t1"], r["t2"]), st
    assert st["policy_weights"] == r["weights"], st
    assert st["blind"] is True, "stats carries the calibration's blindness"
    assert st["low_type"] == r["low_type"], st
    # the ablation labels its lossy rows (b) computed with that blind calibration, not exact (a)
    out = subprocess.run(
        [*cli, "bench", "ablation", path, "--cache", "0.9", "--configs", "ab", "--rounds", "1"]
        + ["--prompt-tokens", "8", "-n", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {line[:3]: line for line in out.stdout.splitlines() if line.startswith("(")}
    assert BLIND_LABEL in rows["(b)"] and BLIND_LABEL not in rows["(a)"], out.stdout
    # the grid offers T1 below every score (every miss low, the top expert's too) and
    # measures its KLD; served with it, hobbitd gives the whole cache to low precision
    calib_file = chosen + ".calib.json"
    with open(calib_file) as f:
        saved = json.load(f)
    every_low = [row for row in saved["threshold_grid"] if row["t1"] < 0]
    assert every_low and all(row["kld"] > 0 and row["high_miss"] == 0 for row in every_low), every_low
    with open(calib_file, "w") as f:
        json.dump({**saved, "t1": -1.0, "t2": 1.0}, f)
    with run_daemon([path], "1M", tmp_path) as d:  # less than the experts: low slots only
        s = connect(d.socket)
        hello(s)
        m = stats(s)["models"][name]
        s.close(linger=0)
    assert m["hobbit"]["mode"] == "lossy: every miss low, T2 1.00 (calibrated)", m["hobbit"]
    assert list(m["regions"]) == ["low"], m["regions"]
    # T1 = 1 (what calibration picks when no low precision is allowed): no low region, the
    # whole cache holds high-precision experts
    with run_daemon([path], "4M", tmp_path, t1=1.0) as d:
        s = connect(d.socket)
        hello(s)
        regions = stats(s)["models"][name]["regions"]
        s.close(linger=0)
    assert list(regions) == ["high"], regions


def test_calibration_of_the_default_model_is_not_blind(default_moe, tmp_path):
    """Real weights predict the next token far from uniformly: calibration says it can judge
    them (flatness below the blind threshold, no "blind" in its line). The companion is
    linked into tmp_path, so the calibration file lands there, not beside the session's
    default model (which other tests expect uncalibrated)."""
    import json
    import os
    import subprocess
    import sys

    from hobbit.compute.make.calibrate import BLIND_FLATNESS
    from hobbit.compute.make.moefy import default_companion

    companion = tmp_path / os.path.basename(default_companion(default_moe))
    companion.symlink_to(default_companion(default_moe))
    text = tmp_path / "calib.txt"
    text.write_text(
        "The train left the station a little after nine. Maria found a seat by the window and "
        "watched the fields go by, green and yellow under a low grey sky. She had not been home "
        "for three years, and she wondered whether her brother would be waiting on the platform, "
        "or whether he was still angry about the letter. At noon the conductor came through the "
        "carriage selling coffee and sandwiches, and an old man across the aisle began to talk "
        "about the war, about the harvest, about his daughter who lived in the city."
    )
    cli = [sys.executable, "-m", "hobbit.compute.apps.cli"]
    out = subprocess.run(
        [*cli, "calibrate", default_moe, "--text", str(text), "--tokens", "64", "--companion", str(companion)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "flatness" in out.stdout and "blind" not in out.stdout, out.stdout
    with open(str(companion) + ".calib.json") as f:
        saved = json.load(f)
    assert saved["blind"] is False and saved["flatness"] < BLIND_FLATNESS, saved
