"""The token embedding and the LM head, split over the ranks by vocabulary rows."""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.layers.quantized import int8_matmul, quantize_int8
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
    """The logits over the whole vocabulary (``vocab_size``), from every rank's rows gathered. With weight-only
    int8 (``use_int8``) it multiplies an int8 copy of its weight, which a tied embedding keeps as it is."""

    def __init__(self, shard: Shard, hidden_size: int, vocab_size: int, tp: TensorParallel) -> None:
        super().__init__(hidden_size, shard.vocab_rows, bias=False)
        self.vocab_size, self.tp = vocab_size, tp
        self.int8: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_int8(self) -> None:
        self.int8 = quantize_int8(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x) if self.int8 is None else int8_matmul(x, *self.int8)
        return self.tp.gather_vocab(logits, self.vocab_size)
