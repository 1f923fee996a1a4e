"""Interactive chat: the model's chat template, streamed answers, the KV cache reused
between turns (only the new turn is computed), /reset /stats /quit, Ctrl-C stops an answer."""

from __future__ import annotations

import sys
import time

from ..engine.generate import TextStream, generate_tokens
from ..engine.model import Model
from ..engine.sampling import Sampler
from ..engine.tokenizer import Tokenizer

HELP = "commands: /reset (new conversation), /stats, /quit; Ctrl-C stops an answer, Ctrl-D quits"


class ChatSession:
    def __init__(self, model: Model, tok: Tokenizer, sampler: Sampler, n_predict: int):
        self.model, self.tok, self.sampler, self.n_predict = model, tok, sampler, n_predict
        self.messages: list[dict] = []
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.last = {}

    def reset(self) -> None:
        self.messages, self.tokens = [], []
        self.model.reset()

    def _prompt_tokens(self) -> list[int]:
        """The whole conversation rendered; the oldest turns are dropped to fit."""
        budget = self.model.n_ctx - min(self.n_predict, self.model.n_ctx // 2)
        while True:
            ids = self.tok.encode(self.tok.chat_prompt(self.messages), parse_special=True)
            if len(ids) <= budget or len(self.messages) <= 1:
                return ids[-budget:]
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            print("[context full: the oldest turn was dropped]", file=sys.stderr)

    def answer(self, text: str, out=sys.stdout) -> str:
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_tokens()
        keep = 0  # reuse the cached prefix that the new prompt shares
        while keep < min(len(ids) - 1, len(self.tokens)) and ids[keep] == self.tokens[keep]:
            keep += 1
        if not self.model.resumable(keep):  # a sliding window already moved past it
            keep = 0
        self.model.n_past = keep
        self.tokens = ids[:keep]
        stream, pieces, gen = TextStream(self.tok), [], []
        t0 = time.perf_counter()
        t_first = None
        try:
            for token in generate_tokens(
                self.model, ids[keep:], self.n_predict, self.sampler, stop=self.tok.is_eog, cached=ids[:keep]
            ):
                t_first = t_first or time.perf_counter()
                gen.append(token)
                piece = stream.push(token)
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        pieces.append(stream.flush())
        out.write(pieces[-1] + "\n")
        reply = "".join(pieces)
        self.messages.append({"role": "assistant", "content": reply})
        self.tokens = (ids + gen)[: self.model.n_past]  # what the KV cache now holds
        t1, n_new = time.perf_counter(), len(gen)
        self.last = {
            "prompt_tokens": len(ids) - keep,
            "reused_tokens": keep,
            "new_tokens": n_new,
            "prefill_s": (t_first or t1) - t0,
            "decode_tok_s": (n_new - 1) / (t1 - t_first) if t_first and n_new > 1 else 0.0,
        }
        return reply

    def stats(self) -> str:
        s = self.last
        if not s:
            return "no answer yet"
        return (
            f"last answer: {s['new_tokens']} tokens at {s['decode_tok_s']:.1f} tok/s; prompt "
            f"{s['prompt_tokens']} new tokens in {s['prefill_s']:.2f} s ({s['reused_tokens']} "
            f"reused from the cache); context {self.model.n_past}/{self.model.n_ctx}"
        )


def run_chat(session: ChatSession, stdin=sys.stdin) -> int:
    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            print("[new conversation]", file=sys.stderr)
        elif line == "/stats":
            print(session.stats(), file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line}; {HELP}", file=sys.stderr)
        else:
            session.answer(line)
    return 0
