"""Prometheus metrics for the server: request counters, latency histograms, engine gauges."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from tristream.engine import AsyncEngine
from tristream.outputs import RequestOutput
from tristream.protocol import SchedulerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75) + (1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    """One registry per server, so that several servers in a process keep apart."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._request_metrics(self.registry, ["model_name"])
        # An engine's gauges and step counters, one series per data-parallel replica.
        self._engine_gauges(self.registry, ["model_name", "engine"])
        self.steps = StepAccounting(model_name)
        self.registry.register(self.steps)

    def _request_metrics(self, r: CollectorRegistry, labels: list[str]) -> None:
        """The counters and latency histograms that ``track`` feeds, request by request."""
        self.requests = Counter(
            "tristream_requests", "Engine requests that ended, by finish reason", labels + ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("tristream_prompt_tokens", "Prompt tokens of ended requests", labels, registry=r)
        self.generation_tokens = Counter("tristream_generation_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram(
            "tristream_time_to_first_token_seconds", "Arrival to first token", labels, buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "tristream_inter_token_latency_seconds", "Time between streamed tokens", labels, buckets=ITL_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "tristream_e2e_request_latency_seconds", "Arrival to the last token", labels, buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue = Histogram(
            "tristream_request_queue_time_seconds", "Arrival to the first scheduled step", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def _engine_gauges(self, r: CollectorRegistry, labels: list[str]) -> None:
        """The gauges that ``render`` sets from the engine's stats."""
        self.running = Gauge("tristream_num_requests_running", "Sequences in the running batch", labels, registry=r)
        self.waiting = Gauge("tristream_num_requests_waiting", "Sequences waiting for admission", labels, registry=r)
        self.pages_total = Gauge("tristream_kv_pages_total", "KV cache pages", labels, registry=r)
        self.pages_used = Gauge(
            "tristream_kv_pages_used", "KV cache pages not free (held by requests or the prefix cache)", labels,
            registry=r,
        )  # fmt: skip
        self.pages_cached = Gauge(
            "tristream_kv_pages_cached", "KV cache pages held by the prefix cache", labels, registry=r
        )
        self.hit_rate = Gauge(
            "tristream_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache, since start", labels,
            registry=r,
        )  # fmt: skip
        self.acceptance = Gauge(
            "tristream_spec_decode_acceptance_rate", "Share of the draft tokens proposed since start that were "
            "accepted", labels, registry=r,
        )  # fmt: skip
        self.accepted_length = Gauge(
            "tristream_spec_decode_mean_accepted_length", "Tokens produced per request-step that checked drafts, "
            "since start", labels, registry=r,
        )  # fmt: skip

    async def render(self) -> bytes:
        """The exposition text, with the engine gauges read now: one series per data-parallel replica that runs."""
        replicas = await self.engine.replica_stats()
        m = self.model_name
        for engine, stats in enumerate(replicas):
            if stats is None:
                continue
            labels = (m, str(engine))
            self.running.labels(*labels).set(stats.num_running)
            self.waiting.labels(*labels).set(stats.num_waiting)
            self.pages_total.labels(*labels).set(stats.num_pages)
            self.pages_used.labels(*labels).set(stats.num_pages - stats.num_free_pages)
            self.pages_cached.labels(*labels).set(stats.num_cached_pages)
            self.hit_rate.labels(*labels).set(
                stats.num_cache_hit_tokens / stats.num_prompt_tokens if stats.num_prompt_tokens else 0.0
            )
            self.acceptance.labels(*labels).set(stats.acceptance_rate)
            self.accepted_length.labels(*labels).set(stats.mean_accepted_length)
        self.steps.replicas = replicas
        return generate_latest(self.registry)

    async def track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass one engine request's outputs through, observing its latencies and counts.

        A request the engine refuses counts as an "error"; one whose stream is
        dropped before it ends counts as an "abort".
        """
        m = self.model_name
        last: float | None = None
        out: RequestOutput | None = None
        outcome = "abort"
        try:
            async for out in stream:
                now = time.time()
                n = sum(len(o.token_ids) for o in out.outputs)
                if n:
                    # One inter-token latency per token after the first: the tokens of an output share its gap.
                    gaps, gap = (n, (now - last) / n) if last is not None else (n - 1, 0.0)
                    if last is None:
                        self.ttft.labels(m).observe(now - out.metrics.arrival_time)
                    for _ in range(gaps):
                        self.itl.labels(m).observe(gap)
                    last = now
                self.generation_tokens.labels(m).inc(n)
                if out.finished:
                    reasons = [o.finish_reason for o in out.outputs if o.finish_reason]
                    outcome = reasons[0] if reasons else "abort"
                yield out
        except ValueError:
            outcome = "error"
            raise
        finally:
            await stream.aclose()
            self.requests.labels(m, outcome).inc()
            if out is not None:
                metrics = out.metrics
                self.prompt_tokens.labels(m).inc(metrics.num_prompt_tokens)
                if metrics.time_in_queue is not None:
                    self.queue.labels(m).observe(metrics.time_in_queue)
                if metrics.finished_time is not None:
                    self.e2e.labels(m).observe(metrics.finished_time - metrics.arrival_time)


class StepAccounting:
    """The engine's step counters as Prometheus counters, read from each replica's scheduler's latest stats:
    where the time of each step goes (GPU busy, GPU idle between steps, scheduler, IPC, tokenizer workers), and
    speculative decoding's draft tokens proposed and accepted."""

    FAMILIES = (
        ("tristream_engine_steps", "Engine steps run", "num_steps"),
        ("tristream_step_gpu_busy_seconds", "Device time of the steps (forward and sampling)", "gpu_busy_s"),
        (
            "tristream_step_gpu_idle_seconds",
            "Time a request was in flight (waiting or running) and the device ran no step",
            "gpu_idle_s",
        ),
        ("tristream_step_scheduler_seconds", "Scheduler time deciding steps and taking their results", "scheduler_s"),
        ("tristream_step_ipc_seconds", "Time plans and results spent in transit between processes", "ipc_s"),
        (
            "tristream_step_tokenizer_busy_seconds",
            "Tokenizer workers' time tokenizing prompts and detokenizing steps, summed over workers",
            "tokenizer_busy_s",
        ),
        ("tristream_spec_decode_num_drafts", "Request-steps that checked draft tokens", "num_drafts"),
        ("tristream_spec_decode_num_draft_tokens", "Draft tokens proposed", "num_draft_tokens"),
        ("tristream_spec_decode_num_accepted_tokens", "Draft tokens accepted", "num_accepted_tokens"),
    )

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.replicas: list[SchedulerStats | None] = []

    def collect(self):
        if not any(self.replicas):
            return
        for name, doc, field in self.FAMILIES:
            family = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
            for engine, stats in enumerate(self.replicas):
                if stats is not None:
                    family.add_metric([self.model_name, str(engine)], getattr(stats, field))
            yield family


@dataclass
class ThroughputLog:
    """The line a busy server logs every few seconds, as vLLM's: prompt and generation tokens/s since the
    previous reading, running and waiting requests, KV cache use and the prefix cache's hit rate since start."""

    last: SchedulerStats | None = None
    at: float = 0.0

    def line(self, stats: SchedulerStats, now: float) -> str | None:
        """The line for ``stats``, read at ``now`` (seconds); None for the first reading and while idle."""
        last, at = self.last, self.at
        self.last, self.at = stats, now
        if last is None:
            return None
        prompt = stats.num_prompt_tokens - last.num_prompt_tokens
        generated = stats.num_generated_tokens - last.num_generated_tokens
        if not (prompt or generated or stats.num_running or stats.num_waiting):
            return None
        seconds = max(now - at, 1e-9)
        used = 1 - stats.num_free_pages / stats.num_pages
        hits = stats.num_cache_hit_tokens / stats.num_prompt_tokens if stats.num_prompt_tokens else 0.0
        return (
            f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, "
            f"Avg generation throughput: {generated / seconds:.1f} tokens/s, "
            f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {used:.1%}, Prefix cache hit rate: {hits:.1%}"
        )
