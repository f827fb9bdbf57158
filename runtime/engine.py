"""AsyncEngine: the asyncio front of the three engine processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from tristream import nodes, processes, rendezvous
from tristream.config import EngineConfig, engine_config
from tristream.embeddings import EmbeddingOutput, EmbeddingRequestOutput
from tristream.lora import DEFAULT_LORA_RANK, read_adapter
from tristream.media import MediaPolicy, load_images, prompt_images, split_images
from tristream.model_config import ModelConfig
from tristream.model_files import generation_defaults, resolve_model
from tristream.outputs import CompletionOutput, RequestMetrics, RequestOutput, accumulate
from tristream.pooling import PoolingParams, engine_pooling
from tristream.protocol import (
    AbortRequest,
    GenerateRequest,
    GpuReady,
    Ipc,
    LoadLora,
    LoraLoaded,
    LoraRef,
    OutputBatch,
    OutputDelta,
    Pooling,
    ProcessFailed,
    SchedulerReady,
    SchedulerStats,
    Shutdown,
    StatsRequest,
    TokenizeCall,
    TokenizeResult,
    TokenizerReady,
    ToolSpec,
    decode,
    gpu_process_name,
    tokenizer_process_name,
    tokenizer_worker,
)
from tristream.quantization import quant_spec
from tristream.sampling_params import SamplingParams
from tristream.sharding import shard_model
from tristream.speculative import resolve_draft

logger = logging.getLogger("tristream")

# Seconds to wait for another host's report of a rank that died there (its watcher looks every half second).
REMOTE_REPORT_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine lost a process; every pending and later request fails."""


