"""The tokenizer_proc: prompts in, token ids to the scheduler; token ids back, text to the user."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import zmq
from transformers import AutoTokenizer

from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.processes import bind_inbox, connect_outbox, recv_all, send
from tristream.protocol import (
    AbortRequest,
    GenerateRequest,
    Ipc,
    OutputBatch,
    OutputDelta,
    Ready,
    Shutdown,
    StopRequest,
    TokenBatch,
    TokenizedRequest,
)
from tristream.sampling_params import SamplingParams
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer
from tristream.tokenizer_proc.prompts import PromptBuilder


@dataclass
class ActiveRequest:
    """What the tokenizer keeps of a running request."""

    detok: IncrementalDetokenizer | None
    prompt_token_ids: list[int]
    chat_text: str | None
    stop: list[str] = field(default_factory=list)
    include_stop: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    prompt_sent: bool = False
    held: str = ""
    emitted: str = ""

    def text(self, token_ids: list[int], finished: bool) -> tuple[str, bool]:
        """New text to emit and whether a stop string ended the request.

        With stop strings, the last ``len(longest stop) - 1`` characters are held
        back, since they may begin a stop string that the next tokens complete.
        """
        if self.detok is None:
            return "", False
        self.held += self.detok.push(token_ids) + (self.detok.flush() if finished else "")
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

    def __init__(self, config: EngineConfig) -> None:
        self.model_config = ModelConfig.load(config.model)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.prompts = PromptBuilder(self.tokenizer, self.model_config.vocab_size, config.max_model_len)
        self.seeds = random.Random(config.seed)
        self.active: dict[str, ActiveRequest] = {}

    def admit(self, req: GenerateRequest) -> TokenizedRequest | OutputDelta:
        """A request for the scheduler, or an error delta for the user."""
        try:
            ids, chat_text = self.prompts.build(req)
        except ValueError as e:
            return OutputDelta(req.request_id, "", [], finished=True, error=str(e))
        params = req.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=self.seeds.getrandbits(63))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.active[req.request_id] = ActiveRequest(detok, ids, chat_text, params.stop, params.include_stop_str_in_output)
        return TokenizedRequest(
            req.request_id, ids, params, self.model_config.eos_token_ids, req.arrival_time, self._bad_words_ids(params)
        )

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space."""
        if not params.bad_words or self.tokenizer is None:
            return []
        variants = {tuple(self.tokenizer.encode(v, add_special_tokens=False))
                    for word in params.bad_words for v in (word.strip(), " " + word.strip())}
        return [list(v) for v in sorted(variants) if v]

    def outputs(self, batch: TokenBatch) -> tuple[list[OutputDelta], list[str]]:
        """Deltas for the user, and the requests a stop string ended (for the scheduler)."""
        out, stopped = [], []
        for d in batch.deltas:
            req = self.active.get(d.request_id)
            if req is None:
                continue
            finished = d.finish_reason is not None or d.error is not None
            req.output_token_ids += d.token_ids
            prompt_ids = None
            if not req.prompt_sent:
                req.prompt_sent, prompt_ids = True, req.prompt_token_ids
            text, hit_stop = req.text(d.token_ids, finished)
            reason = "stop" if hit_stop else d.finish_reason
            if hit_stop and not finished:
                stopped.append(d.request_id)
            if finished or hit_stop:
                del self.active[d.request_id]
                self._remember_turn(req, reason)
            out.append(
                OutputDelta(
                    d.request_id, text, d.token_ids, finished or hit_stop, reason, prompt_ids,
                    d.num_cached_tokens, d.time_in_queue, d.error, d.logprobs,
                )
            )
        return out, stopped

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
    worker = TokenizerWorker(config)
    send(to_user, Ready("tokenizer", {"has_chat_template": worker.prompts.has_chat_template}))
    while True:
        out: list[OutputDelta] = []
        for msg in recv_all(inbox, block=True):
            if isinstance(msg, GenerateRequest):
                result = worker.admit(msg)
                if isinstance(result, OutputDelta):
                    out.append(result)
                else:
                    send(to_scheduler, result)
            elif isinstance(msg, TokenBatch):
                deltas, stopped = worker.outputs(msg)
                out.extend(deltas)
                for request_id in stopped:
                    send(to_scheduler, StopRequest(request_id))
            elif isinstance(msg, AbortRequest):
                send(to_scheduler, msg)
            elif isinstance(msg, Shutdown):
                return
        if out:
            send(to_user, OutputBatch(out))
