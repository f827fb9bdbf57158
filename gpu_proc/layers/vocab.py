"""The token embedding and the LM head, split over the ranks by vocabulary rows."""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.parallel import TensorParallel
from tristream.sharding import Shard


class VocabEmbedding(nn.Embedding):
    """The embedding, or this rank's ``shard.vocab_rows`` rows of it: each rank looks up the ids in its rows,
    and the all-reduce adds them up."""

    def __init__(self, shard: Shard, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__(shard.vocab_rows, hidden_size)
        self.shard, self.tp = shard, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.shard.vocab.start
        inside = (local >= 0) & (local < len(self.shard.vocab))
        x = super().forward(torch.where(inside, local, 0)) * inside[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(x)


class LMHead(nn.Linear):
    """The logits over the whole vocabulary (``vocab_size``), from every rank's rows gathered."""

    def __init__(self, shard: Shard, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__(hidden_size, shard.vocab_rows, bias=False)
        self.vocab_size, self.tp = vocab_size, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_vocab(super().forward(x), self.vocab_size)
