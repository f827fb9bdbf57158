"""The OpenAI-compatible HTTP routes over one AsyncEngine."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.outputs import RequestOutput
from tristream.sampling_params import SamplingParams
from tristream.server.metrics import ServerMetrics
from tristream.server.responses import (
    SSE_DONE,
    Choice,
    JSONResponse,
    TextLogprobs,
    chat_logprobs,
    error_body,
    now,
    sse,
    usage,
)
from tristream.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)

logger = logging.getLogger("tristream.server")


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


def _bad_request(e: ValueError, body: BaseModel | None = None) -> ApiError:
    """A 400 for ``e``; a message that starts with a field of ``body`` names that field."""
    param = getattr(e, "param", None)
    first = str(e).split(" ", 1)[0]
    if param is None and body is not None and first in type(body).model_fields:
        param = first
    return ApiError(400, str(e), param=param)


def _sse_error(e: Exception) -> bytes:
    """An error event for a stream that has already started, so cannot change its status."""
    return sse(error_body(str(e), "service_unavailable" if isinstance(e, EngineDeadError) else "invalid_request_error"))


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, work: Awaitable):
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


class Streams:
    """Several engine streams as one: ``(stream number, output)`` pairs, in arrival order."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]) -> None:
        self.streams = streams
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    async def firsts(self) -> list[RequestOutput]:
        """Each stream's first output; an engine refusal (ValueError) of any stream is raised."""
        tasks = [asyncio.ensure_future(anext(s)) for s in self.streams]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()
            raise

    async def _pump(self, i: int) -> None:
        try:
            async for out in self.streams[i]:
                self.queue.put_nowait((i, out))
        except Exception as e:
            self.queue.put_nowait((i, e))
        self.queue.put_nowait((i, None))

    async def rest(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """What follows the first outputs, until every stream has ended."""
        self.tasks = [asyncio.ensure_future(self._pump(i)) for i in range(len(self.streams))]
        live = len(self.streams)
        while live:
            i, item = await self.queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def after(self, firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The first outputs, then the rest."""
        for item in enumerate(firsts):
            yield item
        async for item in self.rest():
            yield item

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in self.streams:
            await s.aclose()


class EventStream(StreamingResponse):
    """Server-sent events ending in ``[DONE]``, that stop, and close their source, the moment the client leaves.

    An engine error after the stream has started (so its status is sent) becomes an error event.
    """

    def __init__(self, content: AsyncIterator[bytes], source: Streams) -> None:
        super().__init__(self._events(content), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.content = content
        self.source = source

    @staticmethod
    async def _events(content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for event in content:
                yield event
        except (EngineDeadError, ValueError) as e:
            yield _sse_error(e)
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
            await self.content.aclose()
            await self.source.close()
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()


def build_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, default_lora: str | None = None
) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; ``api_key`` guards /v1 and the tokenizer routes.

    A request's ``model`` is ``model_name``, which runs the LoRA adapter ``default_lora``
    (None: the base model), or the name of a loaded adapter, which runs that adapter.
    """
    app = FastAPI(title="tristream", summary="OpenAI-compatible LLM server", default_response_class=JSONResponse)
    metrics = ServerMetrics(engine, model_name)
    page = resources.files("tristream.server").joinpath("static/index.html").read_text()
    max_model_len = engine.child_config.max_model_len
    created = now()
    texts: dict[int, str] = {}

    async def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(
                401, "Incorrect or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )

    def adapter_for(name: str | None) -> str | None:
        """The LoRA adapter that a request naming the model ``name`` runs through."""
        if name is None or name == model_name:
            return default_lora
        adapters = engine.lora_adapters
        if name not in adapters:
            names = ", ".join(f"`{n}`" for n in [model_name, *adapters])
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves {names}",
                param="model",
                code="model_not_found",
            )
        return name

    async def token_texts(ids: set[int]) -> dict[int, str]:
        missing = sorted(ids - texts.keys())
        if missing:
            texts.update(zip(missing, await engine.token_texts(missing)))
        return texts

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(str(e), e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if errors[0].get("type") == "json_invalid":
            return JSONResponse(error_body(f"The body is not valid JSON: {errors[0].get('msg')}"), status_code=400)
        loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        same = [err for err in errors if [str(x) for x in err.get("loc", ()) if x != "body"][:1] == loc[:1]]
        if len(same) > 1:
            # A union field: say what each accepted type objected to.
            reasons = "; ".join(f"{'.'.join(map(str, err['loc'][2:])) or param}: {err['msg']}" for err in same[:4])
            message = f"{param}: matches none of the accepted types ({reasons})"
        else:
            message = f"{'.'.join(loc) or 'body'}: {errors[0].get('msg')}"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, e: HTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(e.detail), type_, code=e.status_code),
            status_code=e.status_code,
            headers=getattr(e, "headers", None),
        )

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, e: EngineDeadError) -> JSONResponse:
        return JSONResponse(error_body(f"the engine is not running: {e}", "service_unavailable"), status_code=503)

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"), status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> Response:
        """200 while every engine process is alive, else 503."""
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> JSONResponse:
        """The served model, then each loaded LoRA adapter with its directory as ``root``."""
        card = {"object": "model", "created": created, "owned_by": "tristream", "max_model_len": max_model_len}
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": model_name, **card},
                    *(
                        {"id": name, **card, "root": path, "parent": model_name}
                        for name, path in engine.lora_adapters.items()
                    ),
                ],
            }
        )

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorized)])
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        if body.lora_name == model_name:
            raise ApiError(
                400, f"`{model_name}` is the served model's name; give the adapter another", param="lora_name"
            )
        try:
            await engine.load_lora(body.lora_name, body.lora_path)
        except ValueError as e:
            raise _bad_request(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized)])
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        if body.lora_name == default_lora:
            raise ApiError(
                400,
                f"LoRA adapter {default_lora!r} is the default of `{model_name}`, so stays loaded",
                param="lora_name",
            )
        try:
            await engine.unload_lora(body.lora_name)
        except ValueError as e:
            raise _bad_request(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        adapter_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages")
        try:
            if body.messages is not None:
                messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
                kwargs = {"add_generation_prompt": body.add_generation_prompt, **(body.chat_template_kwargs or {})}
                ids = await engine.tokenize(messages=messages, chat_template_kwargs=kwargs)
            else:
                ids = await engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as e:
            raise _bad_request(e) from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": max_model_len})

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        adapter_for(body.model)
        try:
            return JSONResponse({"prompt": await engine.detokenize(body.tokens)})
        except ValueError as e:
            raise _bad_request(e) from None

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        lora = adapter_for(body.model)
        try:
            params = body.sampling_params()
            messages = body.conversation()
        except ValueError as e:
            raise _bad_request(e, body) from None
        params.lora = lora
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = Streams([metrics.track(engine.chat(messages, params, rid, body.template_kwargs()))])
        try:
            first = (await _unless_gone(request, streams.firsts()))[0]
        except ValueError as e:
            raise _bad_request(e) from None
        echo = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
        k = params.logprobs
        if body.stream:
            return EventStream(_chat_events(body, params, rid, first, streams, echo, k), streams)
        choices = [Choice(i) for i in range(params.n)]
        outs = await _unless_gone(request, _collect(first, streams))
        steps: dict[int, list] = {i: [] for i in range(params.n)}
        for out in outs:
            for sample in out.outputs:
                choices[sample.index].fold(sample)
                steps[sample.index] += sample.logprobs or []
        if k is not None:
            await token_texts({t for s in steps.values() for step in s for t in step})
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": now(),
                "model": body.model or model_name,
                "choices": [
                    {
                        "index": c.index,
                        "message": {
                            "role": "assistant",
                            "content": echo + c.text,
                            **({"reasoning_content": c.reasoning} if c.reasoning is not None else {}),
                        },
                        "logprobs": {"content": chat_logprobs(steps[c.index], texts, k)} if k is not None else None,
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                "usage": usage(
                    first.metrics.num_prompt_tokens, sum(c.num_tokens for c in choices), first.num_cached_tokens
                ),
            }
        )

    async def _collect(first: RequestOutput, streams: Streams) -> list[RequestOutput]:
        try:
            return [out async for _, out in streams.after([first])]
        finally:
            await streams.close()

    async def _chat_events(
        body: ChatCompletionRequest,
        params: SamplingParams,
        rid: str,
        first: RequestOutput,
        streams: Streams,
        echo: str,
        k: int | None,
    ) -> AsyncIterator[bytes]:
        created_at = now()
        include_usage = body.include_usage
        model = body.model or model_name

        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> bytes:
            return sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created_at,
                    "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                    **({"usage": None} if include_usage else {}),
                }
            )

        num_tokens = 0
        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
            if echo:
                yield chunk(i, {"content": echo})
        async for _, out in streams.after([first]):
            for sample in out.outputs:
                num_tokens += len(sample.token_ids)
                delta = {}
                if sample.reasoning_content:
                    delta["reasoning_content"] = sample.reasoning_content
                if sample.text or not delta:
                    delta["content"] = sample.text
                logprobs = None
                if k is not None and sample.logprobs:
                    await token_texts({t for step in sample.logprobs for t in step})
                    logprobs = {"content": chat_logprobs(sample.logprobs, texts, k)}
                if delta.get("content") or delta.get("reasoning_content") or sample.finish_reason or logprobs:
                    yield chunk(sample.index, delta, sample.finish_reason, logprobs)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created_at,
                    "model": model,
                    "choices": [],
                    "usage": usage(first.metrics.num_prompt_tokens, num_tokens, first.num_cached_tokens),
                }
            )

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        lora = adapter_for(body.model)
        try:
            params = body.sampling_params()
            prompts = body.prompts()
        except ValueError as e:
            raise _bad_request(e, body) from None
        params.lora = lora
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = Streams([metrics.track(engine.generate(p, params, f"{rid}-{i}")) for i, p in enumerate(prompts)])
        try:
            firsts = await _unless_gone(request, streams.firsts())
        except ValueError as e:
            raise _bad_request(e) from None
        n, k = params.n, params.logprobs
        echoes = [""] * len(prompts)
        logprobs = [[TextLogprobs(k) for _ in range(n)] for _ in prompts] if k is not None else None
        if body.echo:
            for i, (p, first) in enumerate(zip(prompts, firsts)):
                echoes[i] = p if isinstance(p, str) else await engine.detokenize(first.prompt_token_ids)
                if logprobs is not None:
                    ids = first.prompt_token_ids
                    await token_texts(set(ids) | {t for step in first.prompt_logprobs[1:] for t in step})
                    for lp in logprobs[i]:
                        for tok, step in zip(ids, first.prompt_logprobs):
                            lp.add(tok, step, texts)
        prompt_tokens = sum(f.metrics.num_prompt_tokens for f in firsts)
        cached = sum(f.num_cached_tokens for f in firsts)

        async def add_logprobs(i: int, sample) -> dict | None:
            if logprobs is None:
                return None
            steps = sample.logprobs or []
            await token_texts({t for step in steps for t in step} | set(sample.token_ids))
            lp = logprobs[i][sample.index]
            for tok, step in zip(sample.token_ids, steps):
                lp.add(tok, step, texts)
            return lp

        if body.stream:
            return EventStream(
                _completion_events(body, rid, firsts, streams, n, echoes, add_logprobs, prompt_tokens, cached), streams
            )
        choices = [[Choice(i * n + j) for j in range(n)] for i in range(len(prompts))]

        async def gather() -> list[tuple[int, RequestOutput]]:
            try:
                return [item async for item in streams.after(firsts)]
            finally:
                await streams.close()

        for i, out in await _unless_gone(request, gather()):
            for sample in out.outputs:
                choices[i][sample.index].fold(sample)
                await add_logprobs(i, sample)
        flat = [(i, c) for i, row in enumerate(choices) for c in row]
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": now(),
                "model": body.model or model_name,
                "choices": [
                    {
                        "index": c.index,
                        "text": echoes[i] + c.text,
                        "logprobs": logprobs[i][c.index % n].body() if logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                    }
                    for i, c in flat
                ],
                "usage": usage(prompt_tokens, sum(c.num_tokens for _, c in flat), cached),
            }
        )

    async def _completion_events(
        body: CompletionRequest,
        rid: str,
        firsts: list[RequestOutput],
        streams: Streams,
        n: int,
        echoes: list[str],
        add_logprobs,
        prompt_tokens: int,
        cached: int,
    ) -> AsyncIterator[bytes]:
        created_at = now()
        include_usage = body.include_usage
        model = body.model or model_name

        def chunk(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> bytes:
            return sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created_at,
                    "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
                    **({"usage": None} if include_usage else {}),
                }
            )

        num_tokens = 0
        pending_echo = {(i, j): echoes[i] for i in range(len(firsts)) for j in range(n) if echoes[i]}
        async for i, out in streams.after(firsts):
            for sample in out.outputs:
                num_tokens += len(sample.token_ids)
                lp = await add_logprobs(i, sample)
                text = pending_echo.pop((i, sample.index), "") + sample.text
                if text or sample.finish_reason or (lp is not None and lp.tokens):
                    yield chunk(i * n + sample.index, text, sample.finish_reason, lp.take() if lp is not None else None)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created_at,
                    "model": model,
                    "choices": [],
                    "usage": usage(prompt_tokens, num_tokens, cached),
                }
            )

    return app
