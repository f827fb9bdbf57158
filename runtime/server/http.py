"""HTTP plumbing of the server: OpenAI-format errors, JSON and server-sent event responses, disconnects."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

import orjson
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from tristream.engine import EngineDeadError

SSE_DONE = b"data: [DONE]\n\n"
_FIRST_WORD = re.compile(r"\w+")


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None
) -> dict:
    """An error in OpenAI's format."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(e: ValueError, body: BaseModel | None = None) -> ApiError:
    """A 400 for ``e``; a message that starts with a field of ``body`` names that field."""
    param = getattr(e, "param", None)
    first = _FIRST_WORD.match(str(e))
    if param is None and body is not None and first is not None and first.group() in type(body).model_fields:
        param = first.group()
    return ApiError(400, str(e), param=param)


class JSONResponse(Response):
    """A JSON response serialized by orjson."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def sse(payload: object) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable):
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events ending in ``[DONE]``, that stop, and close their source, the moment the client leaves.

    An engine error after the stream has started (so its status is sent) becomes an error event.
    """

    def __init__(self, chunks: AsyncGenerator[dict, None], source: AsyncGenerator[object, None]) -> None:
        super().__init__(self._events(chunks), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.chunks = chunks
        self.source = source

    @staticmethod
    async def _events(chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except (EngineDeadError, ValueError) as e:
            kind = "service_unavailable" if isinstance(e, EngineDeadError) else "invalid_request_error"
            yield sse(error_body(str(e), kind))
        yield SSE_DONE

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()
            await self.chunks.aclose()
            await self.source.aclose()
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()
