"""Loading weights into a DecoderLM: safetensors from a Hugging Face directory, or random.

Each rank takes its shard of every checkpoint tensor (``Shard``): rows of the column-parallel
q/k/v, gate/up, embedding and LM head, columns of the row-parallel o and down projections,
and the whole of every norm.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from tristream.gpu_proc.model import DecoderLM
from tristream.model_config import ModelConfig
from tristream.sharding import Shard


@dataclass
class Placement:
    """Where one checkpoint tensor goes: parameter ``param`` (piece ``part`` of a fused one), split along
    ``dim``; this rank's ``src`` slice of the tensor lands at ``dst`` of the parameter."""

    param: str
    part: int | None
    dim: int
    src: slice
    dst: slice


def _span(r: range, scale: int = 1) -> slice:
    return slice(r.start * scale, r.stop * scale)


def place(name: str, mc: ModelConfig, shard: Shard) -> Placement:
    """The placement of the Hugging Face-named tensor ``name`` on this rank; ``mc`` is the local config."""
    name = name.removeprefix("model.")
    d, q, kv, inter = mc.head_dim, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
    fused = {
        "q_proj": ("qkv_proj", 0, _span(shard.q_heads, d), slice(0, q)),
        "k_proj": ("qkv_proj", 1, _span(shard.kv_heads, d), slice(q, q + kv)),
        "v_proj": ("qkv_proj", 2, _span(shard.kv_heads, d), slice(q + kv, q + 2 * kv)),
        "gate_proj": ("gate_up_proj", 0, _span(shard.intermediate), slice(0, inter)),
        "up_proj": ("gate_up_proj", 1, _span(shard.intermediate), slice(inter, 2 * inter)),
    }
    for piece, (target, part, src, dst) in fused.items():
        if f".{piece}." in name:
            return Placement(name.replace(piece, target), part, 0, src, dst)
    if ".o_proj." in name:
        return Placement(name, None, 1, _span(shard.q_heads, d), slice(None))
    if ".down_proj." in name:
        return Placement(name, None, 1, _span(shard.intermediate), slice(None))
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return Placement(name, None, 0, _span(shard.vocab), slice(0, len(shard.vocab)))
    return Placement(name, None, 0, slice(None), slice(None))


def load_weights(model: DecoderLM, weights: Iterable[tuple[str, object]], source: str) -> None:
    """Copy this rank's part of each Hugging Face-named tensor into its (fused) parameter; every
    parameter must be set. A tensor may be a safetensors slice, read only where this rank needs it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    with torch.no_grad():
        for name in ("embed_tokens.weight", "lm_head.weight"):
            params[name][len(model.shard.vocab) :].zero_()
        for name, tensor in weights:
            p = place(name, model.config, model.shard)
            if p.param not in params:
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"unexpected weight {name!r} in {source}")
            index = (slice(None),) * p.dim + (p.src,)
            params[p.param][(slice(None),) * p.dim + (p.dst,)].copy_(tensor[index])
            loaded.add(p.param if p.part is None else f"{p.param}#{p.part}")
    expected = set()
    for name, _ in model.named_parameters():
        if "qkv_proj" in name:
            expected |= {f"{name}#{i}" for i in range(3)}
        elif "gate_up_proj" in name:
            expected |= {f"{name}#{i}" for i in range(2)}
        else:
            expected.add(name)
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - loaded
    if missing:
        raise ValueError(f"weights missing from {source}: {sorted(missing)[:8]}")


def load_safetensors(model: DecoderLM, model_dir: str) -> None:
    """Load ``model_dir/*.safetensors``, reading of each tensor only this rank's part."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")

    def tensors() -> Iterator[tuple[str, object]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)

    load_weights(model, tensors(), model_dir)


def dummy_weights(
    mc: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random Hugging Face-named weights of realistic scale for the whole model ``mc``, for benchmarks
    without a checkpoint. Every rank draws the same whole tensors and keeps its shard."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    q, kv = mc.num_heads * d, mc.num_kv_heads * d

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    yield "model.embed_tokens.weight", normal(mc.vocab_size, h)
    for i in range(mc.num_layers):
        pre = f"model.layers.{i}."
        yield pre + "input_layernorm.weight", ones(h)
        for piece, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield pre + f"self_attn.{piece}.weight", normal(rows, h)
            if mc.attention_bias:
                yield pre + f"self_attn.{piece}.bias", normal(rows)
        if mc.qk_norm:
            yield pre + "self_attn.q_norm.weight", ones(d)
            yield pre + "self_attn.k_norm.weight", ones(d)
        yield pre + "self_attn.o_proj.weight", normal(h, q)
        yield pre + "post_attention_layernorm.weight", ones(h)
        yield pre + "mlp.gate_proj.weight", normal(inter, h)
        yield pre + "mlp.up_proj.weight", normal(inter, h)
        yield pre + "mlp.down_proj.weight", normal(h, inter)
    yield "model.norm.weight", ones(h)
    if not mc.tie_word_embeddings:
        yield "lm_head.weight", normal(mc.vocab_size, h)
