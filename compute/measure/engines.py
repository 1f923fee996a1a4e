"""The engines the benches time, behind one interface: prefill(tokens) -> last logits after
a reset, step(token) -> the next logits, bytes_read() -> bytes read from storage so far,
close(); and the fixed prompt and timed round every bench uses.

HobbitEngine runs an open Run (runs.open_run: in-process or through hobbitd);
LlamaCppEngine runs llama-cpp-python on the same GGUF (mmap, flash attention, last-token
logits only).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

N_BATCH = 512

PARAGRAPH = (
    "The old lighthouse keeper climbed the narrow stairs every evening, counting the steps "
    "as his father had taught him. From the lamp room he could see the fishing boats coming "
    "home across the bay, their sails catching the last of the light, while gulls circled "
    "above the harbour and the wind carried the smell of salt and tar over the rooftops. "
)


def bench_prompt(path: str, n_tokens: int, skip: int = 0) -> list[int]:
    """A fixed, deterministic prompt: PARAGRAPH tokenized, repeated and cut to n_tokens;
    `skip` leaves out that many of its first words' tokens (after BOS), so that several
    clients can get different prompts."""
    from ..engine.tokenizer import Tokenizer

    tok = Tokenizer(path)
    first = tok.encode(PARAGRAPH)
    more = tok.encode(PARAGRAPH, add_special=False)
    head = len(first) - len(more)  # BOS
    prompt = list(first)
    while len(prompt) < n_tokens + skip:
        prompt += more
    return prompt[:head] + prompt[head + skip : n_tokens + skip]


def run_once(engine, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """One round: (prefill seconds, decode seconds, greedy tokens)."""
    t0 = time.perf_counter()
    logits = engine.prefill(prompt)
    t1 = time.perf_counter()
    tokens = [int(np.argmax(logits))]
    t2 = time.perf_counter()
    for _ in range(n):
        tokens.append(int(np.argmax(engine.step(tokens[-1]))))
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, tokens


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


@contextlib.contextmanager
def _model_params(llama_cpp, **fields):
    """llama_cpp.Llama() builds its model parameters from llama_model_default_params()
    and has no argument for some fields: while this is open, the defaults carry `fields`."""
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default


class LlamaCppEngine:
    def __init__(self, path: str, ctx: int, threads: int, n_batch: int = N_BATCH, repack: bool = True):
        """repack False: no CPU repacking of weights (llama.cpp's --no-repack): its repacked
        copies (of Q4_K and friends, on CPUs with AVX2) live in anonymous memory, which a
        memory limit below the model's size cannot hold; the weights then stay mmapped."""
        import llama_cpp

        from ..engine.tokenizer import quiet_stderr

        self.api = llama_cpp
        with quiet_stderr(), _model_params(llama_cpp, use_extra_bufts=repack):
            self.llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=ctx,
                n_batch=n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=True,
                use_mmap=True,
                logits_all=False,
                verbose=False,
            )
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
