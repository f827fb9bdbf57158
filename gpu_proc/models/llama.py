"""The Llama decoder, and the families that share it: Mistral (sliding window), Qwen2 (bias on q/k/v) and
Qwen3 (RMSNorm on q and k). Other families build on its attention, layer and model.

Under tensor parallelism each rank builds the layers of its shard: column-parallel
qkv and gate/up, row-parallel o and down followed by an all-reduce, and a
vocabulary-parallel embedding and LM head.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.layers.attention import PagedAttention
from tristream.gpu_proc.layers.linear import Linear
from tristream.gpu_proc.layers.mlp import GatedMLP
from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.layers.vocab import LMHead, VocabEmbedding
from tristream.gpu_proc.models import register
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Piece, Shard, WeightTable

if TYPE_CHECKING:
    from tristream.gpu_proc.lora import LoraWeights

# Hugging Face checkpoint modules: q/k/v fuse into qkv_proj and gate/up into gate_up_proj, by heads and columns.
WEIGHTS: WeightTable = {
    "q_proj": Piece("qkv_proj", 0, 0, "q_heads"),
    "k_proj": Piece("qkv_proj", 1, 0, "kv_heads"),
    "v_proj": Piece("qkv_proj", 2, 0, "kv_heads"),
    "o_proj": Piece("o_proj", 0, 1, "q_heads"),
    "gate_proj": Piece("gate_up_proj", 0, 0, "intermediate"),
    "up_proj": Piece("gate_up_proj", 1, 0, "intermediate"),
    "down_proj": Piece("down_proj", 0, 1, "intermediate"),
    "embed_tokens": Piece("embed_tokens", 0, 0, "vocab"),
    "lm_head": Piece("lm_head", 0, 0, "vocab"),
}


def split_rows(
    weights: Iterable[tuple[str, object]], fused: dict[str, list[tuple[str, int]]]
) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with each fused module's (a key of ``fused``) split by rows into the modules
    it holds, as (name, rows) in order: ``qkv_proj`` into ``q_proj``, ``k_proj`` and ``v_proj``. Only
    16/32-bit weights and biases split so: a fused module's quantized tensors are a ValueError."""
    for name, tensor in weights:
        module = next((m for m in fused if f".{m}." in name), None)
        if module is None:
            yield name, tensor
            continue
        if not name.endswith((".weight", ".bias")) or tensor_dtype(tensor) not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            raise ValueError(f"{name}: quantized checkpoints that fuse {module} are not supported")
        start = 0
        for part, rows in fused[module]:
            yield name.replace(f".{module}.", f".{part}."), tensor[start : start + rows]
            start += rows


def tensor_dtype(tensor: object) -> torch.dtype:
    """The dtype of a tensor or of a safetensors slice."""
    if isinstance(tensor, torch.Tensor):
        return tensor.dtype
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(tensor.get_dtype(), torch.uint8)


class Attention(nn.Module):
    """Self-attention of one layer: fused q/k/v, optional per-head q/k norms (of class ``qk_norm``), rotary
    embedding, paged attention (with ``options``: scale, sliding window, soft-cap), o."""

    def __init__(
        self,
        mc: ModelConfig,
        layer: int,
        tp: TensorParallel,
        qkv_bias: bool,
        qk_norm: type[RMSNorm] | None = None,
        **options: float,
    ) -> None:
        super().__init__()
        self.q_size, self.kv_size = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        self.qkv_proj = Linear(mc.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias, quant=mc.quant, parts=3)
        self.o_proj = Linear(self.q_size, mc.hidden_size, tp=tp, quant=mc.quant)
        self.qk_norm = qk_norm is not None
        if qk_norm is not None:
            self.q_norm = qk_norm(mc.head_dim, mc.rms_norm_eps)
            self.k_norm = qk_norm(mc.head_dim, mc.rms_norm_eps)
        self.attn = PagedAttention(layer, mc.num_heads, mc.num_kv_heads, mc.head_dim, **options)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, rotary: RotaryEmbedding) -> torch.Tensor:
        q, k, v = self.attn.heads(*self.qkv_proj(x, batch).split([self.q_size, self.kv_size, self.kv_size], dim=-1))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(q, k, batch.positions)
        return self.o_proj(self.attn(q, k, v, batch, kv), batch)


