"""Image embeddings on the gpu_proc: a slot's images are encoded when a prefill chunk first reaches their tokens,
kept until its prompt is computed, and spliced in place of the image tokens' embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tristream.protocol import ImageInput


@dataclass
class SlotImages:
    """The images of a slot's prompt and the embeddings [tokens, hidden] of those encoded so far, by index.

    ``rope`` [3, prompt_len] holds the prompt's multimodal rotary positions (time, height, width) where the model
    has them; a later token at position p rotates as p + ``rope_delta``."""

    images: list[ImageInput]
    embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    rope: torch.Tensor | None = None
    rope_delta: int = 0

    @property
    def end(self) -> int:
        """The first position past every image token and every multimodal position."""
        last = self.images[-1]
        return max(last.offset + last.length, 0 if self.rope is None else self.rope.shape[1])

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(image, first token, last token + 1) of the parts of images that positions ``start:end`` hold."""
        out = []
        for k, image in enumerate(self.images):
            lo, hi = max(start, image.offset), min(end, image.offset + image.length)
            if lo < hi:
                out.append((k, lo - image.offset, hi - image.offset))
        return out


def read_pixels(image: ImageInput) -> torch.Tensor:
    """The pixel values that the tokenizer process wrote for ``image``."""
    return torch.from_numpy(np.fromfile(image.path, dtype=np.float32).reshape(image.shape))


def splice_embeddings(
    model: torch.nn.Module, wanted: list[tuple[SlotImages, int, int, int]], device: torch.device
) -> torch.Tensor:
    """The embeddings of the image tokens a step runs, in row order: ``wanted`` lists (slot's images, image, first
    token, last token + 1). Images not yet encoded are encoded first, all in one call of ``model.vision``;
    an image whose last tokens run is forgotten."""
    missing = {(id(slot), k): (slot, k) for slot, k, _, _ in wanted if k not in slot.embeds}
    if missing:
        todo = list(missing.values())
        embeds = model.vision([slot.images[k] for slot, k in todo], device)
        for (slot, k), e in zip(todo, embeds):
            slot.embeds[k] = e
    rows = torch.cat([slot.embeds[k][a:b] for slot, k, a, b in wanted])
    for slot, k, _, b in wanted:
        if b == slot.images[k].length:  # its last tokens: the prompt never needs it again
            slot.embeds.pop(k, None)
    return rows
