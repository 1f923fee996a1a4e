"""The daemon's configuration: one dataclass, loaded from one TOML file, flags on top.

TOML keys are the field names (models, model_dirs, cache_size, memory, socket, io_threads,
io_limit, direct_io, client_timeout, slot_wait, max_sessions, max_sessions_per_process,
max_sessions_per_user, max_requests, client_pin_share, owner_pid, low_type,
low_share, repack, policy, dynamic, low_only, prefetch, prefetch_budget, preload, t1, t2); sizes may be
integers (bytes) or strings such as "400M", "2G", "1.5GiB". Relative model paths and folders
are relative to the config file's folder.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field, fields

from ..loader.precision import EVERY_MISS_LOW, EXACT
from ..protocol.errors import InputError

log = logging.getLogger("hobbitd")

SYSTEM_SOCKET = "/run/hobbitd/hobbitd.sock"
REPACK_CHOICES = ("auto", "off")


@dataclass
class DaemonConfig:
    models: list[str] = field(default_factory=list)  # GGUF paths
    model_dirs: list[str] = field(default_factory=list)  # folders whose GGUFs a client may
    # ask for by path (opened then); nothing outside them
    cache_size: int = 0  # bytes of shared memory for expert slots; 0 ("auto"): what `memory` leaves
    # after the processes' allowance and a client's non-expert weights (loader/sizing.py)
    memory: int | None = None  # bytes hobbitd and its clients may use, for cache_size auto; None:
    # what is available to the daemon (the machine's, or its memory cgroup's headroom)
    socket: str = ""  # "" = default_socket()
    io_threads: int = 4  # reader threads
    io_limit: int = 0  # bytes/s cap on flash reads (emulates slow flash); 0 = none
    direct_io: bool = True  # O_DIRECT reads (bypass the page cache) where supported
    client_timeout: float = 5.0  # seconds of silence after which a client loses its pins
    slot_wait: float = 30.0  # seconds a miss waits for an unpinned slot before cache_full
    max_sessions: int = 64  # clients at once; one more is answered too_many_sessions
    # so that one process (or user) cannot take every session (issue 31); beyond them a
    # HELLO is answered too_many_sessions too, naming who holds them
    max_sessions_per_process: int = 16
    max_sessions_per_user: int = 48  # leaves a system daemon's other users 16
    max_requests: int = 4  # requests of one client served at once; beyond: ERROR busy (a
    # client waits for each answer, so it has one; a flood is refused, never queued)
    client_pin_share: float = 0.5  # share of a region's slots one client may hold pinned
    # (never less than one layer's experts); beyond: pin_limit
    owner_pid: int = 0  # a private daemon's owner: stop when it exits; 0 = none
    # HOBBIT (issue 5); every technique can be switched off for baselines
    low_type: str = "auto"  # companion type: "auto" (the best suitable type whose file
    # is made), "none", or e.g. "Q4_0"
    low_share: float = 0.25  # share of each model's cache for low-precision slots
    repack: str = "auto"  # high precision from the repacked image (`hobbit-cli convert
    # --repack`, ggml's CPU layout) when a valid one is next to the model; "off": the GGUF
    policy: str = "hobbit"  # eviction: "hobbit" (multidimensional) or "lru"
    dynamic: bool = True  # token-level dynamic loading (low precision / skip on misses)
    low_only: bool = False  # every expert in low precision (a baseline)
    prefetch: bool = True  # act on clients' lookahead hints
    prefetch_budget: bool = True  # prefetch only what can be read while the client computes
    preload: bool = True  # a model whose experts all fit the cache: read them all at once
    t1: float | None = None  # thresholds (THRESHOLDS); None: the calibrated values, else 1 (exact)
    t2: float | None = None


# The thresholds' ranges (loader/precision.py): scores are in [0, 1), so T1 < 0 loads every
# miss in low precision (-1, EVERY_MISS_LOW, is what calibration writes) and 1 is exact;
# T2 below 0 would skip every expert, the top one too.
THRESHOLDS = {"t1": (EVERY_MISS_LOW, EXACT), "t2": (0.0, EXACT)}


def check_threshold(key: str, value) -> float:
    """`value` for threshold `key` ("t1" or "t2") as a float; InputError "must be ..." when
    it is not a number in THRESHOLDS' range. The one check of the TOML's and the flags'."""
    lo, hi = THRESHOLDS[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise InputError(f"must be a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?", re.IGNORECASE)


def parse_size(text) -> int:
    """Bytes from 123, "123", "400M", "2G", "1.5GiB". Suffixes are powers of 1024 with or
    without "iB"/"B" (as in systemd's MemoryMax=), so "1G" == "1GiB" == 2**30."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InputError(f"size {text} is negative")
        return text
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise InputError(
            f"size {text!r} is not a number of bytes with an optional K/M/G/T suffix (e.g. 400M, 2G, 1.5GiB)"
        )
    scale = 1024 ** " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * scale)


def cache_sizing(memory: int | None, models: list[str]):
    """How `--cache-size auto` shares `memory` bytes (None: what is available now) with a
    client of each of `models` (GGUF paths): loader/sizing.py's rule, the cache bounded by
    the shared-memory folder's free bytes. `hobbit-cli plan` prints the same Sizing."""
    from ..loader.sizing import client_weights, size_memory
    from .memory import shm_free

    return size_memory(memory, client_weights(models), shm_free())


def auto_cache_size(memory: int | None, paths: list[str]) -> int:
    """--cache-size auto: the cache `memory` (None: what is available) leaves a client of
    each model at `paths` (loader/sizing.py; `hobbit-cli plan` prints the same figure).
    InputError when nothing is left."""
    sizing = cache_sizing(memory, paths)
    sizing.check("the memory given (--memory)" if memory is not None else "the memory available")
    log.info(
        "cache size auto: %.0f MiB of %.0f MiB %s",
        sizing.cache / (1 << 20),
        sizing.memory / (1 << 20),
        sizing.memory_source,
    )
    return sizing.cache


def default_socket() -> str:
    """Where the daemon listens and clients connect, when no --socket is given:
    $HOBBIT_SOCKET; else the system socket when running as a system service ($RUNTIME_DIRECTORY
    set by systemd), as root, or when a system daemon's socket exists (one daemon per
    machine: a user in the hobbitd group finds it); else $XDG_RUNTIME_DIR/hobbitd.sock;
    else /tmp/hobbitd-$UID.sock."""
    if os.environ.get("HOBBIT_SOCKET"):
        return os.environ["HOBBIT_SOCKET"]
    if os.environ.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories, colon-separated; ours is the first
        return os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "hobbitd.sock")
    if os.geteuid() == 0 or os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "hobbitd.sock")
    return f"/tmp/hobbitd-{os.getuid()}.sock"


