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
from tristream.lora import adapter_tensors, module_shape, read_adapter, weight_name
from tristream.model_config import ModelConfig
from tristream.sharding import Shard

# Each fused projection and its parts, in the order of its output rows.
PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoraProjection:
    """The LoRA matrices of one projection for every slot: ``a`` [slots, parts*rank, in], ``b`` [slots, out, parts*rank]."""

    def __init__(
        self, slots: int, rank: int, parts: int, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device
    ):
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
        shapes = {  # (in, out) of each fused projection: its parts share the input and stack their outputs
            name: (module_shape(mc, parts[0])[0], sum(module_shape(mc, part)[1] for part in parts))
            for name, parts in PARTS.items()
        }
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
            p = place(weight_name(layer, module), self.mc, self.shard)
            proj = self.layers[layer][p.param.split(".")[-2]]
            cols = slice((p.part or 0) * self.rank, (p.part or 0) * self.rank + r)
            if kind == "A":
                src = tensor[:, p.src] if p.dim == 1 else tensor[:]
                proj.a[slot, cols].copy_(src)
            else:
                src = tensor[p.src] if p.dim == 0 else tensor[:]
                proj.b[slot, p.dst, cols].copy_(src.to(torch.float32) * adapter.scaling)
