"""The gated MLP: a fused gate/up projection, SiLU (or Gemma's tanh GELU) of the gate times up, then down."""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.layers.linear import Linear
from tristream.gpu_proc.parallel import TensorParallel
from tristream.quantization import QuantSpec


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``, act SiLU or (``gelu``) tanh-approximated GELU, gate and up fused (column-parallel), down row-parallel: without ``tp``
    the caller sums the ranks' outputs."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        tp: TensorParallel | None,
        quant: QuantSpec | None = None,
        gelu: bool = False,
    ) -> None:
        super().__init__()
        self.act_and_mul = ops.gelu_tanh_and_mul if gelu else ops.silu_and_mul
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, quant=quant, parts=2)
        self.down_proj = Linear(intermediate_size, hidden_size, tp=tp, quant=quant)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x, batch)), batch)
