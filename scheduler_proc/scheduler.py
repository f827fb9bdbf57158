"""Scheduler: continuous batching under a token budget, over paged KV memory."""

from __future__ import annotations

import time
from collections import deque

from tristream.config import EngineConfig
from tristream.protocol import BatchPlan, NewSequence, SchedulerStats, StepResult, TokenDelta, TokenizedRequest
from tristream.scheduler_proc.page_allocator import PageAllocator
from tristream.scheduler_proc.request import Request


class Scheduler:
    """Decides each step: which requests run, how many tokens each computes.

    Running requests go first, in admission order; a prompt longer than the
    step's budget is computed in chunks. When pages run out, the newest running
    request is preempted: its pages are freed and it is recomputed later.
    """

    def __init__(self, config: EngineConfig, num_pages: int) -> None:
        self.config = config
        self.page_size = config.page_size
        self.pages = PageAllocator(num_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.by_slot: dict[int, Request] = {}
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.freed_slots: list[int] = []
        self.step_id = 0

    def stats(self, token: int) -> SchedulerStats:
        usable = self.pages.num_pages - 1
        return SchedulerStats(token, usable, self.pages.num_free, len(self.running), len(self.waiting))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, spec: TokenizedRequest) -> TokenDelta | None:
        """Queue a request; an error delta if it is a duplicate."""
        if spec.request_id in self.by_id:
            return TokenDelta(spec.request_id, [], error=f"request_id {spec.request_id!r} is already running")
        req = Request(spec)
        self.by_id[spec.request_id] = req
        self.waiting.append(req)
        return None

    def abort(self, request_id: str) -> TokenDelta | None:
        """Drop a request wherever it is and free its pages."""
        req = self.by_id.pop(request_id, None)
        if req is None:
            return None
        if req.slot is None:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._release(req)
        return TokenDelta(request_id, [], finish_reason="abort")

    def _release(self, req: Request) -> None:
        self.pages.free(req.pages)
        req.pages = []
        del self.by_slot[req.slot]
        self.free_slots.append(req.slot)
        self.freed_slots.append(req.slot)
        req.slot = None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        self.waiting.appendleft(req)

    def _grow(self, req: Request, num_tokens: int, plan: BatchPlan) -> bool:
        """Give ``req`` pages for ``num_tokens`` tokens; False if too few are free."""
        need = -(-num_tokens // self.page_size) - len(req.pages)
        if need <= 0:
            return True
        pages = self.pages.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        plan.pages.append((req.slot, pages))
        return True

    def _run(self, req: Request, n: int, plan: BatchPlan) -> None:
        plan.slots.append(req.slot)
        plan.num_tokens.append(n)
        req.num_computed += n
        plan.sample.append(req.num_computed == req.num_tokens)

    def schedule(self) -> BatchPlan | None:
        """The next step's plan, or None when there is nothing to run."""
        plan = BatchPlan(self.step_id)
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.slot is None:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n, plan):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.slot is not None:
                self._run(req, n, plan)
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            pages = self.pages.alloc(-(-n // self.page_size))
            if pages is None:
                break
            self.waiting.popleft()
            req.slot = self.free_slots.pop()
            req.pages = pages
            self.by_slot[req.slot] = req
            self.running.append(req)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.time()
            plan.new.append(NewSequence(req.slot, req.all_token_ids, 0, len(req.output_token_ids), req.spec.params))
            plan.pages.append((req.slot, pages))
            self._run(req, n, plan)
            budget -= n
        plan.freed, self.freed_slots = self.freed_slots, []
        if not plan.slots and not plan.freed:
            return None
        self.step_id += 1
        return plan

    def on_result(self, result: StepResult) -> list[TokenDelta]:
        """Record sampled tokens; finish requests that hit a stop condition."""
        deltas = []
        for slot, token in zip(result.slots, result.token_ids):
            req = self.by_slot.get(slot)
            if req is None:
                continue
            req.output_token_ids.append(token)
            reason = self._finish_reason(req, token)
            first = len(req.output_token_ids) == 1
            deltas.append(
                TokenDelta(
                    req.request_id,
                    [token],
                    finish_reason=reason,
                    time_in_queue=req.first_scheduled_time - req.spec.arrival_time if first else None,
                )
            )
            if reason is not None:
                self.running.remove(req)
                self._release(req)
                del self.by_id[req.request_id]
        return deltas

    def _finish_reason(self, req: Request, token: int) -> str | None:
        params = req.spec.params
        if (not params.ignore_eos and token in req.spec.eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and len(req.output_token_ids) >= params.max_tokens:
            return "length"
        if req.num_tokens >= self.config.max_model_len:
            return "length"
        return None
