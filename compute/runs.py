"""Open a model for a run: the one sequence every command follows.

`open_run(model, opts, daemon)` resolves MODEL ("default" or nothing: the default MoE,
built here on first use, before any hobbitd is started), opens its weights and tokenizer,
finds its experts — in-process, or through hobbitd (`ThroughDaemon`: the running one, else
a private one for this process; client/connect.py) — and makes the Model. A dense model
always runs in-process: it has no experts to offload. `Run.close()` closes the model and
its hobbitd connection (stopping a private hobbitd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .engine.model import Model, RunOptions
from .engine.tokenizer import Tokenizer
from .engine.weights import Weights, open_model


def resolve_model(name: str | None) -> str:
    """A model path; "default" (or nothing) is the default MoE, built on first use."""
    if not name or name == "default":
        from .make.moefy import default_model_path

        return default_model_path(build=True, progress=True)
    return name


@dataclass(frozen=True)
class ThroughDaemon:
    """Experts through hobbitd at `socket` (None: $HOBBIT_SOCKET, else the default). When
    no socket is named that way, a private hobbitd is started if none answers (autostart
    None); autostart False makes a missing hobbitd an error. quiet: say nothing on stderr."""

    socket: str | None = None
    autostart: bool | None = None
    quiet: bool = False
    reconnect_s: float = 30.0  # once hobbitd is gone: how long to look for one again

    @classmethod
    def from_args(cls, args) -> ThroughDaemon | None:
        """From --no-daemon, --socket, --reconnect-deadline and --quiet (where the command
        has them)."""
        if getattr(args, "no_daemon", False):
            return None
        deadline = getattr(args, "reconnect_deadline", None)
        return cls(
            getattr(args, "socket", None),
            quiet=getattr(args, "quiet", False),
            reconnect_s=cls.reconnect_s if deadline is None else max(deadline, 0.0),
        )

    def connect(self, model_path: str):
        """An ExpertClient for `model_path`."""
        from ..hobbitd.config import default_socket
        from .client.connect import connect

        explicit = bool(self.socket or os.environ.get("HOBBIT_SOCKET"))
        autostart = not explicit if self.autostart is None else self.autostart
        return connect(
            model_path,
            self.socket or default_socket(),
            autostart=autostart,
            quiet=self.quiet,
            reconnect_s=self.reconnect_s,
        )


class Run:
    """An open model: path, weights, tokenizer (None if not asked for) and Model."""

    def __init__(self, path: str, weights: Weights, tok: Tokenizer | None, model: Model):
        self.path, self.weights, self.tok, self.model = path, weights, tok, model

    @property
    def experts(self):
        """The ExpertClient when the experts come from hobbitd, else None."""
        return self.model.experts

    def another(self, opts: RunOptions | None = None) -> Run:
        """A further Model (its own KV cache) on the same weights and tokenizer; through
        the same hobbitd over a connection of its own when this run uses one."""
        from .client.expert_client import ExpertClient

        experts = self.experts and ExpertClient(
            self.experts.socket_path, self.path, reconnect_s=self.experts.reconnect_s
        )
        if experts:
            experts.announce = self.experts.announce
        try:
            return Run(self.path, self.weights, self.tok, Model(self.weights, opts or self.model.opts, experts=experts))
        except BaseException:
            if experts:
                experts.close()
            raise

    def close(self) -> None:
        experts = self.model.experts
        self.model.close()
        if experts is not None:
            experts.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run(
    model: str | None,
    opts: RunOptions,
    daemon: ThroughDaemon | None = None,
    *,
    weights: Weights | None = None,
    tokenizer: bool = True,
    check=None,
) -> Run:
    """Open `model` for a run (see the module docstring). weights: already open ones to
    reuse; tokenizer False: skip loading it; check(weights, tok) runs before any hobbitd
    is contacted, so a bad prompt fails without starting one."""
    path = resolve_model(model)
    weights = weights or open_model(path)
    tok = Tokenizer(path) if tokenizer else None
    if check is not None:
        check(weights, tok)
    experts = daemon.connect(weights.path) if daemon is not None and weights.args.is_moe else None
    try:
        return Run(path, weights, tok, Model(weights, opts, experts=experts))
    except BaseException:
        if experts is not None:
            experts.close()
        raise
