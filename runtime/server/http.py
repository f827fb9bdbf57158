"""HTTP plumbing of the server: OpenAI-format errors, JSON and server-sent event responses, disconnects."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

import orjson
from fastapi import Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class RequestTooLarge(HTTPException):
    """A request body over the server's limit: a 413, answered like the other HTTP errors."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than this server's limit of {max_bytes} bytes")


class BodyLimit:
    """ASGI middleware that refuses a request body of more than ``max_bytes`` with a 413 and never reads more
    of it than that: a Content-Length over the limit fails the first read of the body, before any of it is
    read; a body of unknown length (a chunked upload) fails the read that takes it past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = int(dict(scope["headers"]).get(b"content-length", 0))
        received = 0

        async def limited() -> Message:
            nonlocal received
            if not received and declared > self.max_bytes:
                raise RequestTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


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
