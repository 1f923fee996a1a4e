"""hobbitd's configuration (TOML + flags, sizes, the default socket) and sd_notify."""

from __future__ import annotations

import os
import socket

import pytest

from hobbit.hobbitd import config
from hobbit.hobbitd.config import DaemonConfig, default_socket, load_config, parse_size
from hobbit.hobbitd.main import build_parser, config_from_args
from hobbit.hobbitd.notify import sd_notify
from hobbit.protocol.errors import InputError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "systemd", "hobbitd.toml")


@pytest.mark.parametrize(
    "text, n",
    [
        ("123", 123),
        (123, 123),
        ("4K", 4096),
        ("400M", 400 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("2g", 2 << 30),
        ("10MB", 10 << 20),
        (" 1 T ", 1 << 40),
        ("0", 0),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "M", "-1", -1, "1.5.2G", "2X", "two", "1 GB extra"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError):
        parse_size(text)


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.models == ["/srv/models/Mixtral-8x7B-Instruct-v0.1.Q4_K_M.gguf"]
    assert cfg.model_dirs == ["/srv/models"]
    assert cfg.cache_size == 8 << 30 and cfg.io_threads == 4 and cfg.direct_io is True
    assert (cfg.client_timeout, cfg.slot_wait, cfg.socket) == (5.0, 30.0, "")


def test_config_values_and_relative_models(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text(
        'models = ["m/a.gguf", "/abs/b.gguf"]\ncache_size = 1073741824\n'
        'io_limit = "400M"\ndirect_io = false\nclient_timeout = 2\n'
        'model_dirs = ["m", "/srv/models"]\n'
    )
    cfg = load_config(str(p))
    assert cfg.models == [str(tmp_path / "m/a.gguf"), "/abs/b.gguf"]
    assert cfg.model_dirs == [str(tmp_path / "m"), "/srv/models"]
    assert (cfg.cache_size, cfg.io_limit, cfg.direct_io) == (1 << 30, 400 << 20, False)
    assert cfg.client_timeout == 2.0


@pytest.mark.parametrize(
    "text, needle",
    [
        ("cache_sise = 1", "unknown key 'cache_sise'"),
        ('models = "a.gguf"', "models must be a list"),
        ("io_threads = 0", "io_threads must be a positive integer"),
        ("max_sessions_per_process = 0", "max_sessions_per_process must be a positive integer"),
        ('max_sessions_per_user = "all"', "max_sessions_per_user must be a positive integer"),
        ("max_requests = 1.5", "max_requests must be a positive integer"),
        ('direct_io = "yes"', "direct_io must be true or false"),
        ("client_timeout = -1", "client_timeout must be a positive number"),
        ('cache_size = "lots"', "cache_size"),
        ("models = [", "unreadable config"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text + "\n")
    with pytest.raises(InputError) as e:
        load_config(str(p))
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_config(tmp_path):
    with pytest.raises(InputError, match="no such config file"):
        load_config(str(tmp_path / "nope.toml"))


def test_flags_override_the_config(tmp_path):
    p = tmp_path / "d.toml"
    p.write_text('models = ["/a.gguf"]\ncache_size = "1G"\nio_threads = 2\n')
    args = build_parser().parse_args(
        ["--config", str(p), "--cache-size", "2G", "--no-direct-io", "--client-timeout", "1.5"]
    )
    cfg = config_from_args(args)
    assert cfg.models == ["/a.gguf"] and cfg.io_threads == 2
    assert (cfg.cache_size, cfg.direct_io, cfg.client_timeout) == (2 << 30, False, 1.5)
    args = build_parser().parse_args(["--config", str(p), "--max-sessions-per-process", "3", "--max-requests", "2"])
    cfg = config_from_args(args)
    assert (cfg.max_sessions_per_process, cfg.max_sessions_per_user, cfg.max_requests) == (3, 48, 2)
    args = build_parser().parse_args(["--config", str(p), "--model", "/b.gguf"])
    assert config_from_args(args).models == ["/b.gguf"]
    assert config_from_args(build_parser().parse_args([])) == DaemonConfig()


def test_bad_flag_values_exit_2(capsys):
    for argv in (["--cache-size", "lots"], ["--io-threads", "0"], ["--client-timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2


def test_default_socket(monkeypatch, tmp_path):
    for var in ("HOBBIT_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(config, "SYSTEM_SOCKET", str(tmp_path / "system.sock"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    assert default_socket() == "/tmp/hobbitd-1000.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket() == "/run/user/1000/hobbitd.sock"
    (tmp_path / "system.sock").touch()  # a system daemon is up: users find it
    assert default_socket() == str(tmp_path / "system.sock")
    (tmp_path / "system.sock").unlink()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket() == str(tmp_path / "system.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/hobbitd:/run/other")
    assert default_socket() == "/run/hobbitd/hobbitd.sock"
    monkeypatch.setenv("HOBBIT_SOCKET", "/x/y.sock")
    assert default_socket() == "/x/y.sock"


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(monkeypatch, tmp_path, abstract):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"hobbit-test-{os.getpid()}"
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        s.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    s.settimeout(2)
    assert sd_notify("READY=1\nSTATUS=hi")
    assert s.recv(100) == b"READY=1\nSTATUS=hi"
    s.close()


def test_sd_notify_unset_or_gone(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sd_notify("READY=1") is False


def test_no_model_and_none_built_says_how_to_build_it(tmp_path):
    """hobbitd never builds the default model (that is the client's job): with no model named
    and none prepared it says in one line how to prepare one, before making anything."""
    import subprocess
    import sys

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("HOBBIT_SOCKET", None)
    r = subprocess.run(
        [sys.executable, "-m", "hobbit.hobbitd.main", "--socket", str(tmp_path / "s.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "hobbit-cli prepare" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "data") and not os.path.exists(tmp_path / "s.sock")


def test_cache_size_auto_sizes_from_the_memory_cgroups_headroom(synth, tmp_path):
    """Under a memory limit (systemd's MemoryMax=, a container's) `--cache-size auto` sizes
    the cache from the cgroup's headroom (less the processes' allowance and a client's
    weights: loader/sizing.py), not from the machine's free memory: a daemon under a 1 GiB
    limit on a machine with more free once took half the machine's."""
    import psutil

    from daemon_util import RunningDaemon, connect, hello, stats
    from hobbit.compute.measure.memcgroup import CgroupUnavailable, MemoryCgroup

    limit = 1 << 30
    assert psutil.virtual_memory().available > 4 * limit, "the test needs a machine with more free memory"
    try:
        cg = MemoryCgroup(limit, "hobbit-test-auto")
    except CgroupUnavailable as e:
        pytest.skip(f"no memory cgroup to run hobbitd in: {e}")
    model = synth(layers=2, d_model=64, d_ff=128, experts=4, top_k=2, heads=2, kv_heads=1)
    try:
        d = RunningDaemon(
            [model],
            str(tmp_path / "hobbitd.sock"),
            log_path=str(tmp_path / "hobbitd.stderr"),
            cache_size="auto",
            preexec=cg.enter,
            owner_pid=os.getpid(),
        )
        try:
            d.wait_ready(60.0)
            s = connect(d.socket)
            hello(s)
            size = stats(s)["cache_size"]
            s.close(linger=0)
        finally:
            d.stop()
    finally:
        cg.close()
    from hobbit.loader.sizing import PROCESS_ALLOWANCE

    assert 0 < size <= limit - PROCESS_ALLOWANCE, size
    assert parse_size("1G") and config_from_args(build_parser().parse_args(["--cache-size", "auto"])).cache_size == 0
