"""`hobbit-cli bench soak`: many clients on one hobbitd for minutes, with crashes.

N client slots each run `hobbit-cli generate` (greedy, the same prompt) through one hobbitd
again and again, and one `hobbit-cli serve` on the same hobbitd answers completion requests
(the same prompt, greedy) one after another for the whole run; every few seconds a random
running `generate` client is SIGKILLed, and hobbitd itself
is SIGKILLed and started again on the same socket (systemd's Restart=on-failure) a given
number of times, spread over the run. At the end it checks and prints: answers completed
and whether each equals the in-process answer (hobbitd serves exactly unless calibrated, so
a restart must not change a greedy answer), errors by kind, clients killed, pins hobbitd
still holds once every client is gone, what the daemons left in /dev/shm and the socket
folder, and hobbitd's RSS and open files over time. No timed assertions: it reports.

With replace_every, the model file (a copy in the work folder) is replaced every so many
seconds by a second version of it, in turn by an atomic rename and by a rewrite in place
(compute/measure/soak_files.py): every answer must then equal the in-process text of a
version the file held while the answer ran, or be a clear one-line error (file_errors).
"""

from __future__ import annotations

import os
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

PROMPT = "The old lighthouse keeper climbed the stairs and"
SHM = "/dev/shm"


def _generate_cmd(model: str, n: int, *where: str) -> list[str]:
    """`hobbit-cli generate` of PROMPT, greedy, n tokens; where: --socket ... or --no-daemon."""
    cli = [sys.executable, "-m", "hobbit.compute.apps.cli", "generate", model]
    return [*cli, "-p", PROMPT, "-n", str(n), "--temperature", "0", *where]


