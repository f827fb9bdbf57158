"""The routes around generation: the web chat page, health, metrics, models, LoRA adapters, the tokenizer."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from tristream.openai_api import DetokenizeRequest, LoadLoraAdapterRequest, TokenizeRequest, UnloadLoraAdapterRequest
from tristream.server.http import ApiError, JSONResponse, bad_request
from tristream.server.state import authorized, server_state

public = APIRouter()
guarded = APIRouter(dependencies=[Depends(authorized)])


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(resources.files("tristream.server").joinpath("static/index.html").read_text())


@public.get("/health")
async def health(request: Request) -> Response:
    """200 while every engine process is alive ("ok"), or while some data-parallel replica is down and the others
    serve ("degraded"); else 503."""
    engine = server_state(request).engine
    if engine.healthy:
        return JSONResponse({"status": "degraded" if engine.degraded else "ok"})
    return JSONResponse({"status": "unhealthy"}, status_code=503)


@public.get("/metrics")
async def prometheus(request: Request) -> Response:
    metrics = await server_state(request).metrics.render()
    return Response(metrics, media_type="text/plain; version=0.0.4; charset=utf-8")


@guarded.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    """The served model, then each loaded LoRA adapter with its directory as ``root``."""
    state = server_state(request)
    card = {"object": "model", "created": state.created, "owned_by": "tristream", "max_model_len": state.max_model_len}
    adapters = state.engine.lora_adapters.items()
    data = [{"id": state.model_name, **card}]
    data += [{"id": name, **card, "root": path, "parent": state.model_name} for name, path in adapters]
    return JSONResponse({"object": "list", "data": data})


@guarded.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Load an adapter from ``lora_path``: only with runtime loading on, and only from under the LoRA root."""
    state = server_state(request)
    state.check_runtime_lora()
    if body.lora_name == state.model_name:
        raise ApiError(
            400, f"`{state.model_name}` is the served model's name; give the adapter another", param="lora_name"
        )
    path = state.adapter_dir(body.lora_path)
    try:
        await state.engine.load_lora(body.lora_name, path)
    except ValueError as e:
        raise bad_request(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@guarded.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Unload an adapter: only with runtime loading on."""
    state = server_state(request)
    state.check_runtime_lora()
    if body.lora_name == state.default_lora:
        raise ApiError(
            400,
            f"LoRA adapter {state.default_lora!r} is the default of `{state.model_name}`, so stays loaded",
            param="lora_name",
        )
    try:
        await state.engine.unload_lora(body.lora_name)
    except ValueError as e:
        raise bad_request(e) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@guarded.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = server_state(request)
    state.adapter_for(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt or messages")
    try:
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
            kwargs = {"add_generation_prompt": body.add_generation_prompt, **(body.chat_template_kwargs or {})}
            ids = await state.engine.tokenize(messages=messages, chat_template_kwargs=kwargs)
        else:
            ids = await state.engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    except ValueError as e:
        raise bad_request(e) from None
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})


@guarded.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    state = server_state(request)
    state.adapter_for(body.model)
    try:
        return JSONResponse({"prompt": await state.engine.detokenize(body.tokens)})
    except ValueError as e:
        raise bad_request(e) from None
