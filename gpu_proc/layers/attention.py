"""Attention of one layer over the paged KV cache."""

from __future__ import annotations

import torch

from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache


class PagedAttention:
    """Stores a step's K/V into layer ``layer``'s pages, then attends each query over its sequence's whole context.

    ``heads`` views the flat q, k and v of a projection per head; the call takes them so (after any norm
    and rotary embedding) and returns the output flat, [tokens, heads * head_dim]. An fp8 KV cache holds
    K / ``k_scale`` and V / ``v_scale`` (a checkpoint's calibrated scales, else 1). Scores are q·k * ``scale``
    (default head_dim**-0.5); ``window`` > 0 makes the layer's attention a sliding window of that many positions,
    the query's own included, and ``softcap`` > 0 caps the scores at softcap * tanh(score / softcap).
    """

    def __init__(
        self,
        layer: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        window: int = 0,
        softcap: float = 0.0,
    ) -> None:
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.window, self.softcap = window, softcap
        self.k_scale = self.v_scale = 1.0

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q, k and v viewed as [tokens, heads, head_dim]."""
        d = self.head_dim
        return q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d), v.view(-1, self.num_kv_heads, d)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv: KVCache
    ) -> torch.Tensor:
        k_cache, v_cache = kv.layer(self.layer)
        scales = (self.k_scale, self.v_scale) if k_cache.dtype == torch.float8_e4m3fn else (1.0, 1.0)
        return ops.attend(
            q, k, v, k_cache, v_cache, batch, self.scale, *scales, window=self.window, softcap=self.softcap
        ).flatten(1)
