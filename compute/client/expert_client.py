"""The compute side of the daemon protocol: ask hobbitd for experts, get pinned slots in
shared memory, release them after use.

One client per compute process, used from one thread. ExpertClient is the ExpertProvider
the engine's segmented forward uses (engine/experts.py), over a Connection
(client/connection.py: liveness, retries, reconnects, request ids). With a control block
(hobbitd offers one where the kernel has membarrier; loader/control.py) a layer whose
experts are all cached costs no message: the client finds them in the slot directory,
pins them in its own row (client/local_pins.py) and reports the hits later, batched with
its next message (HITS at the end of a forward at the latest); releases of slots hobbitd
gave ride along the same way. Requests block until the daemon answers.

A lost daemon is found again by the connection, which hands us its WELCOME: the new shared
memory and control block are mapped and the request asked again. The forward re-points
its tensors at part_bases() before every layer, and the resident table and the handles of
hits pinned in our row belong to one HELLO (`generation`), so neither computes on nor
unpins in the old daemon's memory past that point. A mapping of a dead daemon's segment
stays valid (its pages live while mapped), so a forward already computing on it finishes
with the right bytes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import zmq

from ...loader.layout import Handle, SlotFormat, SlotRegion
from ...loader.precision import Thresholds
from ...loader.shm import Segment
from ...protocol import messages as m
from ...protocol.errors import DaemonError
from .connection import RECONNECT_S, Connection
from .local_pins import LocalPins, Pinned

USED_EVERY_S = 0.25  # one-token forwards on resident experts are reported this often


class _OfConnection:
    """An attribute of the client's Connection (`conn`), read and set through the client."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, client, owner=None):
        return self if client is None else getattr(client.conn, self.name)

    def __set__(self, client, value) -> None:
        setattr(client.conn, self.name, value)


class _Reports:
    """What rides along with the client's next message, unanswered: the hits it pinned
    itself and the slots hobbitd gave that it is done with; and the one-token forwards on
    resident experts, summed (USED)."""

    def __init__(self):
        self.hits: list = []  # hits pinned ourselves, not yet reported
        self.release: list = []  # slots hobbitd gave, done with, not yet released
        self.position = (0, 0, 1)  # (seq, token, n_tokens) of the forward those belong to
        self.used = None  # [uses, seq, token, forwards] of one-token forwards not yet sent
        self.used_sent = 0.0  # time.monotonic() of the last USED

    def clear(self) -> None:
        """A new session: what was pending was the old daemon's (or counted by none)."""
        self.hits, self.release, self.used = [], [], None

    def take(self) -> dict:
        """The fields that ride along with the next message: hits to report, slots to release."""
        out: dict = {}
        if self.hits:
            seq, token, n = self.position
            out.update(hits=self.hits, seq=seq, token=token, tokens=n)
            self.hits = []
        if self.release:
            out["release"], self.release = self.release, []
        return out

    def add_used(self, uses: int, seq: int, token: int) -> None:
        p = self.used
        self.used = [p[0] + uses, seq, token, p[3] + 1] if p else [uses, seq, token, 1]

    def take_used(self) -> dict | None:
        """The summed one-token forwards as USED's fields, if any."""
        if self.used is None:
            return None
        uses, seq, token, n = self.used
        self.used, self.used_sent = None, time.monotonic()
        return {"uses": uses, "seq": seq, "token": token, "tokens": n, "forwards": n}


