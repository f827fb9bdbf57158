"""Loading weights into a DecoderLM: safetensors from a Hugging Face directory, or random."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open

from tristream.gpu_proc.model import DecoderLM

# Hugging Face name piece -> (our fused parameter piece, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _target(model: DecoderLM, name: str) -> tuple[str, int | None]:
    name = name.removeprefix("model.")
    for piece, (fused, shard) in _FUSED.items():
        if f".{piece}." in name:
            return name.replace(piece, fused), shard
    return name, None


def _shard_range(model: DecoderLM, fused_name: str, shard: int) -> tuple[int, int]:
    mc = model.config
    if "qkv_proj" in fused_name:
        q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
    i = mc.intermediate_size
    return [(0, i), (i, 2 * i)][shard]


def load_weights(model: DecoderLM, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy Hugging Face-named tensors into their (fused) parameters; every parameter must be set."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, tensor in weights:
        target, shard = _target(model, name)
        if target not in params:
            if "rotary_emb" in name:
                continue
            raise ValueError(f"unexpected weight {name!r} in {source}")
        param = params[target]
        with torch.no_grad():
            if shard is None:
                param.copy_(tensor)
            else:
                lo, hi = _shard_range(model, target, shard)
                param[lo:hi].copy_(tensor)
        loaded.add(target if shard is None else f"{target}#{shard}")
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
    """Load every tensor of ``model_dir/*.safetensors``."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    load_weights(model, tensors(), model_dir)


def init_dummy(model: DecoderLM, seed: int) -> None:
    """Random weights of realistic scale, for benchmarks without a checkpoint."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
