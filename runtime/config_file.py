"""YAML config files for the command line: the keys of its flags, plus LLaMA-Factory's names."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from tristream.speculative import parse_speculative

logger = logging.getLogger("tristream")

# LLaMA-Factory's inference keys, by the name of the tristream flag they set.
ALIASES = {
    "model_name_or_path": "model",
    "template": "chat_template",
    "max_new_tokens": "max_tokens",
    "default_system": "system",
    "lora_modules": "lora_adapters",
    "infer_dtype": "dtype",
    "vllm_maxlen": "max_model_len",
    "vllm_gpu_util": "gpu_memory_utilization",
    "vllm_enforce_eager": "enforce_eager",
    "vllm_max_lora_rank": "max_lora_rank",
    "speculative_config": "speculative",
}
# LLaMA-Factory's keys that only matter for training (a prediction YAML of ``llamafactory-cli train`` has them).
TRAINING = (
    "stage do_train do_eval deepspeed per_device_eval_batch_size per_device_train_batch_size predict_with_generate "
    "gradient_accumulation_steps overwrite_cache overwrite_output_dir preprocessing_num_workers dataloader_num_workers "
    "report_to ddp_timeout fp16 bf16 pure_bf16 flash_attn learning_rate num_train_epochs max_steps lr_scheduler_type "
    "warmup_ratio warmup_steps weight_decay logging_steps save_steps plot_loss val_size eval_strategy eval_steps "
    "dataset lora_rank lora_alpha lora_dropout lora_target"
).split()
IGNORED = {
    "infer_backend": "tristream is its own backend",
    "trust_remote_code": "tristream runs no remote code",
    "finetuning_type": "adapters come from adapter_name_or_path",
    "num_beams": "tristream has no beam search; requests sample as configured",
    "quantization_bit": "bitsandbytes quantization at load is not supported; use quantization: fp8 (GPU) or int8 (CPU)",
    **dict.fromkeys(TRAINING, "it only matters for training"),
}
# The keys of LLaMA-Factory's batch prediction: flags of ``tristream batch``, which ``do_predict`` selects.
PREDICT_KEYS = ("do_predict", "eval_dataset", "dataset_dir", "max_samples", "cutoff_len", "output_dir")
# LLaMA-Factory's keys that the model and the request imply: ``visual_inputs`` (whether the model takes images:
# its config says), ``do_predict`` (the command) and ``do_sample`` (read on its own).
IMPLIED = ("visual_inputs", "do_predict", "do_sample")
# LLaMA-Factory's templates of the vision-language models that tristream runs: the model's own chat template,
# which places the images, renders them.
MODEL_TEMPLATES = ("qwen2_vl", "llava")
# The media that ``limit_mm_per_prompt`` may limit.
MEDIA = ("image",)


def is_config_file(arg: str) -> bool:
    """Whether a command's first argument names a file of options rather than a model (a folder or a .gguf file)."""
    return arg.endswith((".yaml", ".yml", ".json", ".toml", ".ini", ".cfg"))


def parse_lora_modules(items: object) -> dict[str, str]:
    """LoRA adapter directories by name, from ``NAME=PATH`` strings or a mapping; ``ValueError`` says what is wrong."""
    if isinstance(items, dict):
        pairs = [(str(name), path, f"{name}: {path}") for name, path in items.items()]
    elif isinstance(items, list):
        pairs = [(*str(item).partition("=")[::2], item) for item in items]
    else:
        raise ValueError(f"LoRA modules must be NAME=PATH items or a mapping of names to paths, got {items!r}")
    out: dict[str, str] = {}
    for name, path, item in pairs:
        if not (name and isinstance(path, str) and path):
            raise ValueError(f"LoRA module {item!r} is not NAME=PATH")
        if name in out:
            raise ValueError(f"LoRA module name {name!r} is given twice")
        out[name] = path
    return out


def parse_mm_limits(value: object) -> dict[str, int]:
    """The most items of each medium one prompt may hold, from ``image=N`` (comma-separated for several), vLLM's
    JSON form ``{"image": N}``, or a mapping; ``ValueError`` says what is wrong."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{value!r} is not valid JSON: {e}") from None
    if isinstance(value, str):
        items = [item.strip().partition("=") for item in value.split(",")]
        if not all(name and sep for name, sep, _ in items):
            raise ValueError(f'{value!r} is not image=N or a JSON object like {{"image": 4}}')
        value = {name.strip(): count.strip() for name, _, count in items}
    if not isinstance(value, dict):
        raise ValueError(f'expected image=N or a mapping like {{"image": 4}}, got {value!r}')
    return {str(name): _count(name, count) for name, count in value.items()}


def _count(name: object, count: object) -> int:
    """The limit ``count`` of medium ``name``, a whole number >= 0."""
    if name not in MEDIA:
        raise ValueError(f"{name!r} cannot be limited: the media are {', '.join(MEDIA)}")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"the {name} limit must be a whole number >= 0, got {count!r}")
    return count


def _adapter(path: str, value: object) -> tuple[str, str]:
    """LLaMA-Factory's ``adapter_name_or_path``: the adapter's name (its directory's) and directory."""
    dirs = [d.strip() for d in value.split(",") if d.strip()] if isinstance(value, str) else []
    if not dirs:
        raise ValueError(f"config file {path}: adapter_name_or_path must be an adapter directory, got {value!r}")
    if len(dirs) > 1:
        raise ValueError(
            f"config file {path}: adapter_name_or_path lists {len(dirs)} adapters ({value}): tristream "
            "applies one adapter per request; merge them first or list them under lora_modules"
        )
    return os.path.basename(os.path.normpath(dirs[0])), dirs[0]


def load_config_file(path: str, known: set[str]) -> dict:
    """The flag defaults that a YAML file sets; ``ValueError`` names any key no flag has.

    ``adapter_name_or_path`` adds that adapter to ``lora_adapters`` and makes it the default ``lora``;
    ``do_sample: false`` is greedy (temperature 0), as in LLaMA-Factory. ``visual_inputs`` is implied by the
    model, and a vision-language ``template`` (``qwen2_vl``, ``llava``) is the model's own chat template.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    out = {}
    adapter = None
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in IGNORED:
            logger.warning("config file %s: %s is ignored (%s)", path, key, IGNORED[name])
            continue
        if name in PREDICT_KEYS and "eval_dataset" not in known:
            logger.warning("config file %s: %s is ignored (only `tristream batch` predicts over datasets)", path, key)
            continue
        if name in IMPLIED or (name == "template" and value in MODEL_TEMPLATES):
            continue
        if name == "adapter_name_or_path":
            adapter = _adapter(path, value) if value is not None else None
            continue
        name = ALIASES[name] if ALIASES.get(name) in known else name
        if name not in known:
            raise ValueError(f"config file {path}: unknown key {key!r}")
        parse = {
            "lora_adapters": parse_lora_modules,
            "limit_mm_per_prompt": parse_mm_limits,
            "speculative": parse_speculative,
        }.get(name)
        if parse is not None:
            try:
                value = parse(value)
            except ValueError as e:
                raise ValueError(f"config file {path}: {key}: {e}") from None
        out[name] = value
    if data.get("do_sample") is False:
        out["temperature"] = 0.0
    if adapter is not None:
        name, adapter_dir = adapter
        adapters = out.setdefault("lora_adapters", {})
        if adapters.get(name, adapter_dir) != adapter_dir:
            raise ValueError(
                f"config file {path}: adapter_name_or_path names {name!r}, like a lora_modules entry "
                "of another directory"
            )
        adapters[name] = adapter_dir
        out.setdefault("lora", name)
    return out
