"""`hobbit-cli serve` driven by the official openai client over loopback, against a real
hobbitd process serving the default model with a quarter of its experts cached."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import openai
import pytest

from daemon_util import run_daemon
from serve_util import run_serve
from hobbit.compute.apps.api import StopText

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(default_moe, tmp_path_factory):
    """serve --parallel 2 --max-queue 1 on a free port, through a hobbitd whose cache holds
    a quarter of the experts, in high precision only (with dynamic loading an expert's
    precision depends on what is cached, so greedy answers would depend on the order of
    the tests); stopped with SIGTERM after the module (must exit 0)."""
    from hobbit.loader.layout import gguf_experts
    from hobbit.compute.engine.weights import open_model

    tmp = tmp_path_factory.mktemp("serve")
    ex = gguf_experts(open_model(default_moe))
    cache = ex.total_bytes // 4
    with run_daemon([default_moe], cache, tmp, no_dynamic=True) as daemon:
        flags = ["--parallel", "2", "--max-queue", "1", "--ctx", "512"]
        with run_serve(default_moe, *flags, log_path=tmp / "serve.log", socket=daemon.socket) as s:
            yield s


def _generate(model: str, socket: str, prompt: str, n: int, chat: bool = False) -> str:
    """The greedy text `hobbit-cli generate` gives through the same daemon: the reference."""
    cmd = [
        *CLI,
        "generate",
        model,
        "-p",
        prompt,
        "-n",
        str(n),
        "--temperature",
        "0",
        "--socket",
        socket,
        "--ctx",
        "512",
    ] + (["--chat"] if chat else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout[:-1]  # generate ends with a newline


def test_completion_is_the_engines_greedy_text(served, default_moe):
    r = served.client.completions.create(
        model="default", prompt="The capital of France is", max_tokens=12, temperature=0
    )
    choice = r.choices[0]
    assert choice.text == _generate(default_moe, served.socket, "The capital of France is", 12)
    assert choice.finish_reason == "length"
    from hobbit.compute.engine.tokenizer import Tokenizer

    n_prompt = len(Tokenizer(default_moe).encode("The capital of France is"))
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == n_prompt
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streamed_chat_completion_arrives_in_pieces_and_matches_the_whole_answer(served, default_moe):
    stream = served.client.chat.completions.create(
        model=os.path.basename(default_moe).removesuffix(".gguf"),
        messages=QUESTION,
        stream=True,
        temperature=0,
        max_tokens=24,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 5, "the answer streams token by token"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens == len(pieces) or finishes == ["stop"]
    text = "".join(pieces)
    assert "Paris" in text
    whole = served.client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == text
    assert text == _generate(default_moe, served.socket, QUESTION[0]["content"], 24, chat=True)


def test_two_concurrent_requests_both_complete_with_their_own_answers(served):
    prompts = ["Name a color.", "What is two plus two?"]
    alone = [
        served.client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": p}], temperature=0, max_tokens=16
        )
        .choices[0]
        .message.content
        for p in prompts
    ]
    got, errors = [None, None], []

    def ask(i):
        try:
            got[i] = (
                served.client.chat.completions.create(
                    model="default", messages=[{"role": "user", "content": prompts[i]}], temperature=0, max_tokens=16
                )
                .choices[0]
                .message.content
            )
        except Exception as e:  # reported below, with the server's log
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, (errors, served.log)
    assert got == alone  # each slot has its own KV cache: no answer leaks into the other


def test_a_full_queue_answers_503_and_a_dropped_stream_frees_its_slot(served):
    long_chat = dict(
        model="default",
        messages=[{"role": "user", "content": "Tell me a long story."}],
        stream=True,
        max_tokens=400,
        temperature=0.8,
    )
    streams = [served.client.chat.completions.create(**long_chat) for _ in range(2)]
    for s in streams:
        next(iter(s))  # both slots are generating now
    waiter = threading.Thread(
        target=lambda: served.client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4)
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while json.loads(served.get("/health")[1])["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.APIStatusError) as e:
        served.client.chat.completions.create(model="default", messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
    for s in streams:
        s.close()  # the clients hang up mid-answer
    waiter.join(60)
    deadline = time.monotonic() + 30
    while json.loads(served.get("/health")[1])["slots_idle"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(served.get("/health")[1])["slots_idle"] == 2, served.log
    metrics = served.get("/metrics")[1]
    want = r'hobbit_http_requests_total\{endpoint="/v1/chat/completions",status="499"\} 2\.0'
    assert re.search(want, metrics), metrics


def test_malformed_requests_get_openai_errors(served):
    status, body = served.post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model="default", messages=[{"role": "user"}])
    assert e.value.body["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model="default", prompt="hi", temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model="default", messages=QUESTION, n=3)
    assert e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model="default", prompt="word " * 600)
    assert e.value.body["code"] == "context_length_exceeded"
    status, body = served.get("/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)
    status, body = served.get("/v1/completions")
    assert status == 405 and "error" in json.loads(body)
    # the server still answers
    assert served.client.completions.create(model="default", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_non_finite_numbers_get_400_not_a_traceback(served):
    """JSON's NaN and Infinity (Python's json takes them): a one-line 400 naming the
    parameter, never a 500 with "Probabilities contain NaN" in the log."""
    for field, value in (("temperature", "NaN"), ("top_p", "-Infinity"), ("max_tokens", "Infinity")):
        body = f'{{"model": "default", "prompt": "Hi", "{field}": {value}}}'.encode()
        status, text = served.post("/v1/completions", body)
        error = json.loads(text)["error"]
        assert (status, error["param"], error["code"]) == (400, field, "invalid_value"), text
        assert "finite" in error["message"] and "\n" not in error["message"], error
    assert "Traceback" not in served.log and "NaN" not in served.log, served.log[-2000:]
    assert served.client.completions.create(model="default", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_models_health_and_metrics(served, default_moe):
    models = served.client.models.list().data
    assert [m.id for m in models] == [os.path.basename(default_moe).removesuffix(".gguf")]
    status, body = served.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    served.client.completions.create(model="default", prompt="Once upon a time", max_tokens=8)
    status, text = served.get("/metrics")
    assert status == 200
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["hobbit_daemon_up"] == 1
    assert values["hobbit_completion_tokens_total"] >= 8
    hits = [v for k, v in values.items() if k.startswith("hobbit_cache_hits_total{") and 'precision="high"' in k]
    misses = [v for k, v in values.items() if k.startswith("hobbit_cache_misses_total{") and 'precision="high"' in k]
    assert hits and hits[0] > 0 and misses and misses[0] > 0  # a quarter cached: both happen
    assert any(k.startswith("hobbit_read_bytes_total") and v > 0 for k, v in values.items())


def test_stop_sequences_are_cut_even_across_pieces():
    s = StopText(["\nUser:", "END"])
    out = [s.push(p) for p in ["Hello", " wor", "ld\nUs", "er: more"]]
    assert "".join(out) == "Hello world" and s.stopped
    s = StopText(["END"])
    assert s.push("the EN") == "the " and s.push("ding") == "ENding" and s.flush() == ""
    s = StopText(["END"])
    assert s.push("almost E") == "almost " and s.flush() == "E"


def test_a_port_in_use_is_a_one_line_error_before_anything_loads(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}  # no default model here: not built
        r = subprocess.run([*CLI, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert r.stderr.strip() == f"hobbit-cli: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not list(tmp_path.iterdir()), "nothing was built or loaded"
