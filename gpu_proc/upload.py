"""Copies between host and device that never make the host wait for the device."""

from __future__ import annotations

import torch


def upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``. On CUDA the copy comes from pinned memory and is
    queued on the stream, so the host does not wait for the steps already queued there."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def download(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``, queued on the stream: valid once the device has passed this point."""
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def upload_named(device: torch.device, **lists: list[int]) -> dict[str, torch.Tensor]:
    """Every list as an int64 tensor on ``device``, by its name, in a single copy."""
    flat = upload([v for values in lists.values() for v in values], torch.int64, device)
    return dict(zip(lists, flat.split([len(values) for values in lists.values()])))
