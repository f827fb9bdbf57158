"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and a mixture of routed and shared experts.

MLA compresses each token's keys and values into one latent vector (``kv_lora_rank`` wide, normed) and one
rotary key part (``qk_rope_head_dim``) shared by every head; ``kv_b_proj`` expands the latent into each head's
non-rotary key part and value. The query comes from ``q_proj``, or through its own low-rank bottleneck
(``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``) when ``q_lora_rank`` is set. Only the rotary parts rotate: pairs
(2i, 2i + 1), as DeepSeek lays them out (V3 checkpoints with ``rope_interleave`` false pair (i, i + R/2)). Scores
are scaled by ``qk_head_dim**-0.5``, times mscale(factor, ``mscale_all_dim``)² under yarn rope scaling.

KV cache: it holds every head's expanded K and V, zero-padded to one width (``ModelConfig.head_dim``), so the
paged attention and its kernels serve MLA unchanged. That is correct but not memory-efficient: per token and
layer it keeps 2 * num_heads * head_dim numbers where MLA needs kv_lora_rank + qk_rope_head_dim (DeepSeek-V3:
65,536 against 576). Caching the latent instead would need a pool of one latent "head" per token and attention
that absorbs ``kv_b_proj`` into the query (q_nope times each head's key block, scored against the latent) and
into the output (the latent-weighted sum times each head's value block), i.e. attention kernels whose K and V
widths differ and are shared by every head.

The first ``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) have a dense MLP; the others route
each token to experts (``DeepseekRouter``) and add the shared experts (``moe_intermediate_size *
n_shared_experts`` wide), unscaled. The models run on one rank: kv_b_proj and o_proj split by heads of widths
other than the cache's head_dim, which the weight placement does not express. LoRA adapters are refused.
Multi-token-prediction layers in a checkpoint (numbered from ``num_hidden_layers``) are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.layers.attention import PagedAttention
from tristream.gpu_proc.layers.linear import Linear
from tristream.gpu_proc.layers.moe import SparseMoE
from tristream.gpu_proc.layers.norm import RMSNorm
from tristream.gpu_proc.layers.rotary import RotaryEmbedding
from tristream.gpu_proc.models import register
from tristream.gpu_proc.models.llama import WEIGHTS, LlamaForCausalLM
from tristream.gpu_proc.models.qwen_moe import EXPERT_WEIGHTS
from tristream.gpu_proc.parallel import TensorParallel
from tristream.kernels.rope import rope_type
from tristream.model_config import ModelConfig
from tristream.sharding import WeightTable

if TYPE_CHECKING:
    from tristream.gpu_proc.lora import LoraWeights

# The attention projections keep their checkpoint names, unsplit; the shared experts fill ``shared_expert``.
DEEPSEEK_WEIGHTS: WeightTable = {
    **{name: piece for name, piece in WEIGHTS.items() if name not in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name.replace("shared_expert.", "shared_experts."): piece for name, piece in EXPERT_WEIGHTS.items()},
}
# The epsilon of the norms of the query and KV latents (transformers leaves them at their default).
LATENT_NORM_EPS = 1e-6
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude scale of a context ``factor`` times longer."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(mc: ModelConfig) -> float:
    """``qk_head_dim**-0.5``, times mscale(factor, ``mscale_all_dim``)² where scaled rope gives ``mscale_all_dim``."""
    scale = (mc.hf["qk_nope_head_dim"] + mc.hf["qk_rope_head_dim"]) ** -0.5
    scaling = mc.rope_scaling or {}
    if rope_type(scaling) != "default" and scaling.get("mscale_all_dim"):
        scale *= _mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class LatentAttention(nn.Module):
    """Multi-head latent attention of one layer (see the module's docstring), over a cache of whole K and V.

    Each head's q and K (``qk_nope_head_dim`` + ``qk_rope_head_dim``) and V (``v_head_dim``) are zero-padded to the
    cache's ``head_dim``, which leaves the scores and the first ``v_head_dim`` of each head's output unchanged;
    those go to ``o_proj``.
    """

    def __init__(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        hf, bias, quant = mc.hf, mc.attention_bias, mc.quant
        self.heads, self.width = mc.num_heads, mc.head_dim
        self.nope, self.rope, self.v_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        self.kv_rank, q_rank = hf["kv_lora_rank"], hf.get("q_lora_rank")
        q_size = self.heads * (self.nope + self.rope)
        self.q_lora = q_rank is not None
        if self.q_lora:
            self.q_a_proj = Linear(mc.hidden_size, q_rank, bias, quant=quant)
            self.q_a_layernorm = RMSNorm(q_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(q_rank, q_size, quant=quant)
        else:
            self.q_proj = Linear(mc.hidden_size, q_size, quant=quant)
        self.kv_a_proj_with_mqa = Linear(mc.hidden_size, self.kv_rank + self.rope, bias, quant=quant)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(self.kv_rank, self.heads * (self.nope + self.v_dim), quant=quant)
        self.o_proj = Linear(self.heads * self.v_dim, mc.hidden_size, bias, tp=tp, quant=quant)
        self.attn = PagedAttention(layer, self.heads, self.heads, self.width, scale=softmax_scale(mc))

    def query(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q [tokens, heads, qk_head_dim], before the rotary embedding."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x, batch)), batch) if self.q_lora else self.q_proj(x, batch)
        return q.view(x.shape[0], self.heads, -1)

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [tokens, heads, d] zero-padded to the cache's head_dim."""
        return F.pad(x, (0, self.width - x.shape[-1]))

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache, rotary: RotaryEmbedding) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.query(x, batch)
        latent, k_pe = self.kv_a_proj_with_mqa(x, batch).split([self.kv_rank, self.rope], dim=-1)
        expanded = self.kv_b_proj(self.kv_a_layernorm(latent), batch).view(tokens, self.heads, -1)
        k_nope, v = expanded.split([self.nope, self.v_dim], dim=-1)
        q_pe, k_pe = rotary(q[..., self.nope :], k_pe.unsqueeze(1), batch.positions)
        q = self.widen(torch.cat([q[..., : self.nope], q_pe], dim=-1))
        k = self.widen(torch.cat([k_nope, k_pe.expand(-1, self.heads, -1)], dim=-1))
        out = self.attn(q, k, self.widen(v), batch, kv).view(tokens, self.heads, self.width)
        return self.o_proj(out[..., : self.v_dim].reshape(tokens, -1), batch)


class DeepseekRouter(nn.Module):
    """Each token's ``num_experts_per_tok`` experts and their weights, from fp32 logits x @ weight.T.

    V2 (``sigmoid`` False) scores experts by softmax; its ``topk_method`` "greedy" takes the best scores, and
    "group_limited_greedy" only those in the ``topk_group`` of ``n_group`` groups with the best top score; the
    weights are the chosen scores (``norm_topk_prob`` is not read, as in transformers). V3 scores by sigmoid, and
    chooses by the scores plus ``e_score_correction_bias``, among the ``topk_group`` groups with the best sum of
    two corrected scores; the weights are the uncorrected scores, divided by their sum when ``norm_topk_prob``.
    Both multiply the weights by ``routed_scaling_factor``.
    """

    def __init__(self, mc: ModelConfig, sigmoid: bool) -> None:
        super().__init__()
        hf = mc.hf
        self.weight = nn.Parameter(torch.empty(mc.num_experts, mc.hidden_size, dtype=torch.float32))
        self.sigmoid, self.top_k = sigmoid, mc.num_experts_per_tok
        method = "noaux_tc" if sigmoid else hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported topk_method {method!r} of {mc.architecture}")
        self.groups = (hf.get("n_group") or 1) if method != "greedy" else 1
        self.top_groups = hf.get("topk_group") or self.groups
        self.renormalize = sigmoid and bool(hf.get("norm_topk_prob"))
        self.scaling = hf.get("routed_scaling_factor", 1.0)
        if sigmoid:
            self.e_score_correction_bias = nn.Parameter(torch.empty(mc.num_experts, dtype=torch.float32))

    def best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` [tokens, experts] with the experts outside each token's ``top_groups`` best groups masked
        out (-inf for V3, 0 for V2)."""
        if self.top_groups >= self.groups:
            return choice
        grouped = choice.view(choice.shape[0], self.groups, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.amax(-1)
        best = group_scores.topk(self.top_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf") if self.sigmoid else 0.0).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k] fp32, expert ids [T, top_k] int32)."""
        logits = F.linear(x.float(), self.weight.float())
        if self.sigmoid:
            scores = logits.sigmoid()
            choice = self.best_groups(scores + self.e_score_correction_bias.float())
        else:
            scores = choice = self.best_groups(logits.softmax(dim=-1))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids.to(torch.int32)


class DeepseekMoE(SparseMoE):
    """The routed experts, weighed by ``DeepseekRouter``, plus the shared experts, which see every token."""

    def __init__(self, mc: ModelConfig, tp: TensorParallel, sigmoid: bool) -> None:
        super().__init__(mc, tp, renormalize=False)
        self.gate = DeepseekRouter(mc, sigmoid)


def _layer(name: str) -> int:
    """The decoder layer of the tensor ``name``, or -1 for one outside the layers."""
    m = LAYER.search(name)
    return -1 if m is None else int(m.group(1))


@register("DeepseekV2ForCausalLM", tensor_parallel=False)
class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """DeepSeek-V2: MLA, and experts chosen by softmax scores."""

    weights = DEEPSEEK_WEIGHTS
    sigmoid_router = False

    def make_attention(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> LatentAttention:
        return LatentAttention(mc, layer, tp)

    def make_mlp(self, mc: ModelConfig, layer: int, tp: TensorParallel) -> nn.Module:
        dense = mc.hf.get("first_k_dense_replace") or 0
        if not mc.num_experts or layer < dense or layer % (mc.hf.get("moe_layer_freq") or 1):
            return super().make_mlp(mc, layer, tp)
        return DeepseekMoE(mc, tp, self.sigmoid_router)

    def interleaved_rope(self) -> bool:
        """Whether the rotary dims pair as (2i, 2i + 1)."""
        return True

    def build_rope(self, max_positions: int, device: torch.device) -> None:
        mc, dim = self.config, self.config.hf["qk_rope_head_dim"]
        self.rotary = RotaryEmbedding(
            dim,
            mc.rope_theta,
            mc.rope_scaling,
            max_positions,
            device,
            rotary_dim=dim,
            interleaved=self.interleaved_rope(),
            max_position_embeddings=mc.max_position_embeddings,
        )

    def checkpoint_tensors(self, weights: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
        """The checkpoint's tensors, without those of layers past the decoder's (multi-token prediction)."""
        return ((name, tensor) for name, tensor in weights if _layer(name) < self.config.num_layers)

    def use_lora(self, weights: LoraWeights) -> None:
        raise ValueError(f"LoRA adapters are not supported for {self.config.architecture}")


@register("DeepseekV3ForCausalLM", tensor_parallel=False)
class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3: MLA, and experts chosen by corrected sigmoid scores within the best groups."""

    sigmoid_router = True

    def interleaved_rope(self) -> bool:
        return bool(self.config.hf.get("rope_interleave", True))
