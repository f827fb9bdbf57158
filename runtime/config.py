"""Engine configuration, shared by every process; the command line makes one flag of each field."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from tristream.model_files import LOAD_FORMATS
from tristream.pooling import POOLING_METHODS
from tristream.processes import split_address
from tristream.quantization import KV_CACHE_DTYPES, METHODS
from tristream.speculative import SpeculativeConfig, parse_speculative
from tristream.tokenizer_proc.images import DEFAULT_IMAGE_LIMIT
from tristream.tokenizer_proc.templates import BUILTIN_TEMPLATES, resolve_chat_template
from tristream.tokenizer_proc.tool_calls import PARSERS

# Where the tensor-parallel ranks run: processes started here, or Ray actors.
EXECUTORS = ("mp", "ray")

# Every name selects the one <think>...</think> parser: tristream's, FastDeploy's and vLLM's names.
REASONING_PARSERS = ("think", "ernie-45-vl", "qwen3", "deepseek_r1")

# Engine arguments of vLLM, SGLang, LMDeploy and FastDeploy that tristream spells its own way, or does not need.
PEER_ARGS = {
    "tp": "use tensor_parallel_size",
    "tp_size": "use tensor_parallel_size",
    "dp": "use data_parallel_size",
    "dp_size": "use data_parallel_size",
    "session_len": "use max_model_len",
    "context_length": "use max_model_len",
    "max_seq_len": "use max_model_len",
    "block_size": "use page_size",
    "max_batch_size": "use max_num_seqs",
    "max_running_requests": "use max_num_seqs",
    "chunked_prefill_size": "use max_num_batched_tokens",
    "max_prefill_token_num": "use max_num_batched_tokens",
    "mem_fraction_static": "use gpu_memory_utilization",
    "cache_max_entry_count": "use gpu_memory_utilization",
    "model_path": "use model",
    "tokenizer_path": "use tokenizer",
    "disable_radix_cache": "use enable_prefix_caching=False",
    "enable_lora": "use lora_adapters, or max_loras to load adapters later",
    "adapters": "use lora_adapters",
    "trust_remote_code": "not needed: tristream runs its own code for every model it supports; leave it out",
    "swap_space": "not needed: a preempted request is recomputed from the prefix cache, never swapped; leave it out",
    "quant_policy": "use kv_cache_dtype='fp8' for an 8-bit KV cache",
}


def arg(default: Any, help: str, **flag: Any) -> Any:
    """An engine argument: its default, the help text of its flag, and what that flag and the checks need.

    ``choices`` are the values allowed; a number lies in [``low``, ``high``], or above ``low`` when ``above``;
    ``flag`` and ``aliases`` name the command-line flag.
    """
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class EngineConfig:
    """Engine arguments; each field's help says what it does. ``model=None`` is the bundled SmolLM2-135M-Instruct."""

    model: str | None = arg(None, "a Hugging Face directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    tokenizer: str | None = arg(None, "a tokenizer directory, if not the model's")
    chat_template: str | None = arg(
        None, f"a Jinja file or a built-in name ({', '.join(BUILTIN_TEMPLATES)}), instead of the tokenizer's template"
    )
    skip_tokenizer_init: bool = arg(False, "run without a tokenizer: prompts are token ids, outputs have no text")
    tokenizer_workers: int | None = arg(
        None,
        "tokenizer processes, each tokenizing and detokenizing its share of the requests (default: 1 on CPU; "
        "on CUDA, min(4, CPU cores // 4), at least 1)",
        low=1,
    )
    load_format: str = arg("auto", "dummy: random weights from config.json, for benchmarks", choices=LOAD_FORMATS)
    dtype: str = arg(
        "auto", "auto is float32 on CPU, bfloat16 on CUDA", choices=("auto", "float32", "float16", "bfloat16")
    )
    device: str = arg("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    quantization: str | None = arg(
        None,
        "the checkpoint's own method is found from its quantization_config; fp8 (GPU) or int8 (CPU, weight-only) "
        "quantize a 16/32-bit checkpoint at load",
        choices=METHODS,
    )
    kv_cache_dtype: str = arg(
        "auto",
        "fp8 (or fp8_e4m3): an e4m3 KV cache, twice the tokens; auto: the model's dtype",
        choices=KV_CACHE_DTYPES,
    )
    max_model_len: int | None = arg(None, "longest prompt plus output (default: the model's)", low=1)
    tensor_parallel_size: int = arg(1, "split the model over this many GPUs", low=1, aliases=("--tp",))
    data_parallel_size: int = arg(
        1,
        "engine replicas behind one router, each on its own tensor_parallel_size GPUs; a request goes to the "
        "replica holding the longest prefix of it, else to the least loaded",
        low=1,
        aliases=("--dp",),
    )
    distributed_executor: str = arg(
        "mp",
        "mp: the ranks are processes of this host (or of each host, with --nnodes); ray: the ranks run on Ray "
        "actors placed over the Ray cluster (ray start --head; one placement group per engine)",
        choices=EXECUTORS,
        aliases=("--distributed-executor-backend",),
    )
    nnodes: int = arg(1, "hosts that share the tensor-parallel ranks, tensor_parallel_size / nnodes each", low=1)
    node_rank: int | None = arg(
        None, "this host's index, 0 to nnodes - 1 (default: $NODE_RANK, else 0); host 0 serves, the others run "
        "their ranks", low=0,
    )  # fmt: skip
    dist_init_addr: str | None = arg(
        None, "HOST:PORT on host 0 where the hosts meet (default: $MASTER_ADDR:$MASTER_PORT)", metavar="HOST:PORT"
    )
    max_num_seqs: int = arg(64, "most requests running at once", low=1)
    max_num_batched_tokens: int = arg(2048, "token budget of one step; longer prompts prefill in chunks", low=1)
    page_size: int = arg(16, "tokens per KV page", low=1)
    gpu_memory_utilization: float = arg(0.9, "on CUDA, the fraction of GPU memory to use", low=0, above=True, high=1)
    kv_cache_bytes: int | None = arg(None, "the KV cache budget in bytes (default: 1 GiB on CPU)", low=1)
    kv_cache_tokens: int | None = arg(None, "the KV cache budget in tokens (overrides the memory fraction)", low=1)
    enable_prefix_caching: bool = arg(True, "share the KV pages of common prefixes between requests")
    schedule_policy: str = arg("fcfs", "lpm: admit the longest cached prefix first", choices=("fcfs", "lpm"))
    check_invariants: bool = arg(False, "verify the KV page accounting after every step (slow; for tests)")
    enforce_eager: bool = arg(False, "on CUDA, run without CUDA graphs")
    pipelined: bool = arg(True, "plan the next step while the GPU runs this one (off: one step at a time)")
    seed: int = arg(0, "seeds the per-request seeds of requests that give none")
    log_level: str = arg("INFO", "of the engine processes", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    startup_timeout: float = arg(600.0, "seconds to wait for the engine processes to start", low=0, above=True)
    reasoning_parser: str | None = arg(
        None,
        "think: split <think> reasoning into reasoning_content (ernie-45-vl, qwen3 and deepseek_r1 name it too)",
        choices=REASONING_PARSERS,
    )
    tool_call_parser: str | None = arg(
        None,
        "the format tool calls are parsed in: hermes (qwen25), llama3_json, mistral (default: the one the chat "
        "template shows, when it shows one)",
        choices=PARSERS,
    )
    enable_auto_tool_choice: bool = arg(True, "let the model choose whether to call tools (tool_choice 'auto')")
    lora_adapters: dict[str, str] | None = arg(
        None, "PEFT LoRA adapter directories to load at start-up, by name", flag="--lora-modules", metavar="NAME=PATH"
    )
    max_loras: int | None = arg(None, "LoRA adapters resident at once (default: as many as given)", low=0)
    max_lora_rank: int | None = arg(None, "the largest LoRA rank (default: 16 or the largest given)", low=1)
    download_dir: str | None = arg(
        None, "where Hub models are looked up and downloaded (default: the Hugging Face cache)"
    )
    limit_mm_per_prompt: dict[str, int] | None = arg(
        None,
        f"the most images one prompt may hold, as image=N (default: {DEFAULT_IMAGE_LIMIT}, on vision-language models)",
        metavar="image=N",
    )
    generation_config: str = arg(
        "auto",
        "auto: the sampling fields a request leaves out come from the model's generation_config.json; none: they do not",
        choices=("auto", "none"),
    )
    pooling: str | None = arg(
        None,
        "how embeddings pool the final hidden states: last (the last token's) or mean (default: the model's "
        "sentence-transformers config, else last)",
        choices=POOLING_METHODS,
    )
    normalize: bool | None = arg(
        None, "L2-normalize embeddings (default: as the model's sentence-transformers config says, else on)"
    )
    speculative: SpeculativeConfig | None = arg(
        None,
        'speculative decoding, as JSON: {"method": "ngram", "num_tokens": 4, "prompt_lookup_max": 4} or '
        '{"method": "draft" or "eagle3", "model": PATH, "num_tokens": 4}; also "disable_by_batch_size" (default 16)',
        flag="--speculative-config",
        metavar="JSON",
        parse=parse_speculative,
    )

    def __post_init__(self) -> None:
        self.speculative = parse_speculative(self.speculative)
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.default, f.metadata)
        if self.lora_adapters is not None and not (
            isinstance(self.lora_adapters, dict)
            and all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.lora_adapters.items())
        ):
            raise ValueError(f"lora_adapters must map adapter names to directories, got {self.lora_adapters!r}")
        limits = self.limit_mm_per_prompt
        if limits is not None and not (
            isinstance(limits, dict)
            and set(limits) <= {"image"}
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in limits.values())
        ):
            raise ValueError(f"limit_mm_per_prompt takes {{'image': N}} with N >= 0, got {limits!r}")
        if len(self.lora_adapters or {}) > self.lora_slots:
            raise ValueError(f"{len(self.lora_adapters)} lora_adapters do not fit in max_loras={self.max_loras}")
        self._check_layout()

    def _check_layout(self) -> None:
        """Replicas, hosts and executors that go together."""
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} does not divide over nnodes={self.nnodes}"
            )
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be below nnodes={self.nnodes}")
        if self.nnodes > 1 and self.distributed_executor == "ray":
            raise ValueError("the ray executor places ranks over the Ray cluster itself: leave nnodes at 1")
        if self.nnodes > 1 and self.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 runs on one host: leave nnodes at 1 (or use the ray executor)")
        if self.dist_init_addr is not None:
            split_address(self.dist_init_addr)

    def num_tokenizer_workers(self, on_cuda: bool) -> int:
        """``tokenizer_workers``, or its default for an engine on CUDA (``on_cuda``) or on CPU. On CPU the
        model's forward pass needs the cores that more workers would take."""
        if self.tokenizer_workers is not None:
            return self.tokenizer_workers
        return max(1, min(4, (os.cpu_count() or 1) // 4)) if on_cuda else 1

    @property
    def image_limit(self) -> int:
        """The most images one prompt may hold (``limit_mm_per_prompt``'s image entry)."""
        return (self.limit_mm_per_prompt or {}).get("image", DEFAULT_IMAGE_LIMIT)

    @property
    def lora_slots(self) -> int:
        """``max_loras``, or by default as many as ``lora_adapters`` names."""
        return self.max_loras if self.max_loras is not None else len(self.lora_adapters or {})


def _check(name: str, value: Any, default: Any, meta: dict) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is one of its ``choices`` or a number within its bounds."""
    if value is None and default is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    if "low" not in meta:
        return
    low, high, above = meta["low"], meta.get("high", math.inf), meta.get("above", False)
    kind = (int,) if isinstance(default, int) or default is None else (int, float)
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not (low < value if above else low <= value)
        or value > high
    ):
        bounds = f"{'>' if above else '>='} {low}" if high == math.inf else f"in {'(' if above else '['}{low}, {high}]"
        raise ValueError(f"{name} must be {'an int' if kind == (int,) else 'a number'} {bounds}, got {value!r}")


def engine_config(**kwargs: Any) -> EngineConfig:
    """An EngineConfig from keyword arguments. A peer engine's name for an argument is a TypeError that says
    what to use instead; any other unknown name is a TypeError that lists the valid ones. A chat template
    that is neither a file nor a built-in name is a ValueError here, before any process starts."""
    names = [f.name for f in fields(EngineConfig)]
    for peer, name in (("speculative_config", "speculative"), ("distributed_executor_backend", "distributed_executor")):
        if peer in kwargs:  # vLLM's names
            kwargs[name] = kwargs.pop(peer)
    for key in kwargs:
        if key in PEER_ARGS:
            raise TypeError(f"{key}: {PEER_ARGS[key]}")
        if key not in names:
            raise TypeError(f"unknown engine argument {key!r}; the engine arguments are: {', '.join(names)}")
    config = EngineConfig(**kwargs)
    if config.chat_template is not None:
        resolve_chat_template(config.chat_template)
    return config
