"""Building a model and loading its weights: safetensors from a Hugging Face directory, or random ones.

Each rank takes its part of every checkpoint tensor, as the model's weight table places it
(``tristream.sharding.place``): rows of column-parallel projections, the embedding and the
LM head, columns of row-parallel ones, and the whole of everything else. A quantized
projection's tensors (scales, packed weights) are placed by where they lie against the
weight (``Linear.layout``), and each projection is finished once loaded (quantized at load,
or its scales combined).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from tristream.config import EngineConfig
from tristream.gpu_proc.layers.linear import Linear
from tristream.gpu_proc.layers.moe import ExpertWeights
from tristream.gpu_proc.layers.quantized import Layout
from tristream.gpu_proc.models import model_class
from tristream.gpu_proc.parallel import TensorParallel
from tristream.model_config import ModelConfig
from tristream.quantization import quant_spec
from tristream.sharding import Placement, Shard, fused_parts, module_of, place, shard_model

logger = logging.getLogger("tristream")
# The expert index in a checkpoint tensor's name (``layers.0.mlp.experts.7.up_proj.weight``).
EXPERT = re.compile(r"\.experts\.(\d+)\.")
# Checkpoint tensors the engine does not use.
UNUSED = ("rotary_emb",)
# The calibrated scales of an fp8 KV cache, by checkpoint name ending, and the attention attribute each sets.
KV_SCALES = {
    "self_attn.k_scale": "k_scale",
    "self_attn.v_scale": "v_scale",
    "k_proj.output_scale": "k_scale",
    "v_proj.output_scale": "v_scale",
}


def build_model(
    config: EngineConfig, whole: ModelConfig, shard: Shard, tp: TensorParallel, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """This rank's shard of the model ``whole``, with its weights (``config.load_format``) and rotary tables.

    Its decoder projections hold their weights as ``quant_spec`` resolves them; with dummy weights, a
    quantization method quantizes random 16-bit weights at load.
    """
    dummy = config.load_format == "dummy"
    quant = quant_spec(whole.quantization_config, config.quantization, dummy, whole.num_experts)
    if quant is not None and quant.method == "int8" and device.type != "cpu":
        raise ValueError("quantization='int8' is the CPU's weight-only path; on a GPU use quantization='fp8'")
    whole = dataclasses.replace(whole, quant=quant)
    with torch.device("meta"), _default_dtype(dtype):
        model = model_class(whole.architecture)(shard.local_config(whole), shard, tp)
    model = model.to_empty(device=device)
    if whole.tie_word_embeddings or whole.embedding_only:
        model.lm_head.weight = model.embed_tokens.weight
    weights = dummy_weights(whole, dtype, device, config.seed) if dummy else safetensors(config.model)
    if whole.embedding_only:  # it never samples: its LM head shares the embedding, and a checkpoint's is left out
        weights = ((name, tensor) for name, tensor in weights if not name.startswith("lm_head."))
    vision = getattr(model, "vision", None)
    if vision is not None:
        weights = vision.claim(weights)
    load_weights(model, weights, "dummy weights" if dummy else config.model)
    if vision is not None:
        vision.load(device, dtype, dummy)
    for module in model.modules():
        if hasattr(module, "loaded"):
            module.loaded()
    if quant is not None and quant.method == "int8":
        model.lm_head.use_int8()
    if quant is not None:
        scheme = next(m for m in model.modules() if isinstance(m, Linear)).scheme
        experts = "; the experts dequantized to 16-bit at load" if _stacked(model) else ""
        logger.info("quantized projections: %s; kernels: %s%s", quant.describe(), scheme.kernels(device), experts)
    model.build_rope(config.max_model_len, device)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters made without a dtype take ``dtype``; quantized ones name their own."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, object]], source: str) -> None:
    """Copy this rank's part of each Hugging Face-named tensor into (its part of) its parameter; every part
    must be set. A tensor may be a safetensors slice, read only where this rank needs it. Expert ``e``'s
    tensors (``mlp.experts.{e}.up_proj.weight``) go into entry ``e`` of the experts' stacked parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    loaded: set[tuple[str, int, int]] = set()
    with torch.no_grad():
        for name in ("embed_tokens.weight", "lm_head.weight"):
            params[name][len(model.shard.vocab) :].zero_()
        for name, tensor in model.checkpoint_tensors(weights):
            if _kv_scale(modules, name, tensor):
                continue
            name, expert = _expert(name)
            p = place(name, model.weights, model.config, model.shard)
            owner, _, suffix = p.param.rpartition(".")
            linear = modules.get(owner)
            layout = Layout() if tensor_dims(tensor) > 1 else Layout(inp=None)
            if isinstance(linear, (Linear, ExpertWeights)):
                converted = linear.checkpoint(suffix, tensor)
                if converted is None:
                    continue
                suffix, tensor = converted
                layout = linear.layout(suffix)
            param = params.get(f"{owner}.{suffix}")
            if param is None:
                if any(unused in name for unused in UNUSED):
                    continue
                raise ValueError(f"unexpected weight {name!r} in {source}")
            _copy(param if expert < 0 else param[expert], tensor, p, layout, name)
            loaded.add((f"{owner}.{suffix}", p.part, expert))
    missing = sorted(f"{name}#{i}" + (f"@{e}" if e >= 0 else "") for name, i, e in _expected(model) - loaded)
    if missing:
        raise ValueError(f"weights missing from {source}: {missing[:8]}")


