"""Building a model and loading its weights: safetensors from a Hugging Face directory, or random ones.

Each rank takes its part of every checkpoint tensor, as the model's weight table places it
(``tristream.sharding.place``): rows of column-parallel projections, the embedding and the
LM head, columns of row-parallel ones, and the whole of everything else.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from tristream.config import EngineConfig
from tristream.gpu_proc.models import model_class
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.sharding import Shard, fused_parts, module_of, place, shard_model


def build_model(
    config: EngineConfig, whole: ModelConfig, shard: Shard, tp: TensorParallel, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """This rank's shard of the model ``whole``, with its weights (``config.load_format``) and rotary tables."""
    with torch.device("meta"):
        model = model_class(whole.architecture)(shard.local_config(whole), shard, tp)
    model = model.to_empty(device=device).to(dtype)
    if whole.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if config.load_format == "dummy":
        load_weights(model, dummy_weights(whole, dtype, device, config.seed), "dummy weights")
    else:
        load_weights(model, safetensors(config.model), config.model)
    model.build_rope(config.max_model_len, device)
    return model.eval()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, object]], source: str) -> None:
    """Copy this rank's part of each Hugging Face-named tensor into (its part of) its parameter; every part
    must be set. A tensor may be a safetensors slice, read only where this rank needs it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, int]] = set()
    with torch.no_grad():
        for name in ("embed_tokens.weight", "lm_head.weight"):
            params[name][len(model.shard.vocab) :].zero_()
        for name, tensor in weights:
            p = place(name, model.weights, model.config, model.shard)
            if p.param not in params:
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"unexpected weight {name!r} in {source}")
            src = tensor[(slice(None),) * p.dim + (p.src,)]
            params[p.param][(slice(None),) * p.dim + (p.dst,)].copy_(src)
            loaded.add((p.param, p.part))
    fused = fused_parts(model.weights)
    expected = set()
    for name, _ in model.named_parameters():
        module = module_of(name, fused)
        expected |= {(name, i) for i in range(len(fused[module]) if module else 1)}
    missing = sorted(f"{name}#{i}" for name, i in expected - loaded)
    if missing:
        raise ValueError(f"weights missing from {source}: {missing[:8]}")


def safetensors(model_dir: str) -> Iterator[tuple[str, object]]:
    """The tensors of ``model_dir/*.safetensors`` by name, as slices that read only what is indexed."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def dummy_weights(
    mc: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random Hugging Face-named weights of realistic scale for the whole model ``mc``, for benchmarks without a
    checkpoint: N(0, 0.02), and ones for norms. Every rank draws the same whole tensors and keeps its shard."""
    gen = torch.Generator(device=device).manual_seed(seed)
    whole = shard_model(mc, 1, 0)
    with torch.device("meta"):
        model = model_class(mc.architecture)(mc, whole, TensorParallel(whole, device, None))
    fused = fused_parts(model.weights)
    for name, param in model.named_parameters():
        target = module_of(name, fused)
        for module in fused[target] if target else [None]:
            shape, hf_name = list(param.shape), name
            if module is not None:
                piece = model.weights[module]
                span = whole.span(piece.axis, mc.head_dim)
                shape[piece.dim] = span.stop - span.start
                hf_name = f".{name}".replace(f".{target}.", f".{module}.", 1)[1:]
            tensor = torch.empty(shape, dtype=dtype, device=device)
            tensor = tensor.fill_(1.0) if "norm" in name else tensor.normal_(0.0, 0.02, generator=gen)
            yield hf_name if hf_name.startswith("lm_head.") else f"model.{hf_name}", tensor
