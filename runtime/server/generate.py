"""The routes that generate: ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tristream.openai_api import ChatCompletionRequest, CompletionRequest, Items
from tristream.outputs import RequestOutput, fold
from tristream.server.http import EventStream, JSONResponse, bad_request, unless_gone
from tristream.server.state import authorized, server_state
from tristream.streams import merge

router = APIRouter(dependencies=[Depends(authorized)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _generate(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _generate(body, request)


async def _generate(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    """Run the body's engine requests; answer when their first outputs show the engine took them all.

    An engine refusal is a 400; a client that leaves aborts the requests.
    """
    state = server_state(request)
    lora = state.adapter_for(body.model)
    try:
        # The fields the body gives, over the model's sampling defaults, over the body's default max_tokens.
        omitted = {} if "max_tokens" in body.model_fields_set else {"max_tokens": body.max_tokens}
        calls = body.calls(state.engine.default_sampling_params(**omitted))
    except ValueError as e:
        raise bad_request(e, body) from None
    reply = body.reply(body, calls, uuid.uuid4().hex, body.model or state.model_name, state.engine, state.texts)
    for call in calls:
        call.params.lora = lora
    merged = merge([state.metrics.track(call.start(state.engine, f"{reply.id}-{i}")) for i, call in enumerate(calls)])
    try:
        head = await unless_gone(request, _heads(merged, len(calls)))
    except ValueError as e:
        raise bad_request(e, body) from None
    if body.stream:
        return EventStream(reply.chunks(_chain(head, merged)), merged)
    finals = await unless_gone(request, fold(_chain(head, merged), len(calls)))
    return JSONResponse(await reply.whole(finals))


async def _heads(merged: Items, count: int) -> list[tuple[int, RequestOutput]]:
    """The items of ``merged`` until each of ``count`` streams has given its first."""
    head, seen = [], set()
    async for i, out in merged:
        head.append((i, out))
        seen.add(i)
        if len(seen) == count:
            break
    return head


async def _chain(head: list[tuple[int, RequestOutput]], rest: Items) -> AsyncIterator[tuple[int, RequestOutput]]:
    for item in head:
        yield item
    async for item in rest:
        yield item
