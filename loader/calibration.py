"""The calibration file: HOBBIT's thresholds and cache-policy weights for one companion,
stored beside it as `<companion>.calib.json` by `hobbit-cli calibrate` and read by hobbitd.

Keys the daemon uses: t1, t2 (unimportance thresholds) and weights (w_lru, w_lfu, w_lhu,
w_fld), and blind (true: the model's predictions were near uniform on the calibration
text, so the KLD bound could not judge the lossy mode; `stats` says so; absent in files
written before it: false); the rest records how they were chosen. Written to a temp file,
then renamed.
"""

from __future__ import annotations

import json
import os

from ..protocol.errors import ModelError


def calib_path(companion: str) -> str:
    return companion + ".calib.json"


def load_calibration(companion: str | None) -> dict | None:
    """The stored calibration for a companion file, or None (defaults apply). ModelError
    when the file is there but unreadable or lacks the daemon's keys."""
    if not companion or not os.path.exists(calib_path(companion)):
        return None
    path = calib_path(companion)
    try:
        with open(path) as f:
            calib = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable calibration ({e}); run hobbit-cli calibrate again") from None
    if not isinstance(calib, dict) or not {"t1", "t2", "weights"} <= calib.keys():
        raise ModelError(f"{path}: not a calibration file (needs t1, t2, weights); run hobbit-cli calibrate again")
    return calib


def save_calibration(result: dict, companion: str) -> str:
    path = calib_path(companion)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return path
