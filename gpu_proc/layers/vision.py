"""The vision encoder of a vision-language model: transformers' own vision tower and projector, run beside the
language model on every rank, in the engine's dtype."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from tristream.gpu_proc.images import read_pixels
from tristream.gpu_proc.weights import whole_tensor
from tristream.protocol import ImageInput


class VisionEncoder:
    """Encodes images into language-model embeddings with ``module``, which ``make`` builds (from transformers'
    vision classes) once its weights are in. ``prefixes`` maps the checkpoint name prefixes of its tensors to
    its own parameter names (the first that fits, so longer ones first); ``run(module, pixels, images)`` gives
    the embeddings [tokens, hidden] of each image from their pixel values, concatenated on dim 0.

    It is not a submodule of the language model, whose weight table and tensor-parallel placement it stays out of.
    """

    def __init__(
        self,
        make: Callable[[], nn.Module],
        prefixes: dict[str, str],
        run: Callable[[nn.Module, torch.Tensor, list[ImageInput]], list[torch.Tensor]],
    ) -> None:
        self.make, self.prefixes, self.run = make, prefixes, run
        self.tensors: dict[str, torch.Tensor] = {}
        self.module: nn.Module | None = None

    def claim(self, weights: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """The checkpoint's tensors but the encoder's, which it keeps to load."""
        for name, tensor in weights:
            own = _renamed(name, self.prefixes)
            if own is None:
                yield name, tensor
            else:
                self.tensors[own] = whole_tensor(tensor)

    def load(self, device: torch.device, dtype: torch.dtype, dummy: bool) -> None:
        """Build the encoder on ``device`` with the tensors claimed (random ones for dummy weights)."""
        with torch.device(device):
            module = self.make()
        module.to(dtype)
        if not dummy:
            missing, unexpected = module.load_state_dict(self.tensors, strict=False)
            if missing or unexpected:
                raise ValueError(f"vision encoder weights missing: {missing[:8]}; unexpected: {unexpected[:8]}")
        self.tensors = {}
        self.module = module.eval()

    @torch.inference_mode()
    def __call__(self, images: list[ImageInput], device: torch.device) -> list[torch.Tensor]:
        """The embeddings [tokens, hidden] of each image."""
        dtype = next(self.module.parameters()).dtype
        pixels = torch.cat([read_pixels(image) for image in images]).to(device, dtype, non_blocking=True)
        embeds = self.run(self.module, pixels, images)
        return list(embeds.split([image.length for image in images]))


def vision_config(hf: dict, key: str = "vision_config"):
    """transformers' config object of the model's ``vision_config`` (or the whole model's, for ``key`` None), with
    PyTorch's scaled-dot-product attention."""
    from transformers import AutoConfig

    raw = dict(hf)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config = config if key is None else getattr(config, key)
    config._attn_implementation = "sdpa"
    return config


def rename(weights: Iterable[tuple[str, object]], prefixes: dict[str, str]) -> Iterator[tuple[str, object]]:
    """The tensors with the first prefix of ``prefixes`` that a name starts with replaced by its value: the
    language model's tensors as a text model of the family names them."""
    for name, tensor in weights:
        yield _renamed(name, prefixes) or name, tensor


def _renamed(name: str, prefixes: dict[str, str]) -> str | None:
    """``name`` with the first of ``prefixes`` it starts with replaced by that prefix's value; None if none fits."""
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    return None if prefix is None else prefixes[prefix] + name[len(prefix) :]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float):
    """Attention of q, k, v [tokens, heads, head_dim] within each sequence ``cu_seqlens[i]:cu_seqlens[i + 1]``, as
    one scaled-dot-product call over the sequences padded to the longest (a window or an image of a vision
    tower), instead of a call per sequence."""
    lengths = cu_seqlens.diff()
    positions = torch.arange(int(lengths.max()), device=q.device)
    valid = positions < lengths[:, None]
    index = (cu_seqlens[:-1, None] + positions).clamp(max=q.shape[0] - 1)
    qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid]
