"""KV memory: one pool of pages per layer, sized from the engine's budget."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tristream.config import EngineConfig
from tristream.gpu_proc.upload import upload
from tristream.model_config import ModelConfig

logger = logging.getLogger("tristream")

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class KVCache:
    """``pool[layer, 0|1]`` is the K|V pool ``[num_pages, page_size, kv_heads, head_dim]``.

    Page 0 is reserved and zeroed: padded rows write there and the scheduler never hands it out.
    """

    pool: torch.Tensor

    @property
    def num_pages(self) -> int:
        return self.pool.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[i, 0], self.pool[i, 1]

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages, every layer's K and V, from each source to its destination."""
        src, dst = upload(copies, torch.int64, self.pool.device).T
        self.pool[:, :, dst] = self.pool[:, :, src]


def bytes_per_token(mc: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * dtype.itemsize


def kv_cache_pages(
    config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, budget_bytes: int | None, others_per_token: int = 0
) -> int:
    """Pages to allocate, the reserved page included: for ``kv_cache_tokens``, else ``kv_cache_bytes``,
    else ``budget_bytes`` (CUDA: measured free memory), else 1 GiB. Pools of as many pages that share the
    budget (a draft model's) take ``others_per_token`` bytes per token."""
    if config.kv_cache_tokens is not None:
        tokens = config.kv_cache_tokens
        num_pages = -(-tokens // config.page_size) + 1  # at least the tokens asked for
    else:
        budget = config.kv_cache_bytes if config.kv_cache_bytes is not None else budget_bytes
        tokens = (DEFAULT_CPU_KV_BYTES if budget is None else budget) // (bytes_per_token(mc, dtype) + others_per_token)
        num_pages = tokens // config.page_size + 1  # never more memory than the budget
    if num_pages < 2:
        raise ValueError(
            f"the KV budget holds {tokens} tokens, less than one page of {config.page_size}: "
            "raise kv_cache_tokens, kv_cache_bytes or gpu_memory_utilization"
        )
    return num_pages


def allocate_kv_cache(
    config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device, num_pages: int
) -> KVCache:
    """Allocate ``num_pages`` pages for every layer, with the reserved page 0 zeroed."""
    usable = (num_pages - 1) * config.page_size
    shape = (mc.num_layers, 2, num_pages, config.page_size, mc.num_kv_heads, mc.head_dim)
    pool = torch.empty(shape, dtype=dtype, device=device)
    pool[:, :, 0].zero_()
    logger.info(
        "KV cache: %d tokens in %d pages of %d, %s, %d bytes/token, %.2f GiB; %d concurrent requests of "
        "max_model_len=%d",
        usable,
        num_pages - 1,
        config.page_size,
        str(dtype).removeprefix("torch."),
        bytes_per_token(mc, dtype),
        pool.numel() * pool.element_size() / 2**30,
        usable // config.max_model_len,
        config.max_model_len,
    )
    if usable < config.max_model_len:
        logger.warning(
            "the KV cache holds %d tokens, fewer than max_model_len=%d: longer requests are cut or rejected",
            usable,
            config.max_model_len,
        )
    return KVCache(pool)
