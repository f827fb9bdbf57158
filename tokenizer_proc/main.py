"""The tokenizer_proc: prompts in, token ids to the scheduler; token ids back, text to the user.

An engine runs one or more of these workers; each owns the requests that ``tokenizer_worker`` gives it, and
any of them answers tokenizer calls.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import zmq

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
from tristream.tokenizer_proc.admission import Admission, AdmissionThread, Admitted, Turn
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer, push_step
from tristream.tokenizer_proc.images import remove_files
from tristream.tokenizer_proc.prompts import load_tokenizer
from tristream.tokenizer_proc.reasoning import ThinkParser, opens_reasoning
from tristream.tokenizer_proc.tool_calls import ToolCallParser

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
    emitted: list[str] = field(default_factory=list)
    prompt_text: str | None = None

    def take_text(self, pushed: str, finished: bool) -> tuple[str, bool]:
        """New text to emit and whether a stop string ended the request, given the detokenizer's text for this step.

        With stop strings, the last ``len(longest stop) - 1`` characters are held
        back, since they may begin a stop string that the next tokens complete.
        """
        if self.detok is None:
            return "", False
        if finished:
            pushed += self.detok.flush()
        if not self.stop:
            out, stopped = pushed, False
        else:
            out, stopped = self._until_stop(pushed, finished)
        if self.chat_text is not None:
            self.emitted.append(out)
        return out, stopped

    def _until_stop(self, pushed: str, finished: bool) -> tuple[str, bool]:
        self.held += pushed
        hits = [(i, s) for s in self.stop if (i := self.held.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            out, stopped = self.held[: i + len(s) if self.include_stop else i], True
        elif finished:
            out, stopped = self.held, False
        else:
            keep = max(map(len, self.stop)) - 1
            out, stopped = self.held[: max(0, len(self.held) - keep)], False
        self.held = self.held[len(out) :]
        return out, stopped


class TokenizerWorker:
    """Per-request detokenizers, stop strings and output parsers, plus the prompt side (``Admission``).

    ``admit`` admits a request at once; the worker process instead hands it to an ``AdmissionThread`` with
    ``begin`` and takes the answer with ``register``, while the requests in between go on streaming.
    """

    def __init__(self, config: EngineConfig, media_dir: str, worker: int = 0) -> None:
        self.model_config = ModelConfig.load(config.model)
        self.admission = Admission(config, self.model_config, media_dir)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        self.worker = worker
        self.seeds = random.Random(config.seed)
        self.reasoning_parser = config.reasoning_parser
        self.active: dict[str, ActiveRequest] = {}
        self.samples: dict[str, list[str]] = {}
        self.admitting: dict[str, bool] = {}
        self.on_turn: Callable[[Turn], object] = self.admission.handle

    def admit(self, req: GenerateRequest) -> list[TokenizedRequest | OutputDelta]:
        """``register`` of the request admitted here and now."""
        self.begin(req)
        return self.register(self.admission.admit(req))

    def begin(self, req: GenerateRequest) -> None:
        """Note a request on its way through admission, so that an abort meanwhile waits for it."""
        self.admitting[req.request_id] = False

    def register(self, admitted: Admitted | OutputDelta) -> list[TokenizedRequest | OutputDelta]:
        """One request for the scheduler per sample of an admitted request; or for the user, its error delta,
        or a finished delta per sample if it was aborted during admission.

        Sample 0 keeps the request id; the others are ``id#i`` and fork sample 0.
        With ``best_of > n`` every sample reports logprobs, which rank them. A beam search is one request
        for the scheduler, which answers with its ``n`` best hypotheses as samples 0..n-1.
        """
        aborted = self.admitting.pop(admitted.request_id, False)
        if isinstance(admitted, OutputDelta):
            return [admitted]
        req, params = admitted.req, admitted.req.params
        if aborted:
            remove_files(admitted.images)
            return [OutputDelta(req.request_id, "", [], True, "abort", index=i) for i in range(params.num_samples)]
        seed = self.seeds.getrandbits(63) if params.seed is None else params.seed
        ranked = params.num_samples > params.n and params.logprobs is None
        in_reasoning = admitted.chat_text is not None and opens_reasoning(admitted.chat_text)
        out = []
        for i in range(params.num_samples):
            rid = sample_request_id(req.request_id, i)
            p = dataclasses.replace(
                params,
                seed=sample_seed(seed, i),
                logprobs=0 if ranked else params.logprobs,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None,
            )
            self.active[rid] = self._active(admitted, i, p, in_reasoning)
            out.append(
                TokenizedRequest(
                    rid,
                    admitted.ids,
                    p,
                    self.model_config.eos_token_ids,
                    req.arrival_time,
                    admitted.bad_words_ids,
                    fork_of=req.request_id if i else None,
                    grammar=admitted.grammar,
                    lora=req.lora,
                    images=admitted.images,
                    pooling=req.pooling,
                    worker=self.worker,
                )
            )
        self.samples[req.request_id] = [t.request_id for t in out]
        return out[:1] if params.use_beam_search else out

    def _active(self, admitted: Admitted, index: int, params: SamplingParams, in_reasoning: bool) -> ActiveRequest:
        """What the worker keeps of sample ``index`` of an admitted request, which samples with ``params``."""
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, admitted.ids, params.skip_special_tokens, params.spaces_between_special_tokens
            )
        one_turn = admitted.req.params.num_samples == 1 and not admitted.images
        return ActiveRequest(
            admitted.request_id,
            index,
            detok,
            admitted.ids,
            admitted.chat_text if one_turn else None,
            ThinkParser(in_reasoning) if self.reasoning_parser is not None else None,
            admitted.tools.parser() if admitted.tools is not None else None,
            params.stop,
            params.include_stop_str_in_output,
            prompt_text=admitted.chat_text,
        )

    def abort(self, request_id: str) -> list[AbortRequest]:
        """Aborts for the scheduler: one per sample of the request; none while it is being admitted, which
        ends it once admitted."""
        if request_id in self.admitting:
            self.admitting[request_id] = True
            return []
        return [AbortRequest(rid, self.worker) for rid in self.samples.get(request_id, [request_id])]

    def outputs(self, batch: TokenBatch) -> tuple[list[OutputDelta], list[str]]:
        """Deltas for the user, and the requests a stop string ended (for the scheduler)."""
        out: list[OutputDelta] = []
        stopped: list[str] = []
        deltas = [piece for d in batch.deltas for piece in self._pieces(d)]
        for run in _distinct_runs(deltas):
            live = [(d, req) for d in run if (req := self.active.get(d.request_id)) is not None]
            if self.tokenizer is None:
                pushed = [""] * len(live)
            else:
                pushed = push_step([req.detok for _, req in live], [d.token_ids for d, _ in live])
            for (d, req), text in zip(live, pushed):
                out.append(self._output(d, req, text, stopped))
        return out, stopped

    def _pieces(self, d: TokenDelta) -> list[TokenDelta]:
        """``d`` as one delta per token where it has several (accepted draft tokens) of a request with stop strings,
        so that a stop string drops the tokens after the one that completes it; else ``d`` alone."""
        n = len(d.token_ids)
        req = self.active.get(d.request_id) if n > 1 else None
        if req is None or not req.stop:
            return [d]
        return [
            dataclasses.replace(
                d,
                token_ids=[token],
                finish_reason=d.finish_reason if i == n - 1 else None,
                error=d.error if i == n - 1 else None,
                logprobs=d.logprobs[i : i + 1] if d.logprobs is not None else None,
                num_cached_tokens=d.num_cached_tokens if i == 0 else 0,
                time_in_queue=d.time_in_queue if i == 0 else None,
                prompt_logprobs=d.prompt_logprobs if i == 0 else None,
            )
            for i, token in enumerate(d.token_ids)
        ]

    def _output(self, d: TokenDelta, req: ActiveRequest, pushed: str, stopped: list[str]) -> OutputDelta:
        """The delta for the user of ``d``, whose new text is ``pushed``; a request a stop string ended is added
        to ``stopped``."""
        finished = d.finish_reason is not None or d.error is not None
        req.output_token_ids += d.token_ids
        prompt_ids = prompt_text = None
        if not req.prompt_sent:
            req.prompt_sent, prompt_ids, prompt_text = True, req.prompt_token_ids, req.prompt_text
        text, hit_stop = req.take_text(pushed, finished)
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
        return OutputDelta(
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
            d.embedding,
        )

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
        self.on_turn(Turn(req.chat_text, req.prompt_token_ids, "".join(req.emitted), reply_ids))


def run(ipc: Ipc, config: EngineConfig, worker: int = 0) -> None:
    """Process entry point of tokenizer worker ``worker``: new prompts go to its admission thread; token
    batches, aborts and the admission thread's answers are handled here, in the order they come."""
    ctx = zmq.Context()
    inbox = bind_inbox(ctx, ipc.tokenizers[worker])
    to_scheduler = connect_outbox(ctx, ipc.scheduler)
    to_user = connect_outbox(ctx, ipc.user)
    state = TokenizerWorker(config, ipc.media, worker)
    admission = AdmissionThread(state.admission, ctx)
    state.on_turn = admission.put
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(admission.wake, zmq.POLLIN)
    send(to_user, TokenizerReady(state.admission.prompts.has_chat_template, worker))
    busy_s = 0.0
    while True:
        poller.poll()
        start = time.perf_counter()
        out: list[OutputDelta] = []
        for result in admission.results():
            if isinstance(result, TokenizeResult):
                send(to_user, result)
            else:
                _route(state.register(result), to_scheduler, out)
        for msg in recv_all(inbox, block=False):
            if isinstance(msg, (GenerateRequest, TokenizeCall)):
                if isinstance(msg, GenerateRequest):
                    state.begin(msg)
                admission.put(msg)
            elif isinstance(msg, TokenBatch):
                deltas, stopped = state.outputs(msg)
                out.extend(deltas)
                _route([StopRequest(request_id) for request_id in stopped], to_scheduler, out)
            elif isinstance(msg, AbortRequest):
                _route(state.abort(msg.request_id), to_scheduler, out)
            elif isinstance(msg, Shutdown):
                return
        busy_s += time.perf_counter() - start
        if out:
            send(to_user, OutputBatch(out, worker, busy_s + admission.busy_s))


def _route(messages: list, to_scheduler: zmq.Socket, out: list[OutputDelta]) -> None:
    """Send each message to the scheduler, but add each delta for the user to ``out``."""
    for msg in messages:
        if isinstance(msg, OutputDelta):
            out.append(msg)
        else:
            send(to_scheduler, msg)
