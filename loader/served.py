"""Opening the models a cache serves, and cutting the cache into their regions.

open_served_all() opens each GGUF (loader.gguf_file, loader.layout), its low-precision
companion and its repacked image (loader.companion, validated: foreign, truncated or stale
files are refused) and its calibration (loader.calibration), and returns one empty
ModelCache per model.
plan_cache() then says where each model's regions go in the shared memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from ..protocol.errors import InputError, ModelError
from .layout import PAGE
from .model_cache import ModelCache
from .policy import PolicyWeights, make_policy
from .pool import RegionPlan, plan_regions
from .precision import EXACT, HIGH, LOW, Thresholds

log = logging.getLogger("hobbitd")

MiB = 1 << 20


@dataclass(frozen=True)
class ModelOptions:
    """HOBBIT's switches for every model served (the daemon config's keys of the same names)."""

    low_type: str = "auto"  # companion type: "auto" (the best suitable type's file made), "none", "Q4_0"...
    low_only: bool = False  # every expert in low precision
    dynamic: bool = True  # token-level dynamic loading (low precision / skip on misses)
    t1: float | None = None  # thresholds; None: the calibrated values, else 1 (exact: no low, no skip)
    t2: float | None = None
    policy: str = "hobbit"  # eviction: "hobbit" or "lru"
    repack: str = "auto"  # "auto": high precision from a valid repacked image, if made; "off"


def model_name(path: str) -> str:
    """A model's name: its file name without .gguf."""
    name = os.path.basename(path)
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def open_served_all(paths: list[str], opts: ModelOptions) -> dict[str, ModelCache]:
    """{name: ModelCache} (no regions yet) for the GGUFs at `paths`. InputError for no
    model or two of one name; ModelError for a file that cannot be served."""
    if not paths:
        raise InputError("no model to serve: give --model GGUF (or models in the config)")
    names = [model_name(p) for p in paths]
    for name in set(names):
        if names.count(name) > 1:
            raise InputError(f"two models named {name!r}; a model's name is its file name without .gguf, so rename one")
    return {name: open_served(path, name, opts) for path, name in zip(paths, names)}


def open_served(path: str, name: str, opts: ModelOptions) -> ModelCache:
    """The GGUF at `path` opened to be served as `name`: its ModelCache, with its experts,
    companion (if any), thresholds (options, else calibrated, else exact: nothing measured
    a lossy mode as safe for an uncalibrated model) and eviction policy (calibrated
    weights, if any)."""
    from .calibration import load_calibration
    from .companion import open_companion
    from .gguf_file import open_gguf  # deferred: importing gguf costs ~0.2 s
    from .layout import gguf_experts

    try:
        f = open_gguf(path)
    except OSError as e:
        raise ModelError(f"{path}: {e.strerror or e}") from None
    src = gguf_experts(f)
    companion = _companion_file(f.path, src.format, opts)
    low, crcs = open_companion(f, companion) if companion else (None, None)
    image, image_crcs = _repacked_image(f, src, opts)
    if image is not None:  # the high region announces the image's layout (repacked parts)
        src = replace(src, format=image.format)
    calib = load_calibration(companion)
    t1 = opts.t1 if opts.t1 is not None else (calib or {}).get("t1", EXACT)
    t2 = opts.t2 if opts.t2 is not None else (calib or {}).get("t2", EXACT)
    weights = PolicyWeights(*calib["weights"]) if calib else None
    return ModelCache(
        name,
        os.path.realpath(path),
        src.n_layer,
        src.n_expert,
        src,
        make_policy(opts.policy, src.n_layer, weights),
        low=low,
        crcs=crcs,
        image=image,
        image_crcs=image_crcs,
        thresholds=Thresholds(
            t1, max(t1, t2), dynamic=opts.dynamic and low is not None, low_only=opts.low_only and low is not None
        ),
        calibrated=calib is not None,
        blind=bool(calib and calib.get("blind", False)),
    )


