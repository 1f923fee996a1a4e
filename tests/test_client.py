"""The client's own contracts: its hit path picks each expert's precision as hobbitd does
(one rule, loader/precision.py), and fetch() hands out typed handles, whether hobbitd
served them or the client pinned them itself, which release() gives back."""

from __future__ import annotations

import pytest

from daemon_util import SYNTH, run_daemon
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.client.local_pins import hit_handles
from hobbit.loader.layout import PAGE, ExpertSource, Handle, SlotFormat
from hobbit.loader.model_cache import ModelCache
from hobbit.loader.policy import make_policy
from hobbit.loader.pool import Region
from hobbit.loader.precision import EVERY_MISS_LOW, HIGH, LOW, SKIP, Thresholds

# ---- one decision: hobbitd's (ModelCache.decide) and the client's hit path -----------------

N_EXPERT = 4  # one layer of 4 experts: a high region of 4 slots holds them all
E = 2  # the expert each case asks for
ASK = "ask"  # the hit path asks hobbitd (the expert is read, or waited for)
TH = Thresholds(0.6, 0.9)

# (thresholds, score, cached in (high, low), precisions the model has, holds_all,
#  what hobbitd serves, what the hit path does: the precision it pins, SKIP, or ASK)
CASES = [
    (TH, 0.0, (True, False), (HIGH, LOW), False, HIGH, HIGH),
    (TH, 0.6, (False, False), (HIGH, LOW), False, HIGH, ASK),  # s = T1: a high miss
    (TH, 0.6000001, (False, False), (HIGH, LOW), False, LOW, ASK),  # just above T1: a low miss
    (TH, 0.6, (False, True), (HIGH, LOW), False, LOW, LOW),  # a low hit stays a hit
    (TH, 0.9, (False, True), (HIGH, LOW), False, LOW, LOW),  # s = T2
    (TH, 0.9000001, (False, True), (HIGH, LOW), False, SKIP, SKIP),  # above T2: skipped
    (TH, 0.95, (False, False), (HIGH, LOW), False, SKIP, SKIP),
    (TH, 0.95, (True, False), (HIGH, LOW), False, HIGH, HIGH),  # a high hit, even above T2
    (TH, 0.95, (True, True), (HIGH, LOW), False, HIGH, HIGH),
    (Thresholds(EVERY_MISS_LOW, 0.9), 0.0, (False, False), (LOW,), False, LOW, ASK),
    (Thresholds(EVERY_MISS_LOW, 0.9), 0.0, (False, True), (LOW,), False, LOW, LOW),
    (Thresholds(EVERY_MISS_LOW, 0.9), 0.0, (True, True), (HIGH, LOW), False, HIGH, HIGH),
    (Thresholds(EVERY_MISS_LOW, 0.9), 0.95, (False, True), (LOW,), False, SKIP, SKIP),
    (Thresholds(low_only=True), 0.0, (True, False), (HIGH, LOW), False, LOW, ASK),
    (Thresholds(low_only=True), 0.0, (True, True), (HIGH, LOW), False, LOW, LOW),
    (Thresholds(low_only=True), 0.0, (False, True), (HIGH, LOW), True, LOW, LOW),
    (TH, 0.7, (False, False), (HIGH,), False, HIGH, ASK),  # no companion: high instead
    (TH, 0.7, (True, False), (HIGH,), False, HIGH, HIGH),
    (Thresholds(), 0.0, (False, True), (LOW,), False, LOW, ASK),  # no high slots: low instead,
    # the hit path leaves it to hobbitd
    (TH, 0.95, (False, True), (HIGH, LOW), True, HIGH, ASK),  # holds_all: high, read
    (TH, 0.95, (True, False), (HIGH, LOW), True, HIGH, HIGH),
    (TH, 0.0, (True, True), (HIGH, LOW), True, HIGH, HIGH),
    (Thresholds(), 0.5, (False, True), (HIGH, LOW), False, HIGH, ASK),  # exact: no low use
    (Thresholds(dynamic=False), 0.99, (False, True), (HIGH, LOW), False, HIGH, ASK),
]