class ExpertClient:
    """The ExpertProvider over hobbitd (see the module docstring): the Session of its
    Connection (`conn`), which hands it every WELCOME and has it renew a request asked
    again of a new daemon."""

    remote = True  # the experts come from hobbitd, which needs CPU of its own (Model threads)

    def __init__(
        self,
        socket_path: str,
        model_path: str | None,
        timeout: float = 30.0,
        retries: int = 2,
        name: str | None = None,
        reconnect_s: float = RECONNECT_S,
    ):
        """model_path None: a client for stats only (no model, no shared memory). name: how
        hobbitd lists this client (default: the program and its subcommand). reconnect_s:
        how long to look for a hobbitd again once ours is gone (0: try once)."""
        self.model_path = model_path and os.path.realpath(model_path)
        self.shm: Segment | None = None
        self.model = None  # name the daemon knows our model by
        self.regions: dict[str, SlotRegion] = {}
        self._layout: dict | None = None  # the regions' slot counts and formats, as sent
        self.generation = 0  # HELLOs answered: a new one means new slots
        self.resident_possible = True  # False once hobbitd said it cannot hold every expert
        self._resident: tuple[int, np.ndarray] | None = None  # (generation, slot table) once
        # every expert is pinned
        self.pins = LocalPins()  # where we pin hits ourselves
        self.thresholds = Thresholds()
        self.holds_all = False
        # the file as hobbitd serves it (WELCOME's [dev, ino, size, mtime_ns]; the Model
        # compares it with its mapping) and its epoch there, sent with every request: a
        # file hobbitd saw change since is answered ERROR file_changed (hobbitd/watch.py)
        self.served_file: list | None = None
        self.epoch: int | None = None
        self._reports = _Reports()
        self._checked = False  # the daemon was found alive during this forward
        self.local_hits = 0  # layers served from the directory, no message
        # our model's path: a daemon with model folders opens it if it does not serve it yet
        hello = {} if self.model_path is None else {"model": self.model_path}
        self.conn = Connection(socket_path, self, (name or _program())[:64], hello, timeout, retries, reconnect_s)
        self.conn.open()

    # the connection's, as callers know them: its socket, its deadline for finding a
    # hobbitd again, its counts, its private daemon (client/connect.py) and who it tells
    # that the daemon was lost and found (callable(line) or None)
    socket_path = _OfConnection()
    reconnect_s = _OfConnection()
    round_trips = _OfConnection()
    reconnects = _OfConnection()
    private = _OfConnection()
    announce = _OfConnection()

    # ---- the session (connection.Session) ----------------------------------------------

    def welcome(self, welcome: dict) -> None:
        """Take a WELCOME: our model's name and regions there, its shared memory mapped."""
        if self.model_path is None:
            return
        for name, info in welcome["models"].items():  # noqa: B007 (name: the one found, used below)
            if os.path.realpath(info["path"]) == self.model_path:
                break
        else:
            served = ", ".join(welcome["models"]) or "none"
            raise DaemonError(
                "unknown_model", f"hobbitd at {self.socket_path} does not serve {self.model_path} (it serves: {served})"
            )
        layout = {p: (r["n_slots"], r["format"]) for p, r in info["regions"].items()}
        if self.generation and layout != self._layout:
            # the forward's tensors were made for the old regions (slot counts, types)
            raise DaemonError(
                "layout_changed",
                f"hobbitd at {self.socket_path} came back "
                "with another cache layout for this model; start this client again",
            )
        self._layout = layout
        self.model = name
        self.generation += 1
        self.resident_possible = True  # this daemon may have another cache size
        self.conn.start_heartbeat(float(welcome.get("heartbeat_s") or 1.0))
        self.regions = {
            p: SlotRegion(
                r["n_slots"], SlotFormat.from_wire(r["format"]), r["offset"], r.get("first_slot"), r.get("directory")
            )
            for p, r in info["regions"].items()
        }
        self.thresholds = Thresholds(**info["thresholds"])
        self.holds_all = bool(info["holds_all"])
        self.served_file, self.epoch = info.get("file"), info.get("epoch")
        # a model opened on demand has its own segment and control block (our row is the same)
        shm, size = info.get("shm", welcome["shm"]), info.get("shm_size", welcome["shm_size"])
        if self.shm is None or self.shm.name != shm:
            old = self.shm
            self.shm = Segment(shm, size)
            if old is not None:
                old.close()
        ctl = welcome.get("control")
        if ctl and "control" in info:
            ctl = {**info["control"], "row": ctl["row"]}
        # a new HELLO: what was pending belonged to the old session and goes
        self._reports.clear()
        self.pins.attach(ctl, info)

    def renew(self, fields: dict) -> dict:
        """A request's fields after a new HELLO: our model by its name there, without what
        was batched for the old session (its slots mean nothing to the new one)."""
        fields = {k: v for k, v in fields.items() if k not in ("hits", "release")}
        if "epoch" in fields:  # the new daemon's count (the Model compares its file with ours)
            fields["epoch"] = self.epoch
        return {**fields, "model": self.model} if "model" in fields else fields

    # ---- the ExpertProvider protocol the segmented forward uses (engine/experts.py) ------

    def region_address(self, precision: str) -> int:
        offset = self.regions[precision].offset
        assert self.shm is not None and offset is not None  # a daemon's regions, mapped at WELCOME
        return self.shm.address + offset

    def part_bases(self, precision: str, layer: int) -> tuple:
        """Addresses of slot 0's parts of `layer` (gate/up/down, then any biases) in our
        mapping (SlotFormat.offsets)."""
        base = self.region_address(precision)
        return tuple(base + o for o in self.regions[precision].format.offsets(layer))

    def part_strides(self, precision: str, layer: int) -> tuple:
        """One slot to the next: the same for every layer (slots fit the largest layer)."""
        fmt = self.regions[precision].format
        return (fmt.slot_bytes,) * len(fmt.parts)

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """The experts' handles [Handle or None (skipped)]: pinned by ourselves when the
        directory has each one in the precision hobbitd's rule would serve (a Pinned list,
        which knows its pins), else asked of hobbitd. release() takes what this returned."""
        self._reports.position = (int(seq), int(token), int(n_tokens))
        if not self._checked:
            # once per forward (flush() ends one): the directory of a dead daemon would
            # still say "cached". Within a forward its slots stay mapped and whole (no one
            # writes them any more), so what we pinned before it died computes right.
            self.conn.check()
            self._checked = True
        local = self.pins.pin(layer, experts, scores, self.thresholds, self.holds_all, self.generation)
        if local is None:
            return self.request(layer, experts, scores, seq, token, n_tokens)
        self.local_hits += 1
        self._reports.hits.append(
            [
                int(layer),
                list(map(int, experts)),
                [None if h is None else [h.precision, h.slot] for h in local],
                list(map(float, scores)),
            ]
        )
        return local

    def fetch_pairs(self, layer: int, sel, scores, fetched: dict) -> list:
        """Each use of an expert gets the one slot hobbitd gave that expert for the batch."""
        return [[fetched[e] for e in row] for row in np.asarray(sel).tolist()]

    def request(self, layer: int, experts, scores=None, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """Pinned slots [Handle or None if skipped] for `experts` of `layer`, asked of
        hobbitd; scores are their unimportance (hobbitd picks precisions from them); seq
        and token place the request in the client's sequence for the cache policy;
        n_tokens is how many tokens the forward computes (for the daemon's per-client
        token counts)."""
        fields = {
            "id": self.conn.next_id(),
            "model": self.model,
            "layer": int(layer),
            "experts": [int(e) for e in experts],
            "seq": int(seq),
            "token": int(token),
            "tokens": int(n_tokens),
            **self._reports.take(),
        }
        if self.epoch is not None:
            fields["epoch"] = self.epoch
        if scores is not None:
            fields["scores"] = [float(s) for s in scores]
        reply = self.conn.call(m.Cmd.REQUEST, m.Cmd.SLOTS, **fields)
        return [Handle(*s) if s is not None else None for s in reply["slots"]]

    def release(self, handles) -> None:
        """End the use of one fetch()'s (or request()'s) handles: ours are unpinned at once,
        hobbitd's go with the next message (or flush())."""
        if isinstance(handles, Pinned):  # pinned by ourselves, all at once
            self.pins.unpin(handles, self.generation)
            return
        self._reports.release += [[h.precision, h.slot] for h in handles if h is not None]

    def flush(self) -> None:
        """The forward is over: report what is batched (no answer)."""
        self._checked = False
        try:
            self._send_used()
        except zmq.ZMQError:
            pass
        batched = self._reports.take()
        if batched:
            try:
                self.conn.send(m.Cmd.HITS, model=self.model, hits=batched.pop("hits", []), **batched)
            except zmq.ZMQError:
                pass  # the daemon is gone: nothing of this matters to a new one

    def hint(self, layer: int, predictions, compute_s: float | None = None) -> None:
        """Lookahead from `layer`: predictions [(target layer, experts, scores)], nearest
        first; compute_s: our seconds of compute before the next request (the daemon's
        prefetch budget). No answer; the daemon prefetches up to the first predicted miss.
        Not sent when the directory holds every predicted expert: nothing to do there."""
        th, holds_all = self.thresholds, self.holds_all
        if not predictions or all(self.pins.find(t, ex, sc, th, holds_all) is not None for t, ex, sc in predictions):
            return
        timed = {} if compute_s is None else {"compute_s": float(compute_s)}
        self.conn.send(
            m.Cmd.HINT,
            model=self.model,
            layer=int(layer),
            layers=[int(t) for t, _, _ in predictions],
            experts=[[int(e) for e in ex] for _, ex, _ in predictions],
            scores=[[float(x) for x in sc] for _, _, sc in predictions],
            **timed,
            **self._reports.take(),
        )

    def holds(self, first: int, last: int) -> bool:
        """The directory holds every expert of layers [first, last) in high precision (low
        for a low-only model): a fetch of them finds them there, whatever their scores."""
        return self.pins.holds(first, last, self.thresholds.low_only)

    def resident(self):
        """The (n_layer, n_expert) int32 slot table of every expert, pinned for us until
        close(), once hobbitd holds them all in high precision (it starts reading the
        missing ones at the first ask); None meanwhile, or for good when it cannot."""
        self.conn.check()  # never compute on a dead daemon's pins unknowingly
        if self._resident is not None and self._resident[0] == self.generation:
            return self._resident[1]
        if not self.resident_possible:
            return None
        epoch = {} if self.epoch is None else {"epoch": self.epoch}
        r = self.conn.call(m.Cmd.RESIDENT, m.Cmd.RESIDENT_REPLY, id=self.conn.next_id(), model=self.model, **epoch)
        if r["total"] == 0:
            self.resident_possible = False
        if r.get("slots") is None:
            return None
        self._resident = (self.generation, np.asarray(r["slots"], np.int32))
        return self._resident[1]

    def used(self, uses: int, seq: int, token: int, n_tokens: int) -> None:
        """A forward on resident experts used `uses` of them. One-token forwards are summed
        and sent at most every USED_EVERY_S (and by flush(), stats() and close()): a note
        per decode step cost hobbitd and this client ~0.4 ms each, 5 % of a step on the
        default model; hobbitd's counts lag by that interval at most."""
        if n_tokens > 1:  # a prompt: counted as one, now
            self._send_used()
            self.conn.send(
                m.Cmd.USED, model=self.model, uses=int(uses), seq=int(seq), token=int(token), tokens=int(n_tokens)
            )
            return
        self._reports.add_used(int(uses), int(seq), int(token))
        if time.monotonic() - self._reports.used_sent >= USED_EVERY_S:
            self._send_used()

    def _send_used(self) -> None:
        """Send the summed one-token forwards (USED), if any."""
        used = self._reports.take_used()
        if used is not None:
            self.conn.send(m.Cmd.USED, model=self.model, **used)

    def stats(self) -> dict:
        self.flush()  # the counts include every forward so far
        return self.conn.call(m.Cmd.STATS, m.Cmd.STATS_REPLY)["stats"]

    def close(self) -> None:
        self.flush()
        self.conn.close()
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self.pins.close()
        self.conn.stop_private()


def _program() -> str:
    """'hobbit-cli chat', 'my_app.py', ...: what `hobbit-cli top` shows for this client."""
    import sys

    argv = sys.argv or ["python"]
    prog = os.path.basename(argv[0]) or "python"
    if prog == "cli.py" or prog == "-m":
        prog = "hobbit-cli"
    sub = argv[1] if len(argv) > 1 and not argv[1].startswith("-") and prog.startswith("hobbit") else ""
    return f"{prog} {sub}".strip()
