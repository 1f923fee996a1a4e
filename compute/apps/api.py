"""The OpenAI API's shapes, as plain functions: a request body in, a validated Job out
(or ApiError); a finished or partial generation in, the response JSON out.

Only what hobbit can honour is accepted: one choice (n = 1), text content, no logprobs, no
tools. Anything else is refused with the parameter's name rather than
silently ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from ..engine.sampling import SamplingOptions, SamplingSettings, SamplingValueError

MAX_STOP = 4  # OpenAI's limit on stop sequences

# parameters some clients send with neutral values; anything else is refused
_NEUTRAL = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}
_IGNORED = {
    "user",
    "stream_options",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "reasoning_effort",
    "modalities",
    "prediction",
    "audio",
    "web_search_options",
}


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {...}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One validated request. prompt: text for /v1/completions, token ids if given as ids;
    messages: the conversation for /v1/chat/completions (rendered by the chat template)."""

    chat: bool
    model: str
    prompt: str | list | None = None
    messages: list = field(default_factory=list)
    max_tokens: int | None = None  # None: until end of text or the context is full
    # sampling: None where the request does not say (the model file's, else DEFAULTS, decide)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (llama.cpp's server has it too)
    min_p: float | None = None  # an extension (llama.cpp's server has it too)
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repeat_penalty: float | None = None  # an extension (llama.cpp's server has it too)
    repeat_last_n: int | None = None  # an extension (llama.cpp's server has it too)
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    id: str = ""
    created: int = 0


def parse(body, chat: bool, served: str) -> Job:
    """A Job from a decoded JSON body, or ApiError(400/404) naming the parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", served)
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model not in (served, "default", ""):
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{served}' (see /v1/models)",
            "model",
            "model_not_found",
        )
    job = Job(chat=chat, model=served)
    if chat:
        job.messages = _messages(body.get("messages"))
    else:
        job.prompt = _prompt(body.get("prompt"))
    for name, neutral in _NEUTRAL.items():
        if body.get(name, None) not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    known = {
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        *_PENALTIES.values(),
        "stop",
        "stream",
        *_NEUTRAL,
        *_IGNORED,
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: '{unknown[0]}'", unknown[0], "unknown_parameter")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    job.max_tokens = 16 if limit is None and not chat else limit  # OpenAI's completions default
    if job.max_tokens is not None:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        job.max_tokens = _number(body, name, int, 1, None)
    job.temperature = _number(body, "temperature", float, 0.0, 2.0)
    job.top_p = _number(body, "top_p", float, 0.0, 1.0)
    if job.top_p == 0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p", "invalid_value")
    job.top_k = _number(body, "top_k", int, 0, None)
    job.min_p = _number(body, "min_p", float, 0.0, 1.0)
    job.seed = _number(body, "seed", int, None, None, default=None)
    job.frequency_penalty = _number(body, "frequency_penalty", float, -2.0, 2.0)  # OpenAI's range
    job.presence_penalty = _number(body, "presence_penalty", float, -2.0, 2.0)
    job.repeat_penalty = _number(body, "repeat_penalty", float, None, None)  # > 0: checked below
    job.repeat_last_n = _number(body, "repeat_last_n", int, -1, None)
    try:
        sampling(job).check()  # what the comparisons above let through (a repeat_penalty <= 0)
    except SamplingValueError as e:
        name = _PENALTIES.get(e.field, e.field)
        raise ApiError(400, f"'{name}' {e.rule}, got {e.value}", name, "invalid_value") from None
    job.stop = _stop(body.get("stop"))
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    job.stream = bool(stream)
    opts = body.get("stream_options") or {}
    job.include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
    job.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    job.created = int(time.time())
    return job


# OpenAI's defaults, where neither the request nor the model file says
DEFAULTS = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0)


# the request's names of the penalties (OpenAI's, and llama.cpp's server's)
_PENALTIES = {
    "penalty_freq": "frequency_penalty",
    "penalty_present": "presence_penalty",
    "penalty_repeat": "repeat_penalty",
    "penalty_last_n": "repeat_last_n",
}


def sampling(job: Job) -> SamplingSettings:
    """The sampling the request asks for (None where it does not say)."""
    penalties = {field: getattr(job, name) for field, name in _PENALTIES.items()}
    return SamplingSettings(job.temperature, job.top_k, job.top_p, job.min_p, job.seed, **penalties)


def _number(body: dict, name: str, kind, lo, hi, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and not math.isfinite(v):  # JSON's NaN and Infinity, which json.loads takes
        raise ApiError(400, f"'{name}' must be a finite number, got {v}", name, "invalid_value")
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or v == int(v))
    if not ok:
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", name, "invalid_type")
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"'{name}' must be {span}, got {v}", name, "invalid_value")
    return v


def _stop(stop) -> list:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' holds at most {MAX_STOP} sequences", "stop", "invalid_value")
    return [s for s in stops if s]


def _prompt(prompt):
    """A completion prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "one prompt per request: batches of prompts are not supported", "prompt")
    raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")


def _messages(messages) -> list:
    """Chat messages with text content; content parts of type text are joined."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}: a message needs a role of system, user or assistant", f"{where}.role")
        content = msg.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, f"{where}: only text content parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}: 'content' must be a string", f"{where}.content")
        role = "system" if msg["role"] == "developer" else msg["role"]
        out.append({"role": role, "content": content})
    return out


# ---- responses ---------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(job: Job, text: str, finish: str, use: dict) -> dict:
    """The whole answer of a request that was not streamed."""
    if job.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": job.id,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": use,
    }


def chunk(
    job: Job, text: str | None = None, finish: str | None = None, role: bool = False, use: dict | None = None
) -> dict:
    """One server-sent event of a streamed answer: a piece of text, the opening role
    (chat), the finish reason, or (use given) the closing usage with no choices."""
    if job.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {
        "id": job.id,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": job.created,
        "model": job.model,
        "choices": [] if use else choices,
    }
    if use:
        out["usage"] = use
    return out


class StopText:
    """Cut streamed text at the first stop sequence. push() returns what can be sent now:
    text that might be the start of a stop sequence is held back until it is decided."""

    def __init__(self, stops: list):
        self.stops, self.held, self.stopped = stops, "", False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[: min(hits)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return "" if self.stopped else text
