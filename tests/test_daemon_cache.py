"""hobbitd's cache when the model does not fit: eviction, pins that survive it, cache_full,
and reads shared by concurrent requests."""

from __future__ import annotations

import os
import time

import pytest

from daemon_util import SYNTH, SlotView, call, connect, hello, recv, release, request, run_daemon, send, stats
from hobbit.protocol import messages as m

LAYERS, EXPERTS = SYNTH["layers"], SYNTH["experts"]


@pytest.fixture(scope="module")
def daemon(synth, tmp_path_factory):
    """The minimum cache (9 slots for 32 experts), buffered reads, a short slot wait."""
    path = synth(**SYNTH)
    with run_daemon([path], "4M", tmp_path_factory.mktemp("daemon"), no_direct_io=True, slot_wait=0.5) as d:
        d.model_path = path
        d.model = os.path.basename(path)[: -len(".gguf")]
        yield d


@pytest.fixture
def client(daemon):
    sock = connect(daemon.socket)
    hello(sock)
    yield sock
    send(sock, m.Cmd.BYE)
    sock.close(linger=100)


@pytest.fixture
def view(daemon, client):
    v = SlotView(client.welcome, daemon.model, daemon.model_path)
    yield v
    v.close()


def model_stats(sock, model):
    return stats(sock)["models"][model]


def test_churn_evicts_and_every_slot_is_right(daemon, client, view):
    n_slots = client.welcome["models"][daemon.model]["regions"]["high"]["n_slots"]
    assert n_slots == 9
    before = model_stats(client, daemon.model)
    for _ in range(2):
        for layer in range(LAYERS):
            for e in range(EXPERTS):
                slot = request(client, daemon.model, layer, [e])
                view.check(slot[0], layer, e)
                release(client, daemon.model, slot)
    after = model_stats(client, daemon.model)
    assert after["misses"] - before["misses"] >= 2 * (LAYERS * EXPERTS - n_slots)
    assert after["regions"]["high"]["ready"] <= n_slots
    assert after["regions"]["high"]["pinned"] == 0
    st = stats(client)["io"]
    assert st["direct_reads"] == 0 and st["reads"] > 0  # --no-direct-io


def test_pinned_slot_survives_churn(daemon, client, view):
    held = request(client, daemon.model, 0, [0])[0]
    snapshot = view.slot_parts(held[1], 0)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            if (layer, e) == (0, 0):
                continue
            slot = request(client, daemon.model, layer, [e])[0]
            assert slot != held
            release(client, daemon.model, [slot])
    assert view.slot_parts(held[1], 0) == snapshot
    view.check(held, 0, 0)
    s0 = model_stats(client, daemon.model)
    assert s0["regions"]["high"]["pinned"] == 1
    assert request(client, daemon.model, 0, [0])[0] == held  # still cached: a hit
    assert model_stats(client, daemon.model)["hits"] == s0["hits"] + 1


def test_cache_full_then_recovers(daemon, client, view):
    """8 of the 9 slots pinned: a request for 2 new experts gets one slot, waits for the
    other, answers cache_full after --slot-wait, and gives back the one it got."""
    request(client, daemon.model, 0, range(8))
    other = connect(daemon.socket)
    hello(other, "other")
    t0 = time.monotonic()
    cmd, msg = call(other, m.Cmd.REQUEST, id=3, model=daemon.model, layer=1, experts=[0, 1])
    assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "cache_full", 3), msg
    assert 0.4 < time.monotonic() - t0 < 5
    assert model_stats(other, daemon.model)["regions"]["high"]["pinned"] == 8
    # a release while the request waits lets it through
    send(other, m.Cmd.REQUEST, id=4, model=daemon.model, layer=1, experts=[0, 1])
    time.sleep(0.1)
    release(client, daemon.model, [["high", i] for i in range(9)])
    got = recv(other, 5.0)
    assert got is not None and got[0] == m.Cmd.SLOTS, got
    view.check(got[1]["slots"][0], 1, 0)
    view.check(got[1]["slots"][1], 1, 1)
    other.close()


def test_concurrent_requests_share_one_read(synth, tmp_path):
    """Reads throttled to 512 KiB/s (0.8 s per expert, a wide margin on a busy machine): a
    second request for an expert being read waits for that read instead of starting another."""
    path = synth(**SYNTH)
    with run_daemon([path], "8M", tmp_path, io_limit="512K") as d:
        model = os.path.basename(path)[: -len(".gguf")]
        a, b = connect(d.socket), connect(d.socket)
        hello(a, "a")
        hello(b, "b")
        send(a, m.Cmd.REQUEST, id=1, model=model, layer=2, experts=[3, 4])
        time.sleep(0.1)
        send(b, m.Cmd.REQUEST, id=2, model=model, layer=2, experts=[4])
        ra, rb = recv(a, 10), recv(b, 10)
        assert ra[0] == rb[0] == m.Cmd.SLOTS, (ra, rb)
        assert ra[1]["slots"][1] == rb[1]["slots"][0]
        st = model_stats(a, model)
        assert (st["misses"], st["waits"], st["hits"]) == (2, 1, 0)
        assert st["regions"]["high"]["pinned"] == 2
        assert 0.1 < st["read_MBps"] < 1
        view = SlotView(a.welcome, model, path)
        view.check(rb[1]["slots"][0], 2, 4)
        view.check(ra[1]["slots"][0], 2, 3)
        view.close()
        # a session that ends while its request reads is told so, and pins nothing
        send(b, m.Cmd.REQUEST, id=3, model=model, layer=3, experts=[0])
        hello(b, "b again")  # replaces the session (and drops its pin)
        cmd, msg = recv(b, 10)
        assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "no_session", 3), msg
        assert model_stats(a, model)["regions"]["high"]["pinned"] == 2  # only a's two