class AsyncEngine:
    """Streams generations from the tokenizer, scheduler and gpu processes.

    Use ``async with AsyncEngine(...) as engine`` or ``await engine.start()`` and
    ``await engine.close()``. ``generate`` and ``chat`` start it on first use.
    """

    def __new__(cls, model: str | None = None, **engine_args: object) -> AsyncEngine:
        if cls is AsyncEngine and (engine_args.get("data_parallel_size") or 1) > 1:
            from tristream.data_parallel import DataParallelEngine

            cls = DataParallelEngine
        return super().__new__(cls)

    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        self.config = engine_config(model=model, **engine_args)
        self.model_config: ModelConfig | None = None
        self.pooling: Pooling | None = None
        self._ready: dict[str, GpuReady | TokenizerReady | SchedulerReady] = {}
        self._procs: dict[str, object] = {}
        self._active = ActiveRequests()
        self._dead: str | None = None
        self._closing = False
        self._started: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None
        self._ipc_dir: str | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._call_tokens = itertools.count()
        self._loras: dict[str, LoraRef] = {}
        self._lora_paths: dict[str, str] = {}
        self._lora_ids = itertools.count(1)
        self._lora_users: Counter[str] = Counter()
        self._lora_acks: dict[int, list[LoraLoaded]] = {}
        self._reserved_slots: set[int] = set()
        self._tokenizer_busy: dict[int, float] = {}
        self._reports: list[ProcessFailed] = []
        self.media = MediaPolicy()
        # Where this engine's ranks start among this host's CUDA devices (data-parallel replicas set it).
        self._first_device = 0
        self._store = None
        self._placement = None

    async def __aenter__(self) -> AsyncEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_running(self) -> bool:
        return self._started is not None and self._started.done() and not self._dead and not self._closing

    @property
    def healthy(self) -> bool:
        """True while the engine runs and every one of its processes is alive."""
        return self.is_running and all(proc.is_alive() for proc in self._procs.values())

    @property
    def degraded(self) -> bool:
        """True while part of the engine is down but it still serves (a data-parallel replica)."""
        return False

    @property
    def device(self) -> str:
        """The device of tensor-parallel rank 0 once started, e.g. ``cpu`` or ``cuda:0``."""
        return self._ready["gpu"].device

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer has a chat template (known once started)."""
        return self._ready["tokenizer"].has_chat_template

    @property
    def child_pids(self) -> dict[str, int]:
        """The pid of each engine process, by name."""
        return {name: proc.pid for name, proc in self._procs.items()}

    async def start(self) -> None:
        """Start the processes and wait until all three are ready."""
        if self._started is not None:
            return await asyncio.shield(self._started)
        loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        try:
            await self._launch(loop)
            await asyncio.wait_for(asyncio.shield(self._started), self.config.startup_timeout)
        except BaseException as e:
            if not self._started.done():
                self._started.set_exception(e if isinstance(e, Exception) else RuntimeError("start-up was cancelled"))
            self._started.exception()
            await self._stop_processes()
            raise

    async def _launch(self, loop: asyncio.AbstractEventLoop) -> None:
        _log_to_stderr(self.config.log_level)
        self.child_config = await self._child_config()
        if self.child_config.distributed_executor == "ray":
            try:
                from tristream.ray_ranks import RayPlacement
            except ModuleNotFoundError as e:
                raise RuntimeError(f"distributed_executor='ray' needs Ray ({e}): pip install 'tristream[ray]'") from e
            self._placement = await asyncio.to_thread(
                RayPlacement, self.child_config.tensor_parallel_size, self.child_config
            )
        self._spawn(loop)

    async def _child_config(self) -> EngineConfig:
        """The config the engine processes run with: the model resolved to a folder and checked, the context
        length, LoRA adapters and speculative draft settled. Whatever cannot run fails here, before any process
        starts."""
        config = self.config
        model_dir = await asyncio.to_thread(resolve_model, config.model, config.load_format, config.download_dir)
        mc = ModelConfig.load(model_dir)
        self.pooling = engine_pooling(config.pooling, config.normalize, model_dir)
        quant_spec(mc.quantization_config, config.quantization, config.load_format == "dummy", mc.num_experts)
        self.generation_defaults = generation_defaults(model_dir) if config.generation_config == "auto" else {}
        if self.generation_defaults:
            logger.info(
                "sampling defaults from the model's generation_config.json, for requests that leave them out: %s "
                "(generation_config='none' turns them off)",
                ", ".join(f"{name}={value}" for name, value in self.generation_defaults.items()),
            )
        max_len = config.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings={mc.max_position_embeddings}"
            )
        shard_model(mc, config.tensor_parallel_size, 0)  # a split that does not fit
        self.model_config = mc
        adapters, max_rank = await self._adapters(mc)
        spec = config.speculative and await asyncio.to_thread(
            resolve_draft, config.speculative, mc, max_len, config.load_format, config.download_dir,
            config.tensor_parallel_size,
        )  # fmt: skip
        return dataclasses.replace(
            config,
            **_layout(config, mc),
            model=model_dir,
            speculative=spec,
            max_model_len=max_len,
            lora_adapters=adapters or None,
            max_lora_rank=max_rank,
            tokenizer_workers=config.num_tokenizer_workers(_on_cuda(config.device)),
        )

    async def _adapters(self, mc: ModelConfig) -> tuple[dict[str, str], int]:
        """The start-up LoRA adapters' folders by name, each given its slot, and the largest rank to hold."""
        config = self.config
        adapters = {name: os.path.abspath(path) for name, path in (config.lora_adapters or {}).items()}
        ranks = {name: (await asyncio.to_thread(read_adapter, path, mc)).rank for name, path in adapters.items()}
        max_rank = config.max_lora_rank or max([DEFAULT_LORA_RANK, *ranks.values()])
        for name, rank in ranks.items():
            if rank > max_rank:
                raise ValueError(f"LoRA adapter {name!r} has rank {rank}, above max_lora_rank={max_rank}")
        for slot, name in enumerate(adapters):
            self._loras[name], self._lora_paths[name] = LoraRef(next(self._lora_ids), slot), adapters[name]
        return adapters, max_rank

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the sockets and start the engine processes with ``child_config``: the tokenizer workers and the
        scheduler here, the ranks here, on Ray actors, or here and on the hosts that ``--node-rank`` starts."""
        config = self.child_config
        workers, tp = config.tokenizer_workers, config.tensor_parallel_size
        placement = self._placement
        host, port = (placement.host, 0) if placement else self._master()
        ipc, self._ipc_dir = processes.make_ipc(tp, workers, host)
        if host is None:  # every rank on this host
            ipc.rendezvous = f"file://{os.path.join(self._ipc_dir, 'rendezvous')}"
        else:
            self._store = rendezvous.host_store(host, port)
            ipc.rendezvous = f"tcp://{host}:{self._store.port}"
            rendezvous.publish(self._store, ipc, config)
        self._expected = tp + workers + 1
        self._open_sockets(loop, ipc)
        ranks = range(0 if placement else tp // config.nnodes)  # host 0's share; Ray places them all
        procs = [(gpu_process_name(rank), f"gpu{rank}", "gpu", (rank, self._first_device + rank)) for rank in ranks]
        tokenizers = [(tokenizer_process_name(w), tokenizer_process_name(w), "tokenizer", (w,)) for w in range(workers)]
        scheduler = ("scheduler", "scheduler", "scheduler", (self.model_config.kv_window(),))
        for name, title, kind, args in [*procs, *tokenizers, scheduler]:
            self._procs[name] = processes.spawn(name, f"tristream.{kind}_proc.main", ipc, config, *args, title=title)
        if placement is not None:
            self._procs.update(placement.start(ipc, config, self.config))
        for name, proc in self._procs.items():
            loop.add_reader(proc.sentinel, self._on_exit, name)

    def _open_sockets(self, loop: asyncio.AbstractEventLoop, ipc: Ipc) -> None:
        """The user's inbox, read by ``_read_loop``, and the outboxes to the tokenizer workers and the scheduler."""
        self._ctx = zmq.asyncio.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.RCVHWM, 0)
        self._inbox.bind(processes.bindable(ipc.user))
        self._sync_ctx = zmq.Context()
        # The scheduler passes Shutdown on to the gpu_procs, after the plans it sent them.
        inboxes = {tokenizer_process_name(w): address for w, address in enumerate(ipc.tokenizers)}
        inboxes["scheduler"] = ipc.scheduler
        self._out = {name: processes.connect_outbox(self._sync_ctx, address) for name, address in inboxes.items()}
        self._reader = loop.create_task(self._read_loop())

    def _master(self) -> tuple[str | None, int]:
        """Where the hosts meet when the ranks span several (``dist_init_addr``); (None, 0) on one host."""
        config = self.child_config
        return processes.split_address(config.dist_init_addr) if config.nnodes > 1 else (None, 0)

    def default_sampling_params(self, **fields: object) -> SamplingParams:
        """``SamplingParams(**fields)`` with the model's generation_config.json defaults over them (known once
        started; none with ``generation_config="none"``): what a request without sampling params runs with."""
        if self.model_config is None:
            raise RuntimeError("the model's sampling defaults are known once the engine has started")
        return SamplingParams(**{**fields, **self.generation_defaults})

    def _on_exit(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        proc = self._procs[name]
        loop.remove_reader(proc.sentinel)
        if not self._closing:
            # Give a ProcessFailed message with the traceback a moment to arrive first.
            loop.call_later(0.5, lambda: self._fail(f"the {name} process died ({processes.exit_reason(proc)})", name))

    def _on_failure(self, msg: ProcessFailed) -> None:
        """Fail the engine for a process that reported its failure. Over several hosts, a rank that died on
        another host is reported by that host a moment later, after its peers here failed for the lost
        connection: wait for it, and name it first."""
        self._reports.append(msg)
        if self.child_config.nnodes == 1:
            self._fail(f"the {msg.process} process failed:\n{msg.error}", msg.process)
        elif len(self._reports) == 1:
            asyncio.get_running_loop().call_later(REMOTE_REPORT_S, self._fail_reported)

    def _fail_reported(self) -> None:
        reports = sorted(self._reports, key=lambda r: r.process in self._procs)  # other hosts' reports first
        self._fail("; ".join(f"the {r.process} process failed:\n{r.error}" for r in reports), reports[0].process)

    def _fail(self, reason: str, process: str) -> None:
        if self._dead or self._closing:
            return
        # A process that lost a peer (a tensor-parallel rank) fails too: name the dead ones first.
        died = [
            f"the {name} process died ({processes.exit_reason(proc)})"
            for name, proc in self._procs.items()
            if name != process and proc.exitcode is not None
        ]
        reason = "; ".join([*died, reason])
        self._dead = reason
        logger.error("engine failed: %s", reason)
        if self._started is not None and not self._started.done():
            self._started.set_exception(RuntimeError(f"engine start-up failed: {reason}"))
        self._fail_pending(reason)
        for proc in self._procs.values():
            if proc.is_alive():
                proc.kill()

    def _fail_pending(self, reason: str) -> None:
        """End every stream and every call waiting on a process with ``EngineDeadError(reason)``."""
        for q in self._active.values():
            q.put_nowait(EngineDeadError(reason))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))

    async def _read_loop(self) -> None:
        while True:
            msg = decode(await self._inbox.recv(copy=False))
            if isinstance(msg, OutputBatch):
                self._tokenizer_busy[msg.worker] = msg.busy_s
                for delta in msg.deltas:
                    q = self._active.get(delta.request_id)
                    if q is not None:
                        q.put_nowait(delta)
            elif isinstance(msg, (GpuReady, TokenizerReady, SchedulerReady)):
                self._ready[msg.process] = msg
                if len(self._ready) == self._expected and not self._started.done():
                    self._started.set_result(None)
            elif isinstance(msg, (SchedulerStats, TokenizeResult)):
                future = self._calls.pop(msg.token, None)
                if future is not None and not future.done():
                    future.set_result(msg)
            elif isinstance(msg, LoraLoaded):
                acks = self._lora_acks.setdefault(msg.token, [])
                acks.append(msg)
                if len(acks) == self.config.tensor_parallel_size:
                    del self._lora_acks[msg.token]
                    future = self._calls.pop(msg.token, None)
                    if future is not None and not future.done():
                        future.set_result(next((a for a in acks if a.error), acks[0]))
            elif isinstance(msg, ProcessFailed):
                self._on_failure(msg)

    async def close(self) -> None:
        """Shut down every process and fail whatever is still pending."""
        if self._started is None or self._closing:
            return
        self._closing = True
        self._fail_pending("the engine was closed")
        await self._stop_processes()

    async def _stop_processes(self) -> None:
        self._closing = True
        loop = asyncio.get_running_loop()
        for proc in self._procs.values():
            loop.remove_reader(proc.sentinel)
        for sock in getattr(self, "_out", {}).values():
            processes.send(sock, Shutdown())
        await processes.stop(list(self._procs.values()))
        if self._reader is not None:
            self._reader.cancel()
        for sock in getattr(self, "_out", {}).values():
            sock.close(linger=0)
        if hasattr(self, "_inbox"):
            self._inbox.close(linger=0)
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._placement is not None:
            self._placement.remove()
        self._store = None

    def generate(
        self,
        prompt: str | list[int] | dict,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        suffix: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a completion of ``prompt``: text, token ids, or a dict (``prompt_fields``). Outputs carry deltas.

        With ``suffix``, a model trained to fill in the middle writes the text between a text ``prompt`` and
        ``suffix``; a model whose tokenizer has no fill-in-the-middle tokens is a ValueError.
        """
        return self._stream({"prompt": prompt, "suffix": suffix}, params, request_id)

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the assistant's reply to ``messages`` through the model's chat template.

        A message's content is text, or a list of parts: text (``{"type": "text", "text": ...}``) and, for a
        vision-language model, images (``{"type": "image_url", "image_url": {"url": ...}}`` with a ``data:``,
        ``http(s)://`` or file URL or path, or ``{"type": "image", "image": ...}`` with a PIL image, bytes or a path).
        ``tools`` (OpenAI's function tools) go to the chat template; the calls in the reply arrive on
        ``CompletionOutput.tool_calls``. ``tool_choice`` is "auto" (the default), "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``; the last two are enforced by a grammar.
        """
        spec = ToolSpec.of(tools, tool_choice, parallel_tool_calls)
        fields = dict(messages=messages, chat_template_kwargs=chat_template_kwargs, tools=spec)
        return self._stream(fields, params, request_id)

    async def embed(
        self,
        prompt: str | list[int] | dict,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
        lora: str | None = None,
    ) -> EmbeddingRequestOutput:
        """The embedding of ``prompt`` (text, token ids, or a prompt dict without images): its final-norm hidden
        states pooled as the engine's ``pooling`` argument says (the last token's, or their mean), L2-normalized
        unless ``normalize`` is off; ``pooling_params`` may set ``normalize`` for this request. It runs batched
        with the other requests, through the LoRA adapter ``lora`` if given."""
        fields = prompt_fields(prompt)
        if "images" in fields:
            raise ValueError("embeddings take text or token ids, not images")
        pooling_params = PoolingParams() if pooling_params is None else pooling_params
        if not isinstance(pooling_params, PoolingParams):
            raise ValueError(f"pooling_params must be a PoolingParams, got {type(pooling_params).__name__}")
        await self.start()
        request_id = request_id or uuid.uuid4().hex
        fields = {**fields, "pooling": pooling_params.over(self.pooling)}
        deltas = self._deltas(fields, SamplingParams(lora=lora), request_id, time.time())
        async with contextlib.aclosing(deltas):
            delta = await anext(deltas)
        return EmbeddingRequestOutput(request_id, EmbeddingOutput(delta.embedding), delta.prompt_token_ids)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason="abort"``."""
        if self.is_running:
            processes.send(self._owner(request_id), AbortRequest(request_id))

    async def get_stats(self, timeout: float = 10.0) -> SchedulerStats:
        """The scheduler's page and queue counters, with the tokenizer workers' busy time; ``gpu_idle_s`` is the
        time during which a request was in flight (waiting to be tokenized or scheduled, or running) and the device
        ran no step."""
        stats = await self._call("scheduler", StatsRequest, timeout)
        stats.tokenizer_busy_s = sum(self._tokenizer_busy.values())
        stats.gpu_idle_s = max(0.0, self._active.busy_until_now() - stats.gpu_busy_s)
        return stats

    async def replica_stats(self, timeout: float = 10.0) -> list[SchedulerStats | None]:
        """The stats of each data-parallel replica (one here); None for a replica that is down."""
        return [await self.get_stats(timeout)]

    def _owner(self, request_id: str) -> zmq.Socket:
        """The inbox of the tokenizer worker that owns ``request_id``."""
        return self._out[tokenizer_process_name(tokenizer_worker(request_id, self.child_config.tokenizer_workers))]

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The loaded LoRA adapters' directories, by name."""
        return dict(self._lora_paths)

    async def load_lora(self, name: str, path: str, timeout: float = 120.0) -> None:
        """Load the PEFT LoRA adapter in directory ``path`` as ``name``, for ``SamplingParams(lora=name)``.

        The engine needs a free slot (``max_loras``) and the adapter's rank at most ``max_lora_rank``.
        """
        await self.start()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter name must be a non-empty string, got {name!r}")
        if name in self._loras:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        config = self.child_config
        if not config.lora_slots:
            raise ValueError("this engine has no LoRA slots: start it with max_loras >= 1 or with lora_adapters")
        path = os.path.abspath(path)
        adapter = await asyncio.to_thread(read_adapter, path, self.model_config)
        if adapter.rank > config.max_lora_rank:
            raise ValueError(f"{path}: rank {adapter.rank} is above this engine's max_lora_rank={config.max_lora_rank}")
        taken = {ref.slot for ref in self._loras.values()} | self._reserved_slots
        free = [slot for slot in range(config.lora_slots) if slot not in taken]
        if not free:
            raise ValueError(
                f"all {config.lora_slots} LoRA slots are taken ({', '.join(self._loras)}): unload one first"
            )
        self._reserved_slots.add(free[0])
        try:
            await self._call("scheduler", lambda token: LoadLora(token, free[0], path), timeout)
            self._loras[name], self._lora_paths[name] = LoraRef(next(self._lora_ids), free[0]), path
        finally:
            self._reserved_slots.discard(free[0])

    async def unload_lora(self, name: str) -> None:
        """Forget the LoRA adapter ``name`` and free its slot; it must have no request running."""
        if name not in self._loras:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        if self._lora_users[name]:
            raise ValueError(f"LoRA adapter {name!r} has {self._lora_users[name]} requests running")
        del self._loras[name], self._lora_paths[name]

    async def tokenize(
        self,
        prompt: str | None = None,
        messages: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """The token ids of ``prompt``, or of ``messages`` through the chat template, as the engine would run them."""
        if (prompt is None) == (messages is None):
            raise ValueError("tokenize needs exactly one of prompt or messages")
        result = await self._call(
            "tokenizer",
            lambda token: TokenizeCall(
                token,
                prompt=prompt,
                messages=messages,
                chat_template_kwargs=chat_template_kwargs,
                add_special_tokens=add_special_tokens,
            ),
        )
        return result.token_ids

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``."""
        return (await self._call("tokenizer", lambda token: TokenizeCall(token, token_ids=list(token_ids)))).text

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's text on its own (as logprobs show them)."""
        result = await self._call(
            "tokenizer", lambda token: TokenizeCall(token, token_ids=list(token_ids), pieces=True)
        )
        return result.pieces

    async def _call(self, process: str, make: Callable[[int], object], timeout: float = 10.0):
        await self.start()
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine was closed")
        token = next(self._call_tokens)
        future = asyncio.get_running_loop().create_future()
        self._calls[token] = future
        if process == "tokenizer":  # any worker answers; take turns
            process = tokenizer_process_name(token % self.child_config.tokenizer_workers)
        processes.send(self._out[process], make(token))
        try:
            result = await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(token, None)
        if getattr(result, "error", None) is not None:
            raise ValueError(result.error)
        return result

    async def _stream(
        self, fields: dict, params: SamplingParams | None, request_id: str | None
    ) -> AsyncIterator[RequestOutput]:
        if "prompt" in fields:
            fields = {**prompt_fields(fields["prompt"]), "suffix": fields["suffix"]}
        else:
            messages, images = split_images(fields["messages"])
            fields = {**fields, "messages": messages, **({"images": images} if images else {})}
        if "images" in fields:
            fields["images"] = await load_images(fields["images"], self.media)
        await self.start()
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        stream = _Stream(
            request_id or uuid.uuid4().hex,
            fields.get("prompt"),
            params,
            RequestMetrics(arrival_time=time.time()),
            reasoning=self.config.reasoning_parser is not None,
        )
        deltas = self._deltas(fields, params, stream.request_id, stream.metrics.arrival_time)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                out = stream.output(delta)
                if out is not None:
                    yield out

    async def _deltas(
        self, fields: dict, params: SamplingParams, request_id: str, arrival_time: float
    ) -> AsyncIterator[OutputDelta]:
        """Send the request of ``fields`` (``GenerateRequest``'s) and yield its deltas until each of its samples
        has finished. An error delta is a ValueError; leaving early aborts the request."""
        if self._dead:
            raise EngineDeadError(self._dead)
        if self._closing:
            raise EngineDeadError("the engine was closed")
        if self.model_config.embedding_only and fields.get("pooling") is None:
            raise ValueError("this is an embedding model, without an LM head to generate with: use embed")
        if request_id in self._active:
            raise ValueError(f"request_id {request_id!r} is already running")
        if params.lora is not None:
            if params.lora not in self._loras:
                raise ValueError(f"unknown LoRA adapter {params.lora!r}; loaded: {', '.join(self._loras) or 'none'}")
            fields = {**fields, "lora": self._loras[params.lora]}
            self._lora_users[params.lora] += 1
        queue: asyncio.Queue = asyncio.Queue()
        self._active.add(request_id, queue)
        processes.send(self._owner(request_id), GenerateRequest(request_id, params, arrival_time, **fields))
        finished, pending = 0, deque()
        try:
            while finished < params.num_samples:
                delta = await _coalesced(queue, pending)
                if isinstance(delta, Exception):
                    raise delta
                if delta.error is not None:
                    finished = params.num_samples
                    raise ValueError(delta.error)
                finished += delta.finished
                yield delta
        finally:
            self._active.remove(request_id)
            if params.lora is not None:
                self._lora_users[params.lora] -= 1
            if finished < params.num_samples and self.is_running:
                processes.send(self._owner(request_id), AbortRequest(request_id))


def _layout(config: EngineConfig, mc: ModelConfig) -> dict:
    """Where the ranks run: this host's index (from ``$NODE_RANK`` if not given) and, over several hosts, the
    address where they meet (from ``$MASTER_ADDR:$MASTER_PORT`` if not given)."""
    if mc.hf.get("vision_config") and (config.nnodes > 1 or config.distributed_executor == "ray"):
        raise ValueError(
            "a vision-language model's images pass through a folder of this host: run it without nnodes > 1 or "
            "the ray executor"
        )
    node_rank = nodes.node_rank(config)
    if node_rank:
        raise ValueError(
            f"node_rank={node_rank}: a host other than 0 runs only its ranks, driven by the engine on host 0; start "
            f"it with `tristream serve MODEL --nnodes {config.nnodes} --node-rank {node_rank} --dist-init-addr HOST:PORT`"
        )
    address = config.dist_init_addr or (rendezvous.env_address() if config.nnodes > 1 else None)
    if config.nnodes > 1 and address is None:
        raise ValueError("nnodes > 1 needs dist_init_addr, the HOST:PORT of host 0 (or MASTER_ADDR and MASTER_PORT)")
    return {"node_rank": 0, "dist_init_addr": address}


async def _coalesced(queue: asyncio.Queue, pending: deque) -> OutputDelta | Exception:
    """The next item of a request, with the deltas behind it merged in while they can be (``OutputDelta.then``):
    a consumer that falls behind the engine takes several steps' tokens at once instead of lagging further with
    each step. ``pending`` holds what was taken from ``queue`` and not returned yet."""
    if not pending:
        pending.append(await queue.get())
    while not queue.empty():
        pending.append(queue.get_nowait())
    item = pending.popleft()
    while pending and isinstance(item, OutputDelta) and isinstance(pending[0], OutputDelta):
        merged = item.then(pending[0])
        if merged is None:
            break
        pending.popleft()
        item = merged
    return item


class ActiveRequests(dict):
    """The queues of the requests in flight, by request id, and the wall time during which there was any:
    the engine's busy time, against which the device's idle time counts."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_s = 0.0
        self.since: float | None = None

    def add(self, request_id: str, queue: asyncio.Queue) -> None:
        """Take in the queue of a request that starts."""
        if not self:
            self.since = time.monotonic()
        self[request_id] = queue

    def remove(self, request_id: str) -> None:
        """Let go of a request that ended."""
        if self.pop(request_id, None) is not None and not self:
            self.busy_s += time.monotonic() - self.since

    def busy_until_now(self) -> float:
        """Seconds so far during which a request was in flight."""
        return self.busy_s + (time.monotonic() - self.since if self else 0.0)


MEDIA_KEYS = ("multimodal_data", "multi_modal_data")


def prompt_fields(prompt: str | list[int] | dict) -> dict:
    """The request fields of a prompt: text, token ids, or a dict of ``prompt`` (text) or ``prompt_token_ids``,
    as vLLM's TextPrompt and TokensPrompt and FastDeploy's prompt dicts, with its ``multimodal_data`` images
    (``{"image": [...]}``) under ``images``: one for each image placeholder of the prompt.
    """
    images = []
    if isinstance(prompt, dict):
        prompt, images = _dict_prompt(prompt)
    ids = isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)
    if not ids and not isinstance(prompt, str):
        raise ValueError(
            f"a prompt must be a string, a list of token ids or a prompt dict, got {type(prompt).__name__}"
        )
    if not prompt:
        raise ValueError("the prompt is empty")
    fields = {"prompt_token_ids": list(prompt)} if ids else {"prompt": prompt}
    return {**fields, "images": images} if images else fields


def _dict_prompt(prompt: dict) -> tuple[str | list[int], list]:
    """The text or token ids of a prompt dict and its images; a ValueError for keys it does not take."""
    unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", *MEDIA_KEYS})
    if unknown:
        raise ValueError(f"a prompt dict takes prompt, prompt_token_ids and multimodal_data, not {unknown}")
    images = [image for key in MEDIA_KEYS for image in prompt_images(prompt.get(key) or {}, key)]
    keys = [key for key in ("prompt", "prompt_token_ids") if key in prompt]
    if len(keys) != 1:
        raise ValueError("a prompt dict needs exactly one of prompt or prompt_token_ids")
    value = prompt[keys[0]]
    if (keys[0] == "prompt") != isinstance(value, str):
        raise ValueError(f"{keys[0]} must be {'a string' if keys[0] == 'prompt' else 'a list of token ids'}")
    return value, images


def _on_cuda(device: str) -> bool:
    """Whether an engine asked for ``device`` runs on CUDA; for "auto", whether an NVIDIA driver shows a device
    (torch would tell for sure, but takes seconds to import into this process)."""
    if device == "auto":
        return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")
    return device == "cuda"


def _log_to_stderr(level: str) -> None:
    """Show the user process's own log lines (model download and conversion, sampling defaults) on stderr at
    ``level``, as the engine processes show theirs, unless the application has configured logging."""
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s tristream %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)


@dataclasses.dataclass
class _Stream:
    """What one request's stream has gathered so far, over its samples.

    With ``best_of > n`` the samples are kept whole until all finish; then the
    ``n`` with the highest cumulative logprob are returned, as indices 0..n-1.
    """

    request_id: str
    prompt: str | None
    params: SamplingParams
    metrics: RequestMetrics
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_cached_tokens: int = 0
    cumulative: dict[int, float] = dataclasses.field(default_factory=dict)
    sent: dict[int, int] = dataclasses.field(default_factory=dict)
    num_finished: int = 0
    whole: RequestOutput | None = None
    reasoning: bool = False

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.num_samples

    @property
    def ranked(self) -> bool:
        return self.params.num_samples > self.params.n

    def output(self, delta: OutputDelta) -> RequestOutput | None:
        """The RequestOutput of ``delta``; with ``best_of > n``, the ranked samples once all finish (None before)."""
        self._count(delta)
        prompt_logprobs = None
        if delta.prompt_logprobs is not None:
            prompt_logprobs = [None] + [dict(entry) for entry in delta.prompt_logprobs]
        out = RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[self._sample(delta)],
            finished=self.finished,
            metrics=dataclasses.replace(self.metrics),
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )
        if not self.ranked:
            return out
        self.whole = accumulate(self.whole, out)
        return dataclasses.replace(self.whole, outputs=self._best()) if self.finished else None

    def _count(self, delta: OutputDelta) -> None:
        """Take the prompt (its ids, and a chat's rendered text), the counts and the times of ``delta``."""
        now = time.time()
        metrics = self.metrics
        if delta.prompt_token_ids is not None:
            self.prompt_token_ids = delta.prompt_token_ids
            metrics.num_prompt_tokens = len(delta.prompt_token_ids)
        if delta.prompt is not None:
            self.prompt = delta.prompt
        if delta.time_in_queue is not None and delta.index == 0:
            metrics.time_in_queue = delta.time_in_queue
            self.num_cached_tokens = delta.num_cached_tokens
        if delta.token_ids:
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
        metrics.num_generated_tokens += len(delta.token_ids)
        self.num_finished += delta.finished
        if self.finished:
            metrics.finished_time = now

    def _sample(self, delta: OutputDelta) -> CompletionOutput:
        """The CompletionOutput of ``delta``, numbered among its sample's deltas. A beam search's hypotheses
        always carry logprobs, which give their cumulative logprob; they are shown when asked for."""
        shown = delta.logprobs is not None and not (self.params.use_beam_search and self.params.logprobs is None)
        logprobs = [dict(step) for step in delta.logprobs] if shown else None
        if delta.logprobs is not None:
            self.cumulative[delta.index] = self.cumulative.get(delta.index, 0.0) + sum(s[0][1] for s in delta.logprobs)
        self.sent[delta.index] = self.sent.get(delta.index, -1) + 1
        return CompletionOutput(
            delta.index,
            delta.text,
            delta.token_ids,
            delta.finish_reason,
            logprobs,
            self.cumulative.get(delta.index),
            delta.reasoning if self.reasoning else None,
            self.sent[delta.index],
            delta.tool_calls,
        )

    def _best(self) -> list[CompletionOutput]:
        best = sorted(self.whole.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))[: self.params.n]
        keep = self.params.logprobs is not None
        return [dataclasses.replace(o, index=i, logprobs=o.logprobs if keep else None) for i, o in enumerate(best)]
