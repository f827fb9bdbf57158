"""What the server's routes share, and the dependencies that reach it."""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field

from fastapi import Request

from tristream.engine import AsyncEngine
from tristream.openai_api import RequestDefaults
from tristream.server.http import ApiError
from tristream.server.metrics import ServerMetrics


@dataclass
class ServerState:
    """The engine and the names it is served under, the API key, the metrics, what requests that leave out a
    sampling field or a system prompt get, a cache of token texts, and whether and from where clients may
    load LoRA adapters.

    A request's ``model`` is ``model_name``, which runs the LoRA adapter ``default_lora``
    (None: the base model), or the name of a loaded adapter, which runs that adapter. With
    ``lora_runtime_loading``, clients load and unload adapters, from folders under ``lora_root``
    (symlinks resolved; None: any folder).
    """

    engine: AsyncEngine
    model_name: str
    default_lora: str | None
    api_key: str | None
    metrics: ServerMetrics
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    created: int = field(default_factory=lambda: int(time.time()))
    texts: dict[int, str] = field(default_factory=dict)
    lora_runtime_loading: bool = False
    lora_root: str | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.child_config.max_model_len

    def adapter_for(self, name: str | None) -> str | None:
        """The LoRA adapter that a request naming the model ``name`` runs through."""
        if name is None or name == self.model_name:
            return self.default_lora
        adapters = self.engine.lora_adapters
        if name not in adapters:
            names = ", ".join(f"`{n}`" for n in [self.model_name, *adapters])
            raise ApiError(
                404,
                f"The model `{name}` does not exist; this server serves {names}",
                param="model",
                code="model_not_found",
            )
        return name

    def check_runtime_lora(self) -> None:
        """Refuse with a 404 while loading and unloading adapters at run time is off."""
        if not self.lora_runtime_loading:
            raise ApiError(
                404,
                "Loading and unloading LoRA adapters at run time is off: start the server with "
                "--enable-lora-runtime-loading (or VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)",
                "not_found_error",
                code="lora_runtime_loading_disabled",
            )

    def adapter_dir(self, path: str) -> str:
        """The folder a client may load an adapter from: ``path`` itself, or with a ``lora_root`` its real path,
        refused with a 403 unless it lies under the root."""
        if self.lora_root is None:
            return path
        real = os.path.realpath(path)
        if os.path.commonpath([self.lora_root, real]) != self.lora_root:
            raise ApiError(
                403,
                f"lora_path {path} lies outside the server's --lora-root: adapters load only from folders under it",
                param="lora_path",
                code="lora_path_not_allowed",
            )
        return real


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server


def authorized(request: Request) -> None:
    """Refuse a request without the API key, when the server has one."""
    state = server_state(request)
    if state.api_key is None:
        return
    sent = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(sent, f"Bearer {state.api_key}".encode()):
        raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
