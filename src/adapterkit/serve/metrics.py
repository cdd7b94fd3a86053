"""Prometheus metrics of ``adapterkit serve`` (one registry per server; names follow vLLM's, prefix
``adapterkit:`` instead of ``vllm:``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, "adapterkit:"
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Inter-token latency.", buckets=_LATENCY, registry=r
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds", "End-to-end request latency.", buckets=_LATENCY, registry=r
        )
        self.queue_time = Histogram(
            p + "request_queue_time_seconds", "Time spent waiting.", buckets=_LATENCY, registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", registry=r)
        self.requests_success = Counter(
            p + "request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.lora_info = Gauge(
            p + "lora_requests_info",
            "Running and waiting adapters (labels), value: time of the last update.",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.adapter_loads = Counter(p + "adapter_loads", "Adapters loaded into the model.", registry=r)
        self.adapter_evictions = Counter(p + "adapter_evictions", "Adapters evicted from the pool.", registry=r)
        self.pool_bytes = Gauge(p + "adapter_pool_bytes", "Bytes of adapters in memory.", registry=r)
        self._lora_labels: tuple[str, str, str] | None = None

    def set_lora_info(self, running: list[str], waiting: list[str], max_lora: int) -> None:
        import time

        labels = (",".join(sorted(set(running))), ",".join(sorted(set(waiting))), str(max_lora))
        if labels != self._lora_labels:
            if self._lora_labels is not None:
                self.lora_info.remove(*self._lora_labels)
            self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())
