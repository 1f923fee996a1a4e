"""The wire format between compute clients (ZeroMQ DEALER) and hobbitd (ROUTER).

Every message is two frames: the protocol frame b"HOBBIT" + u16 version, then a msgpack
map whose "cmd" is a Cmd. Commands are append-only: a number once given is never reused.

| cmd | direction | fields | reply |
|---|---|---|---|
| HELLO | client→daemon | version, pid, name, model (opt.: the GGUF path the client runs; a daemon with model folders opens it if it is in one, else ERROR not_allowed) | WELCOME |
| WELCOME | daemon→client | version, shm, shm_size, models {name: model info}, heartbeat_s, control (opt.: {shm, size, rows_offset, n_slots, row}: the control block and this client's pin row; absent or row None: ask for every expert) | — |
| REQUEST | client→daemon | id, model, layer, experts [int], scores [float] (opt.: unimportance, 0 = most important), seq, token (opt.: the client's sequence number and token index, for the cache policy), tokens (opt.: how many tokens this forward computes, for per-client counts), release, hits (opt.: as RELEASE's slots and HITS's hits, applied first), epoch (opt.: the model's epoch the client was welcomed with; another one is answered file_changed) | SLOTS |
| SLOTS | daemon→client | id, slots [[precision, index] or None per expert: None = skipped by the precision rule] (pinned for the client) | — |
| HINT | client→daemon | model, layer, layers [int], experts [[int]], scores [[float]] (per predicted layer, nearest first), compute_s (opt.: the client's seconds of compute before its next request), release, hits, seq, token, tokens (opt., as REQUEST's, applied first) | none |
| RELEASE | client→daemon | model, slots [[precision, index]] | none |
| STATS | client→daemon | — | STATS_REPLY |
| STATS_REPLY | daemon→client | stats {...} | — |
| HEARTBEAT | client→daemon | — | none (any message counts as a heartbeat) |
| ERROR | daemon→client | code, message, id (of the request, if any) | — |
| BYE | client→daemon | — | none: the session's pins are released |
| RESIDENT | client→daemon | id, model, epoch (opt., as REQUEST's) | RESIDENT_REPLY |
| RESIDENT_REPLY | daemon→client | id, slots ([[index per expert] per layer]: every expert in high precision, pinned for the session until BYE; or None), ready, total (experts loaded of all; total 0: the cache cannot hold them all, ask per layer) | — |
| USED | client→daemon | model, uses (expert uses), seq, token, tokens, forwards (default 1): forwards computed on resident experts (for the counts); several one-token forwards may be summed in one note, tokens = forwards | none |
| HITS | client→daemon | model, hits [[layer, experts [int], slots [[precision, index] or None], scores [float]]] (experts the client pinned itself in its row of the control block), release (opt., as RELEASE's slots), seq, token, tokens | none |

model info: {path, file ([dev, inode, size, mtime_ns] of the GGUF as hobbitd serves it: a
client that mapped another file must not compute with its slots), epoch (moves on each time
hobbitd finds the file changed and drops its cached experts), n_layer, n_expert, holds_all,
thresholds {t1, t2, dynamic, low_only},
regions {precision: {offset, n_slots, format, directory, first_slot}}, and for a model
opened on demand its own segment and control block: shm, shm_size, control {shm, size,
rows_offset, n_slots} (the pin row is the WELCOME's)}, where format is
loader.layout.SlotFormat.to_wire(). A slot [precision, i] of a model starts at shm offset
regions[precision].offset + i * format.slot_bytes (of the model's segment); with a control block (loader/control.py)
its directory (int32 [n_layer, n_expert]) is at `directory` there and its pin count at
rows_offset + 4 * (row * n_slots + first_slot + i).

Errors (ERROR.code): bad_version, malformed, too_large, unknown_command, no_session,
too_many_sessions (HELLO beyond the daemon's max_sessions, or a process's or user's
share of them; the message starts "no free session" and names who holds them), busy (a
REQUEST beyond the client's max_requests served at once), unknown_model, not_allowed (a
HELLO's model outside the daemon's models and model folders), bad_request (also: a
HELLO's model that is no path, e.g. with a NUL byte; scores that are NaN or infinite),
pin_limit (a REQUEST that would pin more than the client's share of the cache), cache_full,
io (a failed read), checksum, file_changed (the model's file changed after the daemon
opened it: rewritten, truncated or replaced; or after the client was welcomed: another epoch;
the message names the file), shutting_down, internal (a daemon bug).

Liveness: a session ends at BYE, after client_timeout seconds of silence, or as soon as
the daemon sees the client's process (the pid the kernel reports for the ipc connection)
is gone. Clients detect a dead daemon from ZeroMQ's connection heartbeats
(ZMQ_HEARTBEAT_IVL/TIMEOUT): nothing of it is in these messages.
"""

from __future__ import annotations

import enum
import math
import struct

import msgpack

from .errors import ProtocolError

VERSION = 7  # 2: slot formats carry per-layer types (llama.cpp quantizer mixes);
# 3: and their parts (expert biases, gpt-oss); RESIDENT, USED;
# 4: the control block (clients pin hits themselves), HITS, batched releases;
# 5: errors too_many_sessions and pin_limit
# 6: HELLO's model, models opened on demand (their own segments), not_allowed
# 7: slot formats' layer_shifts (a part read in place starts past its room)
MAGIC = b"HOBBIT"
VERSION_FRAME = MAGIC + struct.pack("<H", VERSION)
MAX_MESSAGE = 1 << 20  # bytes; a request names a few experts, so 1 MiB is generous


