"""Each model operation: the Triton kernel on CUDA, its torch reference elsewhere."""

from __future__ import annotations

import torch

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.kernels import activation, attention, fp8, int4, lora, moe, norm, rope, sampling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (norm.rms_norm if x.is_cuda else norm.rms_norm_ref)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return (norm.add_rms_norm if x.is_cuda else norm.add_rms_norm_ref)(x, residual, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return (rope.apply_rope if q.is_cuda else rope.apply_rope_ref)(q, k, positions, cos, sin)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return (activation.silu_and_mul if x.is_cuda else activation.silu_and_mul_ref)(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return (activation.gelu_tanh_and_mul if x.is_cuda else activation.gelu_tanh_and_mul_ref)(x)


def process_logits(logits: torch.Tensor, slots: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
    return (sampling.process_logits if logits.is_cuda else sampling.process_logits_ref)(logits, slots, *tables)


def nucleus_sample(
    logits: torch.Tensor, slots: torch.Tensor, floats: torch.Tensor, ints: torch.Tensor, kth: torch.Tensor | None
) -> torch.Tensor:
    return (sampling.nucleus_sample if logits.is_cuda else sampling.nucleus_sample_ref)(
        logits, slots, floats, ints, kth
    )


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


def fp8_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with e4m3 ``w`` scaled per channel: ``x`` quantized per token, or by ``x_scale``;
    on CUDA a single row multiplies the weights unquantized (``fp8_gemv``)."""
    rows = x.reshape(-1, x.shape[-1])
    if _gemv_fits(rows):
        y = fp8.fp8_gemv(rows, w, w_scale, 1, rows.shape[1])
        return (y if bias is None else y + bias).reshape(*x.shape[:-1], -1)
    if x_scale is None:
        xq, xs = (fp8.quant_fp8_per_token if x.is_cuda else fp8.quant_fp8_per_token_ref)(rows)
    else:
        xq, xs = fp8.quant_fp8_static(rows, x_scale), x_scale
    y = (fp8.fp8_scaled_mm if x.is_cuda else fp8.fp8_scaled_mm_ref)(xq, xs, w, w_scale, x.dtype, bias)
    return y.reshape(*x.shape[:-1], -1)


def fp8_block_linear(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int], bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with e4m3 ``w`` scaled per ``block``; ``x`` quantized per 1 x block-columns group
    (on CUDA a single row is not: ``fp8_gemv``)."""
    rows = x.reshape(-1, x.shape[-1])
    if _gemv_fits(rows):
        y = fp8.fp8_gemv(rows, w, w_scale, *block)
    else:
        xq, xs = (fp8.quant_fp8_per_group if x.is_cuda else fp8.quant_fp8_per_group_ref)(rows, block[1])
        y = (fp8.fp8_block_matmul if x.is_cuda else fp8.fp8_block_matmul_ref)(xq, xs, w, w_scale, *block, x.dtype)
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


def _gemv_fits(rows: torch.Tensor) -> bool:
    """Whether the fp8 projection of ``rows`` takes the one-row kernel: one row on CUDA, K in steps of 128."""
    return rows.is_cuda and rows.shape[0] == 1 and rows.shape[1] % 128 == 0


def w4a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = (int4.w4a16_matmul if x.is_cuda else int4.w4a16_matmul_ref)(rows, qweight, scales, zeros, group_size)
    return y.reshape(*x.shape[:-1], -1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    *,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Store the new K/V into the pool (an fp8 one divided by ``k_scale`` and ``v_scale``), then attend over
    each sequence's whole context, or its last ``window`` positions, with scores soft-capped at ``softcap``
    (0 turns either off)."""
    opts = {"window": window, "softcap": softcap}
    if not q.is_cuda:
        attention.store_kv_ref(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
        return attention.paged_attention_ref(q, k_cache, v_cache, *batch.host_meta, scale, k_scale, v_scale, **opts)
    attention.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
    if batch.decode:
        return attention.paged_decode_attention(
            q, k_cache, v_cache, batch.block_table, batch.seq_lens, scale, batch.num_splits, k_scale, v_scale, **opts
        )
    return attention.extend_attention(
        q,
        k_cache,
        v_cache,
        batch.block_table,
        batch.seq_lens,
        batch.qo_indptr,
        scale,
        batch.max_q_len,
        k_scale,
        v_scale,
        **opts,
    )


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Each token's chosen experts' SiLU-gated MLPs, weighted and summed."""
    return (moe.fused_moe if x.is_cuda else moe.fused_moe_ref)(x, w13, w2, topk_weights, topk_ids)
