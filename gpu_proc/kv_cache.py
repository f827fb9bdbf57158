"""KV memory: one pool of pages per layer, sized from the engine's budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tristream.config import EngineConfig
from tristream.model_config import ModelConfig

logger = logging.getLogger("tristream")

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class KVCache:
    """``pool[layer, 0|1]`` is the K|V pool ``[num_pages, page_size, kv_heads, head_dim]``.

    Page 0 is reserved: padded rows write there and the scheduler never hands it out.
    """

    pool: torch.Tensor

    @property
    def num_pages(self) -> int:
        return self.pool.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i, 0], self.pool[i, 1]


def bytes_per_token(mc: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(dtype).bits // 8


def plan_kv_tokens(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """How many tokens of KV fit in the budget."""
    per_token = bytes_per_token(mc, dtype)
    if config.kv_cache_tokens is not None:
        return config.kv_cache_tokens
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes // per_token
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES // per_token
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    act_bytes = config.max_num_batched_tokens * (4 * mc.hidden_size + 2 * mc.intermediate_size + mc.vocab_size) * 4
    budget = int(total * config.gpu_memory_utilization) - used - act_bytes
    return max(0, budget // per_token)


def allocate_kv_cache(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device) -> KVCache:
    """Allocate the pools; fails if not even one full-length request fits."""
    tokens = plan_kv_tokens(config, mc, dtype, device)
    num_pages = tokens // config.page_size + 1
    usable = (num_pages - 1) * config.page_size
    if usable < config.max_model_len:
        raise ValueError(
            f"the KV cache holds {usable} tokens, fewer than max_model_len={config.max_model_len}: "
            "raise the KV budget (kv_cache_tokens, kv_cache_bytes or gpu_memory_utilization) or lower max_model_len"
        )
    shape = (mc.num_layers, 2, num_pages, config.page_size, mc.num_kv_heads, mc.head_dim)
    pool = torch.empty(shape, dtype=dtype, device=device)
    per_token = bytes_per_token(mc, dtype)
    logger.info(
        "KV cache: %d tokens in %d pages of %d, %d bytes/token, %.2f GiB; up to %d concurrent requests of max_model_len=%d",
        usable, num_pages - 1, config.page_size, per_token, pool.numel() * pool.element_size() / 2**30,
        usable // config.max_model_len, config.max_model_len,
    )
    return KVCache(pool)
