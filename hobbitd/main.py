"""`hobbitd`: the loader daemon, in the foreground (systemd runs it the same way).

Exit codes: 0 after SIGTERM/SIGINT (shared memory and socket removed), 1 when it cannot
start (one line `hobbitd: error: ...` on stderr), 130 when a second SIGINT forces it out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ..protocol.errors import HobbitError, InputError
from .config import (
    REPACK_CHOICES,
    THRESHOLDS,
    DaemonConfig,
    check_threshold,
    default_model_file,
    load_config,
    parse_size,
)

log = logging.getLogger("hobbitd")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except HobbitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cache_size(text: str) -> int:
    return 0 if text == "auto" else _size(text)


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return v

    return parse


def _share(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hobbitd",
        description="The hobbit loader daemon: owns flash reads and the shared expert cache of MoE models.",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="GGUF",
        help="a MoE GGUF to serve (repeat for several; replaces the config's list; "
        "with none anywhere: the default model, built on first use)",
    )
    p.add_argument(
        "--model-dir",
        action="append",
        metavar="DIR",
        dest="model_dirs",
        help="a folder whose GGUFs clients may ask for by path, opened when first "
        "asked (repeat for several; replaces the config's model_dirs)",
    )
    p.add_argument(
        "--cache-size",
        type=_cache_size,
        metavar="SIZE",
        help="shared memory for expert slots, e.g. 2G; auto (the default): what --memory leaves after "
        "a 512 MiB allowance for the processes and a client's non-expert weights (`hobbit-cli plan` shows it)",
    )
    p.add_argument(
        "--memory",
        type=_size,
        metavar="SIZE",
        help="memory hobbitd and its clients may use, which --cache-size auto sizes the cache from "
        "(default: what is available, the machine's or its memory cgroup's (systemd's MemoryMax=) if smaller)",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="where to listen (default: $HOBBIT_SOCKET, "
        "/run/hobbitd/hobbitd.sock as a service or root, else the user runtime dir)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config; flags override it")
    p.add_argument("--io-threads", type=_positive(int), metavar="N", help="reader threads (4)")
    p.add_argument(
        "--io-limit",
        type=_size,
        metavar="BYTES_PER_S",
        help="cap flash reads, e.g. 400M, to emulate slower flash (default: none)",
    )
    p.add_argument("--no-direct-io", action="store_true", help="read through the page cache")
    p.add_argument(
        "--client-timeout",
        type=_positive(float),
        metavar="S",
        help="seconds of silence after which a client loses its pins (5)",
    )
    p.add_argument(
        "--slot-wait",
        type=_positive(float),
        metavar="S",
        help="seconds a miss waits for a free slot before cache_full (30)",
    )
    p.add_argument(
        "--max-sessions",
        type=_positive(int),
        metavar="N",
        help="clients served at once; one more is refused too_many_sessions (64)",
    )
    p.add_argument(
        "--max-sessions-per-process",
        type=_positive(int),
        metavar="N",
        help="sessions one client process may hold; one more is refused too_many_sessions (16)",
    )
    p.add_argument(
        "--max-sessions-per-user",
        type=_positive(int),
        metavar="N",
        help="sessions the processes of one user may hold; one more is refused too_many_sessions (48)",
    )
    p.add_argument(
        "--max-requests",
        type=_positive(int),
        metavar="N",
        help="requests of one client served at once; one more is refused busy (4)",
    )
    p.add_argument(
        "--client-pin-share",
        type=_share,
        metavar="F",
        help="share of a region's slots one client may hold pinned, never less "
        "than one layer's experts; beyond it a request is refused pin_limit (0.5)",
    )
    p.add_argument(
        "--owner-pid",
        type=_positive(int),
        metavar="PID",
        help="a private daemon: stop when process PID exits, then remove the folder of its socket (made for it alone)",
    )
    h = p.add_argument_group("HOBBIT techniques (each can be switched off for a baseline)")
    h.add_argument(
        "--low",
        dest="low_type",
        metavar="TYPE",
        help="low-precision companion type: auto (default: use the file "
        "`hobbit-cli convert` made, if any), none, or a type such as Q4_0",
    )
    h.add_argument("--low-share", type=float, metavar="F", help="share of the cache for low precision (0.25)")
    h.add_argument("--policy", choices=("hobbit", "lru"), help="cache eviction policy (hobbit)")
    h.add_argument(
        "--repack",
        choices=REPACK_CHOICES,
        help="auto (default): serve high precision from the repacked image `hobbit-cli convert "
        "--repack` made next to the model, if valid; off: from the GGUF",
    )
    h.add_argument(
        "--no-dynamic",
        dest="dynamic",
        action="store_false",
        default=None,
        help="load every miss in high precision (no low precision, no skipping)",
    )
    h.add_argument("--low-only", action="store_true", default=None, help="every expert in low precision")
    h.add_argument(
        "--no-prefetch", dest="prefetch", action="store_false", default=None, help="ignore clients' lookahead hints"
    )
    h.add_argument(
        "--no-prefetch-budget",
        dest="prefetch_budget",
        action="store_false",
        default=None,
        help="prefetch every predicted miss of the hinted layer, not only as many "
        "bytes as can be read while the client computes a layer",
    )
    h.add_argument(
        "--no-preload",
        dest="preload",
        action="store_false",
        default=None,
        help="read a model's experts only as clients ask for them, also when the cache holds "
        "them all (default: such a model is read whole when opened, behind the clients' reads)",
    )
    h.add_argument(
        "--t1",
        type=float,
        metavar="S",
        help="unimportance threshold for high precision, -1 (every miss low) to 1 "
        "(calibrated, else 1: exact; the paper's is 0.6)",
    )
    h.add_argument(
        "--t2",
        type=float,
        metavar="S",
        help="unimportance threshold beyond which experts are skipped, 0 to 1 (calibrated, else 1; the paper's is 0.9)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args) -> DaemonConfig:
    """The config file's DaemonConfig (if any) with the flags given on top; InputError (one
    line) for a bad config file or threshold."""
    cfg = load_config(args.config) if args.config else DaemonConfig()
    if args.model:
        cfg.models = args.model
    if args.model_dirs:
        cfg.model_dirs = [os.path.abspath(d) for d in args.model_dirs]
    for key in (
        "cache_size",
        "memory",
        "socket",
        "io_threads",
        "io_limit",
        "client_timeout",
        "slot_wait",
        "max_sessions",
        "max_sessions_per_process",
        "max_sessions_per_user",
        "max_requests",
        "client_pin_share",
        "owner_pid",
        "low_type",
        "low_share",
        "repack",
        "policy",
        "dynamic",
        "low_only",
        "prefetch",
        "prefetch_budget",
        "preload",
        "t1",
        "t2",
    ):  # each flag's dest is its config key
        value = getattr(args, key)
        if value is not None and key in THRESHOLDS:
            try:
                value = check_threshold(key, value)
            except InputError as e:
                raise InputError(f"--{key} {e}") from None
        if value is not None:
            setattr(cfg, key, value)
    if args.no_direct_io:
        cfg.direct_io = False
    return cfg


def with_default_model(cfg: DaemonConfig) -> DaemonConfig:
    """No model named anywhere: serve the default one, if a client has built it (a daemon
    with model folders may start with none: clients ask for theirs)."""
    if not cfg.models and not cfg.model_dirs:
        path = default_model_file()
        if not os.path.exists(path):
            raise InputError(
                f"no model to serve, and the default model is not built yet: run "
                f"`hobbit-cli prepare` (it builds {path}), or give --model GGUF"
            )
        cfg.models = [path]
    return cfg


async def run(cfg: DaemonConfig) -> int:
    """Start, serve until SIGTERM/SIGINT, shut down. HobbitError if it cannot start."""
    from .server import Daemon  # deferred: keeps `hobbitd --help` fast

    loop = asyncio.get_running_loop()
    daemon = Daemon(cfg)

    caught = []

    def on_signal(sig):
        caught.append(sig)
        if caught.count(signal.SIGINT) > 1:  # a second Ctrl-C: the user will not wait
            log.warning("second interrupt: exiting now")
            daemon.abandon()
            os._exit(130)
        if len(caught) == 1:
            log.info("%s: shutting down", signal.Signals(sig).name)
        daemon.stop()

    sigs = (signal.SIGTERM, signal.SIGINT)
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    for sig in sigs:  # before startup: a signal during startup still cleans up
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await daemon.startup()
        await daemon.serve()
    finally:
        try:
            await daemon.shutdown()
            if daemon.owner_gone:
                _remove_private_folder(os.path.dirname(daemon.socket_path))
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)
                signal.signal(sig, saved[sig])
    return 0


def _remove_private_folder(folder: str) -> None:
    """A private daemon whose owner died: nobody else will remove the folder its owner
    made for it. Remove our log if it is in there, then the folder if that left it empty."""
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.dirname(path) == folder:
                os.unlink(path)
        except OSError:
            pass
    try:
        os.rmdir(folder)
    except OSError:
        pass


class _Format(logging.Formatter):
    def format(self, record):
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        return f"hobbitd: {level}{super().format(record)}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    log.propagate = False
    try:
        import uvloop

        return uvloop.run(run(with_default_model(config_from_args(args))))
    except HobbitError as e:
        print(f"hobbitd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # interrupted before the handlers were in place
        return 130


if __name__ == "__main__":
    sys.exit(main())
