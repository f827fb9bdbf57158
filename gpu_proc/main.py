"""The gpu_proc: receive step plans, run them, send back the sampled tokens.

Pipelined, the next plan's forward pass is queued before the step in flight is read
back, so the device goes straight from one step to the next while the host finishes
the one before and prepares the one after.

Under tensor parallelism one gpu_proc runs per rank. Each receives every plan and runs
it; only rank 0 sends results back.
"""

from __future__ import annotations

import time

import zmq

from tristream.config import EngineConfig
from tristream.gpu_proc.runner import ModelRunner, QueuedStep
from tristream.plan_codec import PlanDecoder, PlanDiff
from tristream.processes import connect_inbox, connect_outbox, recv, send
from tristream.protocol import GpuReady, Ipc, LoadLora, LoraLoaded, Shutdown

# How long to wait for a plan before checking whether the step in flight is done.
POLL_MS = 0.2


def run(ipc: Ipc, config: EngineConfig, rank: int, device_index: int = 0) -> None:
    """Process entry point of tensor-parallel rank ``rank``, on CUDA device ``device_index`` of its host."""
    ctx = zmq.Context()
    inbox = connect_inbox(ctx, ipc.gpu[rank])
    to_scheduler = connect_outbox(ctx, ipc.scheduler)
    to_user = connect_outbox(ctx, ipc.user)
    runner = ModelRunner(config, rank, ipc.rendezvous, device_index)
    ready = GpuReady(rank, runner.kv.num_pages, str(runner.device), str(runner.dtype))
    if rank == 0:
        send(to_scheduler, ready)
    send(to_user, ready)
    plans = PlanDecoder()
    # Only a rank other than 0 of a speculating engine may get a plan that needs its step in flight finished.
    behind = rank > 0 and config.speculative is not None
    in_flight: tuple[QueuedStep, float] | None = None

    def send_result(queued: QueuedStep, plan_ipc_s: float) -> None:
        result = runner.finish(queued)
        if rank == 0:
            result.plan_ipc_s = plan_ipc_s
            result.sent_at = time.monotonic()
            send(to_scheduler, result)

    waiting_since = time.monotonic()
    while True:
        if in_flight is not None and not inbox.poll(POLL_MS):
            if in_flight[0].clock.done():
                send_result(*in_flight)
                in_flight = None
            continue
        msg = recv(inbox)
        if isinstance(msg, Shutdown):
            runner.tp.close()
            return
        if isinstance(msg, LoadLora):
            try:
                runner.load_lora(msg.slot, msg.path)
                send(to_user, LoraLoaded(msg.token, rank))
            except (OSError, ValueError, RuntimeError) as e:
                send(to_user, LoraLoaded(msg.token, rank, f"loading LoRA adapter {msg.path} failed: {e}"))
        elif isinstance(msg, PlanDiff):
            # Transit time: from sending, or from when this process was ready for it, to now.
            plan_ipc_s = max(0.0, time.monotonic() - max(msg.plan.sent_at, waiting_since))
            plan = plans.plan(msg)
            if in_flight is not None and behind and in_flight[0].feeds(plan):
                send_result(*in_flight)
                in_flight = None
            queued = runner.forward(plan)
            if in_flight is not None:
                send_result(*in_flight)
                in_flight = None
            runner.sample(queued)
            if config.pipelined:
                in_flight = queued, plan_ipc_s
            else:
                send_result(queued, plan_ipc_s)
        waiting_since = time.monotonic()
