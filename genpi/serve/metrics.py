"""Per-prompt serving metrics through Ray's metrics API (Ray's dashboard and its Prometheus endpoint).

Every series carries the prompt's name, so each internalized prompt can be watched on its own.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

_LATENCY_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]


class RequestMetrics:
    """What the API layer counts: requests by mode and status, tokens, latency."""

    def __init__(self) -> None:
        tags = ("prompt", "mode")
        self.requests = Counter("genpi_requests", "chat completion requests", tag_keys=(*tags, "status"))
        self.prompt_tokens = Counter("genpi_prompt_tokens", "prompt tokens read", tag_keys=tags)
        self.completion_tokens = Counter("genpi_completion_tokens", "completion tokens generated", tag_keys=tags)
        self.saved_tokens = Counter(
            "genpi_prompt_tokens_saved", "prompt tokens an adapter made unnecessary", tag_keys=tags
        )
        self.latency = Histogram(
            "genpi_request_latency_s", "request latency, seconds", boundaries=_LATENCY_S, tag_keys=tags
        )
        self.first_token = Histogram(
            "genpi_time_to_first_token_s",
            "streamed requests' time to first token, seconds",
            boundaries=_LATENCY_S,
            tag_keys=tags,
        )

    def finished(self, prompt: str, mode: str, status: int, usage: dict | None, seconds: float) -> None:
        tags = {"prompt": prompt, "mode": mode}
        self.requests.inc(tags={**tags, "status": str(status)})
        counts = {
            self.prompt_tokens: "prompt_tokens",
            self.completion_tokens: "completion_tokens",
            self.saved_tokens: "prompt_tokens_saved",
        }
        for counter, field in counts.items():
            if usage and usage.get(field):  # Ray's counters refuse an increment of 0
                counter.inc(usage[field], tags=tags)
        if status == 200:
            self.latency.observe(seconds, tags=tags)


class ReplicaMetrics:
    """What a model replica counts: adapter loads, evictions and rejections (failed checks)."""

    def __init__(self) -> None:
        self.loads = Counter(
            "genpi_adapter_loads", "adapters (or prompt KV caches) loaded", tag_keys=("prompt", "mode")
        )
        self.evictions = Counter(
            "genpi_adapter_evictions",
            "adapters (or prompt KV caches) unloaded, memory freed",
            tag_keys=("prompt", "mode"),
        )
        self.rejections = Counter(
            "genpi_adapter_rejections", "published versions refused (digest or parity check)", tag_keys=("prompt",)
        )
