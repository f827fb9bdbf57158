"""What the server's routes share, and the dependencies that reach it."""

from __future__ import annotations

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
    sampling field or a system prompt get, and a cache of token texts.

    A request's ``model`` is ``model_name``, which runs the LoRA adapter ``default_lora``
    (None: the base model), or the name of a loaded adapter, which runs that adapter.
    """

    engine: AsyncEngine
    model_name: str
    default_lora: str | None
    api_key: str | None
    metrics: ServerMetrics
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    created: int = field(default_factory=lambda: int(time.time()))
    texts: dict[int, str] = field(default_factory=dict)

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


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server


def authorized(request: Request) -> None:
    """Refuse a request without the API key, when the server has one."""
    state = server_state(request)
    if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
        raise ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
