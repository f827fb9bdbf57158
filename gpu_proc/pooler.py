"""Pooling the final-norm hidden states of embedding requests, over the prefill chunks of their prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tristream.protocol import BatchPlan, Pooling


@dataclass
class PooledSlot:
    """One embedding request's slot: how it pools, its prompt's length, how many of its tokens are computed, and
    for mean pooling the sum of their hidden states so far (fp32)."""

    pooling: Pooling
    prompt_len: int
    num_computed: int = 0
    total: torch.Tensor | None = None


class Pooler:
    """The slots of embedding requests. Each step adds the hidden states of their rows; once a slot's prompt is
    all computed, its embedding is the last row's state or the mean of every row's, L2-normalized if it asks."""

    def __init__(self) -> None:
        self.slots: dict[int, PooledSlot] = {}

    def apply(self, plan: BatchPlan) -> None:
        """Forget the freed slots and take the plan's new embedding requests."""
        for slot in plan.freed:
            self.slots.pop(slot, None)
        for new in plan.new:
            self.slots.pop(new.slot, None)
            if new.pooling is not None:
                assert new.num_cached == 0, "an embedding request computes its whole prompt"
                self.slots[new.slot] = PooledSlot(new.pooling, len(new.token_ids))

    def spans(self, plan: BatchPlan) -> list[tuple[int, int, int]]:
        """(slot, first row, number of rows) of each embedding slot that ``plan`` runs, its rows in plan order."""
        spans, row = [], 0
        for slot, n in zip(plan.slots, plan.num_tokens):
            if slot in self.slots:
                spans.append((slot, row, n))
            row += n
        return spans

    def pool(self, hidden: torch.Tensor, spans: list[tuple[int, int, int]]) -> tuple[list[int], torch.Tensor | None]:
        """Take each span's rows of ``hidden`` [tokens, hidden size]; the slots whose prompt they complete, and
        those slots' embeddings [slots, hidden size] in fp32 (None if there are none)."""
        slots, vectors = [], []
        for slot, first, n in spans:
            state = self.slots[slot]
            rows = hidden[first : first + n].float()
            state.num_computed += n
            if state.pooling.method == "mean":
                part = rows.sum(dim=0)
                state.total = part if state.total is None else state.total + part
            if state.num_computed < state.prompt_len:
                continue
            vector = state.total / state.prompt_len if state.pooling.method == "mean" else rows[-1]
            slots.append(slot)
            vectors.append(F.normalize(vector, dim=0) if state.pooling.normalize else vector)
        return slots, torch.stack(vectors) if vectors else None
