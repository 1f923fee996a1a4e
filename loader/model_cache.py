"""One served model's share of the cache: its sources, regions, rule, policy and counters.

A ModelCache is plain state; loader/cache.py's ExpertCache acts on it (lookups, loads,
pins) and loader/served.py builds it. Keys are (layer, expert); precisions are
loader.precision's HIGH and LOW.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.errors import RequestError
from .counts import Counts
from .identity import WatchedFile
from .layout import ExpertSource
from .policy import EvictionPolicy
from .precision import HIGH, LOW, Thresholds, decide


@dataclass(eq=False)
class ModelCache(Counts):
    """As Counts: the experts asked of this model, and how each was served."""

    name: str
    path: str  # realpath of the GGUF
    n_layer: int
    n_expert: int
    source: ExpertSource
    policy: EvictionPolicy
    low: ExpertSource | None = None  # the companion file, if served
    crcs: list | None = None  # the companion's per-expert crc32
    image: ExpertSource | None = None  # the repacked image high precision is read from, if
    # served (its format is source's, layer_repacked set: what the high region announces)
    image_crcs: list | None = None  # its per-expert crc32
    verified: set = field(default_factory=set)  # (precision, (layer, expert)): slot images
    # whose crc32 matched since this daemon opened the file
    thresholds: Thresholds = field(default_factory=Thresholds)
    calibrated: bool = False
    blind: bool = False  # calibrated on a near-uniform model: its KLD bound judged nothing
    regions: dict = field(default_factory=dict)  # precision -> Region
    loads: dict = field(default_factory=dict)  # (precision, key) -> Future of its read
    prefetched: int = 0  # prefetch reads issued
    prefetch_used: int = 0  # prefetched slots a request then hit
    bytes_read: int = 0
    read_seconds: float = 0.0  # summed submit-to-completion time of this model's reads
    demand_Bps: float | None = None  # bytes/s a request with misses was served at (EWMA)
    files: dict = field(default_factory=dict)  # precision -> (WatchedFile per file read, path first)
    # A file changed under the daemon (loader/freshness.py): its cached experts are dropped and
    # `epoch` moves on, so that nothing read before is served with what is read after; the
    # file is opened again, or the model fails its requests with `broken` (one line).
    epoch: int = 0
    broken: str | None = None
    file_changes: int = 0  # changes seen since the daemon started

    def __post_init__(self):
        self.watch_files()

    def watch_files(self) -> None:
        """Take the files as they are now as the ones served."""
        image = self.image.files if self.image else ()  # its GGUF first: WELCOME's "file"
        self.files = {
            prec: tuple(WatchedFile(f) for f in files)
            for prec, files in ((HIGH, (*self.source.files, *image)), (LOW, self.low and self.low.files))
            if files
        }

    def changed(self, precision: str | None = None) -> bool:
        """Whether the file `precision` reads from (None: any of them) is no longer the one
        opened: truncated, rewritten or replaced under the daemon (what it serves is stale)."""
        files = self.files.values() if precision is None else [self.files[precision]]
        return any([w.changed() for ws in files for w in ws])  # each one checked

    def source_of(self, precision: str) -> ExpertSource:
        """The file `precision`'s experts are read from."""
        if precision != LOW:
            return self.image or self.source
        assert self.low is not None, f"{self.name}: low slots exist only with a companion"
        return self.low

    def crcs_of(self, precision: str) -> list | None:
        """The per-expert crc32 of the slot-image file `precision` is read from (the
        companion, the repacked image), or None where it is read from the GGUF."""
        return self.crcs if precision == LOW else self.image_crcs

    @property
    def holds_all(self) -> bool:
        """The high region has a slot for every expert: nothing is ever evicted."""
        high = self.regions.get(HIGH)
        return high is not None and high.n_slots >= self.n_layer * self.n_expert

    def decide(self, key: tuple, score: float):
        """Token-level dynamic loading: the precision to use for one expert (SKIP: skip),
        by loader.precision's rule (precision_for)."""
        return decide(self.thresholds, self.regions, key, score, self.holds_all)

    def check(self, layer: int, experts: list) -> None:
        """RequestError bad_request unless layer and experts are in range, without repeats."""
        if not 0 <= layer < self.n_layer:
            raise RequestError("bad_request", f"layer {layer} is out of range 0..{self.n_layer - 1}")
        for e in experts:
            if not 0 <= e < self.n_expert:
                raise RequestError("bad_request", f"expert {e} is out of range 0..{self.n_expert - 1}")
        if len(set(experts)) != len(experts):
            raise RequestError("bad_request", f"duplicate experts in {experts}")

    def info(self) -> dict:
        """What a client needs to find this model's slots (WELCOME's model info)."""
        th = self.thresholds
        return {
            "path": self.path,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "holds_all": self.holds_all,
            "file": self.files[HIGH][0].identity and self.files[HIGH][0].identity.wire(),
            "epoch": self.epoch,
            "thresholds": {"t1": th.t1, "t2": th.t2, "dynamic": th.dynamic, "low_only": th.low_only},
            "regions": {
                p: {
                    "offset": r.offset,
                    "n_slots": r.n_slots,
                    "format": r.format.to_wire(),
                    **({} if r.shared is None else {"directory": r.shared.offset, "first_slot": r.shared.first_slot}),
                }
                for p, r in self.regions.items()
            },
        }

    def stats(self) -> dict:
        from .ggml_types import type_name  # deferred: importing gguf costs ~0.2 s

        mbps = self.bytes_read / self.read_seconds / 1e6 if self.read_seconds else 0.0
        th, w = self.thresholds, self.policy.weights
        return {
            "path": self.path,
            "requested": self.requested,
            "hits": self.hits,
            "misses": self.misses,
            "waits": self.waits,
            "skipped": self.skipped,
            **{k: self.by_precision[k] for k in ("hits_high", "hits_low", "misses_high", "misses_low")},
            "prefetched": self.prefetched,
            "prefetch_used": self.prefetch_used,
            "bytes_read": self.bytes_read,
            "read_seconds": round(self.read_seconds, 6),
            "read_MBps": round(mbps, 1),
            "hobbit": {
                "t1": th.t1,
                "t2": th.t2,
                "dynamic": th.dynamic,
                "low_only": th.low_only,
                "exact": th.exact,
                "mode": th.describe(self.calibrated),
                "calibrated": self.calibrated,
                "blind": self.blind,
                "policy": self.policy.name,
                "policy_weights": None if w is None else list(w.__dict__.values()),
                "low_type": self.low and type_name(self.low.format.types(0)[0]),
                "repacked_image": self.image and self.image.path,  # high precision read from it
            },
            "holds_all": self.holds_all,
            "file": {"epoch": self.epoch, "changes": self.file_changes, "error": self.broken},
            "regions": {p: r.counts() for p, r in self.regions.items()},
        }
