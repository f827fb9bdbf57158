"""What an embedding request returns, shaped as vLLM's (``output.outputs.embedding``), and embedding a batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from tristream.engine import AsyncEngine
    from tristream.pooling import PoolingParams


@dataclass
class EmbeddingOutput:
    """One prompt's embedding: its pooled final-norm hidden states."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The result of one embedding request: its embedding in ``outputs`` and its prompt's token ids."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


async def embed_all(
    engine: AsyncEngine,
    prompts: Sequence[str | list[int] | dict],
    pooling_params: PoolingParams | None = None,
    request_id: str | None = None,
    lora: str | None = None,
    progress: tqdm | None = None,
) -> list[EmbeddingRequestOutput]:
    """The embeddings of ``prompts`` in their order, all running at once (``AsyncEngine.embed``); request ``i``
    is ``{request_id}-{i}`` when ``request_id`` is given. A bad prompt is a ValueError that names its index, and
    the others are aborted; ``progress`` counts the finished ones."""

    async def one(i: int, prompt: str | list[int] | dict) -> EmbeddingRequestOutput:
        try:
            out = await engine.embed(prompt, pooling_params, f"{request_id}-{i}" if request_id else None, lora)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from e
        if progress is not None:
            progress.update(1)
        return out

    tasks = [asyncio.ensure_future(one(i, prompt)) for i, prompt in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
