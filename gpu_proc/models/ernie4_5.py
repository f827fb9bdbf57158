"""ERNIE 4.5, dense and mixture-of-experts: the Llama decoder with interleaved rotary pairs.

The MoE model's layers from ``moe_layer_start_index`` to ``moe_layer_end_index`` (every
``moe_layer_interval``-th) are sparse. Its fp32 router picks experts by their softmax probability plus a
per-expert score correction, weighs them by the probability alone, renormalized; shared experts see every token.
"""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.layers.moe import Router, SparseMoE
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import WEIGHTS, LlamaForCausalLM
from tristream.gpu_proc.models.qwen_moe import EXPERT_WEIGHTS
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Shard

ERNIE_MOE_WEIGHTS = {
    **WEIGHTS,
    **{name.replace("shared_expert.", "shared_experts."): piece for name, piece in EXPERT_WEIGHTS.items()},
}


@register("Ernie4_5ForCausalLM")
class Ernie4_5ForCausalLM(LlamaForCausalLM):
    rope_interleaved = True

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        if mc.hf.get("use_bias"):
            raise ValueError("ERNIE 4.5 checkpoints with use_bias=true are not supported")
        super().__init__(mc, shard, tp)


class ScoreCorrection(nn.Module):
    """The per-expert bias added to the router's probabilities when it chooses experts."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.empty(1, experts, dtype=torch.float32))


class ErnieMoE(SparseMoE):
    """The routed experts with an fp32 router and its score correction, plus the shared experts."""

    def __init__(self, mc: ModelConfig, tp: TensorParallel) -> None:
        super().__init__(mc, tp, renormalize=True)
        norm_min = mc.hf.get("moe_norm_min", 1e-12)
        self.gate = Router(mc.hidden_size, mc.num_experts, mc.num_experts_per_tok, True, norm_min, torch.float32)
        self.moe_statics = ScoreCorrection(mc.num_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x, self.moe_statics.e_score_correction_bias[0])


@register("Ernie4_5_MoeForCausalLM")
class Ernie4_5_MoeForCausalLM(Ernie4_5ForCausalLM):
    weights = ERNIE_MOE_WEIGHTS

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        start, interval = mc.hf.get("moe_layer_start_index", 0), mc.hf.get("moe_layer_interval", 1)
        end = mc.hf.get("moe_layer_end_index", mc.num_layers - 1)
        if (layer + 1) % interval or not start <= layer <= end:
            return super().make_mlp(mc, layer, tp)
        return ErnieMoE(mc, tp)