def _expert(name: str) -> tuple[str, int]:
    """(``name`` without its expert index, the index), or (``name``, -1) for a tensor of no expert."""
    m = EXPERT.search(name)
    return (name, -1) if m is None else (name[: m.start()] + ".experts." + name[m.end() :], int(m.group(1)))


def _expected(model: nn.Module) -> set[tuple[str, int, int]]:
    """(parameter, part, expert) of every part that loading must set; expert -1 where it is no expert's."""
    fused, experts = fused_parts(model.weights), _stacked(model)
    expected = set()
    for name, param in model.named_parameters():
        module = module_of(name, fused)
        for e in range(param.shape[0]) if name in experts else [-1]:
            expected |= {(name, i, e) for i in range(len(fused[module]) if module else 1)}
    return expected


def _stacked(model: nn.Module) -> set[str]:
    """The names of the parameters that stack every expert's (weights and their scales)."""
    return {
        f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, ExpertWeights) for p, _ in m.named_parameters()
    }


def _kv_scale(modules: dict[str, nn.Module], name: str, tensor: object) -> bool:
    """Set a layer's fp8 KV-cache scale if ``name`` is one; whether it was."""
    ending = next((e for e in KV_SCALES if name.endswith(e)), None)
    if ending is None:
        return False
    attention = modules[name.removeprefix("model.").split(".self_attn.")[0] + ".self_attn"].attn
    setattr(attention, KV_SCALES[ending], float(whole_tensor(tensor).reshape(-1)[0]))
    return True


def tensor_dims(tensor: object) -> int:
    """The dims of a tensor or of a safetensors slice."""
    return tensor.dim() if isinstance(tensor, torch.Tensor) else len(tensor.get_shape())


def _copy(param: torch.Tensor, tensor: object, p: Placement, layout: Layout, name: str) -> None:
    """Copy this rank's part of checkpoint ``tensor`` into ``param``, whose dims lie against the weight as
    ``layout`` says: the placement's weight rows or columns, in the parameter's own units."""
    if layout.per_part:
        target, value = param[p.part], whole_tensor(tensor).reshape(-1)
    else:
        along = layout.out if p.dim == 0 else layout.inp
        if along is None:  # held whole on every rank
            target, value = param, whole_tensor(tensor)
        else:
            dim, unit = along
            src, dst = _units(p.src, unit, name), _units(p.dst, unit, name)
            target = param[(slice(None),) * dim + (dst,)]
            # One number (a per-tensor scale) fills its part's channels.
            value = tensor if tensor_dims(tensor) == 0 else tensor[(slice(None),) * dim + (src,)]
    if value.numel() != 1 and value.shape != target.shape:
        raise ValueError(f"{name} has shape {list(value.shape)} where {list(target.shape)} was expected")
    target.copy_(value.reshape(()) if value.numel() == 1 and target.dim() == 0 else value)


def whole_tensor(tensor: object) -> torch.Tensor:
    """A tensor, or the whole of a safetensors slice (of any dims, none included)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor[...]


def _units(span: slice, unit: int, name: str) -> slice:
    """``span`` of weight rows or columns in entries of ``unit`` of them; a ValueError where it splits one."""
    if span == slice(None) or unit == 1:
        return span
    if span.start % unit or span.stop % unit:
        raise ValueError(
            f"{name}: weight rows or columns {span.start}..{span.stop} split its quantization groups of {unit}; "
            "the model cannot be split that way (tensor_parallel_size) with this checkpoint"
        )
    return slice(span.start // unit, span.stop // unit)


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
    mc = dataclasses.replace(mc, quant=None)
    whole = shard_model(mc, 1, 0)
    with torch.device("meta"):
        model = model_class(mc.architecture)(mc, whole, TensorParallel(whole, device, None))
    fused, experts = fused_parts(model.weights), _stacked(model)
    for name, param in model.named_parameters():
        target = module_of(name, fused)
        shape = list(param.shape[1:] if name in experts else param.shape)
        for module in fused[target] if target else [None]:
            hf_name = name
            if module is not None:
                piece = model.weights[module]
                if piece.axis is not None:
                    span = whole.span(piece.axis, mc.head_dim)
                    shape[piece.dim] = span.stop - span.start
                hf_name = f".{name}".replace(f".{target}.", f".{module}.", 1)[1:]
            for e in range(param.shape[0]) if name in experts else [-1]:
                tensor = torch.empty(shape, dtype=dtype, device=device)
                tensor = tensor.fill_(1.0) if "norm" in name else tensor.normal_(0.0, 0.02, generator=gen)
                full = hf_name if e < 0 else hf_name.replace(".experts.", f".experts.{e}.", 1)
                yield full if full.startswith("lm_head.") else f"model.{full}", tensor
