"""LoRA adapters on the device: every resident adapter's matrices, stacked by slot, per projection.

A fused projection (q/k/v, gate/up) holds its parts' A matrices one under the other and
their B matrices block-diagonally, so one shrink and one expand serve all of its parts.
The adapter's scaling is folded into B. Under tensor parallelism each rank holds the
rows of B of its column-parallel outputs and the columns of A of its row-parallel inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.lora import MODULES, adapter_tensors, module_shape, read_adapter, weight_name
from tristream.model_config import ModelConfig
from tristream.sharding import fused_parts, place


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
    """The LoRA matrices of ``slots`` adapters of rank up to ``rank`` for each projection of ``model`` (one rank's
    shard of it), by the parameter names of the model's weight table."""

    def __init__(self, model: nn.Module, slots: int, rank: int) -> None:
        mc, weight = model.config, next(model.parameters())
        self.mc, self.shard, self.table, self.rank = mc, model.shard, model.weights, rank
        parts = {name: modules for name, modules in fused_parts(self.table).items() if modules[0] in MODULES}
        shapes = {  # (in, out) of each fused projection: its parts share the input and stack their outputs
            name: (module_shape(mc, modules[0])[0], sum(module_shape(mc, m)[1] for m in modules))
            for name, modules in parts.items()
        }
        self.layers = [
            {
                name: LoraProjection(slots, rank, len(parts[name]), *shapes[name], weight.dtype, weight.device)
                for name in parts
            }
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
            p = place(weight_name(layer, module), self.table, self.mc, self.shard)
            proj = self.layers[layer][p.param.split(".")[-2]]
            cols = slice(p.part * self.rank, p.part * self.rank + r)
            # A row-parallel projection (split along dim 1) holds its columns of A; a column-parallel one its rows of B.
            if kind == "A":
                proj.a[slot, cols].copy_(tensor[:, p.src] if p.dim == 1 else tensor[:])
            else:
                rows, src = (p.dst, tensor[p.src]) if p.dim == 0 else (slice(None), tensor[:])
                proj.b[slot, rows, cols].copy_(src.to(torch.float32) * adapter.scaling)
