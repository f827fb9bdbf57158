"""Mixture-of-experts layers: the router, every expert's weights stacked, and the sparse MLP block.

Under tensor parallelism each rank holds its slice of every expert's intermediate dimension (and of the
shared expert's), as the dense MLP splits; the block's output is summed over the ranks once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.layers.mlp import GatedMLP
from tristream.gpu_proc.layers.quantized import Layout
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.quantization import QuantSpec


class ExpertWeights(nn.Module):
    """One projection of every expert, stacked: ``weight`` [experts, out, in]. From a block-wise fp8 checkpoint
    (``quant``) it loads e4m3 values and ``weight_scale`` [experts, out / rows, in / columns], and dequantizes
    them into ``weight`` once loaded: the experts have no fp8 kernel."""

    def __init__(self, experts: int, n_out: int, n_in: int, quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, n_out, n_in))
        self.block = quant.block if quant is not None and quant.from_checkpoint else None
        if self.block is not None:
            shape = (experts, -(-n_out // self.block[0]), -(-n_in // self.block[1]))
            self.weight_scale = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)

    def layout(self, name: str) -> Layout:
        """Where parameter ``name`` lies against one expert's weight [out, in] (for the loader)."""
        return Layout((0, self.block[0]), (1, self.block[1])) if name == "weight_scale" else Layout()

    def checkpoint(self, name: str, tensor: object) -> tuple[str, object]:
        """A checkpoint tensor of this projection as (parameter name, tensor)."""
        return ("weight_scale", tensor[...].float()) if name == "weight_scale_inv" else (name, tensor)

    def loaded(self) -> None:
        if self.block is None:
            return
        rows, cols = self.block
        with torch.no_grad():
            for weight, scale in zip(self.weight, self.weight_scale):
                full = scale.repeat_interleave(rows, 0)[: weight.shape[0]].repeat_interleave(cols, 1)
                weight.copy_(weight.float() * full[:, : weight.shape[1]])
        self.weight_scale = None


class Router(nn.Module):
    """Each token's ``top_k`` experts by the fp32 softmax of x @ weight.T, and their weights: the chosen
    probabilities, divided by their sum (at least ``norm_min``) when ``renormalize``. A ``bias`` added to the
    probabilities changes which experts are chosen, not their weights (ERNIE 4.5's score correction). ``dtype``
    keeps the weight in a dtype of its own (fp32) under a 16-bit model."""

    def __init__(
        self,
        hidden_size: int,
        experts: int,
        top_k: int,
        renormalize: bool,
        norm_min: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden_size, dtype=dtype))
        self.top_k, self.renormalize, self.norm_min = top_k, renormalize, norm_min

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k] fp32, expert ids [T, top_k] int32)."""
        # Logits in the model's dtype, as transformers computes them, unless the weight keeps a dtype of its own.
        w = self.weight
        logits = F.linear(x, w) if w.dtype == x.dtype else F.linear(x.float(), w.float())
        probs = torch.softmax(logits.float(), dim=-1)
        if bias is None:
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
        else:
            ids = torch.topk(probs + bias, self.top_k, dim=-1).indices
            weights = probs.gather(-1, ids)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return weights, ids.to(torch.int32)


class Experts(nn.Module):
    """Every expert's SiLU-gated MLP: ``gate_up_proj`` [experts, 2 * intermediate, hidden] (gate rows, then up
    rows) and ``down_proj`` [experts, hidden, intermediate]; a token's output is its experts' weighted sum."""

    def __init__(self, experts: int, hidden_size: int, intermediate_size: int, quant: QuantSpec | None = None) -> None:
        super().__init__()
        self.gate_up_proj = ExpertWeights(experts, 2 * intermediate_size, hidden_size, quant)
        self.down_proj = ExpertWeights(experts, hidden_size, intermediate_size, quant)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.gate_up_proj.weight, self.down_proj.weight, weights, ids)


class SparseMoE(nn.Module):
    """The routed experts (``gate``, ``experts``), plus a ``shared_expert`` that sees every token when the model
    has one, scaled by sigmoid(``shared_expert_gate``) where the model has that gate (Qwen2-MoE)."""

    def __init__(self, mc: ModelConfig, tp: TensorParallel, renormalize: bool, shared_gate: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.gate = Router(mc.hidden_size, mc.num_experts, mc.num_experts_per_tok, renormalize)
        self.experts = Experts(mc.num_experts, mc.hidden_size, mc.moe_intermediate_size, mc.quant)
        self.shared_expert = self.shared_expert_gate = None
        if mc.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(mc.hidden_size, mc.shared_expert_intermediate_size, None, mc.quant)
            if shared_gate:
                self.shared_expert_gate = nn.Linear(mc.hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's experts: (weights, ids)."""
        return self.gate(x)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        y = self.experts(x, *self.route(x))
        if self.shared_expert is not None:
            shared = self.shared_expert(x, batch)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return self.tp.all_reduce(y)
