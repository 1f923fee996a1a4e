"""hobbitd's client sessions: one per ROUTER identity, from HELLO to BYE or its timeout.

Each session is a pin owner of the ExpertCache (its sid, unique for the daemon's life:
identities are reused); ending a session releases every pin it holds. A session is never
reaped while a request of it is being served.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import psutil
import zmq

from ..loader.cache import EWMA, ExpertCache, Owner
from ..loader.shm import pid_alive

log = logging.getLogger("hobbitd")

GAP_MAX_S = 0.1  # a client silent longer than this between requests was idle, not computing
PROBE = "hobbitd-probe"  # the name a starting daemon's probe gives (not logged, not listed)


class Peer(NamedTuple):
    """The process at the other end of a connection, as the kernel says (ZeroMQ's
    Peer-Address "host:uid:gid:pid" on ipc); None where unknown (another pid namespace)."""

    pid: int | None
    uid: int | None

    @staticmethod
    def of(frame) -> Peer:
        """The peer of a received frame."""
        try:
            _, uid, _, pid = str(frame.get("Peer-Address")).rsplit(":", 3)
            return Peer(int(pid) if int(pid) > 0 else None, int(uid))
        except (AttributeError, ValueError, zmq.ZMQError):
            return Peer(None, None)


UNKNOWN = Peer(None, None)


@dataclass(frozen=True)
class Limits:
    """How many sessions at once: in all, of one process, of one user (DaemonConfig's)."""

    total: int
    per_process: int
    per_user: int


@dataclass(eq=False)
class Session:
    sid: int  # pin owner in the cache
    ident: bytes
    pid: int | None
    name: str
    last_seen: float  # time.monotonic() of its last message
    inflight: int = 0  # requests being served: never reaped while > 0
    alive: bool = True
    replied_at: float = 0.0  # time.monotonic() of its last SLOTS
    gap_s: float | None = None  # its time between a SLOTS and its next REQUEST (EWMA): compute
    connected: float = field(default_factory=time.monotonic)
    tokens: int = 0  # decoded: forwards of one token
    prompt_tokens: int = 0  # in forwards of more than one token
    last_forward: tuple = ()  # (seq, token) of its last request: a new one starts a forward
    peer: tuple | None = None  # (pid, start time) of its process, from the kernel (ipc)
    owner: Peer = UNKNOWN  # its process and user, for the session limits

    def count_forward(self, seq, token, n_tokens, forwards=1) -> None:
        """Count a forward's tokens once, at its first request (the client's first layer);
        `forwards` > 1: that many one-token forwards summed in one note (USED)."""
        if (
            not isinstance(n_tokens, int)
            or isinstance(n_tokens, bool)
            or n_tokens < 1
            or (seq, token) == self.last_forward
        ):
            return
        self.last_forward = (seq, token)
        if isinstance(forwards, int) and not isinstance(forwards, bool) and forwards == n_tokens > 1:
            self.tokens += forwards
        elif n_tokens == 1:
            self.tokens += 1
        else:
            self.prompt_tokens += n_tokens

    def note_request(self) -> None:
        """A REQUEST arrived: the time since our last SLOTS was the client's compute
        (pauses over GAP_MAX_S are idle)."""
        if self.replied_at:
            gap = time.monotonic() - self.replied_at
            if gap < GAP_MAX_S:
                self.gap_s = gap if self.gap_s is None else (1 - EWMA) * self.gap_s + EWMA * gap

    def stats(self, owner: Owner) -> dict:
        """What hobbit-cli top shows per client; `owner`: its counts in the cache."""
        return {
            "name": self.name,
            "pid": self.pid,
            "connected_s": round(time.monotonic() - self.connected, 3),
            "experts": owner.requested,
            "hits": owner.hits + owner.waits,
            "misses": owner.misses,
            "skipped": owner.skipped,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
        }


class Sessions:
    """The live sessions by identity; each one's pins live in `cache`."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self.by_ident: dict[bytes, Session] = {}
        self._sids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.by_ident)

    def get(self, ident: bytes) -> Session | None:
        return self.by_ident.get(ident)

    def open(self, ident: bytes, pid: int | None, name: str, peer: Peer = UNKNOWN) -> Session:
        """A new session for `ident`, ending the one it had. peer: its process as the
        kernel says (not what the client claims): once that process is gone the session
        ends at the next reap, whatever the timeout."""
        old = self.by_ident.get(ident)
        if old is not None:
            self.drop(old, "said HELLO again")
        owner = Peer(peer.pid or pid, peer.uid)  # the claimed pid only where the kernel's is unknown
        s = Session(next(self._sids), ident, pid, name, time.monotonic(), peer=_process(peer.pid), owner=owner)
        self.by_ident[ident] = s
        self.cache.open_owner(s.sid, row=name != PROBE)  # a probe pins nothing
        if s.name != PROBE:
            log.info("client %s (pid %s) connected", s.name or "?", pid)
        return s

    def refusal(self, ident: bytes, peer: Peer, claimed_pid: int | None, limits: Limits) -> str | None:
        """Why a HELLO of `peer` on `ident` gets no session (one line starting "no free
        session", naming who holds them), or None when it may have one. A session the
        identity already has is given up for the new one, so it does not count."""
        others = [s for s in self.by_ident.values() if s.ident != ident]
        pids = Counter(s.owner.pid for s in others if s.owner.pid is not None)
        pid = peer.pid or claimed_pid
        if len(others) >= limits.total:
            top = ", ".join(f"{k} by pid {p}" for p, k in pids.most_common(2))
            return f"no free session: {len(others)} in use{', ' if top else ''}{top} (max_sessions {limits.total})"
        if pid is not None and pids[pid] >= limits.per_process:
            return (
                f"no free session for pid {pid}: it holds {pids[pid]} (max_sessions_per_process {limits.per_process})"
            )
        users = Counter(s.owner.uid for s in others if s.owner.uid is not None)
        if peer.uid is not None and users[peer.uid] >= limits.per_user:
            return (
                f"no free session for uid {peer.uid}: its processes hold {users[peer.uid]} "
                f"(max_sessions_per_user {limits.per_user})"
            )
        return None

    def drop(self, s: Session, why: str) -> None:
        """End a session and release every pin it holds."""
        s.alive = False
        if self.by_ident.get(s.ident) is s:
            del self.by_ident[s.ident]
        n = self.cache.close_owner(s.sid)
        if s.name != PROBE:
            log.info("client %s (pid %s) %s; released %d pins", s.name or "?", s.pid, why, n)

    def reap(self, timeout: float) -> None:
        """Drop the sessions whose process is gone, and those silent for over `timeout`
        seconds with no request in flight."""
        now = time.monotonic()
        for s in list(self.by_ident.values()):
            if s.peer is not None and not pid_alive(*s.peer):
                self.drop(s, "exited")
            elif s.inflight == 0 and now - s.last_seen > timeout:
                self.drop(s, f"silent for {now - s.last_seen:.1f} s")

    def stats(self) -> list[dict]:
        return [s.stats(self.cache.owners[s.sid]) for s in self.by_ident.values() if s.name != PROBE]


def _process(pid: int | None) -> tuple | None:
    """(pid, start time) of a live process, to know it again (pids are reused); None when
    unknown (no pid: another pid namespace, or not a unix socket)."""
    if not pid:
        return None
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return None
