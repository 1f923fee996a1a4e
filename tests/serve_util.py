"""Run the real `hobbit-cli serve` for a test: run_serve(model, *flags, log_path=P) starts
it on a free port, yields a Served once it listens, and stops it with SIGTERM after,
checking it exited 0 without a Traceback."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]
START_S = 120.0


class Served:
    def __init__(self, proc, url: str, log_path, socket: str | None):
        self.proc, self.url, self.log_path = proc, url, log_path
        self.socket = socket  # hobbitd's, when serve goes through one
        self._client = None

    @property
    def client(self):
        """The official openai client on this server (no retries)."""
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return self._client

    def get(self, path: str) -> tuple[int, str]:
        """(status, decoded body) of a GET."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def post(self, path: str, data: bytes) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def complete(self, **body) -> tuple[int, dict]:
        """POST /v1/completions with `body`: (status, the JSON answer)."""
        status, text = self.post("/v1/completions", json.dumps(body).encode())
        return status, json.loads(text)

    @property
    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


@contextlib.contextmanager
def run_serve(model: str, *flags: str, log_path, socket: str | None = None):
    """socket: through the hobbitd there (else serve's own choice)."""
    through = ["--socket", socket] if socket else []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*CLI, "serve", model, "--port", "0", *through, *flags], stdout=log, stderr=log)
    s = None
    try:
        deadline = time.monotonic() + START_S
        while s is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"listening on (http://[\d.]+:\d+)/v1", open(log_path).read())
            s = found and Served(proc, found.group(1), log_path, socket)
            time.sleep(0.1)
        if s is None:
            pytest.fail(f"serve did not start:\n{open(log_path).read()}")
        yield s
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"serve did not stop on SIGTERM:\n{open(log_path).read()}")
    assert rc == 0, open(log_path).read()
    assert "Traceback" not in open(log_path).read(), open(log_path).read()
