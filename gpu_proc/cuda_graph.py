"""Captured CUDA graphs of the decode step, one per batch size, replayed with padding."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tristream.gpu_proc.forward_batch import ForwardBatch
from tristream.gpu_proc.kv_cache import KVCache
from tristream.kernels.attention import choose_num_splits

logger = logging.getLogger("tristream")


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16 up to ``max_batch``."""
    sizes = [s for s in (1, 2, 4, 8, 16) if s < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class CudaGraphRunner:
    """Decode steps replayed from graphs. Inputs live in static buffers filled in place.

    A batch of n sequences runs in the graph of the smallest captured size >= n;
    padded rows read and write only the reserved page 0, and use no LoRA adapter.
    With ``max_loras`` slots each size has a second graph, for batches where some sequence has an adapter.
    """

    def __init__(
        self, model: nn.Module, kv: KVCache, max_batch: int, max_pages: int, attention_span: int, max_loras: int
    ) -> None:
        device = kv.pool.device
        self.sizes = capture_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device)
        self.qo_indptr = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.logit_rows = torch.arange(max_batch, device=device)
        self.lora_rows = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.lora_indptr = torch.zeros(max_loras + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        pool = torch.cuda.graph_pool_handle()
        mc = model.config
        for size in reversed(self.sizes):
            for lora in (False, True) if max_loras else (False,):
                batch = ForwardBatch(
                    self.input_ids[:size],
                    self.positions[:size],
                    self.slot_mapping[:size],
                    self.qo_indptr[: size + 1],
                    self.seq_lens[:size],
                    self.block_table[:size],
                    self.logit_rows[:size],
                    1,
                    True,
                    choose_num_splits(size, mc.num_kv_heads, attention_span),
                    self.lora_rows[:size] if lora else None,
                    self.lora_indptr if lora else None,
                    size,
                )
                model(batch, kv)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = model(batch, kv)
                self.graphs[size, lora] = (graph, logits)
        torch.cuda.synchronize(device)
        logger.info(
            "captured %d decode graphs (batch %d..%d) in %.1f s using %.2f GiB",
            len(self.graphs),
            self.sizes[0],
            self.sizes[-1],
            time.perf_counter() - start,
            (free_before - torch.cuda.mem_get_info(device)[0]) / 2**30,
        )

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of a decode batch, from the graph of the next captured size."""
        n = batch.input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.block_table[:n].copy_(batch.block_table)
        if batch.lora_rows is not None:
            self.lora_rows[: batch.lora_rows.shape[0]].copy_(batch.lora_rows)
            self.lora_indptr.copy_(batch.lora_indptr)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].zero_()
            self.seq_lens[n:size].fill_(1)
            self.block_table[n:size].zero_()
        graph, logits = self.graphs[size, batch.lora_rows is not None]
        graph.replay()
        return logits[:n]
