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
    TokenBatch,
    TokenizedRequest,
)
from tristream.tokenizer_proc.detokenizer import IncrementalDetokenizer
from tristream.tokenizer_proc.prompts import PromptBuilder


@dataclass
class ActiveRequest:
    """What the tokenizer keeps of a running request."""

    detok: IncrementalDetokenizer | None
    prompt_token_ids: list[int]
    chat_text: str | None
    output_token_ids: list[int] = field(default_factory=list)
    prompt_sent: bool = False


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
        self.active[req.request_id] = ActiveRequest(detok, ids, chat_text)
        return TokenizedRequest(req.request_id, ids, params, self.model_config.eos_token_ids, req.arrival_time)

    def outputs(self, batch: TokenBatch) -> list[OutputDelta]:
        out = []
        for d in batch.deltas:
            req = self.active.get(d.request_id)
            finished = d.finish_reason is not None or d.error is not None
            text, prompt_ids = "", None
            if req is not None:
                req.output_token_ids += d.token_ids
                if not req.prompt_sent:
                    req.prompt_sent, prompt_ids = True, req.prompt_token_ids
                if req.detok is not None:
                    text = req.detok.push(d.token_ids) + (req.detok.flush() if finished else "")
                if finished:
                    del self.active[d.request_id]
                    self._remember_turn(req, d.finish_reason)
            out.append(
                OutputDelta(
                    d.request_id, text, d.token_ids, finished, d.finish_reason, prompt_ids,
                    d.num_cached_tokens, d.time_in_queue, d.error,
                )
            )
        return out

    def _remember_turn(self, req: ActiveRequest, finish_reason: str | None) -> None:
        if req.chat_text is None or finish_reason not in ("stop", "length"):
            return
        reply_ids = req.output_token_ids[:-1] if finish_reason == "stop" else req.output_token_ids
        self.prompts.turns.remember(req.chat_text, req.prompt_token_ids, req.detok.text, reply_ids)


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
                out.extend(worker.outputs(msg))
            elif isinstance(msg, AbortRequest):
                send(to_scheduler, msg)
            elif isinstance(msg, Shutdown):
                return
        if out:
            send(to_user, OutputBatch(out))
