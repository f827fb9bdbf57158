"""The tensor-parallel group of the gpu_proc ranks, and the collectives that the model and the runner use.

NCCL on CUDA, gloo on CPU, through torch.distributed. With one rank every collective is a no-op.
On CUDA, all-reduces of up to ``small_bytes`` (decode steps) go through torch's symmetric memory
instead: each rank reads its peers' buffers over NVLink in one kernel, which takes a fraction of
NCCL's latency for small messages. It uses peer-to-peer loads only, never NVLink multicast.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from tristream.rendezvous import rank_store
from tristream.sharding import Shard

# NVLink multicast (NVLS) stays off in NCCL, torch's symmetric memory and NVSHMEM.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

logger = logging.getLogger("tristream")

# torch 2.13 renamed all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TensorParallel:
    """This rank's place in the group: all-reduce of row-parallel outputs, the gather of vocabulary-parallel
    logits, and the broadcast of the tokens that rank 0 samples."""

    def __init__(
        self,
        shard: Shard,
        device: torch.device,
        rendezvous: str | None,
        small_bytes: int = 0,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.rank, self.size, self.device = shard.rank, shard.size, device
        self.small: torch.Tensor | None = None
        if self.size == 1:
            return
        os.environ.update(NO_MULTICAST)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=rank_store(rendezvous, self.size),
            rank=self.rank,
            world_size=self.size,
            device_id=device if device.type == "cuda" else None,
        )
        self.group_name = dist.group.WORLD.group_name
        if device.type == "cuda" and small_bytes:
            self.small = self._symmetric_buffer(small_bytes // dtype.itemsize, dtype)

    def _symmetric_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
        from torch.distributed import _symmetric_memory as symm_mem

        try:
            buffer = symm_mem.empty(numel, dtype=dtype, device=self.device)
            symm_mem.rendezvous(buffer, self.group_name)
        except (RuntimeError, AttributeError) as e:
            logger.warning("symmetric memory is not available (%s): every all-reduce goes through NCCL", e)
            return None
        return buffer

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place: small ones through symmetric memory, the rest through NCCL."""
        small = self.small
        if small is not None and x.dtype == small.dtype and x.numel() <= small.numel() and x.is_contiguous():
            flat = small[: x.numel()]
            flat.copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(flat, "sum", self.group_name, out=x.view(-1))
            return x
        return self.nccl_all_reduce(x)

    def nccl_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place, always through NCCL (or gloo)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's columns of the logits side by side, cut to ``vocab_size``."""
        if self.size == 1:
            return logits
        rows, cols = logits.shape
        out = logits.new_empty(self.size * rows, cols)
        _all_gather(out, logits.contiguous())
        full = out.view(self.size, rows, cols).permute(1, 0, 2).reshape(rows, self.size * cols)
        return full if full.shape[1] == vocab_size else full[:, :vocab_size].contiguous()

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(t, 0)
        return t

    def min(self, value: int) -> int:
        """The least of every rank's ``value``."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
