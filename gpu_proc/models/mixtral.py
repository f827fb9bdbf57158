"""Mixtral: the Mistral decoder with a mixture of experts in every layer (``block_sparse_moe``, experts
``w1`` gate, ``w3`` up and ``w2`` down), routed by the renormalized top-k of a softmax."""

from __future__ import annotations

from torch import nn

from tristream.gpu_proc.layers.moe import SparseMoE
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import WEIGHTS, LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Piece

MIXTRAL_WEIGHTS = {
    **WEIGHTS,
    "block_sparse_moe.gate": Piece("mlp.gate"),
    "block_sparse_moe.experts.w1": Piece("mlp.experts.gate_up_proj", 0, 0, "moe_intermediate"),
    "block_sparse_moe.experts.w3": Piece("mlp.experts.gate_up_proj", 1, 0, "moe_intermediate"),
    "block_sparse_moe.experts.w2": Piece("mlp.experts.down_proj", 0, 1, "moe_intermediate"),
}


@register("MixtralForCausalLM")
class MixtralForCausalLM(LlamaForCausalLM):
    weights = MIXTRAL_WEIGHTS

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        return SparseMoE(mc, tp, renormalize=True)