def _fmt() -> SlotFormat:
    return SlotFormat.build([(32, 32)] * 3, [[8, 8, 8]], [[PAGE] * 3])


def daemon_side(th, cached, have, holds_all) -> ModelCache:
    """A ModelCache of one layer whose regions `have` hold expert E ready where `cached`
    says; the high region has a slot per expert when holds_all, fewer otherwise."""
    fmt = _fmt()
    source = ExpertSource("m.gguf", HIGH, 1, N_EXPERT, fmt, ((0, 0, 0),), ((PAGE,) * 3,))
    policy = make_policy("lru", 1)
    mo = ModelCache("m", "m.gguf", 1, N_EXPERT, source, policy, thresholds=th)
    for prec, is_cached in zip((HIGH, LOW), cached):
        if prec in have:
            n = N_EXPERT if prec == HIGH and holds_all else N_EXPERT - 1
            mo.regions[prec] = Region("m", prec, fmt, 0, n)
            if is_cached:
                mo.regions[prec].take((0, E), policy).state = "ready"
    assert mo.holds_all == holds_all
    return mo


def client_side(mo: ModelCache) -> dict:
    """The directory entries of layer 0 per precision the model has, as a client reads
    them in the control block (slot index, -1: not held)."""
    return {
        p: [-1 if r.lookup((0, e)) is None else r.lookup((0, e)).index for e in range(N_EXPERT)]
        for p, r in mo.regions.items()
    }


@pytest.mark.parametrize("th,score,cached,have,holds_all,served,hit_path", CASES)
def test_the_hit_path_decides_as_hobbitd(th, score, cached, have, holds_all, served, hit_path):
    mo = daemon_side(th, cached, have, holds_all)
    entries = client_side(mo)
    ours = mo.decide((0, E), score)
    got = hit_handles(th, mo.holds_all, entries, [E], [score])
    assert ours == served
    if hit_path == ASK:  # hobbitd reads it, or serves it in the other precision
        assert got is None
        return
    assert got is not None and len(got) == 1
    if hit_path is SKIP:
        assert got == [None]
        return
    # pinned where hobbitd would have served it from: the same precision and slot
    assert got == [Handle(served, mo.regions[served].lookup((0, E)).index)]
    assert isinstance(got[0], Handle)


def test_a_layer_is_pinned_only_when_every_expert_is():
    """A request of several experts: one that must be read makes the hit path ask for all."""
    mo = daemon_side(TH, (True, False), (HIGH, LOW), False)
    entries = client_side(mo)
    assert hit_handles(TH, False, entries, [E], [0.0]) is not None
    assert hit_handles(TH, False, entries, [E, E + 1], [0.0, 0.5]) is None
    assert mo.decide((0, E + 1), 0.5) == HIGH and mo.regions[HIGH].lookup((0, E + 1)) is None


# ---- typed handles through a real hobbitd ----------------------------------------------------


def pinned(client: ExpertClient) -> int:
    """Slots pinned in the model's high region, by hobbitd's count (sessions' and rows')."""
    return next(iter(client.stats()["models"].values()))["regions"]["high"]["pinned"]


def test_fetch_returns_handles_and_release_gives_them_back(synth, tmp_path):
    """A miss hobbitd reads and a hit the client pins itself in its row both come back as
    Handle values (the same slots); release() of each brings the pins back to 0."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path) as d:
        client = ExpertClient(d.socket, path)
        try:
            assert client.pins.control is not None, "hobbitd offered no control block"
            trips, local = client.round_trips, client.local_hits
            served = client.fetch(1, [2, 5], [0.0, 0.5])
            assert client.round_trips == trips + 1 and client.local_hits == local
            assert all(type(h) is Handle and h.precision == HIGH for h in served), served
            assert pinned(client) == 2
            client.release(served)
            assert pinned(client) == 0  # stats() sent the release first

            trips = client.round_trips
            hit = client.fetch(1, [2, 5], [0.0, 0.5])
            assert client.round_trips == trips and client.local_hits == local + 1
            assert all(type(h) is Handle for h in hit) and list(hit) == list(served)
            assert pinned(client) == 2
            client.release(hit)
            assert pinned(client) == 0
        finally:
            client.close()
