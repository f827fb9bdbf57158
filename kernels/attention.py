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
    Single-token (decode) sequences run as one padded batch. Returns [T, H, D].
    """
    out = torch.empty_like(q)
    decode = [b for b in range(len(seq_lens)) if qo_indptr[b + 1] - qo_indptr[b] == 1]
    if decode:
        rows = torch.tensor([qo_indptr[b] for b in decode], device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, [block_tables[b] for b in decode],
                                      [seq_lens[b] for b in decode], scale)
    for b, ctx_len in enumerate(seq_lens):
        start, end = qo_indptr[b], qo_indptr[b + 1]
        if end - start == 1:
            continue
        out[start:end] = _extend_attention(q[start:end], k_cache, v_cache, block_tables[b], ctx_len, scale)
    return out


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return cache.flatten(0, 1)[slots]


def _slots(table: list[int], ctx_len: int, page_size: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(ctx_len, device=device)
    return torch.tensor(table, device=device)[pos // page_size] * page_size + pos % page_size


def _decode_attention(q, k_cache, v_cache, tables, seq_lens, scale) -> torch.Tensor:
    """One query per sequence: [B, H, D] over contexts padded to the longest, masked."""
    page_size, longest = k_cache.shape[1], max(seq_lens)
    slots = torch.zeros(len(tables), longest, dtype=torch.long, device=q.device)
    for j, (table, ctx_len) in enumerate(zip(tables, seq_lens)):
        slots[j, :ctx_len] = _slots(table, ctx_len, page_size, q.device)
    valid = torch.arange(longest, device=q.device)[None, :] < torch.tensor(seq_lens, device=q.device)[:, None]
    pad = ~valid[:, :, None, None]
    k = _gather(k_cache, slots).masked_fill(pad, 0).transpose(1, 2)
    v = _gather(v_cache, slots).masked_fill(pad, 0).transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
        attn_mask=valid[:, None, None, :], scale=scale,
    )
    return o[:, :, 0, :]


def _extend_attention(q, k_cache, v_cache, table, ctx_len, scale) -> torch.Tensor:
    """The last ``len(q)`` tokens of one sequence, each attending causally to its context."""
    n = q.shape[0]
    slots = _slots(table, ctx_len, k_cache.shape[1], q.device)
    k = _gather(k_cache, slots).transpose(0, 1)
    v = _gather(v_cache, slots).transpose(0, 1)
    qb = q.transpose(0, 1)
    if n == ctx_len:
        o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
        groups = qb.shape[0] // k.shape[0]
        o = F.scaled_dot_product_attention(
            qb, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0), attn_mask=mask, scale=scale
        )
    return o.transpose(0, 1)
