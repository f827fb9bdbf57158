"""How tensor parallelism splits a model: which heads, MLP columns and vocabulary rows each rank holds.

Attention splits by KV head, each with its group of query heads, so a rank's heads
keep the model's grouping. With fewer KV heads than ranks, the query heads split
evenly and the ranks that share a KV head each hold a copy of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tristream.model_config import ModelConfig


def _even(n: int, parts: int, index: int) -> range:
    """The ``index``-th of ``parts`` contiguous ranges over ``range(n)``, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class Shard:
    """The slice of the model that one rank holds, in head, column and row indices of the whole model.

    ``vocab_rows`` is the number of embedding and LM-head rows of every rank: the last
    rank's may hold fewer than that of the vocabulary, and zeros past it.
    """

    rank: int
    size: int
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    vocab_rows: int

    def local_config(self, mc: ModelConfig) -> ModelConfig:
        """The shapes of the layers on this rank; the vocabulary stays the whole model's."""
        return dataclasses.replace(
            mc, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads), intermediate_size=len(self.intermediate)
        )


def shard_model(mc: ModelConfig, size: int, rank: int) -> Shard:
    """The shard of ``rank`` out of ``size``; a ValueError says why a model cannot split that way."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    heads, kv = mc.num_heads, mc.num_kv_heads
    if size > heads:
        raise ValueError(f"tensor_parallel_size={size} is more than the model's {heads} attention heads")
    group = heads // kv
    if kv >= size:
        kv_heads = _even(kv, size, rank)
        q_heads = range(kv_heads.start * group, kv_heads.stop * group)
    else:
        if size % kv or heads % size:
            raise ValueError(
                f"tensor_parallel_size={size} does not fit the model's {kv} KV heads and {heads} attention heads: "
                f"with fewer KV heads than ranks, the ranks must be a multiple of the KV heads and divide the attention heads"
            )
        q_heads = range(rank * heads // size, (rank + 1) * heads // size)
        kv_heads = range(q_heads.start // group, q_heads.start // group + 1)
    if size > mc.intermediate_size:
        raise ValueError(
            f"tensor_parallel_size={size} is more than the model's intermediate size {mc.intermediate_size}"
        )
    rows = -(-mc.vocab_size // size)
    vocab = range(min(rank * rows, mc.vocab_size), min((rank + 1) * rows, mc.vocab_size))
    return Shard(rank, size, q_heads, kv_heads, _even(mc.intermediate_size, size, rank), vocab, rows)