def control_of(welcome: dict, model: str):
    """The control block as a client maps it: (block, our pin row, the high directory,
    the high region's first slot in the row)."""
    from hobbit.loader.control import ControlBlock, register_client

    ctl = welcome["control"]
    assert ctl["row"] is not None and register_client()
    cb = ControlBlock.attach(ctl["shm"], ctl["size"], ctl["rows_offset"], ctl["n_slots"])
    info = welcome["models"][model]
    high = info["regions"]["high"]
    return (
        cb,
        cb.rows[ctl["row"]],
        cb.directory(high["directory"], info["n_layer"], info["n_expert"]),
        high["first_slot"],
    )


def check_directory(directory, view):
    """Every published slot holds the expert the directory names, byte for byte."""
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            if directory[layer, e] >= 0:
                view.check(("high", int(directory[layer, e])), layer, e)


def test_a_hit_the_client_pinned_itself_survives_churn_and_is_counted(daemon, client, view):
    """The hit path without a round trip (loader/control.py): a slot hobbitd published is
    pinned in the client's own row; churn never evicts it and every published slot holds
    what the directory says; the HITS report counts it; unpinned, it is evicted again."""
    cb, row, directory, first = control_of(client.welcome, daemon.model)
    try:
        slot = request(client, daemon.model, 1, [2])[0]
        release(client, daemon.model, [slot])
        index = slot[1]
        assert directory[1, 2] == index
        row[first + index] += 1  # pinned by us, not asked for
        assert directory[1, 2] == index  # still published: the pin holds
        before = model_stats(client, daemon.model)
        send(
            client, m.Cmd.HITS, model=daemon.model, seq=1, token=1, tokens=1, hits=[[1, [2], [["high", index]], [0.0]]]
        )
        after = model_stats(client, daemon.model)
        assert after["hits"] - before["hits"] == 1
        assert after["requested"] - before["requested"] == 1
        assert after["regions"]["high"]["pinned"] >= 1
        for _ in range(2):
            for layer in range(LAYERS):
                for e in range(EXPERTS):
                    if (layer, e) != (1, 2):
                        got = request(client, daemon.model, layer, [e])
                        view.check(got[0], layer, e)
                        release(client, daemon.model, got)
            assert directory[1, 2] == index
            view.check(slot, 1, 2)
            check_directory(directory, view)
        row[first + index] -= 1  # done with it
        for layer in range(LAYERS):
            for e in range(EXPERTS):
                release(client, daemon.model, request(client, daemon.model, layer, [e]))
        check_directory(directory, view)
        assert directory[1, 2] in (-1, index)
        assert (directory >= 0).sum() <= 9  # the region's slots
    finally:
        del row, directory  # views into the block: it unmaps only without them
        cb.close()


def test_hits_pinned_in_the_row_count_toward_the_pin_limit(daemon, client):
    """A client cannot get around its share of the cache by pinning hits itself: what its
    row pins counts toward pin_limit as what hobbitd pinned for it does."""
    cb, row, directory, first = control_of(client.welcome, daemon.model)
    try:
        held = request(client, daemon.model, 0, range(3))
        release(client, daemon.model, held)
        for _, index in held:
            row[first + index] += 1
        cmd, msg = call(client, m.Cmd.REQUEST, id=7, model=daemon.model, layer=1, experts=list(range(EXPERTS)))
        assert (cmd, msg["code"]) == (m.Cmd.ERROR, "pin_limit"), msg
        assert "holds 3 pinned slots" in msg["message"], msg
        for _, index in held:
            row[first + index] -= 1
        release(client, daemon.model, request(client, daemon.model, 1, range(EXPERTS)))
    finally:
        del row, directory  # views into the block: it unmaps only without them
        cb.close()


def test_a_session_that_ends_loses_its_row_pins(daemon):
    """Pins in a client's row go with its session (BYE here; a dead client's goes when its
    process is gone): hobbitd zeroes the row, before any other session can be given it."""
    sock = connect(daemon.socket)
    welcome = hello(sock)
    cb, row, directory, first = control_of(welcome, daemon.model)
    try:
        slot = request(sock, daemon.model, 0, [1])[0]
        release(sock, daemon.model, [slot])
        row[first + slot[1]] += 1
        send(sock, m.Cmd.BYE)
        deadline = time.monotonic() + 5
        while row.any() and time.monotonic() < deadline:  # BYE is handled asynchronously
            time.sleep(0.02)
        assert not row.any()
    finally:
        del row, directory  # views into the block: it unmaps only without them
        cb.close()
        sock.close(linger=100)
