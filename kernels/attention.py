"""Attention over a paged KV pool, and writing new K/V into it.

The pool of one layer is ``[num_pages, page_size, num_kv_heads, head_dim]``;
a token's flat slot is ``page * page_size + offset``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, KVH, D] into the pools at flat slots [T]."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: list[list[int]],
    seq_lens: list[int],
    qo_indptr: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention of a ragged batch of new tokens over their whole context.

    Sequence b owns queries ``q[qo_indptr[b]:qo_indptr[b+1]]`` (the last tokens of
    its ``seq_lens[b]``-token context) and its pages ``block_tables[b]``.
    Returns [T, H, D].
    """
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b, ctx_len in enumerate(seq_lens):
        start, end = qo_indptr[b], qo_indptr[b + 1]
        n = end - start
        pages = torch.tensor(block_tables[b][: (ctx_len + page_size - 1) // page_size], device=q.device)
        k = k_cache[pages].flatten(0, 1)[:ctx_len].transpose(0, 1)
        v = v_cache[pages].flatten(0, 1)[:ctx_len].transpose(0, 1)
        qb = q[start:end].transpose(0, 1)
        if n == 1 or n == ctx_len:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=n > 1, scale=scale, enable_gqa=True)
        else:
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
            groups = qb.shape[0] // num_kv_heads
            o = F.scaled_dot_product_attention(
                qb, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0), attn_mask=mask, scale=scale
            )
        out[start:end] = o.transpose(0, 1)
    return out
