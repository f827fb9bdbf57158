"""How much GPU memory is left for the KV cache, from a measured peak of a step."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from tristream.gpu_proc.kv_cache import KVCache
from tristream.gpu_proc.slot_state import SlotState
from tristream.protocol import BatchPlan, NewSequence
from tristream.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tristream.gpu_proc.runner import ModelRunner

logger = logging.getLogger("tristream")


def _peak_bytes(runner: ModelRunner) -> int:
    """The most memory a step takes beside its KV: a prefill of ``max_num_batched_tokens`` tokens and a
    top-k/top-p sampling of ``max_num_seqs`` rows, run once on a temporary pool and slot state."""
    config, mc, device = runner.config, runner.model_config, runner.device
    tokens = min(config.max_num_batched_tokens, config.max_model_len)
    pages = -(-tokens // config.page_size) + 1
    shape = (mc.num_layers, 2, pages, config.page_size, mc.num_kv_heads, mc.head_dim)
    runner.kv = KVCache(torch.zeros(shape, dtype=runner.kv_dtype, device=device))
    runner.slots = SlotState(1, pages, config.page_size, device, runner.model)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=0)
    new = [NewSequence(0, [0] * tokens, 0, 0, probe)]
    runner.step(
        BatchPlan(0, new=new, pages=[(0, list(range(1, pages)))], slots=[0], num_tokens=[tokens], sample=[True])
    )
    if runner.sampler is not None:
        rows = list(range(config.max_num_seqs))
        for slot in rows:
            runner.sampler.state.set(slot, probe, [0], 0)
        logits = torch.randn(len(rows), mc.vocab_size, device=device)
        runner.sampler(logits, torch.arange(len(rows), device=device), rows)
        del logits
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - runner.kv.pool.numel() * runner.kv.pool.element_size()
    runner.kv, runner.slots, runner.last_clock = None, None, None
    torch.cuda.empty_cache()
    return peak


@torch.inference_mode()
def cuda_kv_budget(runner: ModelRunner) -> int:
    """Bytes left for KV under ``gpu_memory_utilization`` after the weights and the peak of a step."""
    peak = _peak_bytes(runner)
    free, total = torch.cuda.mem_get_info(runner.device)
    outside_torch = total - free - torch.cuda.memory_reserved(runner.device)
    utilization = runner.config.gpu_memory_utilization
    budget = int(total * utilization) - peak - outside_torch
    logger.info(
        "GPU memory: %.2f GiB total, peak %.2f GiB with weights and activations, %.2f GiB used outside torch, "
        "%.2f GiB left for KV at gpu_memory_utilization=%.2f",
        *(x / 2**30 for x in (total, peak, outside_torch, max(budget, 0))),
        utilization,
    )
    return max(budget, 0)
