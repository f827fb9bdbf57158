"""The gpu_proc: receive a BatchPlan, run it, send back the sampled tokens."""

from __future__ import annotations

import zmq

from tristream.config import EngineConfig
from tristream.gpu_proc.runner import ModelRunner
from tristream.processes import bind_inbox, connect_outbox, recv, send
from tristream.protocol import BatchPlan, Ipc, Ready, Shutdown


def run(ipc: Ipc, config: EngineConfig) -> None:
    """Process entry point."""
    ctx = zmq.Context()
    inbox = bind_inbox(ctx, ipc.gpu)
    to_scheduler = connect_outbox(ctx, ipc.scheduler)
    to_user = connect_outbox(ctx, ipc.user)
    runner = ModelRunner(config)
    send(to_scheduler, Ready("gpu", runner.info))
    send(to_user, Ready("gpu", runner.info))
    while True:
        msg = recv(inbox)
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, BatchPlan):
            send(to_scheduler, runner.step(msg))