def _repacked_image(f, high, opts: ModelOptions) -> tuple:
    """(source, crc32 table) of the repacked image next to the model when opts.repack is
    "auto" and a valid one is there, else (None, None): a stale, foreign or corrupt image
    is one log line, and the GGUF is served."""
    from .companion import CompanionError, open_repacked, repacked_path

    path = repacked_path(f.path)
    if opts.repack == "off" or not os.path.exists(path):
        return None, None
    try:
        return open_repacked(f, path, high)
    except CompanionError as e:
        log.warning("%s; serving the GGUF's experts", e)
        return None, None


def _companion_file(gguf_path: str, high_format, opts: ModelOptions) -> str | None:
    """The companion to serve, or None. "auto" without a file is fine (high precision
    only), unless low_only asks for it; a named type without its file is a ModelError."""
    from . import ggml_types
    from .companion import companion_path, low_type_choices, made_companion

    kind = opts.low_type.lower()
    if kind == "none":
        return None
    if kind == "auto":
        choices = low_type_choices(high_format)
        if not choices:  # 2- and 3-bit experts: nothing smaller worth loading
            return None
        made = made_companion(gguf_path, high_format)
        if made is not None:
            return made
        t = choices[0]
    else:
        if opts.low_type.upper() not in ggml_types.TYPES_BY_NAME:
            raise InputError(f"--low {opts.low_type}: unknown type")
        t = ggml_types.TYPES_BY_NAME[opts.low_type.upper()]
    path = companion_path(gguf_path, t)
    if os.path.exists(path):
        return path
    if kind != "auto" or opts.low_only:
        raise ModelError(
            f"{path}: no companion file; run hobbit-cli convert {gguf_path} --low {ggml_types.type_name(t)}"
        )
    return None


def cache_low_share(th: Thresholds, low_share: float) -> float:
    """The share of a model's cache in low-precision slots, given that it has some: all of
    it when no miss loads high precision, else `low_share`."""
    return low_share if th.loads_high else 1.0


def plan_cache(models: dict[str, ModelCache], size: int, low_share: float) -> tuple[list[RegionPlan], int]:
    """Regions and the segment size (bytes) for a cache of `size` bytes, `low_share` of
    each model's part in low precision. The cache is split among models in proportion to
    their expert bytes; a model gets at least one layer's experts (else InputError naming
    the minimum) and at most all of them. A cache that holds every expert of every model in
    high precision gets no low regions."""
    full = {n: mo.source.total_bytes for n, mo in models.items()}
    shares = {n: b / sum(full.values()) for n, b in full.items()}
    # a cache that holds every expert in high needs no low copies (nothing is evicted)
    all_high = sum(mo.n_layer * mo.n_expert * mo.source.format.slot_bytes for mo in models.values())
    fits = size >= all_high and not any(mo.thresholds.low_only for mo in models.values())
    if fits:  # split by slot bytes, so that each model gets a slot for every expert
        shares = {n: mo.n_layer * mo.n_expert * mo.source.format.slot_bytes / all_high for n, mo in models.items()}
    specs = []
    for n, mo in models.items():
        th = mo.thresholds  # T1 >= 1 loads every miss in high: low slots would stay empty
        low = not fits and mo.low is not None and (th.low_only or (th.dynamic and th.t1 < 1.0))
        share = cache_low_share(th, low_share) if low else 0.0
        if 0 < share < 1:
            share = _fit_share(mo, share, shares[n] * size)
            low = share > 0
        if share < 1:
            specs.append((n, HIGH, mo.source.format, shares[n] * (1 - share)))
        if low:
            assert mo.low is not None  # low: only with a companion
            specs.append((n, LOW, mo.low.format, shares[n] * share))
    plan = plan_regions(specs, size)
    for r in plan:
        mo = models[r.model]
        if r.n_slots < mo.n_expert:
            need = max(models[m].n_expert * fmt.slot_bytes / part for m, _, fmt, part in specs)
            raise InputError(
                f"cache size {size / MiB:.1f} MiB is too small: model {r.model} "
                f"would get {r.n_slots} {r.precision} slots but needs {mo.n_expert} "
                f"(one layer's experts); the minimum cache size is {int(need // MiB) + 1}M"
            )
    # a region never needs more slots than the model has experts; the offsets stay, the
    # unused tail of a region is never touched so it costs no memory
    plan = [r._replace(n_slots=min(r.n_slots, models[r.model].n_layer * models[r.model].n_expert)) for r in plan]
    total = max((r.offset + r.nbytes for r in plan), default=PAGE)
    return plan, total


