"""The prompt side of a tokenizer worker: validating and tokenizing new requests, and the tokenizer calls.

It runs in a thread of its own beside the worker's detokenizing loop, with a tokenizer of its own, so that a
long prompt never holds up the streams of running requests: the fast tokenizer's encode releases the GIL.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass
from queue import SimpleQueue

import zmq

from tristream.beam_search import check_beam_search
from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.protocol import GenerateRequest, ImageInput, OutputDelta, TokenizeCall, TokenizeResult
from tristream.sampling_params import SamplingParams
from tristream.tokenizer_proc.images import PromptImages, remove_files
from tristream.tokenizer_proc.prompts import PromptBuilder, load_tokenizer
from tristream.tokenizer_proc.structured import grammar_spec
from tristream.tokenizer_proc.tools import ChatTools


def input_error(e: Exception) -> str:
    """The message for a request whose input the tokenizer or template could not take.

    Any exception here comes from the request's own input (a lone surrogate, say),
    so it fails that request alone rather than the process.
    """
    return str(e) if isinstance(e, ValueError) else f"the input could not be tokenized ({type(e).__name__}: {e})"


@dataclass
class Admitted:
    """A validated request: ``req`` with its sampling words as token ids, its prompt token ids, its rendered chat
    (or None), its images, its grammar (or None), its tools (or None) and its bad words as token ids."""

    req: GenerateRequest
    ids: list[int]
    chat_text: str | None
    images: list[ImageInput]
    grammar: tuple[str, str] | None
    tools: ChatTools | None
    bad_words_ids: list[list[int]]

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass
class Turn:
    """A finished chat turn for the turn cache: its prompt's text and ids, its reply's text and ids."""

    prompt_text: str
    prompt_ids: list[int]
    reply_text: str
    reply_ids: list[int]


class Admission:
    """Turns new requests into validated prompt token ids; answers tokenize calls; remembers chat turns."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, media_dir: str) -> None:
        self.model_config = model_config
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        images = PromptImages(config.model, model_config, media_dir, config.image_limit)
        self.prompts = PromptBuilder(self.tokenizer, model_config.vocab_size, config.max_model_len, images)
        self.max_num_seqs = config.max_num_seqs
        self.tool_call_parser = config.tool_call_parser
        self.auto_tools = config.enable_auto_tool_choice

    def handle(self, job: GenerateRequest | TokenizeCall | Turn) -> Admitted | OutputDelta | TokenizeResult | None:
        """The answer to one job: a request admitted or refused, a tokenize call's result, or None for a turn."""
        if isinstance(job, GenerateRequest):
            return self.admit(job)
        if isinstance(job, TokenizeCall):
            return self.tokenize(job)
        self.prompts.turns.remember(job.prompt_text, job.prompt_ids, job.reply_text, job.reply_ids)
        return None

    def admit(self, req: GenerateRequest) -> Admitted | OutputDelta:
        """The request validated and tokenized, or an error delta for the user."""
        try:
            return self._validated(req)
        except Exception as e:
            return OutputDelta(req.request_id, "", [], finished=True, error=input_error(e))

    def _validated(self, req: GenerateRequest) -> Admitted:
        """``req`` admitted; an exception if any of it is bad, the images' files then removed."""
        images = []
        try:
            req = dataclasses.replace(req, params=self.prompts.with_word_tokens(req.params))
            check_beam_search(req.params, self.max_num_seqs, self.model_config)
            tools = None
            if req.tools is not None:
                template = self.prompts.template(req.chat_template_kwargs)
                tools = ChatTools.of(req.tools, template, self.tool_call_parser, self.auto_tools)
            if tools is not None and tools.structured is not None:
                if req.params.structured is not None:
                    raise ValueError(f"tool_choice {tools.spec.choice!r} and an output constraint cannot go together")
                req = dataclasses.replace(req, params=dataclasses.replace(req.params, structured=tools.structured))
            ids, chat_text, images = self.prompts.build(req, tools)
            grammar = None
            if req.params.structured is not None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs a tokenizer (this engine runs with skip_tokenizer_init)")
                grammar = grammar_spec(req.params.structured)
        except BaseException:
            remove_files(images)
            raise
        return Admitted(req, ids, chat_text, images, grammar, tools, self._bad_words_ids(req.params))

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space."""
        if not params.bad_words or self.tokenizer is None:
            return []
        variants = {tuple(ids) for word in params.bad_words for ids in self.prompts.word_variants(word)}
        return [list(v) for v in sorted(variants) if v]

    def tokenize(self, call: TokenizeCall) -> TokenizeResult:
        """Token ids of a prompt or chat, or the text of token ids, for the user's tokenizer calls."""
        if self.tokenizer is None:
            return TokenizeResult(call.token, error="this engine runs without a tokenizer (skip_tokenizer_init)")
        try:
            if call.token_ids is not None:
                bad = [t for t in call.token_ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
                if bad:
                    raise ValueError(f"token ids outside the vocabulary [0, {self.model_config.vocab_size}): {bad[:5]}")
                ids = list(call.token_ids)
                text = self.tokenizer.decode(ids)
            elif call.messages is not None:
                text = self.prompts.render_chat(call.messages, call.chat_template_kwargs)
                ids = self.prompts.turns.encode(text)
            else:
                text = call.prompt or ""
                ids = self.tokenizer.encode(text, add_special_tokens=call.add_special_tokens)
        except Exception as e:
            return TokenizeResult(call.token, error=input_error(e))
        pieces = [self.tokenizer.decode([t]) for t in ids] if call.pieces else None
        return TokenizeResult(call.token, ids, text, pieces)


class AdmissionThread:
    """Runs an Admission's jobs in order in a thread; their answers wait in ``results()``.

    Each answer also sends a byte to ``wake``, a socket the worker's loop polls beside its inbox. A job that
    raises ends the thread and makes ``results()`` raise its exception in the loop.
    """

    def __init__(self, admission: Admission, ctx: zmq.Context) -> None:
        self.admission = admission
        self.busy_s = 0.0
        self._jobs: SimpleQueue = SimpleQueue()
        self._done: deque = deque()
        address = f"inproc://admission-{id(self)}"
        self.wake = ctx.socket(zmq.PULL)
        self.wake.bind(address)
        threading.Thread(target=self._run, args=(ctx, address), daemon=True, name="admission").start()

    def put(self, job: GenerateRequest | TokenizeCall | Turn) -> None:
        """Queue a job."""
        self._jobs.put(job)

    def results(self) -> list[Admitted | OutputDelta | TokenizeResult]:
        """The answers ready now, in the order of their jobs."""
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        done = []
        while self._done:
            result = self._done.popleft()
            if isinstance(result, BaseException):
                raise result
            done.append(result)
        return done

    def _run(self, ctx: zmq.Context, address: str) -> None:
        ping = ctx.socket(zmq.PUSH)
        ping.connect(address)
        while True:
            job = self._jobs.get()
            start = time.perf_counter()
            try:
                result = self.admission.handle(job)
            except BaseException as e:
                result = e
            self.busy_s += time.perf_counter() - start
            if result is not None:
                self._done.append(result)
                ping.send(b"")
            if isinstance(result, BaseException):
                return
