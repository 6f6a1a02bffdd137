"""What `lmlab serve` counts for GET /metrics, in Prometheus' text format (prometheus_client, part of the serve
extra): requests by endpoint and status, rows decoding and requests waiting, prompt and generated tokens, time
to first token, inter-token latency and request duration histograms, the process' CPU and memory, and what is
served. Names follow vLLM's where there is one (`vllm:` becomes `lmlab_`), so a dashboard ports with a rename.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds. A small model on a CPU answers in milliseconds, a large one on a busy machine in tens of seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The server's counters and histograms, in a registry of its own; `live` reads what changes by the moment
    (rows decoding, requests waiting, the phase and decode step) when /metrics is asked."""

    def __init__(self, live: Callable[[], dict[str, Any]]):
        disable_created_metrics()  # no `_created` series beside every counter: Prometheus' text format has none
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter("lmlab_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmlab_prompt_tokens", "prompt tokens of admitted completions",
                                     registry=self.registry)
        self.generation_tokens = Counter("lmlab_generation_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("lmlab_time_to_first_token_seconds", "from a completion request's arrival to its "
                              "first token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("lmlab_inter_token_latency_seconds", "between a choice's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.duration = Histogram("lmlab_e2e_request_latency_seconds", "from a completion request's arrival to "
                                  "its last byte", buckets=DURATION_BUCKETS, registry=self.registry)
        self.live = live
        self.registry.register(self)  # a collector too: `collect` reads the values of the moment

    def tokens(self, first: bool, tokens: int, seconds: float) -> None:
        """`tokens` more tokens of a request, `seconds` after its previous ones (after its arrival: `first`)."""
        self.generation_tokens.inc(tokens)
        if first:
            self.ttft.observe(seconds)
        else:
            for _ in range(tokens):
                self.itl.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Any:
        now = self.live()
        gauges = {"lmlab_num_requests_running": ("choices decoding (rows of the batch in use)", now["decoding"]),
                  "lmlab_num_requests_waiting": ("requests waiting for a row", now["waiting"]),
                  "lmlab_max_batch": ("rows the batch decodes at once (--max-batch)", now["max_batch"]),
                  "lmlab_ready": ("1 once the model answers, 0 while it loads or after it started draining",
                                  now["ready"])}
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)
        yield InfoMetricFamily("lmlab_server", "what is served and how", value=now["info"])
