"""LLM: offline batch generation on top of AsyncEngine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from tristream.beam_search import BeamSearchOutput, BeamSearchParams, beam_search_outputs
from tristream.embeddings import EmbeddingRequestOutput, embed_all
from tristream.engine import AsyncEngine
from tristream.outputs import RequestOutput, accumulate
from tristream.pooling import PoolingParams
from tristream.protocol import SchedulerStats
from tristream.sampling_params import SamplingParams
from tristream.streams import merge

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Prompt = str | list[int] | dict


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def _shutdown(loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> None:
    if not loop.is_closed():
        loop.run_until_complete(engine.close())
        loop.close()


class LLM:
    """Generate for many prompts at once; returns whole outputs in input order.

    ``LLM()`` runs the bundled SmolLM2-135M-Instruct. Use it as a context manager,
    or call ``shutdown()``, to stop its processes.
    """

    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        self.engine = AsyncEngine(model, **engine_args)
        self._loop = _new_loop()
        self._tokenizer = None
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self.engine)
        try:
            self._loop.run_until_complete(self.engine.start())
        except BaseException:
            self._finalizer()
            raise

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the engine processes. Also runs when the LLM is collected or Python exits."""
        self._finalizer()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prompt_token_ids: list[int] | Sequence[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Complete a prompt or a batch of prompts.

        A prompt is a string, a list of token ids, or a dict of ``prompt`` or ``prompt_token_ids`` (vLLM's
        TextPrompt and TokensPrompt, FastDeploy's prompt dict; ``AsyncEngine.generate``), with a
        vision-language model's images under ``multimodal_data`` (or vLLM's ``multi_modal_data``) as
        ``{"image": [image, ...]}``, one for each of the model's image placeholders in the text. vLLM's older
        ``prompt_token_ids`` keyword takes token-id prompts in place of ``prompts``.
        """
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give prompts or prompt_token_ids, not both")
            prompts = [{"prompt_token_ids": ids} for ids in _batch(prompt_token_ids)]
        if prompts is None:
            raise ValueError("generate needs prompts or prompt_token_ids")
        return self._run(_generate_jobs(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
        use_tqdm: bool = True,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or a batch of them, through the chat template.

        A message's content is text, or a list of text parts and, for a vision-language model, image parts
        (``image_url`` with a ``data:``, ``http(s)://`` or file URL or path, or ``image`` with a PIL image,
        bytes or a path), placed by the chat template (``AsyncEngine.chat``). With ``tools`` (OpenAI's function
        tools) the reply's calls are on ``outputs[0].tool_calls``; ``tool_choice`` as ``AsyncEngine.chat``.
        ``chat_template`` (Jinja text, a file or a built-in name such as "hermes") replaces the engine's for
        these conversations.
        """
        kwargs = {**(chat_template_kwargs or {}), **({"chat_template": chat_template} if chat_template else {})}
        options = {"chat_template_kwargs": kwargs or None, "tools": tools, "tool_choice": tool_choice}
        return self._run(_chat_jobs(messages, options), sampling_params, use_tqdm)

    def stream_chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Like ``chat``, but yield ``(conversation index, delta)`` as the replies stream, all at once.

        Closing the iterator early aborts the requests still running. While it is
        open, run nothing else on this LLM and call ``get_stats`` only from this thread.
        """
        return self._stream(_chat_jobs(messages, {"chat_template_kwargs": chat_template_kwargs}), sampling_params)

    def stream_generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Like ``generate``, but yield ``(prompt index, delta)`` as the completions stream, as ``stream_chat``."""
        return self._stream(_generate_jobs(prompts), sampling_params)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        lora: str | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """The embedding of a prompt or of each of a batch (text, token ids or a prompt dict without images), in
        input order, as vLLM's ``LLM.embed`` returns them: ``out.outputs.embedding`` (``AsyncEngine.embed``)."""
        if self._loop.is_closed():
            raise RuntimeError("this LLM was shut down")
        batch = _batch(prompts)
        with tqdm(total=len(batch), desc="Embedding", unit="req", disable=not use_tqdm) as bar:
            work = embed_all(self.engine, batch, pooling_params, lora=lora, progress=bar)
            return self._loop.run_until_complete(work)

    def beam_search(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: BeamSearchParams,
        lora_request: object = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: each prompt's ``params.beam_width`` best hypotheses, best first, with their
        prompt (``tristream.beam_search``). The search runs inside the engine, for all prompts at once or for
        ``concurrency_limit`` at a time; ``lora_request`` is a loaded LoRA adapter's name, or an object with
        vLLM's ``lora_name``."""
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be an int >= 1, got {concurrency_limit!r}")
        sampling = params.sampling_params(getattr(lora_request, "lora_name", lora_request))
        jobs = _generate_jobs(prompts)
        limit = concurrency_limit or len(jobs)
        finals = [out for i in range(0, len(jobs), limit) for out in self._run(jobs[i : i + limit], sampling, use_tqdm)]
        return self._loop.run_until_complete(beam_search_outputs(self.engine, finals))

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's transformers tokenizer, with the engine's chat template, loaded here on the first call."""
        if self._tokenizer is None:
            if self.engine.config.skip_tokenizer_init:
                raise ValueError("this LLM runs without a tokenizer (skip_tokenizer_init)")
            from tristream.tokenizer_proc.prompts import load_tokenizer  # transformers loads only when asked for

            self._tokenizer = load_tokenizer(self.engine.child_config)
        return self._tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` and ``chat`` sample with when given no ``sampling_params``: the sampling defaults of
        the model's generation_config.json (``AsyncEngine.default_sampling_params``)."""
        return self.engine.default_sampling_params()

    def load_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter as ``name`` (``AsyncEngine.load_lora``)."""
        self._loop.run_until_complete(self.engine.load_lora(name, path))

    def unload_lora(self, name: str) -> None:
        """Forget the LoRA adapter ``name`` (``AsyncEngine.unload_lora``)."""
        self._loop.run_until_complete(self.engine.unload_lora(name))

    def get_stats(self, timeout: float = 10.0) -> SchedulerStats:
        """The scheduler's counters (``AsyncEngine.get_stats``).

        Call it between calls, or from another thread while ``generate`` or ``chat``
        runs (not before it starts: another thread must not start the LLM's loop). A
        call that reaches the loop just as that call returns is answered here, by
        running the loop, so start no other call on this LLM until it has returned.
        """
        if self._loop.is_closed():
            raise RuntimeError("this LLM was shut down")
        if not self._loop.is_running():
            return self._loop.run_until_complete(self.engine.get_stats(timeout))
        future = asyncio.run_coroutine_threadsafe(self.engine.get_stats(timeout), self._loop)
        while True:
            try:
                return future.result(0.05)
            except concurrent.futures.TimeoutError:
                if future.done():
                    raise
                if not self._loop.is_running():
                    return self._loop.run_until_complete(asyncio.wrap_future(future, loop=self._loop))

    def _params(self, jobs: list[tuple], sampling_params) -> list[SamplingParams | None]:
        if self._loop.is_closed():
            raise RuntimeError("this LLM was shut down")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(jobs)
        params = list(sampling_params)
        if len(params) != len(jobs):
            raise ValueError(f"got {len(params)} sampling_params for {len(jobs)} prompts")
        return params

    def _stream(self, jobs: list[tuple], sampling_params) -> Iterator[tuple[int, RequestOutput]]:
        """``(job index, delta)`` of every job as they come, all running at once (``_drive``)."""
        return self._drive(self._merged(jobs, self._params(jobs, sampling_params)))

    def _run(self, jobs: list[tuple], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = self._params(jobs, sampling_params)
        return self._loop.run_until_complete(self._run_async(jobs, params, use_tqdm))

    async def _run_async(self, jobs: list[tuple], params: list, use_tqdm: bool) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            async with contextlib.aclosing(self._merged(jobs, params)) as merged:
                async for i, out in merged:
                    finals[i] = accumulate(finals[i], out)
                    bar.update(out.finished)
        return finals

    def _drive(self, merged: AsyncIterator[tuple[int, RequestOutput]]) -> Iterator[tuple[int, RequestOutput]]:
        """Run the loop for one item of ``merged`` at a time; close it (aborting its requests) when done.

        Closing happens on exhaustion, on an error, when the consumer stops early,
        and when an interrupt (Ctrl-C) cuts a wait for the next item short.
        """

        async def next_item() -> tuple[int, RequestOutput] | None:
            return await anext(merged, None)

        async def close(step: asyncio.Task) -> None:
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
            await merged.aclose()

        step = self._loop.create_task(next_item())
        try:
            while (item := self._loop.run_until_complete(step)) is not None:
                yield item
                step = self._loop.create_task(next_item())
        finally:
            if not self._loop.is_closed():
                self._loop.run_until_complete(close(step))

    def _merged(self, jobs: list[tuple], params: list) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(job index, delta)`` from every job's stream as they come, all running at once (``merge``)."""
        return merge(
            [
                _numbered(i, getattr(self.engine, kind)(prompt, params[i], **kw))
                for i, (kind, prompt, kw) in enumerate(jobs)
            ]
        )


def _batch(prompts: Prompt | Sequence[Prompt]) -> Sequence[Prompt]:
    """A single prompt (text, token ids or a dict) as a batch of one; a batch as it is."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        return [prompts]
    return prompts


def _generate_jobs(prompts: Prompt | Sequence[Prompt]) -> list[tuple]:
    """One completion job per prompt; a single prompt is a batch of one."""
    return [("generate", p, {}) for p in _batch(prompts)]


def _chat_jobs(messages: list[dict] | Sequence[list[dict]], options: dict) -> list[tuple]:
    """One chat job per conversation, with ``AsyncEngine.chat``'s ``options``; a single conversation is a batch
    of one."""
    if messages and isinstance(messages[0], dict):
        messages = [messages]
    return [("chat", m, options) for m in messages]


async def _numbered(i: int, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """``stream``, with an engine refusal naming its prompt ``i``."""
    try:
        async for out in stream:
            yield out
    except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from e
    finally:
        await stream.aclose()
