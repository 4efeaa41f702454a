"""GET /metrics: the scheduler's state in Prometheus' text format (prometheus_client)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = {
    "running_requests": "Requests whose paths are in the running batch",
    "waiting_requests": "Requests waiting for KV pages",
    "live_paths": "Paths decoded at each step now",
    "kv_bytes_used": "Bytes the KV cache holds",
}
_COUNTERS = {
    "requests_total": "Requests accepted",
    "requests_rejected": "Requests refused because the waiting queue was full",
    "generated_tokens": "Tokens generated over all requests",
    "steps": "Decode steps run",
    "step_seconds": "Seconds spent in decode steps",
    "prompt_tokens_reused": "Prompt tokens served from the prefix cache instead of prefilled",
}


class _Collector:
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.snapshot = snapshot

    def collect(self):  # called by prometheus_client at each scrape
        values = self.snapshot()
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"forkdec_{name}", doc, value=values[name])
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"forkdec_{name}", doc, value=values[name])


def metrics_registry(snapshot: Callable[[], dict[str, float]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_Collector(snapshot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
