"""Decoder-only transformer for Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Under tensor parallelism each rank builds the layers of its shard: column-parallel
qkv and gate/up, row-parallel o and down followed by an all-reduce, and a
vocabulary-parallel embedding and LM head. With LoRA, each of those four projections
adds its sequences' adapter deltas (``DecoderLM.use_lora``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from tristream.gpu_proc import ops
from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.parallel import TensorParallel
from tristream.kernels.rope import rope_cos_sin, rope_inv_freq
from tristream.model_config import ModelConfig
from tristream.sharding import Shard

if TYPE_CHECKING:
    from tristream.gpu_proc.lora import LoraProjection, LoraWeights


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer, self.tp = layer, tp
        self.num_heads, self.num_kv_heads, self.head_dim = mc.num_heads, mc.num_kv_heads, mc.head_dim
        self.q_size, self.kv_size = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        self.qkv_proj = nn.Linear(mc.hidden_size, self.q_size + 2 * self.kv_size, bias=mc.attention_bias)
        self.o_proj = nn.Linear(self.q_size, mc.hidden_size, bias=False)
        self.qk_norm = mc.qk_norm
        if mc.qk_norm:
            self.q_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
            self.k_norm = RMSNorm(mc.head_dim, mc.rms_norm_eps)
        self.scale = mc.head_dim**-0.5
        self.qkv_lora: LoraProjection | None = None
        self.o_lora: LoraProjection | None = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, rope: tuple[torch.Tensor, torch.Tensor]):
        qkv = self.qkv_proj(x)
        if self.qkv_lora is not None:
            qkv = self.qkv_lora.add_to(qkv, x, batch)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.apply_rope(q, k, batch.positions, *rope)
        o = ops.attend(q, k, v, *kv.layer(self.layer), batch, self.scale).flatten(1)
        out = self.o_proj(o)
        if self.o_lora is not None:
            out = self.o_lora.add_to(out, o, batch)
        return self.tp.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, mc: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(mc.hidden_size, 2 * mc.intermediate_size, bias=False)
        self.down_proj = nn.Linear(mc.intermediate_size, mc.hidden_size, bias=False)
        self.gate_up_lora: LoraProjection | None = None
        self.down_lora: LoraProjection | None = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.gate_up_lora is not None:
            gate_up = self.gate_up_lora.add_to(gate_up, x, batch)
        h = ops.silu_and_mul(gate_up)
        out = self.down_proj(h)
        if self.down_lora is not None:
            out = self.down_lora.add_to(out, h, batch)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.self_attn = Attention(mc, layer, tp)
        self.mlp = MLP(mc, tp)
        self.input_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)

    def forward(self, x, residual, batch, kv, rope):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv, rope)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, batch), residual


class DecoderLM(nn.Module):
    """The model, or one rank's shard of it. Parameter names follow Hugging Face, with q/k/v and gate/up fused.

    ``config`` holds the shapes of this rank's layers (``Shard.local_config``); the
    embedding and the LM head hold ``shard.vocab_rows`` rows of the vocabulary.
    """

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        super().__init__()
        self.config, self.shard, self.tp = mc, shard, tp
        self.embed_tokens = nn.Embedding(shard.vocab_rows, mc.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(mc, i, tp) for i in range(mc.num_layers))
        self.norm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.lm_head = nn.Linear(mc.hidden_size, shard.vocab_rows, bias=False)
        if mc.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def use_lora(self, weights: LoraWeights) -> None:
        """Add the adapter deltas of ``weights`` to the projections; batches then need ``lora_slots``."""
        for layer, projections in zip(self.layers, weights.layers):
            layer.self_attn.qkv_lora, layer.self_attn.o_lora = projections["qkv_proj"], projections["o_proj"]
            layer.mlp.gate_up_lora, layer.mlp.down_lora = projections["gate_up_proj"], projections["down_proj"]

    def build_rope(self, max_positions: int, device: torch.device) -> None:
        """Precompute the fp32 cos/sin tables for positions below ``max_positions``."""
        mc = self.config
        cos, sin = rope_cos_sin(rope_inv_freq(mc.head_dim, mc.rope_theta, mc.rope_scaling), max_positions)
        self.rope = (cos.to(device), sin.to(device))

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] of the rows that need them."""
        x, residual = self.embed(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, kv, self.rope)
        x, _ = self.norm(x, residual)
        return self.tp.gather_vocab(self.lm_head(x[batch.logit_rows]), self.config.vocab_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the ids; each rank looks up those in its rows, and the all-reduce adds them up."""
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.shard.vocab.start
        inside = (local >= 0) & (local < len(self.shard.vocab))
        x = self.embed_tokens(torch.where(inside, local, 0)) * inside[:, None].to(self.embed_tokens.weight.dtype)
        return self.tp.all_reduce(x)
