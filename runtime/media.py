"""Images in requests, on the user's side: found in chat messages and prompt dicts, and fetched where they are URLs.

Decoding and preprocessing happen in the tokenizer process; here an image becomes what that process reads:
encoded bytes (from a ``data:`` or ``http(s)://`` URL), a local file's path, or a PIL image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

# Content part types that carry an image: OpenAI's and vLLM's image_url, and the image / image_pil of
# LMDeploy, ms-swift and vLLM's Python API.
IMAGE_PARTS = ("image_url", "image", "image_pil")
DEFAULT_MAX_IMAGE_BYTES = 20 << 20


@dataclass
class MediaPolicy:
    """Where images may come from. ``allowed_local_path``: local files only under this folder (None: any local
    file; ""; none at all). ``max_bytes`` caps an image's encoded size, ``timeout`` the seconds to fetch one."""

    allowed_local_path: str | None = None
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    timeout: float = 10.0


def split_images(messages: list) -> tuple[list, list]:
    """``messages`` with each image content part made ``{"type": "image"}``, and the images in order (as given:
    a URL or path string, bytes, or a PIL image). Messages without images come back as they are."""
    if not isinstance(messages, list):
        return messages, []
    out, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(_image_of(part) is not None for part in content):
            out.append(message)
            continue
        parts = []
        for part in content:
            image = _image_of(part)
            if image is None:
                parts.append(part)
            else:
                parts.append({"type": "image"})
                images.append(image)
        out.append({**message, "content": parts})
    return out, images


def _image_of(part: object) -> object | None:
    """The image a content part carries, or None for a part of another type."""
    if not isinstance(part, dict) or part.get("type") not in IMAGE_PARTS:
        return None
    kind = part["type"]
    value = part.get(kind, part.get("url") if kind == "image_url" else None)
    if kind == "image_url" and isinstance(value, dict):
        value = value.get("url")
    if value is None:
        raise ValueError(f"an {kind} content part needs its image under {kind!r}")
    return value


def prompt_images(media: dict, key: str = "multimodal_data") -> list:
    """The images of a prompt dict's ``multimodal_data`` (one image or a list), named ``key`` there; other media is
    a ValueError."""
    if not isinstance(media, dict):
        raise ValueError(f"{key} must be a dict of media lists, got {type(media).__name__}")
    other = sorted(kind for kind, items in media.items() if kind != "image" and items not in (None, []))
    if other:
        raise ValueError(f"{' and '.join(other)} input is not supported: send images")
    images = media.get("image")
    return [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]


async def load_images(images: list, policy: MediaPolicy) -> list:
    """Each image as the tokenizer process reads it; URLs are fetched in threads, together."""
    return await asyncio.gather(*(asyncio.to_thread(load_image, image, policy, i) for i, image in enumerate(images)))


def load_image(image: object, policy: MediaPolicy, index: int = 0) -> object:
    """Image ``index`` as encoded bytes, a local path, or the PIL image it is; a ValueError says why it cannot be."""
    if isinstance(image, (bytes, bytearray)):
        return _capped(bytes(image), policy, index)
    if not isinstance(image, (str, os.PathLike)):
        if type(image).__module__.startswith("PIL."):
            return image
        raise ValueError(f"image {index} must be a URL, a path, bytes or a PIL image, not {type(image).__name__}")
    image = os.fspath(image)
    if image.startswith("data:"):
        return _capped(_data_url(image, index), policy, index)
    if image.startswith(("http://", "https://")):
        return _fetch(image, policy, index)
    return _local(image.removeprefix("file://"), policy, index)


def _data_url(url: str, index: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"image {index}: a data URL must be data:<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {index}: the data URL's base64 payload is not valid") from None


def _fetch(url: str, policy: MediaPolicy, index: int) -> bytes:
    """The bytes at ``url``, read within ``policy``'s timeout and size cap."""
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout) as response:
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ValueError(f"image {index}: fetching {url} failed: {getattr(e, 'reason', e)}") from None
    return _capped(data, policy, index)


def _local(path: str, policy: MediaPolicy, index: int) -> str:
    """``path``, once it is a file that ``policy`` allows."""
    if policy.allowed_local_path == "":
        raise ValueError(f"image {index}: local files are not allowed here; send a data: or http(s):// URL")
    real = os.path.realpath(path)
    if policy.allowed_local_path is not None:
        root = os.path.realpath(policy.allowed_local_path)
        if os.path.commonpath([root, real]) != root:
            raise ValueError(f"image {index}: {path} lies outside the allowed local media path")
    if not os.path.isfile(real):
        raise ValueError(f"image {index}: no such file: {path}")
    if os.path.getsize(real) > policy.max_bytes:
        raise ValueError(f"image {index}: {path} is larger than {policy.max_bytes} bytes")
    return real


def _capped(data: bytes, policy: MediaPolicy, index: int) -> bytes:
    if len(data) > policy.max_bytes:
        raise ValueError(f"image {index} is larger than {policy.max_bytes} bytes")
    return data
