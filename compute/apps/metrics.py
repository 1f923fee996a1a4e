"""/metrics of `hobbit-cli serve`, in Prometheus' text format (prometheus_client).

The server's own counters (requests, tokens, the last answer's decode rate) live in a
registry of this server; hobbitd's (cache hits and misses by precision, skips, bytes read,
prefetches, slot occupancy) are read from its STATS at each scrape, so they cover every
client of the daemon, not just this server.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...protocol.errors import HobbitError


class ServerMetrics:
    def __init__(self, server):
        self.server = server
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "hobbit_http_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt = Counter("hobbit_prompt_tokens", "prompt tokens received", registry=r)
        self.computed = Counter(
            "hobbit_prompt_tokens_computed",
            "prompt tokens computed (the rest were reused from a slot's KV cache)",
            registry=r,
        )
        self.completion = Counter("hobbit_completion_tokens", "tokens generated", registry=r)
        self.decode_rate = Gauge(
            "hobbit_decode_tokens_per_second", "decode speed of the last answer of more than one token", registry=r
        )
        Gauge("hobbit_slots_busy", "slots generating now", registry=r).set_function(
            lambda: len(server.seats.all) - len(server.seats.free)
        )
        Gauge("hobbit_requests_waiting", "requests waiting for a free slot", registry=r).set_function(
            lambda: server.seats.waiting
        )
        r.register(_DaemonCollector(server))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def generated(self, result: dict) -> None:
        self.prompt.inc(result["prompt_tokens"])
        self.computed.inc(result["computed_prompt_tokens"])
        self.completion.inc(result["completion_tokens"])
        if result["completion_tokens"] > 1:
            self.decode_rate.set(result["decode_tok_s"])

    def render(self) -> tuple[bytes, str]:
        """(body, content type); blocking (asks hobbitd), so call it from a worker thread."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DaemonCollector:
    """hobbitd's counters at scrape time; hobbit_daemon_up 0 when it does not answer."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        up = GaugeMetricFamily("hobbit_daemon_up", "1 when hobbitd answered this scrape")
        if not self.server.daemon_socket:  # in-process (--no-daemon): no daemon to ask
            return
        try:
            st = self.server.daemon_stats()
        except HobbitError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        clients = GaugeMetricFamily("hobbit_daemon_clients", "clients connected to hobbitd")
        clients.add_metric([], st.get("clients", 0))
        yield clients
        fam = {
            "hits": CounterMetricFamily(
                "hobbit_cache_hits", "expert requests served from the cache", labels=["model", "precision"]
            ),
            "misses": CounterMetricFamily(
                "hobbit_cache_misses", "expert requests that read flash", labels=["model", "precision"]
            ),
            "skipped": CounterMetricFamily(
                "hobbit_experts_skipped", "experts skipped by the mixed-precision rule", labels=["model"]
            ),
            "bytes": CounterMetricFamily(
                "hobbit_read_bytes", "bytes hobbitd read from the model files", labels=["model"]
            ),
            "prefetched": CounterMetricFamily("hobbit_prefetch_reads", "prefetch reads issued", labels=["model"]),
            "used": CounterMetricFamily(
                "hobbit_prefetch_used", "prefetched experts a request then used", labels=["model"]
            ),
            "slots": GaugeMetricFamily(
                "hobbit_cache_slots", "cache slots by precision and state", labels=["model", "precision", "state"]
            ),
        }
        for name, ms in st.get("models", {}).items():
            for prec in ("high", "low"):
                fam["hits"].add_metric([name, prec], ms.get(f"hits_{prec}", 0))
                fam["misses"].add_metric([name, prec], ms.get(f"misses_{prec}", 0))
            fam["skipped"].add_metric([name], ms.get("skipped", 0))
            fam["bytes"].add_metric([name], ms.get("bytes_read", 0))
            fam["prefetched"].add_metric([name], ms.get("prefetched", 0))
            fam["used"].add_metric([name], ms.get("prefetch_used", 0))
            for prec, r in ms.get("regions", {}).items():
                fam["slots"].add_metric([name, prec, "filled"], r.get("ready", 0))
                fam["slots"].add_metric([name, prec, "total"], r.get("slots", 0))
        yield from fam.values()
