"""Scheduler: continuous batching under a token budget, over paged KV memory with a prefix cache."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from tristream.config import EngineConfig
from tristream.protocol import BatchPlan, NewSequence, SchedulerStats, StepResult, TokenDelta, TokenizedRequest
from tristream.scheduler_proc.page_allocator import PageAllocator
from tristream.scheduler_proc.radix_cache import RadixCache
from tristream.scheduler_proc.request import Request

logger = logging.getLogger("tristream")


@dataclass
class StepInFlight:
    """What the scheduler needs to take a step's result: the requests of its rows, those of its
    sampling rows in row order, the prefill chunks to cache, and the time spent planning it."""

    step_id: int
    rows: dict[int, Request] = field(default_factory=dict)
    samplers: list[Request] = field(default_factory=list)
    prefilling: list[Request] = field(default_factory=list)
    plan_s: float = 0.0


class Scheduler:
    """Decides each step: which requests run, and how many tokens each computes.

    Running requests go first, in admission order; a prompt longer than the
    step's budget is computed in chunks, and each computed chunk enters the
    prefix cache. New requests start from their longest cached prefix. When
    pages run out, unlocked cache leaves are evicted first; then the newest
    running request is preempted: its pages are freed and it is recomputed later.
    A sample that forks another (``n > 1``) waits until that one's prompt is
    computed, then shares its cached pages, gets copies of the rest, and
    computes only the last prompt token. A request asking for prompt logprobs
    computes its whole prompt.

    Steps may be planned while earlier ones are in flight: a request that samples in
    one step computes that token in the next, before the scheduler has seen it. A
    request that ends in a step may still be in the step after; the token it samples
    there is dropped. Rows that decode one token come first in a plan, by slot.
    """

    def __init__(self, config: EngineConfig, num_pages: int) -> None:
        self.config = config
        self.page_size = config.page_size
        self.pages = PageAllocator(num_pages)
        self.cache = RadixCache(self.page_size, self.pages) if config.enable_prefix_caching else None
        self.capacity = (num_pages - 1) * self.page_size
        self.max_len = min(config.max_model_len, self.capacity)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.by_slot: dict[int, Request] = {}
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.freed_slots: list[int] = []
        self.in_flight: deque[StepInFlight] = deque()
        self.step_id = 0
        self.num_prompt_tokens = 0
        self.num_cache_hit_tokens = 0
        self.num_preemptions = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.gpu_busy_s = self.gpu_idle_s = self.scheduler_s = self.ipc_s = 0.0

    def stats(self, token: int) -> SchedulerStats:
        return SchedulerStats(
            token,
            self.pages.num_pages - 1,
            self.pages.num_free,
            len(self.running),
            len(self.waiting),
            self.cache.num_pages if self.cache else 0,
            self.num_prompt_tokens,
            self.num_cache_hit_tokens,
            self.num_preemptions,
            self.num_generated_tokens,
            self.num_steps,
            self.gpu_busy_s,
            self.gpu_idle_s,
            self.scheduler_s,
            self.ipc_s,
        )

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, spec: TokenizedRequest) -> TokenDelta | None:
        """Queue a request; an error delta if it is a duplicate or can never fit."""
        if spec.request_id in self.by_id:
            return TokenDelta(spec.request_id, [], error=f"request_id {spec.request_id!r} is already running")
        if len(spec.prompt_token_ids) >= self.max_len:
            return TokenDelta(
                spec.request_id,
                [],
                error=f"the prompt has {len(spec.prompt_token_ids)} tokens, but the KV cache holds only "
                f"{self.capacity} tokens: it can never run",
            )
        req = Request(spec)
        self.by_id[spec.request_id] = req
        self.waiting.append(req)
        return None

    def abort(self, request_id: str) -> TokenDelta | None:
        """Drop a request wherever it is and free its pages."""
        req = self.by_id.get(request_id)
        if req is None:
            return None
        self._end(req, cache=False)
        return TokenDelta(request_id, [], finish_reason="abort")

    def finish(self, request_id: str) -> None:
        """End a request that hit a stop string; its computed pages stay cached."""
        req = self.by_id.get(request_id)
        if req is not None:
            self._end(req, cache=True)

    def _end(self, req: Request, cache: bool) -> None:
        del self.by_id[req.request_id]
        if req.slot is None:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            if cache:
                self._cache(req)
            self._release(req)

    def _live(self, req: Request) -> bool:
        return self.by_id.get(req.request_id) is req

    def _alloc(self, n: int) -> list[int] | None:
        """``n`` free pages, evicting cache leaves if needed; None if that is not enough."""
        if n <= 0:
            return []
        short = n - self.pages.num_free
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        return self.pages.alloc(n)

    def _cache(self, req: Request) -> None:
        """Put the request's computed whole pages into the prefix cache and hold them there."""
        if self.cache is None:
            return
        n = min(req.num_computed, req.num_tokens) // self.page_size
        node, tree_pages = self.cache.insert(
            req.all_token_ids[: n * self.page_size], req.pages[:n], req.cache_namespace
        )
        for mine, theirs in zip(req.pages, tree_pages):
            if mine == theirs:
                req.own_pages.discard(mine)
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = node

    def _release(self, req: Request) -> None:
        self.pages.free([p for p in req.pages if p in req.own_pages])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.pages, req.own_pages, req.cache_node = [], set(), None
        del self.by_slot[req.slot]
        self.free_slots.append(req.slot)
        self.freed_slots.append(req.slot)
        req.slot = None

    def _preempt(self, req: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(req)
        self._cache(req)
        self._release(req)
        req.num_computed = 0
        if not req.output_token_ids and not req.num_pending:
            req.prompt_logprobs = []
        self.waiting.appendleft(req)

    def _grow(self, req: Request, num_tokens: int, plan: BatchPlan) -> bool:
        """Give ``req`` pages for ``num_tokens`` tokens; False if too few can be had."""
        pages = self._alloc(-(-num_tokens // self.page_size) - len(req.pages))
        if pages is None:
            return False
        if pages:
            req.pages.extend(pages)
            req.own_pages.update(pages)
            plan.pages.append((req.slot, pages))
        return True

    def _run(self, req: Request, n: int, plan: BatchPlan, step: StepInFlight) -> None:
        plan.slots.append(req.slot)
        plan.num_tokens.append(n)
        req.num_computed += n
        sample = req.num_computed == req.num_planned
        plan.sample.append(sample)
        req.num_pending += sample
        step.rows[req.slot] = req
        if n > 1:
            step.prefilling.append(req)

    def _ends_with_pending(self, req: Request) -> bool:
        """Whether the tokens in flight take the request to its length limit (so it needs no more steps)."""
        if not req.num_pending:
            return False
        max_tokens = req.spec.params.max_tokens
        outputs = len(req.output_token_ids) + req.num_pending
        return (max_tokens is not None and outputs >= max_tokens) or req.num_planned >= self.max_len

    def _fork_source(self, req: Request, forkable: set[str]) -> Request | None | bool:
        """The running sample whose prompt KV ``req`` copies; None to start on its own;
        False while it must wait for that sample's prompt."""
        leader = self.by_id.get(req.spec.fork_of) if req.spec.fork_of and not req.output_token_ids else None
        if leader is None:
            return None
        return leader if leader.request_id in forkable else False

    def _admit(self, req: Request, budget: int, plan: BatchPlan, step: StepInFlight, leader: Request | None) -> int:
        """Start ``req`` from its longest cached prefix, or from a copy of ``leader``'s prompt KV;
        the tokens it runs (0: it does not fit)."""
        node, pages = None, []
        if self.cache is not None and req.spec.params.prompt_logprobs is None:
            node, pages = self.cache.match(req.all_token_ids[: req.num_tokens - 1], req.cache_namespace)
            self.cache.lock(node)
        hit = len(pages) * self.page_size
        start = req.num_tokens - 1 if leader is not None else hit
        n = min(req.num_tokens - start, budget)
        new = self._alloc(-(-(start + n) // self.page_size) - len(pages))
        if new is None:
            if node is not None:
                self.cache.unlock(node)
            return 0
        if leader is not None:
            first = len(pages)
            plan.copies.extend(zip(leader.pages[first : -(-start // self.page_size)], new))
        req.slot = self.free_slots.pop()
        req.pages, req.own_pages, req.cache_node, req.num_computed = pages + new, set(new), node, start
        if req.num_cached_tokens is None:
            req.num_cached_tokens = start
            self.num_prompt_tokens += len(req.spec.prompt_token_ids)
            self.num_cache_hit_tokens += start
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.time()
        self.by_slot[req.slot] = req
        self.running.append(req)
        plan.new.append(
            NewSequence(
                req.slot,
                req.all_token_ids,
                start,
                len(req.output_token_ids),
                req.spec.params,
                req.spec.bad_words_ids,
                req.spec.grammar,
                req.spec.lora.slot if req.spec.lora else -1,
            )
        )
        plan.pages.append((req.slot, list(req.pages)))
        self._run(req, n, plan, step)
        return n

    def _order_waiting(self) -> None:
        """Longest cached prefix first, after the preempted requests, which keep their place."""
        resumed = [r for r in self.waiting if r.output_token_ids]
        fresh = [r for r in self.waiting if not r.output_token_ids]
        fresh.sort(key=lambda r: -self.cache.peek(r.spec.prompt_token_ids, r.cache_namespace))
        self.waiting = deque(resumed + fresh)

    def schedule(self) -> BatchPlan | None:
        """The next step's plan, or None when there is nothing to run."""
        start = time.perf_counter()
        plan = BatchPlan(self.step_id)
        step = StepInFlight(self.step_id)
        budget = self.config.max_num_batched_tokens
        preempted = False
        # Samples may fork only prompts whose KV was computed before this step.
        forkable = (
            {r.request_id for r in self.running if r.num_computed >= len(r.spec.prompt_token_ids)}
            if self.waiting
            else set()
        )
        for req in list(self.running):
            if budget == 0:
                break
            if req.slot is None or self._ends_with_pending(req):
                continue
            n = min(req.num_planned - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n, plan):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.slot is not None:
                self._run(req, n, plan, step)
                budget -= n
        if self.config.schedule_policy == "lpm" and self.cache is not None and len(self.waiting) > 1:
            self._order_waiting()
        i = 0
        while not preempted and i < len(self.waiting) and self.free_slots and budget > 0:
            req = self.waiting[i]
            leader = self._fork_source(req, forkable)
            if leader is False or req.num_pending:
                i += 1
                continue
            ran = self._admit(req, budget, plan, step, leader)
            if ran == 0:
                break
            del self.waiting[i]
            budget -= ran
        plan.freed, self.freed_slots = self.freed_slots, []
        if self.config.check_invariants:
            self.check_invariants()
        if not plan.slots and not plan.freed:
            return None
        self._decode_rows_first(plan)
        step.samplers = [step.rows[slot] for slot, sample in zip(plan.slots, plan.sample) if sample]
        step.plan_s = time.perf_counter() - start
        self.scheduler_s += step.plan_s
        self.in_flight.append(step)
        self.step_id += 1
        return plan

    @staticmethod
    def _decode_rows_first(plan: BatchPlan) -> None:
        """Put the rows that decode one token first, in slot order (the order PlanEncoder sends as a diff)."""
        rows = list(zip(plan.slots, plan.num_tokens, plan.sample))
        decode = sorted(r for r in rows if r[1] == 1 and r[2])
        rest = [r for r in rows if not (r[1] == 1 and r[2])]
        plan.slots, plan.num_tokens, plan.sample = (list(x) for x in zip(*(decode + rest))) if rows else ([], [], [])

    def on_result(self, result: StepResult, ipc_s: float = 0.0) -> list[TokenDelta]:
        """Record sampled tokens, cache computed prefill chunks, finish requests that stop.

        Results come in plan order. Tokens of requests that ended meanwhile are dropped.
        ``ipc_s`` is the time the step's plan and result spent in transit."""
        start = time.perf_counter()
        step = self.in_flight.popleft()
        assert step.step_id == result.step_id, (step.step_id, result.step_id)
        for req in step.prefilling:
            if self._live(req) and req.slot is not None:
                self._cache(req)
        for slot, entries in result.prompt_logprobs:
            req = step.rows.get(slot)
            if req is not None and self._live(req):
                req.prompt_logprobs.extend(entries)
        deltas = []
        logprobs = result.logprobs or [None] * len(result.token_ids)
        for req, token, lp in zip(step.samplers, result.token_ids, logprobs):
            if not self._live(req):
                continue
            req.num_pending -= 1
            req.output_token_ids.append(token)
            reason = self._finish_reason(req, token)
            first = len(req.output_token_ids) == 1
            deltas.append(
                TokenDelta(
                    req.request_id,
                    [token],
                    finish_reason=reason,
                    num_cached_tokens=req.num_cached_tokens if first else 0,
                    time_in_queue=req.first_scheduled_time - req.spec.arrival_time if first else None,
                    logprobs=[lp] if lp is not None else None,
                    prompt_logprobs=req.prompt_logprobs
                    if first and req.spec.params.prompt_logprobs is not None
                    else None,
                )
            )
            if reason is not None:
                self._end(req, cache=True)
        self.num_generated_tokens += len(deltas)
        if self.config.check_invariants:
            self.check_invariants()
        took = time.perf_counter() - start
        self.num_steps += 1
        self.gpu_busy_s += result.gpu_busy_s
        self.gpu_idle_s += result.gpu_idle_s
        self.scheduler_s += took
        self.ipc_s += ipc_s
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "step %d: %d rows, %d sampled, gpu %.2f ms, gpu idle %.2f ms, scheduler %.2f ms, ipc %.2f ms",
                step.step_id,
                len(step.rows),
                len(result.token_ids),
                1e3 * result.gpu_busy_s,
                1e3 * result.gpu_idle_s,
                1e3 * (step.plan_s + took),
                1e3 * ipc_s,
            )
        return deltas

    def _finish_reason(self, req: Request, token: int) -> str | None:
        params = req.spec.params
        if (not params.ignore_eos and token in req.spec.eos_token_ids) or token in params.stop_token_ids:
            return "stop"
        if params.max_tokens is not None and len(req.output_token_ids) >= params.max_tokens:
            return "length"
        if req.num_tokens >= self.max_len:
            return "length"
        return None

    def check_invariants(self) -> None:
        """Every usable page is exactly one of: free, in the cache, or owned by a running request."""
        free = self.pages.free_pages()
        cached = self.cache.all_pages() if self.cache else []
        owned = [p for r in self.running for p in r.own_pages]
        everything = free + cached + owned
        total = self.pages.num_pages - 1
        assert len(free) + len(cached) + len(owned) == total, (len(free), len(cached), len(owned), total)
        assert sorted(everything) == list(range(1, total + 1)), "a page is lost or held twice"
        for r in self.running:
            assert set(r.pages) >= r.own_pages and len(r.pages) * self.page_size >= r.num_computed
            assert all(p in r.own_pages or p in cached for p in r.pages), "a request uses a page nobody holds"
        if self.cache:
            assert self.cache.num_pages == len(cached)
