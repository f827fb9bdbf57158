"""GLM-4 (``Glm4ForCausalLM``): the Llama decoder with a norm after attention and after the MLP (the Gemma
layer's sandwich under other names), bias on q/k/v, and rotary embedding on the first half of each head, in
interleaved pairs. The checkpoint fuses gate and up into ``gate_up_proj``."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.gemma import SandwichDecoderLayer
from tristream.gpu_proc.models.llama import WEIGHTS, LlamaForCausalLM, split_rows
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Piece

# GLM's norm names, by where they sit in the sandwich layer.
GLM4_WEIGHTS = {
    **WEIGHTS,
    "post_self_attn_layernorm": Piece("post_attention_layernorm"),
    "post_attention_layernorm": Piece("pre_feedforward_layernorm"),
    "post_mlp_layernorm": Piece("post_feedforward_layernorm"),
}


@register("Glm4ForCausalLM")
class Glm4ForCausalLM(LlamaForCausalLM):
    weights = GLM4_WEIGHTS
    rope_interleaved = True

    def make_layer(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        attention, mlp = self.make_attention(mc, layer, tp), self.make_mlp(mc, layer, tp)
        return SandwichDecoderLayer(mc, attention, mlp, RMSNorm)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
        size = self.config.hf["intermediate_size"]
        return split_rows(weights, {"gate_up_proj": [("gate_proj", size), ("up_proj", size)]})
