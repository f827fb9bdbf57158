"""Gemma 2 and Gemma 3 (text): the embedding scaled by sqrt(hidden), RMSNorms of ``1 + weight``, a norm before
and after each of attention and the MLP, a tanh-GELU MLP, scores scaled by ``query_pre_attn_scalar``, sliding
windows on the layers that ``layer_types`` marks, and soft-capped attention scores and logits (Gemma 2).

Gemma 3 adds q/k norms and gives its sliding layers a rotary base of their own (``rope_local_base_freq``),
while its global layers take ``rope_theta`` and ``rope_scaling``.
"""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.layers.mlp import GatedMLP
from tristream.gpu_proc.layers.norm import OffsetRMSNorm
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import Attention, LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Shard


class SandwichDecoderLayer(nn.Module):
    """Attention and the MLP each between two norms: ``input_layernorm``, attention, ``post_attention_layernorm``,
    add; ``pre_feedforward_layernorm``, MLP, ``post_feedforward_layernorm``, add. The residual adds join the
    next norm, as in the Llama layer."""

    def __init__(self, mc: ModelConfig, attention: Attention, mlp: nn.Module, norm: type[nn.Module]) -> None:
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        for name in ("input", "post_attention", "pre_feedforward", "post_feedforward"):
            setattr(self, f"{name}_layernorm", norm(mc.hidden_size, mc.rms_norm_eps))

    def forward(self, x, residual, batch, kv, rotary):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, batch, kv, rotary))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x, batch)), residual


@register("Gemma2ForCausalLM")
class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_class = OffsetRMSNorm
    window_pattern = 2

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        super().__init__(mc, shard, tp)
        self.final_softcap = mc.hf.get("final_logit_softcapping") or 0.0
        # sqrt(hidden) rounded to the model's dtype (the default while the model is built), as transformers does.
        self.embed_scale = torch.tensor(mc.hidden_size**0.5, dtype=torch.get_default_dtype(), device="cpu").item()

    def make_layer(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        attention, mlp = self.make_attention(mc, layer, tp), self.make_mlp(mc, layer, tp)
        return SandwichDecoderLayer(mc, attention, mlp, self.norm_class)

    def sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` attends over a sliding window: as ``layer_types`` says, else every layer but
        each ``sliding_window_pattern``-th."""
        types = self.config.hf.get("layer_types")
        if types:
            return types[layer] == "sliding_attention"
        return bool((layer + 1) % self.config.hf.get("sliding_window_pattern", self.window_pattern))

    def make_attention(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> Attention:
        return Attention(
            mc,
            layer,
            tp,
            mc.attention_bias,
            self.qk_norm,
            scale=mc.hf.get("query_pre_attn_scalar", mc.head_dim) ** -0.5,
            window=mc.hf.get("sliding_window", 0) if self.sliding(layer) else 0,
            softcap=mc.hf.get("attn_logit_softcapping") or 0.0,
        )

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        return GatedMLP(mc.hidden_size, mc.intermediate_size, tp, mc.quant, gelu=True)

    def rotary_of(self, layer: int) -> RotaryEmbedding:
        """The rotary tables of layer ``layer``."""
        return self.rotary

    def hidden_states(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        x, residual = x * self.embed_scale, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, batch, kv, self.rotary_of(i))
        return self.final_norm(x, residual)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


@register("Gemma3ForCausalLM")
class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = OffsetRMSNorm
    window_pattern = 6

    def build_rope(self, max_positions: int, device: torch.device) -> None:
        mc = self.config
        rope = mc.hf.get("rope_parameters") or {}
        local = rope.get("sliding_attention") or {"rope_theta": mc.hf.get("rope_local_base_freq", 10000.0)}
        full = rope.get("full_attention") or {**(mc.rope_scaling or {}), "rope_theta": mc.hf.get("rope_theta", 1e6)}
        self.rotaries = {
            kind: RotaryEmbedding(
                mc.head_dim,
                params["rope_theta"],
                params if params.get("rope_type", params.get("type", "default")) != "default" else None,
                max_positions,
                device,
                max_position_embeddings=mc.max_position_embeddings,
            )
            for kind, params in (("sliding", local), ("full", full))
        }

    def rotary_of(self, layer: int) -> RotaryEmbedding:
        return self.rotaries["sliding" if self.sliding(layer) else "full"]
