"""hobbitd over the wire: WELCOME, the data path into shared memory, hits, pins, and typed
errors for bad input (after which the daemon keeps serving). One daemon for the module."""

from __future__ import annotations

import os
import struct

import msgpack
import pytest

from daemon_util import (
    SYNTH,
    SlotView,
    call,
    connect,
    expert_source,
    hello,
    recv,
    release,
    request,
    run_daemon,
    send,
    stats,
)
from hobbit.loader.layout import SlotFormat
from hobbit.protocol import messages as m


@pytest.fixture(scope="module")
def daemon(synth, tmp_path_factory):
    path = synth(**SYNTH)
    # tests here pin more than half the cache (the per-client limit's default), and open
    # more sessions from this one process than its limits' defaults
    limits = dict(max_sessions_per_process=64, max_sessions_per_user=64)
    with run_daemon([path], "8M", tmp_path_factory.mktemp("daemon"), client_pin_share=1.0, **limits) as d:
        d.model_path = path
        d.model = os.path.basename(path)[: -len(".gguf")]
        yield d


@pytest.fixture
def client(daemon):
    sock = connect(daemon.socket)
    hello(sock)
    yield sock
    send(sock, m.Cmd.BYE)  # releases whatever the test left pinned
    sock.close(linger=100)


@pytest.fixture
def view(daemon, client):
    v = SlotView(client.welcome, daemon.model, daemon.model_path)
    yield v
    v.close()


def pinned(sock, model) -> int:
    return stats(sock)["models"][model]["regions"]["high"]["pinned"]


def test_welcome(daemon, client):
    w = client.welcome
    assert w["version"] == m.VERSION
    assert os.path.exists(f"/dev/shm/{w['shm']}")
    assert os.path.getsize(f"/dev/shm/{w['shm']}") == w["shm_size"]
    assert 0 < w["heartbeat_s"] < 5.0
    assert list(w["models"]) == [daemon.model]
    info = w["models"][daemon.model]
    assert info["path"] == os.path.realpath(daemon.model_path)
    assert (info["n_layer"], info["n_expert"]) == (SYNTH["layers"], SYNTH["experts"])
    region = info["regions"]["high"]
    fmt = SlotFormat.from_wire(region["format"])
    assert fmt == expert_source(daemon.model_path).format
    assert region["offset"] == 0
    assert region["n_slots"] == (8 << 20) // fmt.slot_bytes  # 19 slots in 8 MiB
    assert region["offset"] + region["n_slots"] * fmt.slot_bytes <= w["shm_size"]


def test_request_maps_the_experts_bytes(daemon, client, view):
    """The core data path: a SLOTS reply names pinned slots whose shared memory holds
    exactly the expert's bytes from the GGUF, part by part."""
    slots = request(client, daemon.model, 1, range(8), rid=11)
    assert len({tuple(s) for s in slots}) == 8
    for e, slot in enumerate(slots):
        view.check(slot, 1, e)
    slots2 = request(client, daemon.model, 3, [5, 2], rid=12)
    view.check(slots2[0], 3, 5)
    view.check(slots2[1], 3, 2)
    assert pinned(client, daemon.model) == 10
    release(client, daemon.model, slots + slots2)
    assert pinned(client, daemon.model) == 0


def test_second_request_is_a_hit(daemon, client, view):
    s0 = stats(client)["models"][daemon.model]
    first = request(client, daemon.model, 2, [6], rid=1)
    release(client, daemon.model, first)
    s1 = stats(client)["models"][daemon.model]
    second = request(client, daemon.model, 2, [6], rid=2)
    s2 = stats(client)["models"][daemon.model]
    assert second == first
    assert (s2["hits"] - s1["hits"], s2["misses"] - s1["misses"]) == (1, 0)
    assert s1["misses"] + s1["hits"] == s0["misses"] + s0["hits"] + 1
    view.check(second[0], 2, 6)


def test_stats(daemon, client):
    request(client, daemon.model, 0, [3])
    st = stats(client)
    assert st["uptime_s"] > 0 and st["clients"] >= 1
    ms = st["models"][daemon.model]
    assert {"hits", "misses", "waits", "bytes_read", "read_seconds", "read_MBps"} <= set(ms)
    assert ms["bytes_read"] == ms["misses"] * expert_source(daemon.model_path).expert_bytes(0)
    assert ms["regions"]["high"]["pinned"] == 1
    assert ms["regions"]["high"]["slots"] == 19
    assert st["io"]["bytes_read"] == ms["bytes_read"]
    assert st["io"]["direct_reads"] == st["io"]["reads"] > 0  # the GGUF is on a real disk
    assert st["io"]["pending"] == 0


