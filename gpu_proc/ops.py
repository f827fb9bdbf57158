"""Each model operation: the Triton kernel on CUDA, its torch reference elsewhere."""

from __future__ import annotations

import torch

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.kernels import activation, attention, lora, norm, rope, sampling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (norm.rms_norm if x.is_cuda else norm.rms_norm_ref)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return (norm.add_rms_norm if x.is_cuda else norm.add_rms_norm_ref)(x, residual, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return (rope.apply_rope if q.is_cuda else rope.apply_rope_ref)(q, k, positions, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return (activation.silu_and_mul if x.is_cuda else activation.silu_and_mul_ref)(x)


def gumbel_argmax(scaled: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    return (sampling.gumbel_argmax if scaled.is_cuda else sampling.gumbel_argmax_ref)(scaled, seeds, counters)


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, max_rows: int
) -> torch.Tensor:
    if x.is_cuda:
        return lora.lora_shrink(x, a, rows, indptr, max_rows)
    return lora.lora_shrink_ref(x, a, rows, indptr)


def lora_expand(
    parts: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, indptr: torch.Tensor, y: torch.Tensor, max_rows: int
) -> torch.Tensor:
    if y.is_cuda:
        return lora.lora_expand(parts, b, rows, indptr, y, max_rows)
    return lora.lora_expand_ref(parts, b, rows, indptr, y)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Store the new K/V into the pool, then attend over each sequence's whole context."""
    if not q.is_cuda:
        attention.store_kv_ref(k, v, k_cache, v_cache, batch.slot_mapping)
        return attention.paged_attention_ref(q, k_cache, v_cache, *batch.host_meta, scale)
    attention.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
    if batch.decode:
        return attention.paged_decode_attention(
            q, k_cache, v_cache, batch.block_table, batch.seq_lens, scale, batch.num_splits
        )
    return attention.extend_attention(
        q, k_cache, v_cache, batch.block_table, batch.seq_lens, batch.qo_indptr, scale, batch.max_q_len
    )
