"""Scheduler: continuous batching under a token budget, over paged KV memory with a prefix cache."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from tristream.config import EngineConfig
from tristream.protocol import (
    BatchPlan,
    NewSequence,
    SchedulerCounters,
    SchedulerStats,
    StepResult,
    TokenDelta,
    TokenizedRequest,
)
from tristream.scheduler_proc.beams import BeamSearch
from tristream.scheduler_proc.image_files import ImageFiles
from tristream.scheduler_proc.kv_pages import KVPages
from tristream.scheduler_proc.request import Request, finish_reason

logger = logging.getLogger("tristream")


@dataclass
class StepInFlight:
    """What the scheduler needs to take a step's result: the request of each row by slot, the
    prefill chunks to cache, and the time spent planning it."""

    step_id: int
    rows: dict[int, Request] = field(default_factory=dict)
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
    computes its whole prompt. So does an embedding request (a cached prefix has no
    hidden states to pool): it samples nothing and ends, with its pooled vector, once
    its last prompt chunk is computed. Its computed chunks enter the prefix cache like
    any other request's, so that later prompts that generate can start from them.

    Steps may be planned while earlier ones are in flight: a request that samples in
    one step computes that token in the next, before the scheduler has seen it. A
    request that ends in a step may still be in the step after; the token it samples
    there is dropped. A step's sampled tokens are matched to its requests by slot, whatever
    order the plan's rows travel in.

    A beam search (``tristream.scheduler_proc.beams``) runs its beams as requests that
    share its spec; it reserves a slot per beam when its prompt is admitted. Its beams
    are never pipelined, and the beams of every search run in the same steps. They are
    never preempted: their pages come from preempting other requests.

    With a sliding window on every layer (``window``: the largest), each step first frees the
    pages of running requests that no query still to come can read (``KVPages.drop_out_of_window``).

    With speculative decoding, a decoding request that can (``_num_drafts``) computes its newest token and room
    for up to ``num_tokens`` draft tokens, which the gpu_proc proposes and checks; it waits for that step's
    result before its next one, and then takes back the computed positions of the drafts that were rejected
    (their KV is overwritten when those positions are computed again).
    """

    def __init__(self, config: EngineConfig, num_pages: int, window: int = 0) -> None:
        self.config = config
        self.page_size = config.page_size
        self.kv = KVPages(num_pages, self.page_size, config.enable_prefix_caching, window)
        self.capacity = (num_pages - 1) * self.page_size
        self.max_len = min(config.max_model_len, self.capacity)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.by_id: dict[str, Request] = {}
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.freed_slots: list[int] = []
        self.in_flight: deque[StepInFlight] = deque()
        self.step_id = 0
        self.counters = SchedulerCounters()
        self.images = ImageFiles()
        self.beam_searches: dict[str, BeamSearch] = {}
        self.beam_samples: dict[str, str] = {}
        self.spec = config.speculative

    def stats(self, token: int) -> SchedulerStats:
        """The pages and queues now and the counters, in answer to ``StatsRequest(token)``."""
        return SchedulerStats(
            token=token,
            num_pages=self.kv.allocator.num_pages - 1,
            num_free_pages=self.kv.allocator.num_free,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_cached_pages=self.kv.cache.num_pages if self.kv.cache else 0,
            **vars(self.counters),
        )

    def add(self, spec: TokenizedRequest) -> TokenDelta | None:
        """Queue a request; an error delta if it is a duplicate or can never fit."""
        self.images.add(spec.images)
        error = None
        if spec.request_id in self.by_id:
            error = f"request_id {spec.request_id!r} is already running"
        elif len(spec.prompt_token_ids) >= self.max_len:
            error = (
                f"the prompt has {len(spec.prompt_token_ids)} tokens, but the KV cache holds only "
                f"{self.capacity} tokens: it can never run"
            )
        if error is not None:
            self.images.drop(spec.images, None)
            return TokenDelta(spec.request_id, [], error=error, worker=spec.worker)
        req = Request(spec)
        self.by_id[spec.request_id] = req
        self.waiting.append(req)
        if spec.params.use_beam_search:
            self.beam_searches[spec.request_id] = group = BeamSearch(req, self.max_len)
            self.beam_samples.update(dict.fromkeys(group.sample_ids, spec.request_id))
        return None

    def abort(self, request_id: str, worker: int = 0) -> TokenDelta | None:
        """Drop a request wherever it is and free its pages. Any sample id of a beam search ends all of it.
        ``worker`` is the tokenizer worker that owns the request."""
        root_id = self.beam_samples.pop(request_id, None)
        if root_id is not None:
            if root_id in self.beam_searches:
                self._close_beams(self.beam_searches[root_id], cache=False)
            return TokenDelta(request_id, [], finish_reason="abort", worker=worker)
        req = self.by_id.get(request_id)
        if req is None:
            return None
        self._end(req, cache=False)
        return TokenDelta(request_id, [], finish_reason="abort", worker=worker)

    def finish(self, request_id: str) -> None:
        """End a request that hit a stop string; its computed pages stay cached."""
        req = self.by_id.get(request_id)
        if req is not None:
            self._end(req, cache=True)

    def _end(self, req: Request, cache: bool) -> None:
        del self.by_id[req.request_id]
        self.images.drop(req.spec.images, self.in_flight[-1].step_id if self.in_flight else None)
        if req.slot is None:
            self.waiting.remove(req)
        else:
            self._release(req, cache)

    def _live(self, req: Request) -> bool:
        return self.by_id.get(req.request_id) is req

    def _release(self, req: Request, cache: bool) -> None:
        """Take a running request off its slot and free its pages, first caching the computed ones if ``cache``."""
        self.running.remove(req)
        if cache:
            self.kv.cache_computed(req)
        self.kv.release(req)
        self.free_slots.append(req.slot)
        self.freed_slots.append(req.slot)
        req.slot = None

    def _preempt(self, req: Request) -> None:
        self.counters.num_preemptions += 1
        self._release(req, cache=True)
        req.num_computed = 0
        if not req.output_token_ids and not req.num_pending:
            req.prompt_logprobs = []
        self.waiting.appendleft(req)

    def _run(self, req: Request, n: int, plan: BatchPlan, step: StepInFlight, drafts: int = 0) -> None:
        """Plan ``n`` tokens of ``req``, the last ``drafts`` of them room for draft tokens."""
        plan.slots.append(req.slot)
        plan.num_tokens.append(n)
        req.num_computed += n
        sample = req.num_computed - drafts == req.num_planned and req.spec.pooling is None
        plan.sample.append(sample)
        req.num_pending += sample
        step.rows[req.slot] = req
        req.num_drafts = drafts
        if n > drafts + 1:
            step.prefilling.append(req)

    def _num_drafts(self, req: Request, budget: int) -> int:
        """How many draft tokens a running request may check in its next step: 0 unless it speculates (a
        decoding request that samples, without penalties, bad words of several tokens or a min_tokens still to
        reach, while fewer than ``disable_by_batch_size`` requests run), and never past its ``max_tokens``, the
        context or the step's token ``budget``."""
        spec, params = self.spec, req.spec.params
        if (
            spec is None
            or len(self.running) >= spec.disable_by_batch_size
            or req.num_planned - req.num_computed != 1
            or req.spec.pooling is not None
            or req.request_id in self.beam_searches
            or params.penalized
            or any(len(word) > 1 for word in req.spec.bad_words_ids)
            or len(req.output_token_ids) < params.min_tokens
        ):
            return 0
        outputs = len(req.output_token_ids) + req.num_pending
        room = self.max_len - req.num_planned - 1
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - outputs - 1)
        return max(0, min(spec.num_tokens, budget - 1, room))

    def _ends_with_pending(self, req: Request) -> bool:
        """Whether the tokens in flight take the request to its length limit, or an embedding request's last
        prompt chunk is in flight (so it needs no more steps)."""
        if req.spec.pooling is not None:
            return req.num_computed == req.num_tokens
        if not req.num_pending:
            return False
        max_tokens = req.spec.params.max_tokens
        outputs = len(req.output_token_ids) + req.num_pending
        return (max_tokens is not None and outputs >= max_tokens) or req.num_planned >= self.max_len

    def _fork_source(self, req: Request) -> Request | None:
        """The running sample whose prompt KV ``req`` copies, or None to start on its own (also when that
        one has dropped pages that the window of ``req``'s last prompt token reads)."""
        leader = self.by_id.get(req.spec.fork_of) if req.spec.fork_of and not req.output_token_ids else None
        if leader is not None and leader.window_page > self.kv.window_page(req.num_tokens - 1):
            return None
        return leader

    def _drop_out_of_window(self) -> None:
        """Free the running requests' pages that no query still to come can read. A request whose samples
        wait to copy its prompt keeps the pages that its last prompt token's window reads."""
        forked: set[str] | None = None  # read from the waiting queue only when a request has pages to drop
        for req in self.running:
            query = req.num_computed
            if self.kv.window_page(query) <= req.window_page:
                continue
            if forked is None:
                forked = {r.spec.fork_of for r in self.waiting if r.spec.fork_of and not r.output_token_ids}
            if req.request_id in forked:
                query = min(query, len(req.spec.prompt_token_ids) - 1)
            self.kv.drop_out_of_window(req, query)

    def _admit(self, req: Request, budget: int, plan: BatchPlan, step: StepInFlight, leader: Request | None) -> int:
        """Start ``req`` from its longest cached prefix, or from a copy of ``leader``'s prompt KV;
        the tokens it runs (0: it does not fit)."""
        hit = 0 if req.computes_whole_prompt else self.kv.lock_prefix(req)
        start = req.num_tokens - 1 if leader is not None else hit
        n = min(req.num_tokens - start, budget)
        new = self.kv.grow(req, start + n)
        if new is None:
            self.kv.release(req)
            return 0
        self.kv.drop_out_of_window(req, start)
        if leader is not None:
            copied = range(hit // self.page_size, -(-start // self.page_size))
            plan.copies.extend((leader.pages[j], req.pages[j]) for j in copied if req.pages[j])
        req.slot = self.free_slots.pop()
        req.num_computed = start
        if req.num_cached_tokens is None:
            req.num_cached_tokens = start
            self.counters.num_prompt_tokens += len(req.spec.prompt_token_ids)
            self.counters.num_cache_hit_tokens += start
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.time()
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
                req.spec.images,
                pooling=req.spec.pooling,
            )
        )
        plan.pages.append((req.slot, list(req.pages)))
        self._run(req, n, plan, step)
        return n

    def _order_waiting(self) -> None:
        """Longest cached prefix first, after the preempted requests, which keep their place."""
        resumed = [r for r in self.waiting if r.output_token_ids]
        fresh = [r for r in self.waiting if not r.output_token_ids]
        fresh.sort(key=lambda r: -self.kv.cache.peek(r.cache_prompt, r.cache_namespace))
        self.waiting = deque(resumed + fresh)

    def schedule(self) -> BatchPlan | None:
        """The next step's plan, or None when there is nothing to run."""
        start = time.perf_counter()
        plan = BatchPlan(self.step_id)
        step = StepInFlight(self.step_id)
        budget = self.config.max_num_batched_tokens
        preempted = False
        beams_in_flight = self._plan_beam_forks(plan)
        if self.kv.window:
            self._drop_out_of_window()
        # Samples may fork only prompts whose KV was computed before this step.
        forkable = (
            {r.request_id for r in self.running if r.num_computed >= len(r.spec.prompt_token_ids)}
            if self.waiting
            else set()
        )
        for req in list(self.running):
            if budget == 0:
                break
            if req.slot is None or self._ends_with_pending(req) or self._beam_waits(req, beams_in_flight):
                continue
            drafts = self._num_drafts(req, budget)
            if req.num_drafts or (drafts and req.num_pending):
                continue  # its drafts follow the tokens in flight, once those are known
            n = min(req.num_planned - req.num_computed, budget) + drafts
            while (pages := self.kv.grow(req, req.num_computed + n)) is None:
                victim = self._newest_outside_beams() or req
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.slot is not None:
                if pages:
                    plan.pages.append((req.slot, pages))
                self._run(req, n, plan, step, drafts)
                budget -= n
        if not preempted:
            self._admit_waiting(plan, step, budget, forkable)
        plan.freed, self.freed_slots = self.freed_slots, []
        if self.config.check_invariants:
            self.kv.check_invariants(self.running)
        if not plan.slots and not plan.freed and not plan.beams:
            return None
        step.plan_s = time.perf_counter() - start
        self.counters.scheduler_s += step.plan_s
        self.in_flight.append(step)
        self.step_id += 1
        return plan

    def _admit_waiting(self, plan: BatchPlan, step: StepInFlight, budget: int, forkable: set[str]) -> None:
        """Admit waiting requests into ``plan`` while slots and the token ``budget`` last; a sample waits until
        the prompt it forks is in ``forkable``."""
        if self.config.schedule_policy == "lpm" and self.kv.cache is not None and len(self.waiting) > 1:
            self._order_waiting()
        i = 0
        while i < len(self.waiting) and self.free_slots and budget > 0:
            req = self.waiting[i]
            leader = self._fork_source(req)
            if req.num_pending or (leader is not None and leader.request_id not in forkable):
                i += 1
                continue
            group = self.beam_searches.get(req.request_id)
            if group is not None and len(self.free_slots) <= group.slots_to_reserve:
                break
            ran = self._admit(req, budget, plan, step, leader)
            if ran == 0:
                break
            if group is not None:
                group.reserve(self.free_slots)
            del self.waiting[i]
            budget -= ran

    def on_result(self, result: StepResult, ipc_s: float = 0.0) -> list[TokenDelta]:
        """Record sampled tokens, cache computed prefill chunks, finish requests that stop.

        Tokens are matched to requests by ``result.slots``; those of requests that ended meanwhile are dropped.
        ``ipc_s`` is the time the step's plan and result spent in transit."""
        start = time.perf_counter()
        step = self.in_flight.popleft()
        assert step.step_id == result.step_id, (step.step_id, result.step_id)
        self.images.step_done(result.step_id)
        for req in step.prefilling:
            if self._live(req) and req.slot is not None:
                self.kv.cache_computed(req)
        for slot, entries in result.prompt_logprobs:
            req = step.rows.get(slot)
            if req is not None and self._live(req):
                req.prompt_logprobs.extend(entries)
        deltas = []
        rows = _by_slot(result)
        if result.drafts:
            self._count_drafts(result.drafts, rows)
        for slot, tokens, lps in rows:
            req = step.rows[slot]
            group = self.beam_searches.get(req.request_id)
            if group is not None and group.holds(req):
                deltas += self._take_beam(group, req, lps[0])
            elif self._live(req):
                deltas.append(self._take(req, tokens, lps))
        pooled = [(step.rows[slot], vector) for slot, vector in result.embeddings]
        embedded = [self._embedded(req, vector) for req, vector in pooled if self._live(req)]
        if self.config.check_invariants:
            self.kv.check_invariants(self.running)
        took = time.perf_counter() - start
        counters = self.counters
        counters.num_generated_tokens += sum(len(d.token_ids) for d in deltas)
        counters.num_steps += 1
        counters.gpu_busy_s += result.gpu_busy_s
        counters.gpu_idle_s += result.gpu_idle_s
        counters.scheduler_s += took
        counters.ipc_s += ipc_s
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
        return deltas + embedded

    def _count_drafts(self, proposed: list[tuple[int, int]], rows: list[tuple[int, list[int], list]]) -> None:
        """Count the (slot, draft tokens) ``proposed`` in a step, and the accepted ones: each such slot's tokens
        in ``rows`` but the last."""
        produced = {slot: len(tokens) for slot, tokens, _ in rows}
        for slot, n in proposed:
            if n:
                self.counters.num_drafts += 1
                self.counters.num_draft_tokens += n
                self.counters.num_accepted_tokens += produced[slot] - 1

    def _embedded(self, req: Request, embedding: list[float]) -> TokenDelta:
        """End an embedding request with its pooled vector; its computed pages stay cached."""
        self._end(req, cache=True)
        return TokenDelta(
            req.request_id,
            [],
            finish_reason="stop",
            time_in_queue=req.first_scheduled_time - req.spec.arrival_time,
            embedding=embedding,
            worker=req.spec.worker,
        )

    def _take(self, req: Request, tokens: list[int], logprobs: list) -> TokenDelta:
        """Record a step's tokens of a request (more than one where it accepted some of the ``num_drafts`` drafts
        it had room for): its delta, which ends the request at the first token that finishes it."""
        req.num_pending -= 1
        if req.slot is not None:
            req.num_computed -= req.num_drafts + 1 - len(tokens)
        req.num_drafts = 0
        first = not req.output_token_ids
        reason, taken = None, 0
        while reason is None and taken < len(tokens):
            req.output_token_ids.append(tokens[taken])
            reason = self._finish_reason(req, tokens[taken])
            taken += 1
        if reason is not None:
            self._end(req, cache=True)
        return TokenDelta(
            req.request_id,
            tokens[:taken],
            finish_reason=reason,
            num_cached_tokens=req.num_cached_tokens if first else 0,
            time_in_queue=req.first_scheduled_time - req.spec.arrival_time if first else None,
            logprobs=logprobs[:taken] if logprobs[0] is not None else None,
            prompt_logprobs=req.prompt_logprobs if first and req.spec.params.prompt_logprobs is not None else None,
            worker=req.spec.worker,
        )

    def _plan_beam_forks(self, plan: BatchPlan) -> bool:
        """Put the beams' chosen tokens, their new pages and the page copies of their forks into ``plan``; whether
        some beam's step is in flight."""
        in_flight = False
        for group in self.beam_searches.values():
            plan.beams += group.forks
            plan.pages += group.pages
            plan.copies += group.copies
            group.forks, group.pages, group.copies = [], [], []
            in_flight = in_flight or any(beam.request.num_pending for beam in group.beams)
        return in_flight

    def _beam_waits(self, req: Request, beams_in_flight: bool) -> bool:
        """Whether ``req`` is a beam that waits: for its next token to be chosen, or, so that the beams of every
        search run in one step, for a beam step in flight."""
        return req.request_id in self.beam_searches and (beams_in_flight or req.num_computed >= req.num_tokens)

    def _newest_outside_beams(self) -> Request | None:
        """The newest running request that is no beam search's: the first to preempt."""
        return next((r for r in reversed(self.running) if r.request_id not in self.beam_searches), None)

    def _take_beam(self, group: BeamSearch, req: Request, logprobs: list[tuple[int, float]]) -> list[TokenDelta]:
        """Record a beam's step; once every beam's is in, branch the search, or end it with its results. Its new
        pages come first from preempting other requests; where none is left, the search ends there."""
        req.num_pending -= 1
        if not group.take(req, logprobs):
            return []
        choices = group.choose()
        if choices:
            group.drop_unchosen(choices, self.kv, self.running)
            if self._make_room(group.pages_needed(choices, self.kv)):
                group.branch(choices, self.kv, self.running)
                return []
            group.finish_at_capacity(choices)
        for sample_id in group.sample_ids:
            del self.beam_samples[sample_id]
        self._close_beams(group, cache=True)
        return group.results()

    def _make_room(self, num_pages: int) -> bool:
        """Whether ``num_pages`` pages are free, after preempting requests outside beam searches as needed."""
        while not self.kv.ensure_free(num_pages):
            victim = self._newest_outside_beams()
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _close_beams(self, group: BeamSearch, cache: bool) -> None:
        """End a beam search: free its beams' pages (first caching the computed ones if ``cache``) and its slots."""
        del self.beam_searches[group.root.request_id]
        first, *others = [beam.request for beam in group.beams]
        self._end(first, cache)
        for req in others:
            self._release(req, cache)
        self.free_slots += group.spare_slots
        self.freed_slots += group.spare_slots
        group.spare_slots = []

    def _finish_reason(self, req: Request, token: int) -> str | None:
        return finish_reason(req.spec, token, len(req.output_token_ids), req.num_tokens, self.max_len)


def _by_slot(result: StepResult) -> list[tuple[int, list[int], list]]:
    """The result's rows as (slot, tokens, logprobs of each token or None) per slot, in order."""
    logprobs = result.logprobs or [None] * len(result.token_ids)
    rows: list[tuple[int, list[int], list]] = []
    for slot, token, lp in zip(result.slots, result.token_ids, logprobs):
        if rows and rows[-1][0] == slot:
            rows[-1][1].append(token)
            rows[-1][2].append(lp)
        else:
            rows.append((slot, [token], [lp]))
    return rows