class Cmd(enum.IntEnum):
    """The commands: each one's number on the wire (append-only: a number once given is
    never reused) and its required fields with their types, checked on decode (the daemon
    never trusts input); the optional fields are in the table above."""

    required: dict[str, type]

    def __new__(cls, number: int, required: dict[str, type] | None = None):
        member = int.__new__(cls, number)
        member._value_ = number
        member.required = required or {}
        return member

    HELLO = 1, {"version": int}
    WELCOME = 2, {"version": int, "shm": str, "models": dict}
    REQUEST = 3, {"id": int, "model": str, "layer": int, "experts": list}
    SLOTS = 4, {"id": int, "slots": list}
    HINT = 5, {"model": str, "layer": int, "layers": list, "experts": list, "scores": list}
    RELEASE = 6, {"model": str, "slots": list}
    STATS = 7
    STATS_REPLY = 8, {"stats": dict}
    HEARTBEAT = 9
    ERROR = 10, {"code": str, "message": str}
    BYE = 11
    RESIDENT = 12, {"id": int, "model": str}
    RESIDENT_REPLY = 13, {"id": int, "ready": int, "total": int}
    USED = 14, {"model": str, "uses": int}
    HITS = 15, {"model": str, "hits": list}


def encode(cmd: Cmd, **fields) -> list[bytes]:
    return [VERSION_FRAME, msgpack.packb({"cmd": int(cmd), **fields}, use_bin_type=True)]


def decode(frames: list[bytes]) -> tuple[Cmd, dict]:
    """(cmd, fields) from received frames; ProtocolError (with a wire code) when invalid."""
    if len(frames) != 2:
        raise ProtocolError("malformed", f"expected 2 frames, got {len(frames)}")
    head, body = frames
    if head[: len(MAGIC)] != MAGIC or len(head) != len(VERSION_FRAME):
        raise ProtocolError("malformed", "first frame is not a hobbit protocol frame")
    version = struct.unpack("<H", head[len(MAGIC) :])[0]
    if version != VERSION:
        raise ProtocolError("bad_version", f"protocol version {version}; this side speaks {VERSION}")
    if len(body) > MAX_MESSAGE:
        raise ProtocolError("too_large", f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError("malformed", f"undecodable msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), int):
        raise ProtocolError("malformed", "message is not a map with an integer 'cmd'")
    try:
        cmd = Cmd(msg.pop("cmd"))
    except ValueError:
        raise ProtocolError("unknown_command", "unknown command number") from None
    for name, typ in cmd.required.items():
        if not isinstance(msg.get(name), typ) or isinstance(msg.get(name), bool):
            raise ProtocolError("malformed", f"{cmd.name}: field {name!r} missing or not {typ.__name__}")
    if cmd == Cmd.HELLO and msg.get("model") is not None:
        model = msg["model"]
        if not isinstance(model, str) or not model or "\x00" in model:
            raise ProtocolError("bad_request", "HELLO: model must be a file path (a non-empty string, no NUL byte)")
    for name in ("release", "hits"):  # optional batched fields; entries are checked on use
        if msg.get(name) is not None and not isinstance(msg[name], list):
            raise ProtocolError("malformed", f"{cmd.name}: field {name!r} is not a list")
    if cmd == Cmd.HINT:
        rows = (msg["layers"], msg["experts"], msg["scores"])
        if (
            not (len(rows[0]) == len(rows[1]) == len(rows[2]))
            or not _ints(rows[0])
            or not all(isinstance(e, list) and _ints(e) for e in rows[1])
            or not all(isinstance(s, list) and _numbers(s) and len(s) == len(e) for e, s in zip(rows[1], rows[2]))
        ):
            raise ProtocolError("malformed", "HINT: layers, experts and scores must line up")
        if not all(_finite(s) for s in rows[2]):
            raise ProtocolError("bad_request", "HINT: scores must be finite (the router gave NaN or inf)")
        c = msg.get("compute_s")
        if c is not None and not (_numbers([c]) and 0 <= c < float("inf")):
            raise ProtocolError("malformed", "HINT: compute_s must be a number of seconds >= 0")
        return cmd, msg
    if "experts" in msg and not (isinstance(msg["experts"], list) and _ints(msg["experts"])):
        raise ProtocolError("malformed", f"{cmd.name}: experts must be integers")
    if msg.get("scores") is not None:
        s = msg["scores"]
        if not isinstance(s, list) or not _numbers(s) or len(s) != len(msg.get("experts", s)):
            raise ProtocolError("malformed", f"{cmd.name}: scores must be numbers, one per expert")
        if not _finite(s):  # NaN passes no threshold: it would be skipped, even in exact mode
            raise ProtocolError("bad_request", f"{cmd.name}: scores must be finite (the router gave NaN or inf)")
    return cmd, msg


def _ints(xs) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def _finite(xs) -> bool:
    """Numbers none of which is NaN or infinite (checked after _numbers)."""
    return all(math.isfinite(x) for x in xs)


def _numbers(xs) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
