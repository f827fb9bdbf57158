"""LoRA adapters on the device: every resident adapter's matrices, stacked by slot, per projection.

A fused projection (q/k/v, gate/up) holds its parts' A matrices one under the other and
their B matrices block-diagonally, so one shrink and one expand serve all of its parts.
The adapter's scaling is folded into B. Under tensor parallelism each rank holds the
rows of B of its column-parallel outputs and the columns of A of its row-parallel inputs.
"""

from __future__ import annotations

import torch

from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.weights import place
from tristream.lora import adapter_tensors, read_adapter
from tristream.model_config import ModelConfig
from tristream.sharding import Shard

# Each fused projection and its parts, in the order of its output rows.
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
         "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoraProjection:
    """The LoRA matrices of one projection for every slot: ``a`` [slots, parts*rank, in], ``b`` [slots, out, parts*rank]."""

    def __init__(self, slots: int, rank: int, parts: int, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device):
        self.a = torch.zeros(slots, parts * rank, n_in, dtype=dtype, device=device)
        self.b = torch.zeros(slots, n_out, parts * rank, dtype=dtype, device=device)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """``y += x @ A.T @ B.T`` per row, with its adapter's matrices; rows without one are left alone."""
        if batch.lora_rows is None:
            return y
        parts = ops.lora_shrink(x, self.a, batch.lora_rows, batch.lora_indptr, batch.lora_max_rows)
        return ops.lora_expand(parts, self.b, batch.lora_rows, batch.lora_indptr, y, batch.lora_max_rows)


class LoraWeights:
    """The LoRA matrices of ``slots`` adapters of rank up to ``rank`` for this rank's layers (``mc`` is the local config)."""

    def __init__(self, mc: ModelConfig, shard: Shard, slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.mc, self.shard, self.rank = mc, shard, rank
        q, kv, h, inter = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.hidden_size, mc.intermediate_size
        shapes = {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}
        self.layers = [
            {name: LoraProjection(slots, rank, len(PARTS[name]), *shapes[name], dtype, device) for name in PARTS}
            for _ in range(mc.num_layers)
        ]

    def load(self, slot: int, path: str, whole: ModelConfig) -> None:
        """Put the adapter in directory ``path`` into ``slot``, replacing what was there."""
        adapter = read_adapter(path, whole)
        if adapter.rank > self.rank:
            raise ValueError(f"{path}: rank {adapter.rank} is above max_lora_rank={self.rank}")
        for layer in self.layers:
            for proj in layer.values():
                proj.a[slot].zero_()
                proj.b[slot].zero_()
        r = adapter.rank
        for layer, module, kind, tensor in adapter_tensors(path):
            group = "self_attn" if module in PARTS["qkv_proj"] + PARTS["o_proj"] else "mlp"
            p = place(f"model.layers.{layer}.{group}.{module}.weight", self.mc, self.shard)
            proj = self.layers[layer][p.param.split(".")[-2]]
            cols = slice((p.part or 0) * self.rank, (p.part or 0) * self.rank + r)
            if kind == "A":
                src = tensor[:, p.src] if p.dim == 1 else tensor[:]
                proj.a[slot, cols].copy_(src)
            else:
                src = tensor[p.src] if p.dim == 0 else tensor[:]
                proj.b[slot, p.dst, cols].copy_(src.to(torch.float32) * adapter.scaling)
