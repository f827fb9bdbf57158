"""A prompt's images: decoded, preprocessed by the model's Hugging Face image processor, written where the
gpu_proc reads them, and given their tokens in place of their placeholders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import uuid

import numpy as np
from PIL import Image

from tristream.model_config import ModelConfig
from tristream.protocol import ImageInput

# The most pixels a decoded image may have (a 16k x 16k image): more is a ValueError, not a decompression bomb.
MAX_IMAGE_PIXELS = 1 << 28
DEFAULT_IMAGE_LIMIT = 4


def decode_image(source: object, index: int) -> Image.Image:
    """Image ``index`` of a request as RGB: encoded bytes, a local file's path, or a PIL image."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str):
            image = Image.open(source)
        else:
            raise ValueError(f"an image is encoded bytes, a file path or a PIL image, not {type(source).__name__}")
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"it is {image.width}x{image.height}, more than {MAX_IMAGE_PIXELS} pixels")
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {index} cannot be read: {e}") from None


def remove_files(images: list[ImageInput]) -> None:
    """Delete the pixel files of ``images`` (those still there)."""
    for image in images:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image.path)


class PromptImages:
    """Puts a prompt's images in place of its image placeholder tokens: each placeholder becomes as many image
    tokens as the model's vision encoder gives the image, and the image's pixel values go to a file in ``media_dir``.
    A model without a ``vision_config`` takes no images; a prompt takes at most ``limit`` of them."""

    def __init__(self, model_dir: str, mc: ModelConfig, media_dir: str, limit: int) -> None:
        self.architecture, self.media_dir, self.limit = mc.architecture, media_dir, limit
        vision = mc.hf.get("vision_config")
        self.processor = None
        if vision is not None:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(model_dir)
            self.token_id = mc.hf.get("image_token_id", mc.hf.get("image_token_index"))
            self.merge = vision.get("spatial_merge_size", 1)
            # LLaVA: a token per patch, and one more where it keeps the class token
            full = mc.hf.get("vision_feature_select_strategy") == "full"
            self.tokens_per_image = (vision.get("image_size", 0) // vision.get("patch_size", 1)) ** 2 + full

    def check(self, count: int) -> None:
        """A ValueError unless the model takes ``count`` images in one prompt."""
        if count and self.processor is None:
            raise ValueError(f"{self.architecture} is a text-only model: it takes no images")
        if count > self.limit:
            raise ValueError(f"{count} images, but limit_mm_per_prompt allows {self.limit} per prompt")

    def expand(self, ids: list[int], images: list) -> tuple[list[int], list[ImageInput]]:
        """``ids`` with each image placeholder made the tokens of its image (in order), and the images' inputs;
        ``check`` has passed them."""
        if self.processor is None:
            return ids, []
        places = [i for i, t in enumerate(ids) if t == self.token_id]
        if len(places) != len(images):
            raise ValueError(
                f"the prompt has {len(places)} image placeholders for {len(images)} images (a chat template must "
                "write one for each image part: use the model's own)"
            )
        out, inputs, start = [], [], 0
        try:
            for k, (place, source) in enumerate(zip(places, images)):
                out += ids[start:place]
                inputs.append(self._write(decode_image(source, k), len(out)))
                out += [self.token_id] * inputs[-1].length
                start = place + 1
        except BaseException:
            remove_files(inputs)
            raise
        return out + ids[start:], inputs

    def _write(self, image: Image.Image, offset: int) -> ImageInput:
        """The input of ``image``, whose tokens start at prompt position ``offset``; its pixels go to a file."""
        pixels, grid = self._pixels(image)
        n = math.prod(grid) // self.merge**2 if grid else self.tokens_per_image
        digest = hashlib.sha256(memoryview(pixels).cast("B"))
        digest.update(repr(grid).encode())
        path = os.path.join(self.media_dir, f"{uuid.uuid4().hex}.f32")
        pixels.tofile(path)
        return ImageInput(path, pixels.shape, grid, offset, n, int.from_bytes(digest.digest()[:8]) >> 2)

    def _pixels(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int] | None]:
        """The processor's float32 pixel values of ``image``, and its patch grid (t, h, w) if it gives one."""
        features = self.processor(images=[image], return_tensors="np")
        pixels = np.ascontiguousarray(features["pixel_values"], dtype=np.float32)
        grid = features.get("image_grid_thw")
        return pixels, None if grid is None else tuple(int(x) for x in grid[0])
