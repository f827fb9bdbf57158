"""A smaller model of the same tokenizer that proposes draft tokens greedily, over its own KV pool.

Its pool has as many pages as the model's, and a slot's tokens live at the same page slots in both, so it reads
the model's block tables. A sequence's ``draft_computed`` tokens have KV in the draft pool; the draft catches up
on the rest (a whole prompt the first time, then the one or two tokens that the last step kept past its drafts)
in one extend, then proposes one token per decode step.
"""

from __future__ import annotations

import dataclasses

import torch

from tristream.config import EngineConfig
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache, allocate_kv_cache, bytes_per_token
from tristream.gpu_proc.parallel import TensorParallel
from tristream.gpu_proc.slot_state import Sequence
from tristream.gpu_proc.upload import upload_named
from tristream.gpu_proc.weights import build_model
from tristream.kernels.attention import choose_num_splits
from tristream.model_config import ModelConfig
from tristream.sharding import shard_model


class DraftModel:
    """The draft model ``config.speculative.model`` on ``device``, whole on every rank (rank 0's drafts are the
    ones checked; the engine refuses draft models under tensor parallelism)."""

    def __init__(self, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config, self.dtype, self.device = config, dtype, device
        self.model_config = ModelConfig.load(config.speculative.model)
        shard = shard_model(self.model_config, 1, 0)
        own = dataclasses.replace(config, model=config.speculative.model, quantization=None, speculative=None)
        self.model = build_model(own, self.model_config, shard, TensorParallel(shard, device, None), dtype, device)
        self.kv: KVCache | None = None
        self.block_tables: torch.Tensor | None = None

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """The KV bytes of one token in the draft pool."""
        return bytes_per_token(self.model_config, dtype)

    def allocate(self, num_pages: int, dtype: torch.dtype, block_tables: torch.Tensor) -> None:
        """Allocate the draft pool of ``num_pages`` pages; slots' pages are those of ``block_tables``."""
        self.kv = allocate_kv_cache(self.config, self.model_config, dtype, self.device, num_pages)
        self.block_tables = block_tables

    @torch.inference_mode()
    def propose(self, items: list[tuple[int, Sequence, int]]) -> list[list[int]]:
        """For each (slot, sequence, room), ``room`` draft tokens to follow the sequence's tokens."""
        slots = [slot for slot, _, _ in items]
        spans = [(seq, seq.draft_computed, seq.token_ids[seq.draft_computed :]) for _, seq, _ in items]
        batch = span_batch(slots, spans, self.block_tables, self.model_config, self.config)
        drafts = [self.model(batch, self.kv).argmax(dim=-1)]
        for seq in (seq for _, seq, _ in items):
            seq.draft_computed = len(seq.token_ids)
        rooms = [room for _, _, room in items]
        for i in range(1, max(rooms)):
            live = [j for j, room in enumerate(rooms) if room > i]
            spans = [(items[j][1], len(items[j][1].token_ids) + i - 1, [0]) for j in live]
            batch = span_batch([slots[j] for j in live], spans, self.block_tables, self.model_config, self.config)
            if len(live) == len(items):
                batch.input_ids = drafts[-1]
                drafts.append(self.model(batch, self.kv).argmax(dim=-1))
            else:  # the sequences out of room keep their place, with a token never read
                index = torch.tensor(live, device=self.device)
                batch.input_ids = drafts[-1][index]
                drafts.append(drafts[-1].index_copy(0, index, self.model(batch, self.kv).argmax(dim=-1)))
            for j in live:
                items[j][1].draft_computed += 1
        return by_row([d.tolist() for d in drafts], rooms)


def by_row(steps: list[list[int]], rooms: list[int]) -> list[list[int]]:
    """Each sequence's drafts from the tokens of each draft step, of which sequence j has its first ``rooms[j]``."""
    return [[step[j] for step in steps[:room]] for j, room in enumerate(rooms)]


def span_batch(
    slots: list[int],
    spans: list[tuple[Sequence, int, list[int]]],
    block_tables: torch.Tensor,
    mc: ModelConfig,
    config: EngineConfig,
) -> ForwardBatch:
    """The forward batch of each (sequence, first position, token ids) of ``slots``, over the pages of
    ``block_tables``, for a model of shape ``mc``; a sequence's last row gives logits."""
    ps = config.page_size
    ids, positions, mapping, indptr, lens = [], [], [], [0], []
    for seq, start, tokens in spans:
        end = start + len(tokens)
        ids += tokens
        positions += range(start + seq.position_offset, end + seq.position_offset)
        mapping += (seq.pages[p // ps] * ps + p % ps for p in range(start, end))
        indptr.append(end - start + indptr[-1])
        lens.append(end)
    device = block_tables.device
    t = upload_named(
        device,
        ids=ids,
        positions=positions,
        slot_mapping=mapping,
        qo_indptr=indptr,
        seq_lens=lens,
        logit_rows=[i - 1 for i in indptr[1:]],
        slots=slots,
    )
    max_q_len = max(b - a for a, b in zip(indptr, indptr[1:]))
    return ForwardBatch(
        input_ids=t["ids"],
        positions=t["positions"],
        slot_mapping=t["slot_mapping"],
        qo_indptr=t["qo_indptr"].int(),
        seq_lens=t["seq_lens"].int(),
        block_table=block_tables[t["slots"]],
        logit_rows=t["logit_rows"],
        max_q_len=max_q_len,
        decode=max_q_len == 1,
        num_splits=choose_num_splits(len(spans), mc.num_kv_heads, mc.attention_span(config.max_model_len)),
    )
