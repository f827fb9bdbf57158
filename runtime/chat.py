"""An ms-swift-style front door: chat with a history of ``(query, response)`` pairs.

``inference`` and ``inference_stream`` take an ``LLM`` (synchronous) or an
``AsyncEngine`` (awaitable, async generator). The default sampling is greedy
(temperature 0) with at most 512 new tokens, a deterministic answer of bounded
length; pass ``sampling_params`` for anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence

from tristream.engine import AsyncEngine
from tristream.llm import LLM
from tristream.sampling_params import SamplingParams

History = list[tuple[str, str]]
HistoryIn = Sequence[tuple[str, str] | list[str]] | None

DEFAULT_PARAMS = SamplingParams(temperature=0, max_tokens=512)


def inference(
    engine_or_llm: LLM | AsyncEngine,
    query: str,
    history: HistoryIn = None,
    system: str | None = None,
    sampling_params: SamplingParams | None = None,
) -> tuple[str, History] | Awaitable[tuple[str, History]]:
    """Answer ``query`` after ``history``; return ``(response, history + [(query, response)])``.

    The input history is left as it is. With an ``AsyncEngine`` this returns an
    awaitable: ``response, history = await inference(engine, query)``.
    """
    past, messages, params = _prepare(engine_or_llm, query, history, system, sampling_params)
    if isinstance(engine_or_llm, AsyncEngine):
        return _ainference(engine_or_llm, query, past, messages, params)
    response = engine_or_llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    return response, [*past, (query, response)]


def inference_stream(
    engine_or_llm: LLM | AsyncEngine,
    query: str,
    history: HistoryIn = None,
    system: str | None = None,
    sampling_params: SamplingParams | None = None,
) -> Iterator[tuple[str, History]] | AsyncIterator[tuple[str, History]]:
    """Yield ``(response_so_far, history)`` as the answer grows; history ends with ``(query, response_so_far)``.

    A generator with an ``LLM``, an async generator with an ``AsyncEngine``.
    """
    past, messages, params = _prepare(engine_or_llm, query, history, system, sampling_params)
    if isinstance(engine_or_llm, AsyncEngine):
        return _astream(engine_or_llm, query, past, messages, params)
    return _stream(engine_or_llm, query, past, messages, params)


def _prepare(
    engine_or_llm: object, query: str, history: HistoryIn, system: str | None, sampling_params: SamplingParams | None
) -> tuple[History, list[dict], SamplingParams]:
    """Check the arguments; return the history as pairs, the chat messages and the parameters."""
    if not isinstance(engine_or_llm, (LLM, AsyncEngine)):
        raise TypeError(f"engine_or_llm must be a tristream LLM or AsyncEngine, got {type(engine_or_llm).__name__}")
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or None, got {type(system).__name__}")
    if history is not None and not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (query, response) pairs, got {history!r}")
    past: History = []
    for i, pair in enumerate(history or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise ValueError(f"history[{i}] must be a (query, response) pair of strings, got {pair!r}")
        past.append((pair[0], pair[1]))
    params = sampling_params if sampling_params is not None else DEFAULT_PARAMS
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
    if params.num_samples != 1:
        raise ValueError("a chat turn has one response: n and best_of must be 1")
    messages = [{"role": "system", "content": system}] if system is not None else []
    for q, r in past:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": query})
    return past, messages, params


async def _ainference(
    engine: AsyncEngine, query: str, past: History, messages: list[dict], params: SamplingParams
) -> tuple[str, History]:
    response = ""
    async with contextlib.aclosing(engine.chat(messages, params)) as deltas:
        async for out in deltas:
            response += out.outputs[0].text
    return response, [*past, (query, response)]


async def _astream(
    engine: AsyncEngine, query: str, past: History, messages: list[dict], params: SamplingParams
) -> AsyncIterator[tuple[str, History]]:
    response = ""
    async with contextlib.aclosing(engine.chat(messages, params)) as deltas:
        async for out in deltas:
            response += out.outputs[0].text
            yield response, [*past, (query, response)]


def _stream(
    llm: LLM, query: str, past: History, messages: list[dict], params: SamplingParams
) -> Iterator[tuple[str, History]]:
    response = ""
    with contextlib.closing(llm.stream_chat(messages, params)) as deltas:
        for _, out in deltas:
            response += out.outputs[0].text
            yield response, [*past, (query, response)]
