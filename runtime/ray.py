"""tristream as a Ray Serve deployment: the OpenAI-compatible server behind Ray's HTTP proxy.

    from ray import serve
    from tristream.ray import deployment

    serve.run(deployment(model="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=2).bind())

Each replica starts one engine (its processes are children of the replica, its tensor-parallel ranks on the
GPUs Ray gives the replica) and serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
and the rest of ``tristream serve``'s routes. Ray Serve adds and removes replicas as the load changes.
Only Ray users import this module; ``import tristream`` never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

import tristream
from tristream.config import EngineConfig, engine_config
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.model_files import model_name
from tristream.server.app import build_app

__all__ = ["deployment"]

# Replicas when neither num_replicas nor autoscaling_config is given: scale out past half a replica's batch.
MIN_REPLICAS = 1
MAX_REPLICAS = 4


@dataclasses.dataclass(frozen=True)
class ReplicaSettings:
    """What each replica starts: the engine arguments (checked on the driver) and the server's settings."""

    engine_args: dict[str, Any]
    served_model_name: str
    api_key: str | None = None
    default_lora: str | None = None


@serve.ingress()
class OpenAIServer:
    """A Ray Serve replica: one engine and the OpenAI-compatible app over it.

    ``deployment()`` makes a subclass whose ``settings`` say what to start, so that ``.bind()`` takes no arguments.
    """

    settings: ReplicaSettings

    async def __init__(self) -> None:
        # A start-up failure (a missing model, too little memory, a dead rank) raises here with its cause and
        # fails the replica; start() has already stopped whatever processes it had started.
        _unshadow_kernels()
        self.engine = AsyncEngine(**self.settings.engine_args)
        await self.engine.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The OpenAI-compatible app over the started engine, built at replica start-up."""
        s = self.settings
        return build_app(self.engine, s.served_model_name, s.api_key, s.default_lora)

    async def check_health(self) -> None:
        """Raise once an engine process has stopped, so that Serve replaces the replica."""
        if self.engine.healthy:
            return
        reason = "one of its processes is gone"
        with contextlib.suppress(asyncio.TimeoutError):
            try:
                await self.engine.get_stats(timeout=1.0)
            except EngineDeadError as e:  # says which process died, and why
                reason = str(e)
        raise RuntimeError(f"the engine stopped: {reason}")

    async def __del__(self) -> None:
        """Shut the engine's processes down when Serve stops the replica."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.close()


def deployment(
    model: str | None = None,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    default_lora: str | None = None,
    num_replicas: int | str | None = None,
    autoscaling_config: dict | None = None,
    ray_actor_options: dict | None = None,
    name: str = "tristream",
    **engine_args: Any,
) -> serve.Deployment:
    """A Ray Serve deployment of tristream's OpenAI-compatible server; ``.bind()`` it and ``serve.run`` that.

    ``model`` and ``engine_args`` are ``AsyncEngine``'s (None: the bundled model), checked here: a bad one raises
    TypeError or ValueError at once. ``served_model_name`` (default: the model's short name), ``api_key`` and
    ``default_lora`` are ``tristream serve``'s. Without ``num_replicas`` or ``autoscaling_config`` Serve
    autoscales between 1 and 4 replicas, aiming at half of ``max_num_seqs`` requests each. ``ray_actor_options``
    go over the default of one CPU and, on CUDA (``device="cuda"``, or "auto" on a cluster with GPUs),
    ``tensor_parallel_size`` GPUs (times ``data_parallel_size``), on which the replica's child processes run
    the ranks; with ``distributed_executor="ray"`` the ranks' own actors hold the GPUs instead.
    """
    config = engine_config(model=model, **engine_args)
    served = served_model_name or model_name(config.model)
    _check_lora_names(config, served, default_lora)
    cuda = _wants_cuda(config.device)
    gpus = _replica_gpus(config) if cuda else 0
    actor_options = {"num_cpus": 1, "num_gpus": gpus, **(ray_actor_options or {})}
    if actor_options["num_gpus"] < gpus:
        raise ValueError(
            f"the engine's ranks need {gpus} GPUs in the replica, but ray_actor_options gives "
            f"num_gpus={actor_options['num_gpus']}"
        )
    # The replica runs on the device its resources were asked for, not on whatever its node shows.
    args = {**engine_args, "model": model, "device": "cuda" if cuda else "cpu"}
    settings = ReplicaSettings(args, served, api_key, default_lora)
    replica = type("TristreamReplica", (OpenAIServer,), {"settings": settings, "__doc__": OpenAIServer.__doc__})
    return serve.deployment(replica).options(
        name=name, ray_actor_options=actor_options, **_scaling(config, num_replicas, autoscaling_config)
    )


def _scaling(config: EngineConfig, num_replicas: int | str | None, autoscaling_config: dict | None) -> dict:
    """Serve's replica options for an engine that runs ``max_num_seqs`` requests at once (in each data-parallel
    replica): twice that in flight, and by default autoscaling that aims at half of it."""
    batch = config.max_num_seqs * config.data_parallel_size
    options: dict[str, Any] = {"max_ongoing_requests": 2 * batch}
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    if num_replicas is None and autoscaling_config is None:
        autoscaling_config = {
            "min_replicas": MIN_REPLICAS,
            "max_replicas": MAX_REPLICAS,
            "target_ongoing_requests": max(1, batch // 2),
        }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    return options


def _check_lora_names(config: EngineConfig, served: str, default_lora: str | None) -> None:
    """Raise a ValueError, as ``tristream serve`` does, for a ``default_lora`` that is not a start-up adapter or an
    adapter named like the served model."""
    adapters = config.lora_adapters or {}
    if default_lora is not None and default_lora not in adapters:
        raise ValueError(
            f"default_lora {default_lora!r} is not one of the engine's LoRA adapters ({', '.join(adapters) or 'none'})"
        )
    if served in adapters:
        raise ValueError(f"a LoRA adapter is named {served!r}, like the served model; rename one")


def _replica_gpus(config: EngineConfig) -> int:
    """The GPUs a replica on CUDA holds: one for each rank of each of its engine's data-parallel replicas, all
    its child processes; none when the ranks run on Ray actors of their own (``distributed_executor="ray"``)."""
    if config.nnodes > 1:
        raise ValueError("a replica's engine cannot drive ranks on other hosts: use distributed_executor='ray'")
    if config.distributed_executor == "ray":
        return 0
    return config.tensor_parallel_size * config.data_parallel_size


def _wants_cuda(device: str) -> bool:
    """Whether replicas of an engine on ``device`` run on CUDA: for "auto", whether the Ray cluster has GPUs
    (before ``ray.init``, whether this machine shows an NVIDIA GPU)."""
    if device != "auto":
        return device == "cuda"
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


def _unshadow_kernels() -> None:
    """Take a tristream checkout's root off ``sys.path``, as ``python -m tristream`` does.

    Ray puts the driver's working directory on its workers' ``sys.path``, and the engine's processes inherit it;
    in a checkout that is the repository root, whose kernels/ folder would hide the installed ``kernels`` package
    that transformers imports. An installed tristream's folder is named tristream, and nothing is taken off.
    """
    package = os.path.dirname(os.path.abspath(tristream.__file__))
    if os.path.basename(package) != "runtime":
        return
    root = os.path.dirname(package)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
