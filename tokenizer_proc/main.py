"""The tokenizer_proc: prompts in, token ids to the scheduler; token ids back, text to the user."""

from __future__ import annotations

import dataclasses
import random

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


class TokenizerWorker:
    """Per-request detokenizers plus the prompt builder."""

    def __init__(self, config: EngineConfig) -> None:
        self.model_config = ModelConfig.load(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.prompts = PromptBuilder(self.tokenizer, self.model_config.vocab_size, config.max_model_len)
        self.seeds = random.Random(config.seed)
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self.unsent_prompts: dict[str, list[int]] = {}

    def admit(self, req: GenerateRequest) -> TokenizedRequest | OutputDelta:
        """A request for the scheduler, or an error delta for the user."""
        try:
            ids = self.prompts.build(req)
        except ValueError as e:
            return OutputDelta(req.request_id, "", [], finished=True, error=str(e))
        params = req.params
        if params.seed is None:
            params = dataclasses.replace(params, seed=self.seeds.getrandbits(63))
        self.detok[req.request_id] = IncrementalDetokenizer(
            self.tokenizer, ids, params.skip_special_tokens, params.spaces_between_special_tokens
        )
        self.unsent_prompts[req.request_id] = ids
        return TokenizedRequest(req.request_id, ids, params, self.model_config.eos_token_ids, req.arrival_time)

    def outputs(self, batch: TokenBatch) -> list[OutputDelta]:
        out = []
        for d in batch.deltas:
            detok = self.detok.get(d.request_id)
            finished = d.finish_reason is not None or d.error is not None
            text = ""
            if detok is not None:
                text = detok.push(d.token_ids)
                if finished:
                    text += detok.flush()
                    del self.detok[d.request_id]
            prompt_ids = self.unsent_prompts.pop(d.request_id, None)
            out.append(
                OutputDelta(
                    d.request_id, text, d.token_ids, finished, d.finish_reason, prompt_ids,
                    d.num_cached_tokens, d.time_in_queue, d.error,
                )
            )
        return out


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
