"""The projection of a layer, or one rank's shard of it, with the LoRA deltas of its batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.layers.quantized import Dense, Layout, scheme
from tristream.gpu_proc.parallel import TensorParallel
from tristream.quantization import QuantSpec

if TYPE_CHECKING:
    from tristream.gpu_proc.lora import LoraProjection


class Linear(nn.Module):
    """``x @ W.T (+ b)``. Column-parallel by default: each rank computes its rows of the output (a fused
    projection's ``parts`` side by side). Given ``tp`` it is row-parallel: each rank holds its columns of the
    input, and the all-reduce sums the ranks' outputs. ``lora``, when set, adds each row's adapter delta
    before that sum. ``quant`` says how the weight is held (``gpu_proc.layers.quantized``)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        bias: bool = False,
        tp: TensorParallel | None = None,
        quant: QuantSpec | None = None,
        parts: int = 1,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.scheme: Dense = scheme(quant)
        self.scheme.create(self, n_in, n_out, parts)
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None
        self.tp = tp
        self.lora: LoraProjection | None = None

    def layout(self, name: str) -> Layout:
        """Where parameter ``name`` lies against the weight [out, in] (for the loader)."""
        return self.scheme.layout(name)

    def checkpoint(self, name: str, tensor: object) -> tuple[str, object] | None:
        """A checkpoint tensor of this projection as (parameter name, tensor), or None where it is not kept."""
        return self.scheme.checkpoint(name, tensor)

    def loaded(self) -> None:
        """Finish the weight once every part is loaded (quantize it, or combine its scales)."""
        self.scheme.finish(self)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        y = self.scheme.apply(self, x)
        if self.lora is not None:
            y = self.lora.add_to(y, x, batch)
        return y if self.tp is None else self.tp.all_reduce(y)