def _reference(model: str, n: int) -> str:
    r = subprocess.run(_generate_cmd(model, n, "--no-daemon"), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"the in-process reference failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def _ours(pids: set) -> list[str]:
    """/dev/shm entries made by hobbitd processes with these pids (hobbit-PID-...)."""
    return sorted(
        n
        for n in os.listdir(SHM)
        if n.startswith("hobbit-") and n.split("-")[1].isdigit() and int(n.split("-")[1]) in pids
    )


class _Served:
    """`hobbit-cli serve` on a free port through the soak's hobbitd, asked for the prompt's
    greedy completion again and again from a thread until stop()."""

    def __init__(self, model: str, socket: str, work: str, n_tokens: int, judge):
        """judge(text, t0, t1): whether an answer asked at t0 and got at t1 is right."""
        self.log_path = os.path.join(work, "serve.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hobbit.compute.apps.cli",
                    "serve",
                    model,
                    "--port",
                    "0",
                    "--socket",
                    socket,
                    "--reconnect-deadline",
                    "60",
                ],
                stdout=log,
                stderr=log,
            )
        deadline, self.url = time.monotonic() + 120, None
        while self.url is None and time.monotonic() < deadline and self.proc.poll() is None:
            with open(self.log_path) as f:
                found = re.search(r"listening on (http://[\d.]+:\d+)/v1", f.read())
            self.url = found and found.group(1)
            time.sleep(0.1)
        if self.url is None:
            self.proc.kill()
            raise RuntimeError(f"serve did not start: {open(self.log_path).read()[-300:]}")
        self.body = json.dumps({"prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0}).encode()
        self.judge = judge
        self.answers = self.correct = 0
        self.errors: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ask, daemon=True)
        self._thread.start()

    def _ask(self) -> None:
        while not self._stop.is_set():
            req = urllib.request.Request(self.url + "/v1/completions", self.body, {"Content-Type": "application/json"})
            try:
                t0 = time.monotonic()
                with urllib.request.urlopen(req, timeout=120) as r:
                    text = json.loads(r.read())["choices"][0]["text"]
                self.answers += 1
                self.correct += self.judge(text, t0, time.monotonic())
            except Exception as e:  # counted by kind: the soak reports, never raises
                kind = f"serve: {type(e).__name__}: {e}"[:120]
                self.errors[kind] = self.errors.get(kind, 0) + 1
                time.sleep(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(180)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run(
    model: str | None = None,
    clients: int = 4,
    minutes: float = 1.0,
    n_tokens: int = 16,
    kill_every: float = 5.0,
    daemon_kills: int = 1,
    cache: float = 0.25,
    seed: int = 0,
    serve: bool = True,
    progress: bool = True,
    replace_every: float = 0.0,
) -> dict:
    """The soak (see the module docstring); `cache` as a share of the expert bytes."""
    import psutil

    from ...loader.layout import gguf_experts
    from ..client.daemon import DaemonProcess
    from ..engine.weights import open_model
    from .bench_offload import synthetic_model
    from .soak_files import KINDS, Replacer, clear_error

    model = model or synthetic_model(quick=True, progress=progress)
    src = gguf_experts(open_model(model))
    cache_bytes = int(cache * src.n_layer * src.n_expert * src.format.slot_bytes)
    reference = _reference(model, n_tokens)
    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="hobbit-soak-")
    sock = os.path.join(work, "hobbitd.sock")
    files, texts = None, [reference]
    if replace_every > 0:  # serve a copy of the model, replaced under load
        files = Replacer(model, work)
        model = files.path
        texts.append(_reference(files.versions[1], n_tokens))
    d = DaemonProcess([model], sock, log_path=os.path.join(work, "hobbitd.log"), cache_size=cache_bytes)
    d.wait_ready()
    pids = {d.proc.pid}
    duration = minutes * 60
    kill_at = [duration * (i + 1) / (daemon_kills + 1) for i in range(daemon_kills)]
    slots: list = [None] * clients
    out = {
        "answers": 0,
        "correct": 0,
        "wrong": 0,
        "errors": {},
        "clients_killed": 0,
        "daemon_kills": 0,
        "rss_mib": [],
        "private_mib": [],
        "fds": [],
    }
    if files is not None:
        out.update(file_errors={}, answers_by_version=[0, 0])
    t0 = time.monotonic()
    next_kill = t0 + kill_every
    next_sample = t0
    next_replace = t0 + replace_every

    def right(text: str, since: float, until: float) -> bool:
        """text is the in-process text of the file as it was while the answer ran."""
        held = [0] if files is None else sorted(files.held(since, until))
        for v in held:
            if text == texts[v]:
                if files is not None:
                    out["answers_by_version"][v] += 1
                return True
        return False

    def start(i):
        log = open(os.path.join(work, f"client-{i}.err"), "w+")
        cmd = _generate_cmd(model, n_tokens, "--socket", sock, "--reconnect-deadline", "60")
        slots[i] = (
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True),
            log,
            time.monotonic(),
        )

    def finish(i, killed=False):
        proc, log, since = slots[i]
        stdout, _ = proc.communicate()
        log.seek(0)
        err = log.read().strip().splitlines()
        log.close()
        slots[i] = None
        if killed:
            out["clients_killed"] += 1
        elif proc.returncode == 0:
            out["answers"] += 1
            out["correct" if right(stdout, since, time.monotonic()) else "wrong"] += 1
        else:
            clear = files is not None and clear_error(proc.returncode, "\n".join(err))
            last = err[-1] if err and err[-1].startswith("hobbit-cli: error: ") else None
            kind = (last or f"exit {proc.returncode}" + (f" after: {err[-1]}" if err else ""))[:120]
            errors = out["file_errors"] if clear else out["errors"]  # the file changed under it
            errors[kind] = errors.get(kind, 0) + 1

    served = None
    try:
        if serve:
            # generate ends its text with a newline, serve does not
            served = _Served(model, sock, work, n_tokens, lambda text, t0, t1: right(text + "\n", t0, t1))
        for i in range(clients):
            start(i)
        while time.monotonic() - t0 < duration:
            now = time.monotonic()
            if kill_at and now - t0 >= kill_at[0]:
                kill_at.pop(0)
                d.proc.kill()  # a crash, as the kernel's OOM killer would
                d.proc.wait()
                out["daemon_kills"] += 1
                time.sleep(1.0)  # systemd's RestartSec, shortened
                d.restart()
                pids.add(d.proc.pid)
            if files is not None and now >= next_replace:
                files.replace(KINDS[sum(files.counts.values()) % 2])
                next_replace = time.monotonic() + replace_every
            if now >= next_kill:
                running = [i for i, s in enumerate(slots) if s is not None and s[0].poll() is None]
                if running:
                    i = rng.choice(running)
                    slots[i][0].kill()
                    finish(i, killed=True)
                    start(i)
                next_kill = now + kill_every
            if now >= next_sample:
                try:
                    p = psutil.Process(d.proc.pid)
                    mem = p.memory_info()  # shared: the cache's pages; the rest is private
                    out["rss_mib"].append(round(mem.rss / 2**20, 1))
                    out["private_mib"].append(round((mem.rss - mem.shared) / 2**20, 1))
                    out["fds"].append(p.num_fds())
                except psutil.Error:
                    pass
                next_sample = now + 1.0
            for i, s in enumerate(slots):
                if s is not None and s[0].poll() is not None:
                    finish(i)
                    start(i)
            time.sleep(0.05)
        for i, s in enumerate(slots):  # let the last ones finish
            if s is not None:
                try:
                    s[0].wait(120)
                except subprocess.TimeoutExpired:
                    s[0].kill()
                finish(i)
        if served is not None:
            out["serve_exit"] = served.stop()
            out["serve"] = {"answers": served.answers, "correct": served.correct, "errors": served.errors}
            served = None
        out["pins_after"], out["sessions_after"] = _pins(sock)
    finally:
        for s in slots:
            if s is not None:
                s[0].kill()
        if served is not None:
            served.stop()
        rc = d.stop()
    out["daemon_exit"] = rc
    out["leftover_shm"] = _ours(pids)
    ours = set() if files is None else {os.path.basename(files.path), "versions"}  # the model's copies
    out["leftover_files"] = sorted(f for f in os.listdir(work) if not f.endswith((".log", ".err")) and f not in ours)
    out.update(
        model=model,
        clients=clients,
        minutes=minutes,
        n_tokens=n_tokens,
        kill_every_s=kill_every,
        cache_bytes=cache_bytes,
        **({} if files is None else {"replacements": files.counts}),
    )
    sv = out.get("serve", {})
    if (
        out["errors"]
        or out["wrong"]
        or out["leftover_files"]
        or (sv.get("errors") and files is None)  # with replacements serve fails clearly (503)
        or sv.get("answers", 0) != sv.get("correct", 0)
    ):
        out["workdir"] = work  # kept: the daemon's and the clients' logs tell why
    else:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _pins(sock: str) -> tuple:
    """(pinned slots, sessions) hobbitd reports once the clients are gone (after its reaper
    ran: a killed client's session ends when hobbitd sees its process is gone)."""
    from ..client.expert_client import ExpertClient

    time.sleep(2.0)
    c = ExpertClient(sock, None, timeout=5, retries=0, reconnect_s=0)
    try:
        st = c.stats()
    finally:
        c.close()
    pins = sum(r["pinned"] for mo in st["models"].values() for r in mo["regions"].values())
    return pins, sum(s["pid"] != os.getpid() for s in st["sessions"])  # not ourselves


