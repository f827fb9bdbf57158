"""PEFT LoRA adapters on disk: ``adapter_config.json`` plus ``adapter_model.safetensors``."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from safetensors import safe_open

from tristream.model_config import ModelConfig

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "adapter_model.safetensors"
# max_lora_rank when neither given nor raised by a start-up adapter's rank.
DEFAULT_LORA_RANK = 16
_NAME = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    """A validated adapter: its rank, the scale of its product, and the modules it changes."""

    path: str
    rank: int
    scaling: float
    modules: tuple[str, ...]


def module_shape(mc: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) features of a projection of the whole model."""
    q, kv, h, inter = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.hidden_size, mc.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }[module]


def weight_name(layer: int, module: str, suffix: str = "weight") -> str:
    """The Hugging Face name of a projection's tensor, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{group}.{module}.{suffix}"


def read_adapter(path: str, mc: ModelConfig) -> LoraAdapter:
    """Check that the PEFT adapter in directory ``path`` fits the model ``mc``; ValueError says why not."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path} is not a PEFT adapter directory: it has no adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported, only LORA")
    for key, what in (
        ("use_dora", "DoRA"),
        ("modules_to_save", "modules_to_save"),
        ("rank_pattern", "rank_pattern"),
        ("alpha_pattern", "alpha_pattern"),
    ):
        if config.get(key):
            raise ValueError(f"{path}: {what} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: LoRA bias={config['bias']!r} is not supported, only 'none'")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ValueError(f"{path} has no {WEIGHTS_FILE} (adapters saved as .bin are not supported)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{path}: r must be an int >= 1, got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    seen: dict[tuple[int, str], set[str]] = {}
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            m = _NAME.match(name)
            if m is None or m.group(3) not in MODULES:
                raise ValueError(f"{path}: weight {name!r} is not a LoRA matrix of {', '.join(MODULES)}")
            layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
            if layer >= mc.num_layers:
                raise ValueError(f"{path}: {name} is for layer {layer}, but the model has {mc.num_layers}")
            n_in, n_out = module_shape(mc, module)
            expected = (rank, n_in) if ab == "A" else (n_out, rank)
            shape = tuple(f.get_slice(name).get_shape())
            if shape != expected:
                raise ValueError(f"{path}: {name} has shape {list(shape)}, but this model needs {list(expected)}")
            seen.setdefault((layer, module), set()).add(ab)
    unpaired = [f"layers.{layer}.{module}" for (layer, module), abs_ in seen.items() if abs_ != {"A", "B"}]
    if unpaired or not seen:
        raise ValueError(f"{path}: " + (f"{unpaired[0]} lacks its lora_A or lora_B" if unpaired else "no LoRA weights"))
    return LoraAdapter(path, rank, scaling, tuple(sorted({module for _, module in seen})))


def adapter_tensors(path: str) -> Iterator[tuple[int, str, str, object]]:
    """(layer, module, "A" or "B", safetensors slice) of each matrix of a validated adapter."""
    with safe_open(os.path.join(path, WEIGHTS_FILE), framework="pt") as f:
        for name in f.keys():
            m = _NAME.match(name)
            yield int(m.group(1)), m.group(3), m.group(4), f.get_slice(name)
