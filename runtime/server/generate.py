"""The routes that generate: ``/v1/chat/completions``, ``/v1/completions`` and the deployment guide's ``POST /``."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from tristream.openai_api import ChatCompletionRequest, CompletionRequest, Items, Reply, SimpleChatRequest
from tristream.outputs import RequestOutput, fold
from tristream.server.http import ApiError, EventStream, JSONResponse, bad_request, unless_gone
from tristream.server.state import authorized, server_state
from tristream.streams import merge

router = APIRouter(dependencies=[Depends(authorized)])
# The format of the simple API's "time".
TIME = "%Y-%m-%d %H:%M:%S"


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _generate(body, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _generate(body, request)


async def _generate(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    """Run the body's engine requests, answering as a stream or as one body."""
    reply, merged, head = await _start(body, request)
    if body.stream:
        return EventStream(reply.chunks(_chain(head, merged)), merged)
    finals = await unless_gone(request, fold(_chain(head, merged), len(reply.calls)))
    return JSONResponse(await reply.whole(finals))


@router.post("/")
async def simple_chat(body: SimpleChatRequest, request: Request) -> JSONResponse:
    """The deployment guide's API: ``{"prompt", "history"}`` in, ``{"response", "history", "status", "time"}`` out."""
    state = server_state(request)
    chat = body.chat()
    if body.max_length is not None:
        try:
            prompt = await state.engine.tokenize(messages=chat.conversation(state.defaults.system))
        except ValueError as e:
            raise bad_request(e) from None
        if body.max_length <= len(prompt):
            message = f"max_length {body.max_length} leaves no room for an answer: the prompt has {len(prompt)} tokens"
            raise ApiError(400, message, param="max_length")
        chat = body.chat(body.max_length - len(prompt))
    _, merged, head = await _start(chat, request)
    [final] = await unless_gone(request, fold(_chain(head, merged), 1))
    response = final.outputs[0].text
    history = [*(body.history or []), [body.prompt, response]]
    return JSONResponse({"response": response, "history": history, "status": 200, "time": time.strftime(TIME)})


async def _start(body: ChatCompletionRequest | CompletionRequest, request: Request) -> tuple[Reply, Items, list]:
    """Start the body's engine requests; return once their first outputs show the engine took them all.

    An engine refusal is a 400; a client that leaves aborts the requests.
    """
    state = server_state(request)
    lora = state.adapter_for(body.model)
    try:
        calls = state.defaults.calls(body, state.engine)
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
    return reply, merged, head


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
