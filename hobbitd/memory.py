"""The shared memory hobbitd serves models from: a segment of expert slots and, where
clients may pin their hits themselves (loader/control.py), a control block beside it.

The models configured share one ModelMemory; each model opened on demand gets one of its
own. make_memory() is the one place both are made; the Daemon closes them at shutdown.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..loader import control
from ..loader.model_cache import ModelCache
from ..loader.pool import RegionPlan
from ..loader.shm import SHM_DIR, Segment, new_name, remove_stale
from ..protocol.errors import InputError

log = logging.getLogger("hobbitd")

MiB = 1 << 20


@dataclass
class ModelMemory:
    shm: Segment  # the expert slots
    control: control.ControlBlock | None  # None: clients ask for every expert

    def files(self) -> list[str]:
        """Its files in SHM_DIR."""
        return [self.shm.path] + ([self.control.seg.path] if self.control is not None else [])

    def close(self) -> None:
        """Unmap and unlink both."""
        self.shm.close()
        if self.control is not None:
            self.control.close()


def make_memory(
    models: dict[str, ModelCache], plan: list[RegionPlan], size: int, with_control: bool, what: str, advice: str = ""
) -> ModelMemory:
    """A segment of `size` bytes for the regions `plan` of `models` and, with_control, its
    control block. InputError "`what` needs ... MiB free`advice`" when SHM_DIR has not that
    much free; OSError when one cannot be made (nothing is left behind)."""
    free = shm_free()
    if free is not None and size > free:
        raise InputError(
            f"{what} needs {size / MiB:.0f} MiB of shared memory but {SHM_DIR} has {free / MiB:.0f} MiB free{advice}"
        )
    shm = Segment(new_name(), size, create=True)
    block = None
    if with_control:
        try:
            lay = control.layout(
                [(r.model, r.precision, models[r.model].n_layer, models[r.model].n_expert, r.n_slots) for r in plan]
            )
            block = control.ControlBlock.create(shm.name + "-ctl", lay)
        except OSError:
            shm.close()  # nothing half-made left in SHM_DIR
            raise
    return ModelMemory(shm, block)


def remove_stale_segments() -> None:
    """Shared memory of hobbitd processes that died (SIGKILL, OOM) before removing it."""
    for name, size in remove_stale():
        log.info("removed %s (%.0f MiB) left by a hobbitd that is gone", name, size / MiB)


def shm_free() -> int | None:
    """Bytes free in SHM_DIR; None when it cannot be told."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
