"""Qwen2-MoE and Qwen3-MoE: the Qwen2 and Qwen3 decoders with mixture-of-experts MLPs.

A layer is sparse unless ``mlp_only_layers`` lists it or ``decoder_sparse_step`` skips it; the router keeps
the top-k softmax probabilities, renormalized when ``norm_topk_prob``. Qwen2-MoE adds a shared expert gated
by a sigmoid.
"""

from __future__ import annotations

from torch import nn

from tristream.gpu_proc.layers.moe import SparseMoE
from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import WEIGHTS, LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Piece, WeightTable

# Expert e's tensors (``mlp.experts.{e}.gate_proj``) fill entry e of the stacked experts, split like the MLP.
EXPERT_WEIGHTS: WeightTable = {
    "experts.gate_proj": Piece("experts.gate_up_proj", 0, 0, "moe_intermediate"),
    "experts.up_proj": Piece("experts.gate_up_proj", 1, 0, "moe_intermediate"),
    "experts.down_proj": Piece("experts.down_proj", 0, 1, "moe_intermediate"),
    "shared_expert.gate_proj": Piece("shared_expert.gate_up_proj", 0, 0, "shared_intermediate"),
    "shared_expert.up_proj": Piece("shared_expert.gate_up_proj", 1, 0, "shared_intermediate"),
    "shared_expert.down_proj": Piece("shared_expert.down_proj", 0, 1, "shared_intermediate"),
}


@register("Qwen3MoeForCausalLM")
class Qwen3MoeForCausalLM(LlamaForCausalLM):
    weights = {**WEIGHTS, **EXPERT_WEIGHTS}
    qk_norm = RMSNorm
    shared_gate = False

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        step = mc.hf.get("decoder_sparse_step", 1)
        if layer in mc.hf.get("mlp_only_layers", []) or (layer + 1) % step:
            return super().make_mlp(mc, layer, tp)
        return SparseMoE(mc, tp, renormalize=bool(mc.hf.get("norm_topk_prob")), shared_gate=self.shared_gate)


@register("Qwen2MoeForCausalLM")
class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = None
    qkv_bias = True
    shared_gate = True