def print_table(r: dict) -> None:
    print(
        f"bench soak: {r['model']}, {r['clients']} clients for {r['minutes']:g} min, "
        f"{r['n_tokens']} tokens per answer, a client SIGKILLed every {r['kill_every_s']:g} s, "
        f"hobbitd SIGKILLed and restarted {r['daemon_kills']} times"
    )
    print(f"  answers completed      {r['answers']} ({r['correct']} equal to in-process, {r['wrong']} not)")
    print(f"  clients killed         {r['clients_killed']}")
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    print(f"  errors                 {errors}")
    if "replacements" in r:
        rp, by = r["replacements"], r["answers_by_version"]
        ferr = ", ".join(f"{k}: {v}" for k, v in r["file_errors"].items()) or "none"
        print(f"  file replaced          {rp['rename']} by a rename, {rp['in_place']} in place")
        print(f"  answers by version     {by[0]} of the first, {by[1]} of the second")
        print(f"  clear file errors      {ferr}")
    if "serve" in r:
        sv = r["serve"]
        serrors = ", ".join(f"{k}: {v}" for k, v in sv["errors"].items()) or "none"
        print(
            f"  serve                  {sv['answers']} answers ({sv['correct']} equal to in-process), "
            f"errors: {serrors}; exit code {r['serve_exit']}"
        )
    print(f"  pins held afterwards   {r['pins_after']} (sessions left: {r['sessions_after']})")
    print(f"  left in /dev/shm       {', '.join(r['leftover_shm']) or 'nothing'}")
    print(f"  left in the socket dir {', '.join(r['leftover_files']) or 'nothing'}")
    rss, fds = r["rss_mib"], r["fds"]
    if rss:
        prv = r["private_mib"]
        print(
            f"  hobbitd RSS MiB        first {rss[0]}, max {max(rss)}, last {rss[-1]} "
            f"(not shared: first {prv[0]}, max {max(prv)}, last {prv[-1]})"
        )
        print(f"  hobbitd open files     first {fds[0]}, max {max(fds)}, last {fds[-1]}")
    print(f"  hobbitd exit code      {r['daemon_exit']}")
    if r.get("workdir"):
        print(f"  logs kept in           {r['workdir']}")
