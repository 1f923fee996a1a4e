"""hobbit-cli top: a live view of hobbitd, redrawn every --interval seconds.

Each frame compares two STATS snapshots, so its rates (requests, hits, reads, tokens per
second) are over the last interval; occupancy is as of now; prefetch accuracy is the share
of prefetched experts a request then used, over the interval (lifetime in brackets).
"""

from __future__ import annotations

import sys
import time

from ...protocol.errors import DaemonError

BAR = 20


def _bar(filled: int, total: int) -> str:
    n = round(BAR * filled / total) if total else 0
    return "#" * n + "." * (BAR - n)


def _pct(part: float, whole: float) -> str:
    return f"{part / whole:6.1%}" if whole else "     -"


def _duration(s: float) -> str:
    s = int(s)
    return (
        f"{s // 86400}d{s // 3600 % 24:02d}h"
        if s >= 86400
        else f"{s // 3600}h{s // 60 % 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
    )


def frame(socket: str, old: dict, new: dict, dt: float) -> str:
    """The screen for two snapshots taken dt seconds apart."""
    rate = lambda a, b, key: (b.get(key, 0) - a.get(key, 0)) / dt
    io0, io1 = old.get("io", {}), new.get("io", {})
    lines = [
        f"hobbitd at {socket}   up {_duration(new.get('uptime_s', 0))}   "
        f"{new.get('clients', 0)} clients   read {rate(io0, io1, 'bytes_read') / 1e6:7.1f} MB/s   "
        f"reads queued {io1.get('pending', 0)}",
        "",
    ]
    for name, m1 in new.get("models", {}).items():
        m0 = old.get("models", {}).get(name, {})
        h = m1.get("hobbit", {})
        blind = "   (calibrated blind: random weights, quality unjudged)" if h.get("blind") else ""
        low = h.get("low_type") or "-"
        lines.append(f"{name}   policy {h.get('policy', '?')}   {h.get('mode', '?')}   low type {low}{blind}")
        for prec, r in m1.get("regions", {}).items():
            lines.append(
                f"  {prec:4s} [{_bar(r['ready'], r['slots'])}] {r['ready']:5d}/{r['slots']:<5d} slots "
                f"{r['ready'] * r['slot_bytes'] / 2**20:8.1f} MiB   {r['pinned']:3d} pinned   "
                f"{r.get('loading', 0):3d} loading"
            )
        d = {
            k: m1.get(k, 0) - m0.get(k, 0)
            for k in (
                "requested",
                "hits",
                "waits",
                "misses",
                "skipped",
                "hits_high",
                "hits_low",
                "misses_high",
                "misses_low",
                "prefetched",
                "prefetch_used",
                "bytes_read",
            )
        }
        n = d["requested"]
        lines.append(
            f"  experts {n / dt:8.1f}/s   hit {_pct(d['hits'] + d['waits'], n)} "
            f"(high {_pct(d['hits_high'], n).strip()}, low {_pct(d['hits_low'], n).strip()})   "
            f"miss {_pct(d['misses'], n)}   skip {_pct(d['skipped'], n)}"
        )
        life = _pct(m1.get("prefetch_used", 0), m1.get("prefetched", 0)).strip()
        lines.append(
            f"  read {d['bytes_read'] / dt / 1e6:8.1f} MB/s   prefetch {d['prefetched'] / dt:6.1f}/s "
            f"accuracy {_pct(d['prefetch_used'], d['prefetched']).strip()} (lifetime {life})"
        )
        lines.append("")
    olds = {(s.get("pid"), s.get("name")): s for s in old.get("sessions", [])}
    lines.append(
        f"{'PID':>8}  {'CLIENT':24s} {'TOK/S':>7} {'PROMPT TOK/S':>12} {'EXPERTS/S':>10} "
        f"{'HIT':>7} {'SKIP':>7} {'TOKENS':>8}  UP"
    )
    for s in sorted(new.get("sessions", []), key=lambda s: -s.get("tokens", 0)):
        s0 = olds.get((s.get("pid"), s.get("name")), {})
        d = {k: s.get(k, 0) - s0.get(k, 0) for k in ("tokens", "prompt_tokens", "experts", "hits", "skipped")}
        lines.append(
            f"{s.get('pid') or '?':>8}  {s.get('name', '')[:24]:24s} {d['tokens'] / dt:7.1f} "
            f"{d['prompt_tokens'] / dt:12.1f} {d['experts'] / dt:10.1f} "
            f"{_pct(d['hits'], d['experts'])} {_pct(d['skipped'], d['experts'])} "
            f"{s.get('tokens', 0):8d}  {_duration(s.get('connected_s', 0))}"
        )
    if not new.get("sessions"):
        lines.append("  (no clients)")
    return "\n".join(lines)


def run_top(socket: str, interval: float = 1.0, count: int | None = None, out=sys.stdout) -> int:
    """Draw frames until Ctrl-C (or `count` frames). On a terminal each frame replaces the
    last; otherwise frames follow each other, separated by a blank line (like top -b)."""
    from ..client.expert_client import ExpertClient

    client = ExpertClient(socket, None, timeout=5, retries=0, name="hobbit-cli top")
    tty = out.isatty()
    drawn = 0
    try:
        old, t_old = client.stats(), time.monotonic()
        while count is None or drawn < count:
            time.sleep(interval)
            try:
                new = client.stats()
            except DaemonError as e:
                raise DaemonError(e.code, f"hobbitd at {socket} stopped answering: {e}") from None
            t_new = time.monotonic()
            screen = frame(socket, old, new, t_new - t_old)
            stamp = time.strftime("%H:%M:%S")
            if tty:
                out.write("\x1b[H\x1b[2J" + screen + f"\n\n{stamp}  every {interval:g} s, Ctrl-C quits\n")
            else:
                out.write(("\n" if drawn else "") + f"--- {stamp}\n" + screen + "\n")
            out.flush()
            old, t_old = new, t_new
            drawn += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0