def test_pins_are_counted_per_session(daemon, client):
    other = connect(daemon.socket)
    hello(other, "other")
    a = request(client, daemon.model, 0, [1])
    b = request(other, daemon.model, 0, [1])
    assert a == b
    release(other, daemon.model, b)
    release(other, daemon.model, b)  # twice: never takes client's pin with it
    assert pinned(client, daemon.model) == 1
    release(client, daemon.model, a)
    assert pinned(client, daemon.model) == 0
    other.close()


def test_release_is_forgiving(daemon, client):
    slots = request(client, daemon.model, 0, [2])
    release(client, daemon.model, slots)
    release(client, daemon.model, slots)  # not pinned any more
    send(
        client,
        m.Cmd.RELEASE,
        model=daemon.model,
        slots=[["high", 10**6], ["low", 0], ["high", -1], [1, 2, 3], "x", None, []],
    )
    assert pinned(client, daemon.model) == 0
    again = request(client, daemon.model, 0, [2])  # a double release left no debt
    assert again == slots and pinned(client, daemon.model) == 1
    cmd, msg = call(client, m.Cmd.RELEASE, model="nope", slots=[])
    assert (cmd, msg["code"]) == (m.Cmd.ERROR, "unknown_model")


@pytest.mark.parametrize(
    "model, layer, experts, code",
    [
        ("nope", 0, [0], "unknown_model"),
        (None, -1, [0], "bad_request"),
        (None, 4, [0], "bad_request"),
        (None, 0, [8], "bad_request"),
        (None, 0, [-1], "bad_request"),
        (None, 0, [1, 3, 1], "bad_request"),
    ],
)
def test_request_errors(daemon, client, model, layer, experts, code):
    cmd, msg = call(client, m.Cmd.REQUEST, id=77, model=model or daemon.model, layer=layer, experts=experts)
    assert cmd == m.Cmd.ERROR
    assert (msg["code"], msg["id"]) == (code, 77), msg
    assert pinned(client, daemon.model) == 0


def test_hint_is_validated_and_not_answered(daemon, client):
    send(
        client,
        m.Cmd.HINT,
        model=daemon.model,
        layer=1,
        layers=[2, 3],
        experts=[[0, 1], [7]],
        scores=[[0.7, 0.3], [1.0]],
    )
    assert recv(client, 0.3) is None
    for bad, code in [
        (dict(layer=99, layers=[], experts=[], scores=[]), "bad_request"),
        (dict(layer=1, layers=[9], experts=[[0]], scores=[[1]]), "bad_request"),
        (dict(layer=1, layers=[2], experts=[[8]], scores=[[1]]), "bad_request"),
        (dict(layer=1, layers=[2], experts=[[0]]), "malformed"),
        (dict(layer=1, layers=[2], experts=[0], scores=[1]), "malformed"),
        (dict(layer=1, layers=[2], experts=[[0]], scores=[[1]], compute_s=-1), "malformed"),
        (dict(layer=1, layers=[2], experts=[[0]], scores=[[1]], compute_s="1"), "malformed"),
    ]:
        cmd, msg = call(client, m.Cmd.HINT, model=daemon.model, **bad)
        assert (cmd, msg["code"]) == (m.Cmd.ERROR, code), (bad, msg)
    cmd, msg = call(client, m.Cmd.HINT, model="nope", layer=0, layers=[], experts=[], scores=[])
    assert (cmd, msg["code"]) == (m.Cmd.ERROR, "unknown_model")
    request(client, daemon.model, 1, [0])


def test_commands_need_a_session(daemon):
    sock = connect(daemon.socket)
    cmd, msg = call(sock, m.Cmd.REQUEST, id=5, model=daemon.model, layer=0, experts=[0])
    assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "no_session", 5)
    cmd, msg = call(sock, m.Cmd.STATS)
    assert (cmd, msg["code"]) == (m.Cmd.ERROR, "no_session")
    hello(sock)
    request(sock, daemon.model, 0, [4])
    send(sock, m.Cmd.BYE)  # drops the session and its pin
    send(sock, m.Cmd.HEARTBEAT)  # commands without an answer get none without a session
    assert recv(sock, 0.5) is None
    cmd, msg = call(sock, m.Cmd.REQUEST, id=6, model=daemon.model, layer=0, experts=[0])
    assert (cmd, msg["code"], msg["id"]) == (m.Cmd.ERROR, "no_session", 6)
    sock.close()


