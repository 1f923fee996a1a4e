"""Tokenizer and chat template from the GGUF, through llama-cpp-python (vocab only)."""

from __future__ import annotations

import contextlib
import os

from ...protocol.errors import ModelError


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to fd 2 while loading; keep the user's terminal clean."""
    if os.environ.get("HOBBIT_GGML_LOG"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Tokenizer:
    def __init__(self, path: str):
        import llama_cpp

        self._llama_cpp = llama_cpp
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{path}: llama.cpp could not read its vocabulary ({e})") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))  # the model asks for BOS
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        self.eos = self.llm.token_eos()
        self.bos = self.llm.token_bos()

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids; add_special adds BOS where the model asks for it."""
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def decode(self, tokens, prev_tokens=None) -> bytes:
        """Bytes (a token may end inside a UTF-8 character; callers join before decoding)."""
        return self.llm.detokenize(list(tokens), prev_tokens=prev_tokens)

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT, <|im_end|> and the like."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    def chat_prompt(self, messages: list[dict]) -> str:
        """Render messages with the model's own chat template (generation prompt appended)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.template:
            raise ModelError("the model has no chat template (tokenizer.chat_template)")
        piece = lambda t: self.llm.detokenize([t], special=True).decode(errors="replace")
        fmt = Jinja2ChatFormatter(self.template, eos_token=piece(self.eos), bos_token=piece(self.bos))
        return fmt(messages=messages).prompt