def _fit_share(mo: ModelCache, share: float, nbytes: float) -> float:
    """The low-precision share of a model's `nbytes` of cache, moved from `share` as far
    as needed for each precision to hold one layer's experts (with many experts a layer,
    a fixed share made mixed precision refuse caches exact mode runs in). A cache too
    small for both gets none: misses load high precision, exact where a low copy would
    have been used (skips above T2 stay)."""
    assert mo.low is not None  # asked only of a model with a companion
    need_high = mo.n_expert * mo.source.format.slot_bytes + PAGE
    need_low = mo.n_expert * mo.low.format.slot_bytes + PAGE
    if nbytes < need_high + need_low:
        log.warning(
            "%s: a cache of %.1f MiB holds one layer's experts in one precision only: misses load high precision",
            mo.name,
            nbytes / MiB,
        )
        return 0.0
    return min(max(share, need_low / nbytes), 1 - need_high / nbytes)


def plan_added(
    models: dict[str, ModelCache], new: ModelCache, size: int, low_share: float
) -> tuple[dict, list[RegionPlan], int]:
    """Room for `new`, opened on demand, in a cache of `size` bytes that `models` share.
    new gets the bytes plan_cache would give it with `new` among them (as if it had been
    configured); what the cache has not handed out yet goes first, the rest is taken from
    the others by their use (take_by_use). Returns ({(model, precision): n_slots to keep}
    for regions that shrink, new's regions placed from offset 0 of a segment of its own,
    that segment's size). InputError when the cache cannot hold one layer's experts of each."""
    joint, _ = plan_cache({**models, new.name: new}, size, low_share)
    share = sum(r.nbytes for r in joint if r.model == new.name)
    plan, total = plan_cache({new.name: new}, share, low_share)
    need = sum(r.nbytes for r in plan)
    held = sum(r.n_slots * r.format.slot_bytes for mo in models.values() for r in mo.regions.values())
    return take_by_use(models, need - (size - held)), plan, total


def take_by_use(models: dict[str, ModelCache], nbytes: int) -> dict:
    """{(model, precision): n_slots to keep} that frees at least `nbytes` of the regions
    of `models`: the slots used longest ago go first (empty and never-used ones before
    any), so an idle model gives up its part before a busy one; every region keeps one
    layer's experts. Ties (a cache nobody has used yet) are shared out in proportion to
    the regions' sizes."""
    if nbytes <= 0:
        return {}
    spare = []  # (last use, rank in its region / its size, bytes, region)
    for name, mo in models.items():
        for prec, r in mo.regions.items():
            coldest = sorted(r.slots[: r.n_slots], key=lambda s: s.used_at)
            for rank, slot in enumerate(coldest[: r.n_slots - mo.n_expert]):
                spare.append((slot.used_at, rank / r.n_slots, r.format.slot_bytes, (name, prec)))
    spare.sort(key=lambda item: item[:2])
    given: dict = {}
    for _, _, slot_bytes, region in spare:
        if nbytes <= 0:
            break
        given[region] = given.get(region, 0) + 1
        nbytes -= slot_bytes
    return {(name, prec): models[name].regions[prec].n_slots - k for (name, prec), k in given.items()}
