"""Scheduler: continuous batching under a token budget, over paged KV memory with a prefix cache."""

from __future__ import annotations

import time
from collections import deque

from tristream.config import EngineConfig
from tristream.protocol import BatchPlan, NewSequence, SchedulerStats, StepResult, TokenDelta, TokenizedRequest
from tristream.scheduler_proc.page_allocator import PageAllocator
from tristream.scheduler_proc.radix_cache import RadixCache
from tristream.scheduler_proc.request import Request


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
        self.prefilling: list[Request] = []
        self.step_id = 0
        self.num_prompt_tokens = 0
        self.num_cache_hit_tokens = 0
        self.num_preemptions = 0

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
        )

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, spec: TokenizedRequest) -> TokenDelta | None:
        """Queue a request; an error delta if it is a duplicate or can never fit."""
        if spec.request_id in self.by_id:
            return TokenDelta(spec.request_id, [], error=f"request_id {spec.request_id!r} is already running")
        if len(spec.prompt_token_ids) >= self.max_len:
            return TokenDelta(
                spec.request_id, [],
                error=f"the prompt has {len(spec.prompt_token_ids)} tokens, but the KV cache holds only "
                f"{self.capacity} tokens: it can never run",
            )
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

    def finish(self, request_id: str) -> None:
        """End a request that hit a stop string; its computed pages stay cached."""
        req = self.by_id.pop(request_id, None)
        if req is None:
            return
        if req.slot is None:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._cache(req)
            self._release(req)

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
        n = req.num_computed // self.page_size
        node, tree_pages = self.cache.insert(req.all_token_ids[: n * self.page_size], req.pages[:n])
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
        if not req.output_token_ids:
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

    def _run(self, req: Request, n: int, plan: BatchPlan) -> None:
        plan.slots.append(req.slot)
        plan.num_tokens.append(n)
        req.num_computed += n
        plan.sample.append(req.num_computed == req.num_tokens)
        if n > 1:
            self.prefilling.append(req)

    def _fork_source(self, req: Request, forkable: set[str]) -> Request | None | bool:
        """The running sample whose prompt KV ``req`` copies; None to start on its own;
        False while it must wait for that sample's prompt."""
        leader = self.by_id.get(req.spec.fork_of) if req.spec.fork_of and not req.output_token_ids else None
        if leader is None:
            return None
        return leader if leader.request_id in forkable else False

    def _admit(self, req: Request, budget: int, plan: BatchPlan, leader: Request | None) -> int:
        """Start ``req`` from its longest cached prefix, or from a copy of ``leader``'s prompt KV;
        the tokens it runs (0: it does not fit)."""
        node, pages = None, []
        if self.cache is not None and req.spec.params.prompt_logprobs is None:
            node, pages = self.cache.match(req.all_token_ids[: req.num_tokens - 1])
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
                req.slot, req.all_token_ids, start, len(req.output_token_ids), req.spec.params,
                req.spec.bad_words_ids, req.spec.grammar,
            )
        )
        plan.pages.append((req.slot, list(req.pages)))
        self._run(req, n, plan)
        return n

    def _order_waiting(self) -> None:
        """Longest cached prefix first, after the preempted requests, which keep their place."""
        resumed = [r for r in self.waiting if r.output_token_ids]
        fresh = [r for r in self.waiting if not r.output_token_ids]
        fresh.sort(key=lambda r: -self.cache.peek(r.spec.prompt_token_ids))
        self.waiting = deque(resumed + fresh)

    def schedule(self) -> BatchPlan | None:
        """The next step's plan, or None when there is nothing to run."""
        plan = BatchPlan(self.step_id)
        budget = self.config.max_num_batched_tokens
        preempted = False
        # Samples may fork only prompts whose KV was computed before this step.
        forkable = {r.request_id for r in self.running if r.num_computed >= len(r.spec.prompt_token_ids)} if self.waiting else set()
        for req in list(self.running):
            if budget == 0:
                break
            if req.slot is None:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, req.num_computed + n, plan):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.slot is not None:
                self._run(req, n, plan)
                budget -= n
        if self.config.schedule_policy == "lpm" and self.cache is not None and len(self.waiting) > 1:
            self._order_waiting()
        i = 0
        while not preempted and i < len(self.waiting) and self.free_slots and budget > 0:
            leader = self._fork_source(self.waiting[i], forkable)
            if leader is False:
                i += 1
                continue
            ran = self._admit(self.waiting[i], budget, plan, leader)
            if ran == 0:
                break
            del self.waiting[i]
            budget -= ran
        plan.freed, self.freed_slots = self.freed_slots, []
        if self.config.check_invariants:
            self.check_invariants()
        if not plan.slots and not plan.freed:
            return None
        self.step_id += 1
        return plan

    def on_result(self, result: StepResult) -> list[TokenDelta]:
        """Record sampled tokens, cache computed prefill chunks, finish requests that stop."""
        for req in self.prefilling:
            if req.slot is not None:
                self._cache(req)
        self.prefilling = []
        for slot, entries in result.prompt_logprobs:
            if slot in self.by_slot:
                self.by_slot[slot].prompt_logprobs.extend(entries)
        deltas = []
        logprobs = result.logprobs or [None] * len(result.slots)
        for slot, token, lp in zip(result.slots, result.token_ids, logprobs):
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
                    num_cached_tokens=req.num_cached_tokens if first else 0,
                    time_in_queue=req.first_scheduled_time - req.spec.arrival_time if first else None,
                    logprobs=[lp] if lp is not None else None,
                    prompt_logprobs=req.prompt_logprobs if first and req.spec.params.prompt_logprobs is not None else None,
                )
            )
            if reason is not None:
                self.running.remove(req)
                self._cache(req)
                self._release(req)
                del self.by_id[req.request_id]
        if self.config.check_invariants:
            self.check_invariants()
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
