"""hobbitd's thresholds T1/T2: unset means calibrated (else exact), `--t1 0` means T1 = 0,
and the flags and the TOML config accept the same range (T1 from -1, every miss low, to 1;
T2 from 0 to 1), refusing anything else with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from daemon_util import connect, hello, run_daemon, stats
from hobbit.hobbitd.config import DaemonConfig, load_config
from hobbit.hobbitd.main import build_parser, config_from_args
from hobbit.protocol.errors import InputError

SMALL = dict(layers=2, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2, type="Q8_0")


@pytest.fixture(scope="module")
def converted(synth, tmp_path_factory) -> str:
    """A private copy of a small model with its low-precision companion, uncalibrated."""
    path = str(tmp_path_factory.mktemp("thresholds") / "m.gguf")
    shutil.copy(synth(**SMALL), path)
    subprocess.run(
        [sys.executable, "-m", "hobbit.compute.apps.cli", "convert", path, "-q"], check=True, capture_output=True
    )
    return path


def served(path, tmp_path, cache_size="4M", **flags) -> dict:
    """What hobbitd started with `flags` says of the model at `path` (its stats)."""
    with run_daemon([path], cache_size, tmp_path, **flags) as d:
        s = connect(d.socket)
        hello(s)
        st = stats(s)["models"][os.path.basename(path)[: -len(".gguf")]]
        s.close(linger=0)
    return st


def test_unset_is_none_and_zero_is_zero():
    parse = build_parser().parse_args
    assert DaemonConfig().t1 is None and config_from_args(parse([])).t1 is None
    assert config_from_args(parse(["--t1", "0", "--t2", "0"])) == DaemonConfig(t1=0.0, t2=0.0)


def test_t1_0_is_served_as_0(converted, tmp_path):
    """The model is uncalibrated: unset, it is served exactly (T1 = 1); --t1 0 is T1 = 0."""
    assert served(converted, tmp_path)["hobbit"]["t1"] == 1.0
    h = served(converted, tmp_path, t1=0)["hobbit"]
    assert (h["t1"], h["t2"], h["mode"]) == (0.0, 1.0, "lossy: T1 0.00 T2 1.00"), h


def test_toml_t1_minus_1_is_served_as_the_flag(converted, tmp_path):
    """T1 = -1 (every miss low, as calibration may choose): the cache is low precision only,
    whether the config file or the flag says so."""
    config = tmp_path / "hobbitd.toml"
    config.write_text("t1 = -1\n")
    assert load_config(str(config)).t1 == -1.0
    by_flag = served(converted, tmp_path, cache_size="1M", t1=-1)
    by_toml = served(converted, tmp_path, cache_size="1M", config=str(config))
    for st in (by_flag, by_toml):
        assert st["hobbit"]["t1"] == -1.0 and list(st["regions"]) == ["low"], st
        assert st["hobbit"]["mode"] == "lossy: every miss low, T2 1.00", st["hobbit"]


@pytest.mark.parametrize(
    "key, value", [("t1", -1), ("t1", 0), ("t1", 0.6), ("t1", 1), ("t2", 0), ("t2", 0.9), ("t2", 1)]
)
def test_flags_and_toml_accept_the_same(tmp_path, key, value):
    config = tmp_path / "d.toml"
    config.write_text(f"{key} = {value}\n")
    by_flag = config_from_args(build_parser().parse_args([f"--{key}", str(value)]))
    assert getattr(load_config(str(config)), key) == getattr(by_flag, key) == value


@pytest.mark.parametrize("key, value", [("t1", "-1.5"), ("t1", "1.5"), ("t1", "nan"), ("t2", "-0.1"), ("t2", "2")])
def test_flags_and_toml_refuse_the_same_with_one_line(tmp_path, key, value):
    config = tmp_path / "d.toml"
    config.write_text(f"{key} = {value}\n")
    with pytest.raises(InputError, match=f"{key} must be a number from"):
        load_config(str(config))
    with pytest.raises(InputError, match=f"--{key} must be a number from"):
        config_from_args(build_parser().parse_args([f"--{key}", value]))
    for argv in (["--config", str(config)], [f"--{key}", value]):  # the real command
        r = subprocess.run(
            [sys.executable, "-m", "hobbit.hobbitd.main", "--socket", str(tmp_path / "s.sock"), *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and "must be a number from" in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "s.sock")
