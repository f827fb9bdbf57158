"""How tensor parallelism splits a model: which heads, MLP columns and vocabulary rows each rank holds,
and where each checkpoint tensor lands on a rank.

Attention splits by KV head, each with its group of query heads, so a rank's heads
keep the model's grouping. With fewer KV heads than ranks, the query heads split
evenly and the ranks that share a KV head each hold a copy of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from tristream.gpu_proc.models import single_rank
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
    moe_intermediate: range = range(0)
    shared_intermediate: range = range(0)

    def span(self, axis: str, head_dim: int) -> slice:
        """This rank's rows of a tensor split by ``axis``: "q_heads", "kv_heads", "intermediate", "vocab", or an
        expert's "moe_intermediate" or the shared expert's "shared_intermediate"."""
        indices, unit = getattr(self, axis), head_dim if axis.endswith("heads") else 1
        return slice(indices.start * unit, indices.stop * unit)

    def local_config(self, mc: ModelConfig) -> ModelConfig:
        """The shapes of the layers on this rank; the vocabulary stays the whole model's."""
        return dataclasses.replace(
            mc,
            num_heads=len(self.q_heads),
            num_kv_heads=len(self.kv_heads),
            intermediate_size=len(self.intermediate),
            moe_intermediate_size=len(self.moe_intermediate),
            shared_expert_intermediate_size=len(self.shared_intermediate),
        )


def shard_model(mc: ModelConfig, size: int, rank: int) -> Shard:
    """The shard of ``rank`` out of ``size``; a ValueError says why a model cannot split that way."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if size > 1 and mc.architecture in single_rank():
        raise ValueError(f"{mc.architecture} cannot be split over ranks: use tensor_parallel_size=1")
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
    if mc.num_experts and size > mc.moe_intermediate_size:
        raise ValueError(
            f"tensor_parallel_size={size} is more than the experts' intermediate size {mc.moe_intermediate_size}"
        )
    rows = -(-mc.vocab_size // size)
    vocab = range(min(rank * rows, mc.vocab_size), min((rank + 1) * rows, mc.vocab_size))
    return Shard(
        rank,
        size,
        q_heads,
        kv_heads,
        _even(mc.intermediate_size, size, rank),
        vocab,
        rows,
        _even(mc.moe_intermediate_size, size, rank),
        _even(mc.shared_expert_intermediate_size, size, rank),
    )


@dataclass(frozen=True)
class Piece:
    """Where the tensors of a checkpoint module go: into the module ``param``, as part ``part`` of the pieces fused
    there (in the order of its outputs), split over the ranks along ``dim`` by ``axis`` (see ``Shard.span``),
    or held whole on every rank without an ``axis``."""

    param: str
    part: int = 0
    dim: int = 0
    axis: str | None = None


# A model's weight table: its checkpoint module names (``q_proj``, ``embed_tokens``...) and their pieces.
# A module missing from it is not split: every rank holds it whole, under its own name.
WeightTable = dict[str, Piece]


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor goes on a rank: parameter ``param``, piece ``part`` of it; the tensor's ``src``
    slice along ``dim`` lands at ``dst`` of the parameter."""

    param: str
    part: int
    dim: int
    src: slice
    dst: slice


def module_of(name: str, modules: Iterable[str]) -> str | None:
    """The one of ``modules`` that the tensor or parameter ``name`` (``layers.0.mlp.up_proj.weight``) belongs to;
    of several (``up_proj`` and ``experts.up_proj``), the longest."""
    return max((m for m in modules if f".{m}." in f".{name}"), key=len, default=None)


def fused_parts(table: WeightTable) -> dict[str, list[str]]:
    """Each parameter module of ``table`` and the checkpoint modules that fill it, in the order of its parts."""
    parts: dict[str, list[str]] = {}
    for module, piece in sorted(table.items(), key=lambda item: item[1].part):
        parts.setdefault(piece.param, []).append(module)
    return parts


def place(name: str, table: WeightTable, mc: ModelConfig, shard: Shard) -> Placement:
    """The placement of the Hugging Face-named tensor ``name`` on ``shard``'s rank."""
    name = name.removeprefix("model.")
    module = module_of(name, table)
    if module is None:
        return Placement(name, 0, 0, slice(None), slice(None))
    piece = table[module]
    param = f".{name}".replace(f".{module}.", f".{piece.param}.", 1)[1:]
    if piece.axis is None:
        return Placement(param, piece.part, piece.dim, slice(None), slice(None))
    spans = {p.part: shard.span(p.axis, mc.head_dim) for p in table.values() if p.param == piece.param}
    start = sum(s.stop - s.start for part, s in spans.items() if part < piece.part)
    src = spans[piece.part]
    return Placement(param, piece.part, piece.dim, src, slice(start, start + src.stop - src.start))
