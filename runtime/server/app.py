"""The OpenAI-compatible FastAPI app over one AsyncEngine, and the web chat page's static files."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from tristream.engine import AsyncEngine, EngineDeadError
from tristream.openai_api import DEFAULT_MAX_REQUEST_BYTES, RequestDefaults, validation_message
from tristream.server import embeddings, generate, routes
from tristream.server.http import ApiError, BodyLimit, ClientGone, JSONResponse, error_body
from tristream.server.metrics import ServerMetrics
from tristream.server.state import ServerState

logger = logging.getLogger("tristream.server")


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    default_lora: str | None = None,
    defaults: RequestDefaults | None = None,
    enable_lora_runtime_loading: bool = False,
    lora_root: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name``; ``api_key`` guards /v1 and the tokenizer routes.

    A request's ``model`` is ``model_name``, which runs the LoRA adapter ``default_lora``
    (None: the base model), or the name of a loaded adapter, which runs that adapter. ``defaults`` fill in
    the sampling fields and the system prompt that a request leaves out. With ``enable_lora_runtime_loading``,
    clients load adapters from folders under ``lora_root`` (None: any folder, with a warning) and unload them.
    A request body of more than ``max_request_bytes`` is a 413.
    """
    app = FastAPI(title="tristream", summary="OpenAI-compatible LLM server", default_response_class=JSONResponse)
    metrics = ServerMetrics(engine, model_name)
    app.state.server = ServerState(
        engine,
        model_name,
        default_lora,
        api_key,
        metrics,
        defaults or RequestDefaults(),
        lora_runtime_loading=enable_lora_runtime_loading,
        lora_root=_lora_root(lora_root, enable_lora_runtime_loading),
    )
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
    for router in (routes.public, routes.guarded, generate.router, embeddings.router):
        app.include_router(router)
    # The web chat's script, styles and the libraries it uses, public like the page itself.
    app.mount("/static", StaticFiles(packages=[("tristream.server", "static")]), name="static")
    return app


def _lora_root(root: str | None, enabled: bool) -> str | None:
    """The real path of the folder that clients load adapters from; warns when loading is on with no folder."""
    if root is None:
        if enabled:
            logger.warning(
                "loading LoRA adapters at run time is on without --lora-root: "
                "clients may load adapters from any folder the server can read"
            )
        return None
    if not os.path.isdir(root):
        raise ValueError(f"--lora-root {root}: no such folder")
    return os.path.realpath(root)


async def _on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(str(e), e.type, e.param, e.code), status_code=e.status)


async def _on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    if errors[0].get("type") == "json_invalid":
        return JSONResponse(error_body(f"The body is not valid JSON: {errors[0].get('msg')}"), status_code=400)
    message, param = validation_message(errors)
    return JSONResponse(error_body(message, param=param), status_code=400)


async def _on_http(request: Request, e: HTTPException) -> JSONResponse:
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(str(e.detail), type_, code=e.status_code),
        status_code=e.status_code,
        headers=getattr(e, "headers", None),
    )


async def _on_dead(request: Request, e: EngineDeadError) -> JSONResponse:
    return JSONResponse(error_body(f"the engine is not running: {e}", "service_unavailable"), status_code=503)


async def _on_gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=499)


async def _on_bug(request: Request, e: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "internal_error"), status_code=500)


HANDLERS = {
    ApiError: _on_api_error,
    RequestValidationError: _on_invalid,
    HTTPException: _on_http,
    EngineDeadError: _on_dead,
    ClientGone: _on_gone,
    Exception: _on_bug,
}
