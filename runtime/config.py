"""Engine configuration, shared by every process."""

from __future__ import annotations

from dataclasses import dataclass

from tristream.model_files import LOAD_FORMATS

DTYPES = ("auto", "float32", "float16", "bfloat16")
REASONING_PARSERS = (None, "think")


@dataclass
class EngineConfig:
    """Engine arguments. ``model=None`` is the bundled SmolLM2-135M-Instruct.

    KV cache budget: on CUDA a fraction of GPU memory (``gpu_memory_utilization``);
    on CPU ``kv_cache_tokens`` or ``kv_cache_bytes`` (default 1 GiB).
    ``schedule_policy`` is "fcfs" or "lpm" (longest cached prefix first).
    ``check_invariants`` verifies the page accounting after every step (slow; for tests).
    ``pipelined`` lets the scheduler plan step N+1 while the GPU runs step N (the
    default); ``pipelined=False`` is the synchronous loop, one step in flight.
    ``tensor_parallel_size`` splits the model over that many ranks, one gpu_proc and one GPU
    each (on CPU, processes that talk over gloo).
    ``enforce_eager`` turns CUDA graphs off. ``skip_tokenizer_init`` runs without a
    tokenizer: prompts are token ids and outputs carry ids but no text.
    ``chat_template`` overrides the tokenizer's template: a Jinja file, or one of
    the built-in names "chatml", "qwen", "llama3" and "default-generation" (the
    messages' contents joined, for models without a chat format).
    ``reasoning_parser="think"`` splits ``<think>...</think>`` out of the text into
    ``CompletionOutput.reasoning_content``.
    ``lora_adapters`` maps names to PEFT LoRA adapter directories loaded at start-up;
    ``AsyncEngine.load_lora`` adds more at run time. Up to ``max_loras`` adapters of
    rank up to ``max_lora_rank`` are resident at once (defaults: as many as
    ``lora_adapters`` names, and the largest of their ranks or 16); ``max_loras=0``
    with no adapters runs without LoRA.
    """

    model: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: int | None = None
    kv_cache_tokens: int | None = None
    enable_prefix_caching: bool = True
    schedule_policy: str = "fcfs"
    check_invariants: bool = False
    enforce_eager: bool = False
    pipelined: bool = True
    seed: int = 0
    log_level: str = "INFO"
    startup_timeout: float = 600.0
    reasoning_parser: str | None = None
    lora_adapters: dict[str, str] | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(
                f"schedule_policy must be 'fcfs' or 'lpm' (longest prefix match), got {self.schedule_policy!r}"
            )
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS}, got {self.reasoning_parser!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be an int >= 1, got {self.max_model_len!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.lora_adapters is not None:
            if not isinstance(self.lora_adapters, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.lora_adapters.items()
            ):
                raise ValueError(f"lora_adapters must map adapter names to directories, got {self.lora_adapters!r}")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "max_loras" else 1)):
                raise ValueError(f"{name} must be an int >= {0 if name == 'max_loras' else 1}, got {value!r}")
        if len(self.lora_adapters or {}) > self.lora_slots:
            raise ValueError(f"{len(self.lora_adapters)} lora_adapters do not fit in max_loras={self.max_loras}")
        for name in ("kv_cache_bytes", "kv_cache_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def lora_slots(self) -> int:
        """``max_loras``, or by default as many as ``lora_adapters`` names."""
        return self.max_loras if self.max_loras is not None else len(self.lora_adapters or {})
