"""What the engine returns to the user."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class ToolCall:
    """A function call in a reply: ``arguments`` is the JSON text the model wrote.

    In a stream, a call's first delta carries its ``id`` and ``name``, and the later ones add text to its
    ``arguments``; ``index`` numbers the calls of one sample. A whole result holds each call once, whole.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str = ""
    type: str = "function"


def merge_tool_calls(whole: list[ToolCall], deltas: list[ToolCall]) -> list[ToolCall]:
    """``whole`` (a sample's calls so far) with the stream ``deltas`` added to them."""
    calls = {c.index: c for c in whole}
    for d in deltas:
        if d.index in calls:
            calls[d.index].arguments += d.arguments
        else:
            calls[d.index] = dataclasses.replace(d)
    return [calls[i] for i in sorted(calls)]


@dataclass
class CompletionOutput:
    """One generated sequence (sample ``index`` of the request's ``n``).

    In a stream, ``text``, ``token_ids``, ``logprobs`` and ``reasoning_content`` are
    deltas, while ``cumulative_logprob`` is the running sum over the whole sequence.
    ``logprobs[i]`` maps token ids to log-probabilities at step i: the sampled
    token first, then the top ``SamplingParams.logprobs`` tokens, most likely first.
    ``reasoning_content`` is the text inside ``<think>...</think>`` when the engine
    runs a reasoning parser; ``text`` is then the answer after it. ``tool_calls`` are
    the function calls of a chat that has tools (None without tools); ``finish_reason``
    is then "tool_calls" when the reply ends after one. ``send_idx`` (FastDeploy's)
    numbers the sample's deltas from 0; a whole result has its last.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "tool_calls" or "abort"
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    reasoning_content: str | None = None
    send_idx: int = 0
    tool_calls: list[ToolCall] | None = None


class CompletionOutputs(list):
    """``RequestOutput.outputs``: the samples, a list, whose own attributes read the first sample.

    ``out.outputs[0].text`` and FastDeploy's ``out.outputs.text`` are the same text;
    ``index`` and ``count`` stay the list's methods.
    """

    def __getattr__(self, name: str) -> object:
        if name.startswith("_") or not self:
            raise AttributeError(name)
        return getattr(self[0], name)


@dataclass
class RequestMetrics:
    """Timestamps (``time.time()``) and counts of one request, and FastDeploy's durations derived from them.

    ``time_in_queue`` runs from arrival until the scheduler first ran the request;
    ``last_token_time`` is when its latest tokens arrived.
    """

    arrival_time: float
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    last_token_time: float | None = None

    @property
    def inference_start_time(self) -> float | None:
        """When the scheduler first ran the request (its prompt's first step)."""
        return None if self.time_in_queue is None else self.arrival_time + self.time_in_queue

    @property
    def model_forward_time(self) -> float | None:
        """Seconds from ``inference_start_time`` to the latest tokens: the time the request spent running."""
        start = self.inference_start_time
        return None if start is None or self.last_token_time is None else self.last_token_time - start

    @property
    def model_execute_time(self) -> float | None:
        """Seconds from arrival to the latest tokens: queueing, tokenizing and running together."""
        return None if self.last_token_time is None else self.last_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """The state of one request: a delta while streaming, the whole result from ``LLM``.

    While streaming, ``outputs`` holds the samples that changed. ``prompt`` is the
    prompt's text: for a chat, the conversation as the chat template rendered it.
    ``prompt_logprobs`` (when asked for) comes with the first output: None for the
    first prompt token, then a dict like ``CompletionOutput.logprobs`` for each of
    the others. ``error_code`` and ``error_msg`` are FastDeploy's names for ``error``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.outputs, CompletionOutputs):
            self.outputs = CompletionOutputs(self.outputs)

    @property
    def error_code(self) -> int:
        """200, or 400 when the request failed (``error``)."""
        return 200 if self.error is None else 400

    @property
    def error_msg(self) -> str | None:
        """``error``."""
        return self.error


def accumulate(final: RequestOutput | None, out: RequestOutput) -> RequestOutput:
    """Fold a streamed delta ``out`` into the whole result so far (None at first), sample by sample."""
    if final is None:
        final = dataclasses.replace(out, outputs=[])
    by_index = {o.index: o for o in final.outputs}
    for delta in out.outputs:
        whole = by_index.get(delta.index)
        if whole is None:
            final.outputs.append(
                dataclasses.replace(
                    delta,
                    token_ids=list(delta.token_ids),
                    logprobs=list(delta.logprobs) if delta.logprobs is not None else None,
                    tool_calls=merge_tool_calls([], delta.tool_calls) if delta.tool_calls is not None else None,
                )
            )
            continue
        whole.text += delta.text
        whole.token_ids.extend(delta.token_ids)
        whole.finish_reason, whole.cumulative_logprob = delta.finish_reason, delta.cumulative_logprob
        whole.send_idx = delta.send_idx
        if delta.logprobs is not None:
            whole.logprobs = (whole.logprobs or []) + delta.logprobs
        if delta.reasoning_content is not None:
            whole.reasoning_content = (whole.reasoning_content or "") + delta.reasoning_content
        if delta.tool_calls is not None:
            whole.tool_calls = merge_tool_calls(whole.tool_calls or [], delta.tool_calls)
    final.outputs.sort(key=lambda o: o.index)
    final.finished, final.metrics, final.num_cached_tokens = out.finished, out.metrics, out.num_cached_tokens
    if out.prompt_logprobs is not None:
        final.prompt_logprobs = out.prompt_logprobs
    return final


async def fold(items: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    """The whole output of each of ``count`` streams, from their ``(stream number, delta)`` items."""
    finals: list[RequestOutput | None] = [None] * count
    async for i, out in items:
        finals[i] = accumulate(finals[i], out)
    return finals
