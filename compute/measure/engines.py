"""The engines the benches time, behind one interface: prefill(tokens) -> last logits after
a reset, step(token) -> the next logits, bytes_read() -> bytes read from storage so far,
close().

HobbitEngine runs an open Run (runs.open_run: in-process or through hobbitd);
LlamaCppEngine runs llama-cpp-python on the same GGUF (mmap, flash attention, last-token
logits only).
"""
from __future__ import annotations

import numpy as np

N_BATCH = 512


class HobbitEngine:
    def __init__(self, run):
        self.run, self.model = run, run.model

    def prefill(self, tokens) -> np.ndarray:
        self.model.reset()
        return self.model.forward(tokens)

    def step(self, token: int) -> np.ndarray:
        return self.model.forward([token])

    def bytes_read(self) -> int:
        """hobbitd's bytes read (every model it serves); in-process: this process's."""
        if self.run.experts is None:
            return storage_read_bytes()
        return sum(m["bytes_read"] for m in self.run.experts.stats()["models"].values())

    def close(self) -> None:
        self.run.close()


class LlamaCppEngine:
    def __init__(self, path: str, ctx: int, threads: int, n_batch: int = N_BATCH):
        import llama_cpp

        from ..engine.tokenizer import quiet_stderr

        self.api = llama_cpp
        with quiet_stderr():
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=n_batch,
                                       n_threads=threads, n_threads_batch=threads,
                                       flash_attn=True, use_mmap=True, logits_all=False,
                                       verbose=False)
        self.ctx = self.llm.ctx
        self.n_vocab = self.llm.n_vocab()

    def _logits(self) -> np.ndarray:
        # with logits_all=False only the last token has logits; view them in place
        ptr = self.api.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, tokens) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._logits()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()

    def bytes_read(self) -> int:
        return storage_read_bytes()

    def close(self) -> None:
        self.llm.close()


def storage_read_bytes() -> int:
    """Bytes this process made the kernel read from storage (page faults of mmap included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])
