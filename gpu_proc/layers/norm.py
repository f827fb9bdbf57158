"""RMSNorm, alone or fused with the residual add."""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc import ops


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; given a residual, it first adds ``x`` to it and returns (normed, new residual)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm, ``x / rms(x) * (1 + weight)``: the checkpoint's weight plus one once loaded (in a 16-bit
    model that sum is rounded to its dtype, where transformers adds in fp32)."""

    def loaded(self) -> None:
        with torch.no_grad():
            self.weight += 1.0
