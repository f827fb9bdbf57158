"""Data parallelism: ``AsyncEngine(data_parallel_size=N)`` runs N engine replicas, each with its own tokenizer
workers, scheduler and ranks on its own GPUs, behind the one ``AsyncEngine`` API (and so behind ``LLM`` and the
server). A ``PrefixRouter`` sends each request to the replica that most likely holds its prefix in cache, or to
the least loaded one. A replica that dies fails only its own requests and is started again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from tristream.config import EngineConfig
from tristream.engine import AsyncEngine, EngineDeadError
from tristream.protocol import OutputDelta, SchedulerStats
from tristream.router import PrefixRouter, prompt_key
from tristream.sampling_params import SamplingParams

logger = logging.getLogger("tristream")

# Seconds between two attempts to start a dead replica again.
RESTART_BACKOFF_S = 30.0


class DataParallelEngine(AsyncEngine):
    """``data_parallel_size`` replicas of one engine behind the ``AsyncEngine`` API. ``AsyncEngine(...)`` makes
    one when ``data_parallel_size > 1``."""

    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        super().__init__(model, **engine_args)
        n = self.config.data_parallel_size
        self.replicas = [self._replica(index) for index in range(n)]
        self.router = PrefixRouter(n)
        self._loads = [0] * n
        self._routes: dict[str, int] = {}
        self._restart_at = [0.0] * n
        self._monitor: asyncio.Task | None = None

    def _replica(self, index: int, lora_adapters: dict[str, str] | None = None) -> AsyncEngine:
        """Replica ``index``: the engine on CUDA devices ``index * tp`` onwards, with ``lora_adapters`` if given."""
        config = self.config
        if lora_adapters:
            config = dataclasses.replace(config, lora_adapters=lora_adapters)
        replica = object.__new__(AsyncEngine)
        replica.__init__(**{f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)})
        replica._first_device = index * config.tensor_parallel_size
        replica.media = self.media
        return replica

    @property
    def is_running(self) -> bool:
        return (
            self._started is not None
            and self._started.done()
            and not self._closing
            and any(replica.is_running for replica in self.replicas)
        )

    @property
    def healthy(self) -> bool:
        """True while the engine runs and at least one replica is alive and whole."""
        return self.is_running and any(replica.healthy for replica in self.replicas)

    @property
    def degraded(self) -> bool:
        """True while a replica is down (until it has been started again)."""
        return not all(replica.healthy for replica in self.replicas)

    @property
    def device(self) -> str:
        return self.replicas[0].device

    @property
    def has_chat_template(self) -> bool:
        return self.replicas[0].has_chat_template

    @property
    def child_pids(self) -> dict[str, int]:
        """The pid of each engine process, by replica and name (``replica1/scheduler``)."""
        return {f"replica{i}/{name}": pid for i, r in enumerate(self.replicas) for name, pid in r.child_pids.items()}

    async def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every replica (``start`` stops them all if one cannot start, and raises its error)."""
        await asyncio.gather(*(replica.start() for replica in self.replicas))
        first = self.replicas[0]
        self.model_config, self.pooling, self.child_config = first.model_config, first.pooling, first.child_config
        self.generation_defaults = first.generation_defaults
        self._monitor = loop.create_task(self._watch())
        self._started.set_result(None)

    async def _stop_processes(self) -> None:
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
        await asyncio.gather(*(replica.close() for replica in self.replicas), return_exceptions=True)

    async def _watch(self) -> None:
        """Start a replica that died again, at most once every ``RESTART_BACKOFF_S`` seconds."""
        while True:
            await asyncio.sleep(0.5)
            for index, replica in enumerate(self.replicas):
                if replica._dead and time.monotonic() >= self._restart_at[index]:
                    self._restart_at[index] = time.monotonic() + RESTART_BACKOFF_S
                    await self._restart(index, replica._dead)

    async def _restart(self, index: int, reason: str) -> None:
        logger.error("engine replica %d died (%s); starting it again", index, reason)
        self.router.forget(index)
        await self.replicas[index].close()
        live = [r.lora_adapters for r in self.replicas if r.is_running]
        replica = self._replica(index, live[0] if live else self.config.lora_adapters)
        try:
            await replica.start()
        except Exception as e:  # start-up failures are reported, and tried again later
            logger.error("engine replica %d did not start again: %s", index, e)
            return
        self.replicas[index] = replica
        logger.info("engine replica %d is serving again", index)

    def _live(self) -> AsyncEngine:
        """A replica that runs; EngineDeadError when none does."""
        for replica in self.replicas:
            if replica.is_running:
                return replica
        reasons = "; ".join(f"replica {i}: {r._dead or 'closed'}" for i, r in enumerate(self.replicas))
        raise EngineDeadError(f"every engine replica is down ({reasons})")

    async def _deltas(
        self, fields: dict, params: SamplingParams, request_id: str, arrival_time: float
    ) -> AsyncIterator[OutputDelta]:
        """The replica the router picks runs the request (all its samples)."""
        if self._closing:
            raise EngineDeadError("the engine was closed")
        if request_id in self._routes:
            raise ValueError(f"request_id {request_id!r} is already running")
        self._live()
        alive = [replica.is_running for replica in self.replicas]
        index = self.router.choose(prompt_key(fields), self._loads, alive)
        self._loads[index] += 1
        self._routes[request_id] = index
        try:
            deltas = self.replicas[index]._deltas(fields, params, request_id, arrival_time)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta
        finally:
            self._loads[index] -= 1
            del self._routes[request_id]

    async def abort(self, request_id: str) -> None:
        index = self._routes.get(request_id)
        if index is not None:
            await self.replicas[index].abort(request_id)

    async def replica_stats(self, timeout: float = 10.0) -> list[SchedulerStats | None]:
        """Each replica's stats (``get_stats``), None for a replica that is down."""

        async def stats(replica: AsyncEngine) -> SchedulerStats | None:
            with contextlib.suppress(EngineDeadError):
                return await replica.get_stats(timeout) if replica.is_running else None
            return None

        return list(await asyncio.gather(*(stats(replica) for replica in self.replicas)))

    async def get_stats(self, timeout: float = 10.0) -> SchedulerStats:
        """The replicas' stats summed (those that run)."""
        live = [stats for stats in await self.replica_stats(timeout) if stats is not None]
        if not live:
            self._live()
        total = dataclasses.replace(live[0])
        for stats in live[1:]:
            for f in dataclasses.fields(SchedulerStats):
                if f.name != "token":
                    setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        return total

    @property
    def lora_adapters(self) -> dict[str, str]:
        return self._live().lora_adapters

    async def load_lora(self, name: str, path: str, timeout: float = 120.0) -> None:
        """Load the adapter on every running replica; if one fails, none keeps it."""
        await self.start()
        done = []
        try:
            for replica in [r for r in self.replicas if r.is_running]:
                await replica.load_lora(name, path, timeout)
                done.append(replica)
        except BaseException:
            for replica in done:
                with contextlib.suppress(ValueError):
                    await replica.unload_lora(name)
            raise

    async def unload_lora(self, name: str) -> None:
        running = [r for r in self.replicas if r.is_running]
        users = sum(r._lora_users[name] for r in running)
        if users:
            raise ValueError(f"LoRA adapter {name!r} has {users} requests running")
        for replica in running:
            await replica.unload_lora(name)

    async def _call(self, process: str, make: Callable[[int], object], timeout: float = 10.0):
        await self.start()
        return await self._live()._call(process, make, timeout)
