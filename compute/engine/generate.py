"""Generation: prompt in as one batch, then one token at a time, streamed as text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .model import Model
from .sampling import Sampler
from .tokenizer import Tokenizer


def generate_tokens(
    model: Model,
    prompt: list[int],
    n_predict: int,
    sampler: Sampler,
    stop=lambda token: False,
    cached: Sequence[int] = (),
) -> Iterator[int]:
    """Yield up to n_predict new token ids after `prompt`; the KV cache continues from
    model.n_past, so a chat can feed only the new turn, `cached` being the tokens the cache
    holds before it. Stops after a `stop` token (which is not yielded) or when the context
    is full. The sampler sees the history: cached, prompt and the tokens generated so far,
    as llama.cpp's sampler accepts the prompt and each new token."""
    history = [*cached, *prompt]
    logits = model.forward(prompt)
    for _ in range(n_predict):
        token = sampler(logits, history)
        if stop(token):
            return
        history.append(token)
        yield token
        if model.n_past >= model.n_ctx:
            return
        logits = model.forward([token])


class TextStream:
    """Turns token ids into text pieces, holding back bytes of an unfinished UTF-8 char."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.pending = b""

    def push(self, token: int) -> str:
        self.pending += self.tok.decode([token])
        try:
            text = self.pending.decode()
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":
                return ""  # wait for the rest of the character
            text = self.pending.decode(errors="replace")
        self.pending = b""
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode(errors="replace"), b""
        return text
