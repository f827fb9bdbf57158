"""How embeddings pool: the engine's default (its ``pooling`` and ``normalize`` arguments, else the model's
sentence-transformers config), and each request's ``PoolingParams`` over it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tristream.protocol import Pooling

POOLING_METHODS = ("last", "mean")
# sentence-transformers' Pooling modes, by the key that switches each on in 1_Pooling/config.json.
SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}


@dataclass(frozen=True)
class PoolingParams:
    """How one embedding request pools (vLLM's ``PoolingParams``): ``normalize`` (L2) left None takes the
    engine's. ``dimensions`` (shortened embeddings) is refused: the supported models give full-size vectors only."""

    normalize: bool | None = None
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")
        if self.dimensions is not None:
            raise ValueError(
                "dimensions is not supported: the model was not trained for shortened (Matryoshka) embeddings, "
                "so it gives its full hidden size only"
            )

    def over(self, default: Pooling) -> Pooling:
        """The engine's pooling ``default`` with what these params set."""
        return Pooling(default.method, default.normalize if self.normalize is None else self.normalize)


def sentence_transformers_pooling(model_dir: str) -> tuple[str | None, bool | None]:
    """The pooling method and whether to normalize, as the model's sentence-transformers ``modules.json`` (a
    ``Pooling`` module's config, a ``Normalize`` module) says; (None, None) without one. A pooling mode other
    than last-token or mean is a ValueError."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        modules = json.load(f)
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    method = None
    if "Pooling" in kinds:
        with open(os.path.join(model_dir, kinds["Pooling"].get("path", ""), "config.json")) as f:
            config = json.load(f)
        modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
        unsupported = [key for key in modes if key not in SENTENCE_TRANSFORMERS_MODES]
        if unsupported or len(modes) != 1:
            raise ValueError(
                f"{model_dir}: the sentence-transformers pooling {modes or 'of no mode'} is not supported; "
                "tristream pools the last token (pooling_mode_lasttoken) or the mean (pooling_mode_mean_tokens)"
            )
        method = SENTENCE_TRANSFORMERS_MODES[modes[0]]
    return method, "Normalize" in kinds


def engine_pooling(method: str | None, normalize: bool | None, model_dir: str) -> Pooling:
    """The pooling of embedding requests that set none: the engine arguments ``method`` and ``normalize`` where
    given, else the model's sentence-transformers config, else the last token's hidden state, L2-normalized."""
    model_method, model_normalize = sentence_transformers_pooling(model_dir)
    if normalize is None:
        normalize = True if model_normalize is None else model_normalize
    return Pooling(method or model_method or "last", normalize)
