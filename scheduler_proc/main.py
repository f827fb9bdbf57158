"""The scheduler_proc: requests in, step plans to the gpu_proc, token deltas out."""

from __future__ import annotations

import time

import zmq

from tristream.config import EngineConfig
from tristream.plan_codec import PlanEncoder
from tristream.processes import bind_inbox, bind_outbox, connect_outbox, recv, recv_all, send
from tristream.protocol import (
    AbortRequest,
    GpuReady,
    Ipc,
    LoadLora,
    SchedulerReady,
    Shutdown,
    StatsRequest,
    StepResult,
    StopRequest,
    TokenBatch,
    TokenDelta,
    TokenizedRequest,
    encode,
)
from tristream.scheduler_proc.scheduler import Scheduler


def run(ipc: Ipc, config: EngineConfig, window: int = 0) -> None:
    """Process entry point: plans go out while up to one step (two, pipelined) is in flight. ``window`` is
    the largest sliding window of a model whose every layer has one, or 0."""
    ctx = zmq.Context()
    inbox = bind_inbox(ctx, ipc.scheduler)
    to_gpus = [bind_outbox(ctx, address) for address in ipc.gpu]
    to_tokenizers = [connect_outbox(ctx, address) for address in ipc.tokenizers]
    to_user = connect_outbox(ctx, ipc.user)

    def to_every_gpu(message: object) -> None:
        """The same bytes to every tensor-parallel rank, encoded once."""
        data = encode(message)
        for sock in to_gpus:
            sock.send(data, copy=False)

    ready = recv(inbox)
    while not isinstance(ready, GpuReady):
        if isinstance(ready, Shutdown):
            return to_every_gpu(ready)
        ready = recv(inbox)
    scheduler = Scheduler(config, ready.num_pages, window)
    plans = PlanEncoder()
    send(to_user, SchedulerReady())
    depth = 2 if config.pipelined else 1
    stalled = after_idle = False
    while True:
        deltas = []
        waiting_since = time.monotonic()
        for msg in recv_all(inbox, block=stalled or len(scheduler.in_flight) >= depth):
            if isinstance(msg, StepResult):
                # Transit time: from sending, or from when this process was ready for it, to now.
                ipc_s = msg.plan_ipc_s + max(0.0, time.monotonic() - max(msg.sent_at, waiting_since))
                deltas.extend(scheduler.on_result(msg, ipc_s))
            elif isinstance(msg, TokenizedRequest):
                deltas.append(scheduler.add(msg))
            elif isinstance(msg, AbortRequest):
                deltas.append(scheduler.abort(msg.request_id, msg.worker))
            elif isinstance(msg, StopRequest):
                scheduler.finish(msg.request_id)
            elif isinstance(msg, StatsRequest):
                send(to_user, scheduler.stats(msg.token))
            elif isinstance(msg, LoadLora):
                to_every_gpu(msg)
            elif isinstance(msg, Shutdown):
                return to_every_gpu(msg)
        for worker, batch in enumerate(_by_worker(deltas, len(to_tokenizers))):
            if batch:
                send(to_tokenizers[worker], TokenBatch(batch))
        stalled = False
        if len(scheduler.in_flight) < depth:
            plan = scheduler.schedule()
            if plan is None:
                stalled = True
                after_idle = after_idle or not scheduler.in_flight
            else:
                plan.after_idle, after_idle = after_idle, False
                plan.sent_at = time.monotonic()
                to_every_gpu(plans.diff(plan))


def _by_worker(deltas: list[TokenDelta | None], num_workers: int) -> list[list[TokenDelta]]:
    """The deltas (None left out) of each tokenizer worker, in order."""
    batches: list[list[TokenDelta]] = [[] for _ in range(num_workers)]
    for d in deltas:
        if d is not None:
            batches[d.worker].append(d)
    return batches
