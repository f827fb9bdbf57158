"""What the engine returns to the user."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sequence. In a stream, ``text``, ``token_ids`` and ``logprobs`` are deltas.

    ``logprobs[i]`` maps token ids to log-probabilities at step i: the sampled
    token first, then the top ``SamplingParams.logprobs`` tokens, most likely first.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """Timestamps (``time.time()``) and counts of one request."""

    arrival_time: float
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0


@dataclass
class RequestOutput:
    """The state of one request: a delta while streaming, the whole result from ``LLM``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
