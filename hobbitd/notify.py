"""sd_notify without libsystemd: tell systemd (Type=notify) that we are ready, what we are
doing, and that we are stopping. A no-op when not started by systemd."""

from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> bool:
    """Send `state` ("READY=1", "STATUS=...", "STOPPING=1", lines joined by \\n) to
    $NOTIFY_SOCKET. True if sent; False when unset or unreachable (never raises: a lost
    status line must not stop the daemon)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
        return True
    except OSError:
        return False