# The default model's file name; compute/make/moefy.py builds it (model_name of its
# default options, checked by tests/test_default_model.py).
DEFAULT_MODEL = "smollm2-135m-moe-e16k12-r3.gguf"


def models_dir() -> str:
    """Where hobbit keeps the models it builds: $XDG_DATA_HOME/hobbit/models."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "hobbit", "models")


def default_model_file() -> str:
    return os.path.join(models_dir(), DEFAULT_MODEL)


def load_config(path: str) -> DaemonConfig:
    """A DaemonConfig from one TOML file; InputError naming the file and the bad key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: unreadable config ({e})") from None
    known = {f.name: f for f in fields(DaemonConfig)}
    cfg = DaemonConfig()
    for key, value in data.items():
        if key not in known:
            raise InputError(f"{path}: unknown key {key!r} (known: {', '.join(known)})")
        setattr(cfg, key, _coerce(path, key, value))
    base = os.path.dirname(os.path.abspath(path))
    cfg.models = [os.path.join(base, os.path.expanduser(m)) for m in cfg.models]
    cfg.model_dirs = [os.path.join(base, os.path.expanduser(d)) for d in cfg.model_dirs]
    return cfg


def _coerce(path: str, key: str, value):
    """A TOML value checked against the field's type (TOML has no sizes: strings allowed)."""

    def bad(want):
        return InputError(f"{path}: {key} must be {want}, not {value!r}")

    if key in ("models", "model_dirs"):
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise bad("a list of GGUF paths" if key == "models" else "a list of folders")
        return list(value)
    if key == "cache_size" and value == "auto":
        return 0
    if key in ("cache_size", "io_limit", "memory"):
        try:
            return parse_size(value)
        except InputError as e:
            raise InputError(f"{path}: {key}: {e}") from None
    if key == "socket":
        if not isinstance(value, str):
            raise bad("a path")
        return os.path.expanduser(value)
    if key in ("io_threads", "max_sessions", "max_sessions_per_process", "max_sessions_per_user", "max_requests"):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("a positive integer")
        return value
    if key == "owner_pid":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad("a process id (0: none)")
        return value
    if key in ("direct_io", "dynamic", "low_only", "prefetch", "prefetch_budget", "preload"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key in ("low_type", "policy", "repack"):
        if not isinstance(value, str):
            raise bad("a string")
        if key == "policy" and value not in ("hobbit", "lru"):
            raise bad('"hobbit" or "lru"')
        if key == "repack" and value not in REPACK_CHOICES:
            raise bad('"auto" or "off"')
        return value
    if key in THRESHOLDS:
        try:
            return check_threshold(key, value)
        except InputError as e:
            raise InputError(f"{path}: {key} {e}") from None
    if key in ("low_share", "client_pin_share"):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise bad("a number from 0 to 1")
        return float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise bad("a positive number of seconds")
    return float(value)
