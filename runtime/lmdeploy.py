"""LMDeploy's engine and chat template configs, with LMDeploy's field names, for ``pipeline(backend_config=...)``,
and its ``load_image`` and ``IMAGE_TOKEN`` (``lmdeploy.vl``) for the pipeline's image prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from PIL import Image

from tristream import media
from tristream.tokenizer_proc.images import decode_image

# LMDeploy's mark of where an image goes in the text of a ``(text, images)`` prompt.
IMAGE_TOKEN = "<IMAGE_TOKEN>"

# Each LMDeploy field with a tristream equivalent, and the engine argument it sets.
ENGINE_ARGS = {
    "dtype": "dtype",
    "tp": "tensor_parallel_size",
    "session_len": "max_model_len",
    "max_batch_size": "max_num_seqs",
    "cache_max_entry_count": "gpu_memory_utilization",
    "cache_block_seq_len": "page_size",
    "block_size": "page_size",
    "enable_prefix_caching": "enable_prefix_caching",
    "max_prefill_token_num": "max_num_batched_tokens",
    "adapters": "lora_adapters",
    "eager_mode": "enforce_eager",
    "model_name": "chat_template",
    "download_dir": "download_dir",
}


@dataclass
class BackendConfig:
    """The fields LMDeploy's two engine configs share, with LMDeploy's defaults.

    ``engine_args()`` maps them onto tristream's engine arguments; a field left None
    keeps tristream's default. ``cache_max_entry_count`` becomes ``gpu_memory_utilization``,
    a share of the whole GPU memory rather than of what the weights leave. ``quant_policy=8``
    is an 8-bit (fp8 e4m3) KV cache, and ``model_format`` a quantized checkpoint's method
    (``awq``, ``gptq``, ``fp8``; ``hf`` is unquantized).
    """

    dtype: str = "auto"
    model_format: str | None = None
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    enable_prefix_caching: bool = False
    quant_policy: int = 0
    download_dir: str | None = None
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.quant_policy not in (0, 8):
            raise ValueError(f"quant_policy={self.quant_policy!r}: only 8 (an 8-bit KV cache) is supported")
        if self.model_format not in (None, "hf", "awq", "gptq", "fp8"):
            raise ValueError(f"model_format={self.model_format!r}: supported are hf, awq, gptq and fp8")

    def engine_args(self) -> dict[str, object]:
        """The tristream engine arguments that this config sets."""
        args = {
            ENGINE_ARGS[f.name]: getattr(self, f.name)
            for f in fields(self)
            if f.name in ENGINE_ARGS and getattr(self, f.name) is not None
        }
        if self.quant_policy == 8:
            args["kv_cache_dtype"] = "fp8"
        if self.model_format not in (None, "hf"):
            args["quantization"] = self.model_format
        return args


@dataclass
class TurbomindEngineConfig(BackendConfig):
    """LMDeploy's TurboMind engine config: ``cache_block_seq_len`` is the KV page size."""

    cache_block_seq_len: int = 64
    max_prefill_token_num: int = 8192


@dataclass
class PytorchEngineConfig(BackendConfig):
    """LMDeploy's PyTorch engine config: ``adapters`` are LoRA adapters by name; preempted requests are
    recomputed (``eviction_type="recompute"``), never copied out."""

    block_size: int = 64
    eviction_type: str = "recompute"
    adapters: dict[str, str] | None = None
    max_prefill_token_num: int = 4096
    eager_mode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eviction_type != "recompute":
            raise ValueError(f"eviction_type={self.eviction_type!r}: preempted requests are always recomputed")


@dataclass
class ChatTemplateConfig:
    """LMDeploy's chat template config: ``model_name`` names a tristream template or a Jinja file.

    The fields that spell a template out piece by piece are refused: write it as a Jinja file instead.
    """

    model_name: str
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    separator: str | None = None
    capability: str | None = None
    stop_words: list[str] | None = None

    def __post_init__(self) -> None:
        pieces = [f.name for f in fields(self)[1:] if getattr(self, f.name) is not None]
        if pieces:
            raise ValueError(f"ChatTemplateConfig: {', '.join(pieces)} are not supported; give a Jinja file instead")


def load_image(image_url: str | os.PathLike | Image.Image) -> Image.Image:
    """LMDeploy's ``load_image``: the RGB image at an http(s) or ``data:`` URL or a local path, or of a PIL image."""
    return decode_image(media.load_image(image_url, media.MediaPolicy()), 0)
