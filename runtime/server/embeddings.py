"""``POST /v1/embeddings``: OpenAI's embeddings body in, its list of embeddings out."""

from __future__ import annotations

import base64
import uuid
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from tristream.embeddings import embed_all
from tristream.pooling import PoolingParams
from tristream.server.http import ApiError, JSONResponse, bad_request, unless_gone
from tristream.server.state import authorized, server_state

router = APIRouter(dependencies=[Depends(authorized)])


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body: ``input`` is a string, a list of strings, a list of token ids or a list of
    lists of token ids. ``dimensions`` is refused (``PoolingParams``); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of ``input``: a string or a list of token ids."""
        given = self.input
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            return [given]
        if not given:
            raise ValueError("input is empty")
        return list(given)


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """``vector`` as JSON numbers, or as base64 of its little-endian float32 bytes."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    """The embedding of each input, all run at once; a bad input is a 400 that names it."""
    state = server_state(request)
    lora = state.adapter_for(body.model)
    try:
        params = PoolingParams(dimensions=body.dimensions)
        prompts = body.prompts()
    except ValueError as e:
        raise bad_request(e, body) from None
    work = embed_all(state.engine, prompts, params, f"embd-{uuid.uuid4().hex}", lora)
    try:
        outputs = await unless_gone(request, work)
    except ValueError as e:
        raise ApiError(400, str(e), param="input") from None
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(out.outputs.embedding, body.encoding_format)}
        for i, out in enumerate(outputs)
    ]
    tokens = sum(len(out.prompt_token_ids) for out in outputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model or state.model_name, "usage": usage})