class DecoderLayer(nn.Module):
    """Pre-norm attention, then the MLP (dense, or a mixture of experts); the residual travels beside ``x`` and
    joins it in the fused norms."""

    def __init__(self, mc: ModelConfig, attention: Attention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(mc.hidden_size, mc.rms_norm_eps)

    def forward(self, x, residual, batch, kv, rotary):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv, rotary)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, batch), residual


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaForCausalLM(nn.Module):
    """The model, or one rank's shard of it. Parameter names follow Hugging Face, with q/k/v and gate/up fused.

    ``config`` holds the shapes of this rank's layers (``Shard.local_config``); the
    embedding and the LM head hold ``shard.vocab_rows`` rows of the vocabulary.
    """

    weights = WEIGHTS
    aux_layers: tuple[int, ...] = ()
    aux_hidden: torch.Tensor | None = None
    qkv_bias = False
    qk_norm: type[RMSNorm] | None = None
    norm_class: type[RMSNorm] = RMSNorm
    rope_interleaved = False

    def __init__(self, mc: ModelConfig, shard: Shard, tp: TensorParallel) -> None:
        super().__init__()
        self.config, self.shard, self.tp = mc, shard, tp
        self.embed_tokens = VocabEmbedding(shard, mc.hidden_size, tp)
        self.layers = nn.ModuleList(self.make_layer(mc, i, tp) for i in range(mc.num_layers))
        self.norm = self.norm_class(mc.hidden_size, mc.rms_norm_eps)
        self.lm_head = LMHead(shard, mc.hidden_size, mc.vocab_size, tp)
        if mc.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_layer(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        """Decoder layer ``layer``."""
        return DecoderLayer(mc, self.make_attention(mc, layer, tp), self.make_mlp(mc, layer, tp))

    def make_attention(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> Attention:
        """The self-attention of layer ``layer``: a sliding window where the config gives the layer one."""
        bias = self.qkv_bias or mc.attention_bias
        return Attention(mc, layer, tp, bias, self.qk_norm, window=mc.sliding_window(layer))

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        """The MLP of layer ``layer``."""
        return GatedMLP(mc.hidden_size, mc.intermediate_size, tp, mc.quant)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
        """The checkpoint's tensors by Hugging Face name, as the weight table reads them."""
        return weights

    def use_lora(self, weights: LoraWeights) -> None:
        """Add the adapter deltas of ``weights`` to the attention and dense MLP projections (not to experts);
        batches then need ``lora_rows``."""
        for layer, projections in zip(self.layers, weights.layers):
            for owner in (layer.self_attn, layer.mlp):
                for name, projection in projections.items():
                    linear = getattr(owner, name, None)
                    if isinstance(linear, Linear):
                        linear.lora = projection

    def build_rope(self, max_positions: int, device: torch.device) -> None:
        """Precompute the rotary tables for positions below ``max_positions``."""
        mc = self.config
        self.rotary = RotaryEmbedding(
            mc.head_dim,
            mc.rope_theta,
            mc.rope_scaling,
            max_positions,
            device,
            rotary_dim=int(mc.head_dim * mc.partial_rotary_factor),
            interleaved=self.rope_interleaved,
            max_position_embeddings=mc.max_position_embeddings,
        )

    def forward(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Logits [len(logit_rows), vocab] of the rows that need them."""
        return self.logits(self.hidden_states(batch, kv)[batch.logit_rows])

    def hidden_states(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The final norm's output [tokens, hidden] for every row of the batch. With ``aux_layers`` set, the
        residual stream entering each of those layers, side by side, is kept as ``aux_hidden`` (for an EAGLE-3
        head)."""
        x, residual = self.embed(batch), None
        rotary, batch = self.rotary_of(batch)
        aux = []
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux.append(x if residual is None else x + residual)
            x, residual = layer(x, residual, batch, kv, rotary)
        if aux:
            self.aux_hidden = torch.cat(aux, dim=-1)
        return self.final_norm(x, residual)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits over the vocabulary of final-norm hidden states."""
        return self.lm_head(hidden)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """The input embeddings of the batch's tokens, image tokens' taken from ``batch.image_embeds``."""
        x = self.embed_tokens(batch.input_ids)
        if batch.image_rows is None:
            return x
        return x.index_copy(0, batch.image_rows, batch.image_embeds.to(x.dtype))

    def rotary_of(self, batch: ForwardBatch) -> tuple[RotaryEmbedding, ForwardBatch]:
        """The rotary embedding of the batch's positions, and the batch as the layers take it."""
        return self.rotary, batch

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's output through ``norm``, with the residual that has not yet joined it, if any."""
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


@register("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


@register("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = RMSNorm
