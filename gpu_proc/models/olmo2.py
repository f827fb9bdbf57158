"""OLMo 2 (``Olmo2ForCausalLM``): the Llama decoder with norms after attention and after the MLP instead of
before them, and RMSNorms over the whole of q and of k (all heads at once) before the rotary embedding.

Those q/k norms span every head, so a model split over ranks would need their sums from all ranks: OLMo 2
runs on one GPU (tensor_parallel_size=1).
"""

from __future__ import annotations

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import Attention, LlamaForCausalLM
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig


class Olmo2Attention(Attention):
    """Attention whose ``q_norm`` and ``k_norm`` normalise all of q's and k's heads together."""

    def __init__(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__(mc, layer, tp, mc.attention_bias)
        self.q_norm = RMSNorm(self.q_size, mc.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, mc.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.qkv_proj(x, batch).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = self.attn.heads(self.q_norm(q), self.k_norm(k), v)
        q, k = rotary(q, k, batch.positions)
        return self.o_proj(self.attn(q, k, v, batch, kv), batch)


class PostNormDecoderLayer(nn.Module):
    """``x + post_attention_layernorm(attention(x))``, then ``x + post_feedforward_layernorm(mlp(x))``."""

    def __init__(self, mc: ModelConfig, attention: Attention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.mlp = attention, mlp
        self.post_attention_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)

    def forward(self, x, residual, batch, kv, rotary):
        x = x + self.post_attention_layernorm(self.self_attn(x, batch, kv, rotary))
        return x + self.post_feedforward_layernorm(self.mlp(x, batch)), None


@register("Olmo2ForCausalLM", tensor_parallel=False)
class Olmo2ForCausalLM(LlamaForCausalLM):
    def make_layer(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        return PostNormDecoderLayer(mc, Olmo2Attention(mc, layer, tp), self.make_mlp(mc, layer, tp))