def _body(**fields) -> bytes:
    return msgpack.packb(fields)


BAD = {
    "undecodable msgpack": ([m.VERSION_FRAME, b"\xc1\xc1"], "malformed"),
    "not a map": ([m.VERSION_FRAME, msgpack.packb([1, 2])], "malformed"),
    "cmd not an int": ([m.VERSION_FRAME, _body(cmd="HELLO")], "malformed"),
    "one frame": ([m.VERSION_FRAME], "malformed"),
    "three frames": ([m.VERSION_FRAME, _body(cmd=9), b""], "malformed"),
    "REQ-style delimiter": ([b"", m.VERSION_FRAME, _body(cmd=9)], "malformed"),
    "no protocol frame": ([b"HELLO", _body(cmd=1, version=1)], "malformed"),
    "wrong protocol version": ([m.MAGIC + struct.pack("<H", 99), _body(cmd=1, version=99)], "bad_version"),
    "HELLO of another version": ([m.VERSION_FRAME, _body(cmd=1, version=m.VERSION + 1)], "bad_version"),
    "unknown command": ([m.VERSION_FRAME, _body(cmd=99)], "unknown_command"),
    "daemon-side command": ([m.VERSION_FRAME, _body(cmd=int(m.Cmd.SLOTS), id=1, slots=[])], "unknown_command"),
    "missing field": ([m.VERSION_FRAME, _body(cmd=3, id=1, model="x", experts=[0])], "malformed"),
    "field of wrong type": ([m.VERSION_FRAME, _body(cmd=3, id=1, model="x", layer="0", experts=[0])], "malformed"),
    "experts not integers": ([m.VERSION_FRAME, _body(cmd=3, id=1, model="x", layer=0, experts=[0.5])], "malformed"),
    "scores of the wrong length": (
        [m.VERSION_FRAME, _body(cmd=3, id=1, model="x", layer=0, experts=[0], scores=[1, 2])],
        "malformed",
    ),
    "just over MAX_MESSAGE": ([m.VERSION_FRAME, b"\x00" * (m.MAX_MESSAGE + 100)], "too_large"),
}


@pytest.mark.parametrize("frames, code", BAD.values(), ids=BAD.keys())
def test_bad_messages_get_typed_errors(daemon, client, frames, code):
    client.send_multipart(frames)
    got = recv(client, 5.0)
    assert got is not None, "no answer"
    cmd, msg = got
    assert (cmd, msg["code"]) == (m.Cmd.ERROR, code), msg
    # the daemon keeps serving, this connection included
    request(client, daemon.model, 0, [5])
    hello(connect(daemon.socket))


def test_oversized_message_is_dropped(daemon, client):
    """Beyond MAXMSGSIZE ZeroMQ drops the message and that connection, unanswered."""
    big = connect(daemon.socket)
    big.send_multipart([m.VERSION_FRAME, b"\x00" * (4 * m.MAX_MESSAGE)])
    assert recv(big, 1.0) is None
    big.close()
    hello(connect(daemon.socket))
    request(client, daemon.model, 0, [6])


def test_fuzzed_fields_never_break_the_daemon(daemon, client):
    """Every command with fields of every odd type: answers are typed errors (or nothing),
    never an internal error, and the daemon keeps serving."""
    import random

    rng = random.Random(0)
    odd = [
        None,
        True,
        -1,
        0,
        3,
        2**63,
        1.5,
        "",
        daemon.model,
        b"\x00",
        [],
        [0, 1],
        [[0]],
        [1, 1],
        [-5],
        [2**40],
        ["high", 0],
        [["high", 0]],
        [[None]],
        {},
        {"a": 1},
        "x" * 300,
    ]
    names = ["id", "model", "layer", "experts", "scores", "slots", "version", "pid", "name", "layers", "seq"]
    for _ in range(2000):
        cmd = rng.choice(list(m.Cmd))
        if cmd == m.Cmd.BYE:
            continue
        fields = {n: rng.choice(odd) for n in rng.sample(names, rng.randint(0, len(names)))}
        client.send_multipart([m.VERSION_FRAME, msgpack.packb({"cmd": int(cmd), **fields})])
        while (got := recv(client, 0)) is not None:
            assert got[1].get("code") != "internal", (cmd, fields, got)
    while (got := recv(client, 0.5)) is not None:
        assert got[1].get("code") != "internal", got
    hello(client)
    request(client, daemon.model, 0, [7])
    assert "Traceback" not in daemon.stderr, daemon.stderr
