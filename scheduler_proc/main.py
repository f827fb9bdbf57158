"""The scheduler_proc: requests in, step plans to the gpu_proc, token deltas out."""

from __future__ import annotations

import zmq

from tristream.config import EngineConfig
from tristream.processes import bind_inbox, connect_outbox, recv, recv_all, send
from tristream.protocol import (
    AbortRequest,
    Ipc,
    Ready,
    Shutdown,
    StatsRequest,
    StepResult,
    StopRequest,
    TokenBatch,
    TokenizedRequest,
)
from tristream.scheduler_proc.scheduler import Scheduler


def run(ipc: Ipc, config: EngineConfig) -> None:
    """Process entry point: a synchronous loop with at most one step in flight."""
    ctx = zmq.Context()
    inbox = bind_inbox(ctx, ipc.scheduler)
    to_gpu = connect_outbox(ctx, ipc.gpu)
    to_tokenizer = connect_outbox(ctx, ipc.tokenizer)
    to_user = connect_outbox(ctx, ipc.user)
    ready = recv(inbox)
    while not (isinstance(ready, Ready) and ready.process == "gpu"):
        if isinstance(ready, Shutdown):
            return
        ready = recv(inbox)
    scheduler = Scheduler(config, ready.info["num_pages"])
    send(to_user, Ready("scheduler"))
    in_flight = idle = False
    while True:
        deltas = []
        for msg in recv_all(inbox, block=in_flight or idle):
            if isinstance(msg, StepResult):
                in_flight = False
                deltas.extend(scheduler.on_result(msg))
            elif isinstance(msg, TokenizedRequest):
                deltas.append(scheduler.add(msg))
            elif isinstance(msg, AbortRequest):
                deltas.append(scheduler.abort(msg.request_id))
            elif isinstance(msg, StopRequest):
                scheduler.finish(msg.request_id)
            elif isinstance(msg, StatsRequest):
                send(to_user, scheduler.stats(msg.token))
            elif isinstance(msg, Shutdown):
                return
        deltas = [d for d in deltas if d is not None]
        if deltas:
            send(to_tokenizer, TokenBatch(deltas))
        if not in_flight:
            plan = scheduler.schedule()
            idle = plan is None
            if plan is not None:
                send(to_gpu, plan)
                in_flight = True
