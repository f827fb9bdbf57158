"""The tokenizer_proc: prompts in, token ids to the scheduler; token ids back, text to the user."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq

from tristream.beam_search import check_beam_search
from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.processes import bind_inbox, connect_outbox, recv_all, send
from tristream.protocol import (
    AbortRequest,
    GenerateRequest,
    Ipc,
    OutputBatch,
    OutputDelta,
    Shutdown,
    StopRequest,
    TokenBatch,
    TokenDelta,
    TokenizeCall,
    TokenizedRequest,
    TokenizeResult,
    TokenizerReady,
    sample_request_id,
)
from tristream.sampling_params import SamplingParams
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer, push_step
from tristream.tokenizer_proc.images import PromptImages, remove_files
from tristream.tokenizer_proc.prompts import PromptBuilder, load_tokenizer
from tristream.tokenizer_proc.reasoning import ThinkParser, opens_reasoning
from tristream.tokenizer_proc.structured import grammar_spec
from tristream.tokenizer_proc.tool_calls import ToolCallParser
from tristream.tokenizer_proc.tools import ChatTools

_SEED_MASK = (1 << 63) - 1


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request: the request's own for sample 0."""
    return seed if index == 0 else (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & _SEED_MASK


def _distinct_runs(deltas: list[TokenDelta]) -> Iterator[list[TokenDelta]]:
    """The deltas in order, cut into runs in which no request appears twice.

    A batch may hold two deltas of one request (a step's tokens, then its abort);
    the second must see the request as the first left it.
    """
    run: list[TokenDelta] = []
    seen: set[str] = set()
    for d in deltas:
        if d.request_id in seen:
            yield run
            run, seen = [], set()
        run.append(d)
        seen.add(d.request_id)
    if run:
        yield run


def _input_error(e: Exception) -> str:
    """The message for a request whose input the tokenizer or template could not take.

    Any exception here comes from the request's own input (a lone surrogate, say),
    so it fails that request alone rather than the process.
    """
    return str(e) if isinstance(e, ValueError) else f"the input could not be tokenized ({type(e).__name__}: {e})"


@dataclass
class ActiveRequest:
    """What the tokenizer keeps of one running sample of a request.

    ``chat_text`` is the rendered chat of a one-sample request without images (their token ids hold the images'
    tokens, not their placeholders), whose turn the prompt builder remembers;
    ``prompt_text`` the rendered chat of any, for the user.
    """

    parent: str
    index: int
    detok: IncrementalDetokenizer | None
    prompt_token_ids: list[int]
    chat_text: str | None
    reasoning: ThinkParser | None = None
    tools: ToolCallParser | None = None
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    prompt_sent: bool = False
    held: str = ""
    emitted: str = ""
    prompt_text: str | None = None

    def take_text(self, pushed: str, finished: bool) -> tuple[str, bool]:
        """New text to emit and whether a stop string ended the request, given the detokenizer's text for this step.

        With stop strings, the last ``len(longest stop) - 1`` characters are held
        back, since they may begin a stop string that the next tokens complete.
        """
        if self.detok is None:
            return "", False
        self.held += pushed + (self.detok.flush() if finished else "")
        hits = [(i, s) for s in self.stop if (i := self.held.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            out, stopped = self.held[: i + len(s) if self.include_stop else i], True
        elif finished or not self.stop:
            out, stopped = self.held, False
        else:
            keep = max(map(len, self.stop)) - 1
            out, stopped = self.held[: max(0, len(self.held) - keep)], False
        self.held = self.held[len(out) :]
        self.emitted += out
        return out, stopped


class TokenizerWorker:
    """Per-request detokenizers plus the prompt builder."""

    def __init__(self, config: EngineConfig, media_dir: str) -> None:
        self.model_config = ModelConfig.load(config.model)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(config)
        images = PromptImages(config.model, self.model_config, media_dir, config.image_limit)
        self.prompts = PromptBuilder(self.tokenizer, self.model_config.vocab_size, config.max_model_len, images)
        self.seeds = random.Random(config.seed)
        self.max_num_seqs = config.max_num_seqs
        self.reasoning_parser = config.reasoning_parser
        self.tool_call_parser = config.tool_call_parser
        self.auto_tools = config.enable_auto_tool_choice
        self.active: dict[str, ActiveRequest] = {}
        self.samples: dict[str, list[str]] = {}

    def admit(self, req: GenerateRequest) -> list[TokenizedRequest] | OutputDelta:
        """One request for the scheduler per sample, or an error delta for the user.

        Sample 0 keeps the request id; the others are ``id#i`` and fork sample 0.
        With ``best_of > n`` every sample reports logprobs, which rank them. A beam search is one request
        for the scheduler, which answers with its ``n`` best hypotheses as samples 0..n-1.
        """
        try:
            req, ids, chat_text, images, grammar, tools = self._validated(req)
        except Exception as e:
            return OutputDelta(req.request_id, "", [], finished=True, error=_input_error(e))
        params = req.params
        seed = self.seeds.getrandbits(63) if params.seed is None else params.seed
        ranked = params.num_samples > params.n and params.logprobs is None
        bad_words_ids = self._bad_words_ids(params)
        in_reasoning = chat_text is not None and opens_reasoning(chat_text)
        out = []
        for i in range(params.num_samples):
            rid = sample_request_id(req.request_id, i)
            p = dataclasses.replace(
                params,
                seed=sample_seed(seed, i),
                logprobs=0 if ranked else params.logprobs,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None,
            )
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, p.skip_special_tokens, p.spaces_between_special_tokens
                )
            self.active[rid] = ActiveRequest(
                req.request_id,
                i,
                detok,
                ids,
                chat_text if params.num_samples == 1 and not images else None,
                ThinkParser(in_reasoning) if self.reasoning_parser is not None else None,
                tools.parser() if tools is not None else None,
                p.stop,
                p.include_stop_str_in_output,
                prompt_text=chat_text,
            )
            out.append(
                TokenizedRequest(
                    rid,
                    ids,
                    p,
                    self.model_config.eos_token_ids,
                    req.arrival_time,
                    bad_words_ids,
                    fork_of=req.request_id if i else None,
                    grammar=grammar,
                    lora=req.lora,
                    images=images,
                    pooling=req.pooling,
                )
            )
        self.samples[req.request_id] = [t.request_id for t in out]
        return out[:1] if params.use_beam_search else out

    def _validated(self, req: GenerateRequest) -> tuple:
        """``req`` with its sampling words as token ids, its prompt token ids, its rendered chat (or None), its
        images, its grammar (or None) and its tools (or None); an exception if any of it is bad, the images'
        files then removed."""
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
        return req, ids, chat_text, images, grammar, tools

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
            return TokenizeResult(call.token, error=_input_error(e))
        pieces = [self.tokenizer.decode([t]) for t in ids] if call.pieces else None
        return TokenizeResult(call.token, ids, text, pieces)

    def abort(self, request_id: str) -> list[AbortRequest]:
        """Aborts for the scheduler: one per sample of the request."""
        return [AbortRequest(rid) for rid in self.samples.get(request_id, [request_id])]

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space."""
        if not params.bad_words or self.tokenizer is None:
            return []
        variants = {tuple(ids) for word in params.bad_words for ids in self.prompts.word_variants(word)}
        return [list(v) for v in sorted(variants) if v]

    def outputs(self, batch: TokenBatch) -> tuple[list[OutputDelta], list[str]]:
        """Deltas for the user, and the requests a stop string ended (for the scheduler)."""
        out: list[OutputDelta] = []
        stopped: list[str] = []
        for run in _distinct_runs(batch.deltas):
            live = [(d, req) for d in run if (req := self.active.get(d.request_id)) is not None]
            pushes = [(req.detok, d.token_ids) for d, req in live if req.detok is not None]
            pushed = iter(push_step([detok for detok, _ in pushes], [ids for _, ids in pushes]))
            for d, req in live:
                finished = d.finish_reason is not None or d.error is not None
                req.output_token_ids += d.token_ids
                prompt_ids = prompt_text = None
                if not req.prompt_sent:
                    req.prompt_sent, prompt_ids, prompt_text = True, req.prompt_token_ids, req.prompt_text
                text, hit_stop = req.take_text(next(pushed) if req.detok is not None else "", finished)
                reason = "stop" if hit_stop else d.finish_reason
                if hit_stop and not finished:
                    stopped.append(d.request_id)
                reasoning = ""
                if req.reasoning is not None:
                    reasoning, text = req.reasoning.push(text, finished or hit_stop)
                calls = None
                if req.tools is not None:
                    text, calls = req.tools.push(text, finished or hit_stop)
                    reason = "tool_calls" if reason == "stop" and req.tools.calls else reason
                if finished or hit_stop:
                    del self.active[d.request_id]
                    self._forget_sample(req.parent, d.request_id)
                    self._remember_turn(req, reason)
                out.append(
                    OutputDelta(
                        req.parent,
                        text,
                        d.token_ids,
                        finished or hit_stop,
                        reason,
                        prompt_ids,
                        d.num_cached_tokens,
                        d.time_in_queue,
                        d.error,
                        d.logprobs,
                        d.prompt_logprobs,
                        req.index,
                        reasoning,
                        prompt_text,
                        calls,
                        embedding=d.embedding,
                    )
                )
        return out, stopped

    def _forget_sample(self, parent: str, request_id: str) -> None:
        samples = self.samples.get(parent)
        if samples is not None:
            samples.remove(request_id)
            if not samples:
                del self.samples[parent]

    def _remember_turn(self, req: ActiveRequest, finish_reason: str | None) -> None:
        if req.chat_text is None or finish_reason not in ("stop", "length"):
            return
        reply_ids = req.output_token_ids[:-1] if finish_reason == "stop" else req.output_token_ids
        self.prompts.turns.remember(req.chat_text, req.prompt_token_ids, req.emitted, reply_ids)


def run(ipc: Ipc, config: EngineConfig) -> None:
    """Process entry point."""
    ctx = zmq.Context()
    inbox = bind_inbox(ctx, ipc.tokenizer)
    to_scheduler = connect_outbox(ctx, ipc.scheduler)
    to_user = connect_outbox(ctx, ipc.user)
    worker = TokenizerWorker(config, ipc.media)
    send(to_user, TokenizerReady(worker.prompts.has_chat_template))
    while True:
        out: list[OutputDelta] = []
        for msg in recv_all(inbox, block=True):
            if isinstance(msg, GenerateRequest):
                result = worker.admit(msg)
                if isinstance(result, OutputDelta):
                    out.append(result)
                else:
                    for sample in result:
                        send(to_scheduler, sample)
            elif isinstance(msg, TokenBatch):
                deltas, stopped = worker.outputs(msg)
                out.extend(deltas)
                for request_id in stopped:
                    send(to_scheduler, StopRequest(request_id))
            elif isinstance(msg, AbortRequest):
                for abort in worker.abort(msg.request_id):
                    send(to_scheduler, abort)
            elif isinstance(msg, TokenizeCall):
                send(to_user, worker.tokenize(msg))
            elif isinstance(msg, Shutdown):
                return
        if out:
            send(to_user, OutputBatch(out))
