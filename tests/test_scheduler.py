"""Unit tests of the Scheduler, driven by a simulated gpu_proc (no processes)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

from tristream import SamplingParams
from tristream.config import EngineConfig
from tristream.protocol import BatchPlan, StepResult, TokenDelta, TokenizedRequest
from tristream.scheduler_proc.scheduler import Scheduler

EOS = 2


def fake_token(seed: int, index: int) -> int:
    """The token a request with ``seed`` samples as its ``index``-th output (never EOS)."""
    return 100 + (seed * 7919 + index * 31) % 30000


@dataclass
class SlotView:
    """The simulated gpu's view of one slot, built only from the plans."""

    token_ids: list[int]
    num_computed: int
    seed: int
    num_prompt: int
    admitted: int
    pages: list[int] = field(default_factory=list)


class Harness:
    """A Scheduler plus a simulated gpu that applies every plan like ModelRunner does and checks it.

    Every request gets its own seed, which also names it inside the harness (request ids may be reused).
    """

    def __init__(self, num_pages: int = 64, **config: object) -> None:
        defaults = dict(
            model="unused",
            max_model_len=128,
            max_num_seqs=8,
            max_num_batched_tokens=32,
            page_size=4,
            enable_prefix_caching=False,
            check_invariants=True,
        )
        self.config = EngineConfig(**{**defaults, **config})
        self.num_pages = num_pages
        self.sched = Scheduler(self.config, num_pages)
        self.slots: dict[int, SlotView] = {}
        self.admissions = 0
        self.plans: list[BatchPlan] = []
        self.seed_of: dict[str, int] = {}
        self.rid_of: dict[int, str] = {}
        self.prompts: dict[int, list[int]] = {}
        self.outputs: dict[int, list[int]] = {}
        self.finish: dict[int, str] = {}
        self.aborted: set[int] = set()
        self.admitted: set[int] = set()
        self.deltas: list[TokenDelta] = []
        self.preempted: list[str] = []
        self.readmitted: list[tuple[str, int]] = []
        self.last_step_id = -1

    def add(
        self, request_id: str, prompt_len: int, seed: int, eos: list[int] | None = None, **params: object
    ) -> TokenDelta | None:
        """Submit a request of ``prompt_len`` tokens; returns the scheduler's answer."""
        assert seed not in self.rid_of
        prompt = [10 + (seed + i) % 50 for i in range(prompt_len)]
        spec = TokenizedRequest(request_id, prompt, SamplingParams(seed=seed, **params), eos or [EOS], time.time())
        delta = self.sched.add(spec)
        if delta is None:
            self.seed_of[request_id] = seed
            self.rid_of[seed] = request_id
            self.prompts[seed] = prompt
            self.outputs[seed] = []
        return delta

    def abort(self, request_id: str) -> TokenDelta | None:
        delta = self.sched.abort(request_id)
        if delta is not None:
            assert delta.request_id == request_id and delta.finish_reason == "abort" and delta.token_ids == []
            self.aborted.add(self.seed_of[request_id])
        return delta

    def out(self, request_id: str) -> list[int]:
        return self.outputs[self.seed_of[request_id]]

    def reason(self, request_id: str) -> str | None:
        return self.finish.get(self.seed_of[request_id])

    def expected(self, request_id: str, n: int) -> list[int]:
        """The first ``n`` tokens the simulated gpu samples for ``request_id``."""
        return [fake_token(self.seed_of[request_id], i) for i in range(n)]

    def _check_pages(self) -> None:
        held = [p for view in self.slots.values() for p in view.pages]
        assert len(held) == len(set(held)), "a page is held by two slots"
        assert all(1 <= p < self.num_pages for p in held)
        stats = self.sched.stats(0)
        assert stats.num_pages == self.num_pages - 1
        assert stats.num_free_pages == stats.num_pages - len(held)

    def _apply(self, plan: BatchPlan) -> None:
        ended = {s for s, v in self.slots.items() if v.seed in self.finish or v.seed in self.aborted}
        assert ended <= set(plan.freed), "a finished or aborted request's slot was not freed"
        preempted = [s for s in plan.freed if s not in ended]
        if preempted:
            running = sorted(set(self.slots) - ended, key=lambda s: self.slots[s].admitted)
            assert set(preempted) == set(running[len(running) - len(preempted) :]), "not the newest were preempted"
            self.preempted.extend(self.rid_of[self.slots[s].seed] for s in preempted)
        for slot in plan.freed:
            del self.slots[slot]
        for new in plan.new:
            assert new.slot not in self.slots and 0 <= new.slot < self.config.max_num_seqs
            seed = new.params.seed
            assert seed not in self.finish and seed not in self.aborted
            assert new.num_cached == 0
            assert new.num_outputs == len(self.outputs[seed])
            assert new.token_ids == self.prompts[seed] + self.outputs[seed]
            if seed in self.admitted:
                self.readmitted.append((self.rid_of[seed], new.num_outputs))
            self.admitted.add(seed)
            self.slots[new.slot] = SlotView(
                list(new.token_ids), new.num_cached, seed, len(new.token_ids) - new.num_outputs, self.admissions
            )
            self.admissions += 1
        for slot, pages in plan.pages:
            self.slots[slot].pages.extend(pages)
        self._check_pages()

    def schedule(self) -> BatchPlan | None:
        """The scheduler's next plan, applied to the simulated gpu's slots."""
        plan = self.sched.schedule()
        if plan is None:
            return None
        assert plan.step_id > self.last_step_id
        self.last_step_id = plan.step_id
        self.plans.append(plan)
        self._apply(plan)
        return plan

    def compute(self, plan: BatchPlan) -> StepResult:
        """What the gpu would do: check every slot's work and sample the fake tokens."""
        assert len(plan.slots) == len(plan.num_tokens) == len(plan.sample) == len(set(plan.slots))
        assert sum(plan.num_tokens) <= self.config.max_num_batched_tokens
        result = StepResult(plan.step_id, [], [])
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            view = self.slots[slot]
            end = view.num_computed + n
            assert n >= 1 and end <= len(view.token_ids)
            assert len(view.pages) * self.config.page_size >= end, "KV written past the slot's pages"
            view.num_computed = end
            assert sample == (end == len(view.token_ids))
            if sample:
                token = fake_token(view.seed, len(view.token_ids) - view.num_prompt)
                view.token_ids.append(token)
                assert len(view.token_ids) <= self.config.max_model_len
                result.slots.append(slot)
                result.token_ids.append(token)
        return result

    def deliver(self, result: StepResult) -> list[TokenDelta]:
        """Hand a step's result to the scheduler and record its deltas."""
        deltas = self.sched.on_result(result)
        for d in deltas:
            seed = self.seed_of[d.request_id]
            assert seed not in self.finish and seed not in self.aborted, "a delta after the request ended"
            assert d.error is None
            self.deltas.append(d)
            self.outputs[seed].extend(d.token_ids)
            if d.finish_reason is not None:
                self.finish[seed] = d.finish_reason
        return deltas

    def step(self) -> BatchPlan | None:
        """One whole step; None when the scheduler has nothing to run."""
        plan = self.schedule()
        if plan is not None:
            self.deliver(self.compute(plan))
        return plan

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if self.step() is None:
                assert not (self.sched.waiting or self.sched.running)
                return
        raise AssertionError("the scheduler did not finish")

    def assert_all_pages_free(self) -> None:
        stats = self.sched.stats(7)
        assert stats.token == 7
        assert stats.num_free_pages == stats.num_pages == self.num_pages - 1
        assert stats.num_running == stats.num_waiting == 0


def slot_work(h: Harness, request_id: str) -> list[tuple[int, bool]]:
    """(num_tokens, sample) of every step in which ``request_id`` ran (it must not be preempted)."""
    seed = h.seed_of[request_id]
    slot = next(n.slot for p in h.plans for n in p.new if n.params.seed == seed)
    work = []
    for plan in h.plans:
        if slot in plan.slots:
            i = plan.slots.index(slot)
            work.append((plan.num_tokens[i], plan.sample[i]))
    return work


def test_long_prompt_is_chunked_and_samples_only_on_the_last_chunk() -> None:
    h = Harness(max_num_batched_tokens=16)
    h.add("long", prompt_len=50, seed=1, max_tokens=3)
    h.run()
    work = slot_work(h, "long")
    first_sample = next(i for i, (_, s) in enumerate(work) if s)
    chunks = work[: first_sample + 1]
    assert len(chunks) == 4
    assert sum(n for n, _ in chunks) == 50
    assert all(n <= 16 for n, _ in chunks)
    assert [s for _, s in chunks] == [False, False, False, True]
    assert work[first_sample + 1 :] == [(1, True), (1, True)]
    assert h.out("long") == h.expected("long", 3) and h.reason("long") == "length"
    h.assert_all_pages_free()


def test_decode_and_prefill_chunk_share_a_step_within_budget() -> None:
    budget = 16
    h = Harness(max_num_batched_tokens=budget)
    h.add("a", prompt_len=5, seed=1, max_tokens=20)
    h.step()
    h.step()
    h.add("b", prompt_len=40, seed=2, max_tokens=4)
    plan = h.step()
    slot_a = h.plans[0].slots[0]
    slot_b = next(n.slot for n in plan.new)
    i_a, i_b = plan.slots.index(slot_a), plan.slots.index(slot_b)
    assert plan.num_tokens[i_a] == 1 and plan.sample[i_a]
    assert plan.num_tokens[i_b] == budget - 1 and not plan.sample[i_b]
    h.run()
    assert all(sum(p.num_tokens) <= budget for p in h.plans)
    assert h.out("a") == h.expected("a", 20)
    assert h.out("b") == h.expected("b", 4)
    h.assert_all_pages_free()


def test_many_requests_respect_budget_and_slots() -> None:
    h = Harness(max_num_batched_tokens=24, max_num_seqs=3, num_pages=200)
    rng = random.Random(0)
    lengths = {}
    for i in range(9):
        lengths[f"r{i}"] = rng.randint(1, 12)
        h.add(f"r{i}", prompt_len=rng.randint(1, 60), seed=i + 1, max_tokens=lengths[f"r{i}"])
    h.run()
    assert max(len(p.slots) for p in h.plans) <= 3
    assert all(sum(p.num_tokens) <= 24 for p in h.plans)
    assert any(sum(p.num_tokens) == 24 for p in h.plans)  # the budget is used when there is work
    for rid, n in lengths.items():
        assert h.out(rid) == h.expected(rid, n) and h.reason(rid) == "length"
    h.assert_all_pages_free()


def test_finish_on_eos_unless_ignored() -> None:
    h = Harness()
    h.add("eos", prompt_len=6, seed=1, eos=[fake_token(1, 3), EOS], max_tokens=10)
    h.add("ignore", prompt_len=6, seed=2, eos=[fake_token(2, 3)], max_tokens=10, ignore_eos=True)
    h.run()
    assert h.out("eos") == h.expected("eos", 4) and h.reason("eos") == "stop"
    assert h.out("ignore") == h.expected("ignore", 10) and h.reason("ignore") == "length"
    assert fake_token(2, 3) in h.out("ignore")
    h.assert_all_pages_free()


def test_finish_on_stop_token_ids_even_with_ignore_eos() -> None:
    h = Harness()
    h.add("stop", prompt_len=3, seed=5, stop_token_ids=[fake_token(5, 6)], ignore_eos=True)
    h.add("plain", prompt_len=3, seed=6, stop_token_ids=[fake_token(6, 2)], max_tokens=9)
    h.run()
    assert h.out("stop") == h.expected("stop", 7) and h.reason("stop") == "stop"
    assert h.out("plain") == h.expected("plain", 3) and h.reason("plain") == "stop"
    h.assert_all_pages_free()


def test_finish_on_max_tokens_and_max_model_len() -> None:
    # the harness also checks that no sequence ever holds more than max_model_len tokens
    h = Harness(max_model_len=32)
    h.add("max_tokens", prompt_len=10, seed=1, max_tokens=5)
    h.add("model_len", prompt_len=20, seed=2)
    h.add("both", prompt_len=31, seed=3, max_tokens=8)
    h.run()
    assert h.out("max_tokens") == h.expected("max_tokens", 5) and h.reason("max_tokens") == "length"
    assert h.out("model_len") == h.expected("model_len", 12) and h.reason("model_len") == "length"
    assert h.out("both") == h.expected("both", 1) and h.reason("both") == "length"
    h.assert_all_pages_free()


def test_first_delta_carries_time_in_queue() -> None:
    h = Harness()
    h.add("r", prompt_len=4, seed=1, max_tokens=3)
    h.run()
    deltas = [d for d in h.deltas if d.request_id == "r"]
    assert deltas[0].time_in_queue is not None and deltas[0].time_in_queue >= 0
    assert all(d.time_in_queue is None for d in deltas[1:])
    assert [d.finish_reason for d in deltas] == [None, None, "length"]
    assert [d.token_ids for d in deltas] == [[t] for t in h.expected("r", 3)]


def test_preemption_of_the_newest_request_and_recompute() -> None:
    # 12 usable pages of 4 tokens; each request grows to 30 tokens, 8 pages
    h = Harness(num_pages=13, max_model_len=48, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(4):
        h.add(f"r{i}", prompt_len=10, seed=i + 1, max_tokens=20, ignore_eos=True)
    h.run()
    assert h.preempted, "the pool is too small for all four: some request must be preempted"
    # the harness checked that each victim was the newest running request, and that each
    # re-admission carried prompt + outputs so far; some resumed with outputs already made
    assert sorted(h.preempted) == sorted(rid for rid, _ in h.readmitted)
    assert any(n > 0 for _, n in h.readmitted)
    assert "r0" not in h.preempted
    for i in range(4):
        rid = f"r{i}"
        assert h.out(rid) == h.expected(rid, 20) and h.reason(rid) == "length"
    h.assert_all_pages_free()


def test_sampled_tokens_are_taken_by_slot_in_any_order() -> None:
    h = Harness(max_num_batched_tokens=16)
    for i in range(4):
        h.add(f"r{i}", prompt_len=3 + 5 * i, seed=i + 1, max_tokens=6)
    while (plan := h.schedule()) is not None:
        result = h.compute(plan)
        result.slots.reverse()
        result.token_ids.reverse()
        h.deliver(result)
    for i in range(4):
        assert h.out(f"r{i}") == h.expected(f"r{i}", 6)
    h.assert_all_pages_free()


def test_counters_in_the_stats() -> None:
    h = Harness(num_pages=13, max_model_len=48, max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(4):
        h.add(f"r{i}", prompt_len=10, seed=i + 1, max_tokens=20, ignore_eos=True)
    h.run()
    stats = h.sched.stats(0)
    assert stats.num_preemptions == len(h.preempted) > 0
    assert stats.num_prompt_tokens == 40 and stats.num_cache_hit_tokens == 0
    assert stats.num_generated_tokens == 80 == len(h.deltas)
    assert stats.num_steps == len(h.plans)
    assert stats.scheduler_s > 0 and stats.gpu_busy_s == stats.gpu_idle_s == stats.ipc_s == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_under_page_pressure(seed: int) -> None:
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 4, 16])
    max_model_len = 64
    # always room for one full-length request (as the gpu_proc guarantees), often not for more
    num_pages = -(-max_model_len // page_size) + 1 + rng.randint(0, 2 * max_model_len // page_size)
    h = Harness(
        num_pages=num_pages,
        page_size=page_size,
        max_model_len=max_model_len,
        max_num_seqs=rng.randint(1, 6),
        max_num_batched_tokens=rng.choice([8, 16, 33, 64]),
    )
    expected: dict[str, int] = {}
    pending = []
    for i in range(14):
        prompt_len = rng.randint(1, 40)
        max_tokens = rng.randint(1, 30)
        pending.append((f"q{i}", prompt_len, i + 1, max_tokens))
        expected[f"q{i}"] = min(max_tokens, max_model_len - prompt_len)
    for _ in range(5000):
        if pending and rng.random() < 0.3:
            rid, prompt_len, s, max_tokens = pending.pop(0)
            h.add(rid, prompt_len=prompt_len, seed=s, max_tokens=max_tokens, ignore_eos=True)
        if h.step() is None and not pending:
            break
    else:
        raise AssertionError("the scheduler did not finish")
    for rid, n in expected.items():
        assert h.out(rid) == h.expected(rid, n), rid
        assert h.reason(rid) == "length"
    h.assert_all_pages_free()


def test_abort_waiting_and_running_requests() -> None:
    h = Harness(num_pages=40, max_num_seqs=1)
    h.add("running", prompt_len=9, seed=1, max_tokens=50)
    h.add("waiting", prompt_len=9, seed=2, max_tokens=50)
    h.step()
    h.step()
    stats = h.sched.stats(0)
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.num_free_pages < stats.num_pages

    assert h.abort("waiting") is not None
    stats = h.sched.stats(0)
    assert (stats.num_running, stats.num_waiting) == (1, 0)

    slot = h.plans[0].slots[0]
    assert h.abort("running") is not None
    stats = h.sched.stats(0)
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_pages == stats.num_pages
    plan = h.step()
    assert plan is not None and plan.freed == [slot] and plan.slots == [] and plan.new == []
    assert h.step() is None
    assert not (h.sched.waiting or h.sched.running)
    assert h.abort("running") is None and h.abort("never-added") is None
    assert h.out("running") == h.expected("running", 2) and h.out("waiting") == []
    assert h.reason("running") is None and h.reason("waiting") is None
    h.assert_all_pages_free()


def test_abort_while_its_step_is_in_flight_drops_the_token() -> None:
    h = Harness()
    h.add("a", prompt_len=5, seed=1, max_tokens=10)
    h.add("b", prompt_len=5, seed=2, max_tokens=3)
    plan = h.schedule()
    result = h.compute(plan)
    assert len(result.slots) == 2
    assert h.abort("a") is not None
    deltas = h.deliver(result)
    assert [d.request_id for d in deltas] == ["b"]
    h.run()
    assert h.out("a") == [] and h.reason("a") is None
    assert h.out("b") == h.expected("b", 3) and h.reason("b") == "length"
    h.assert_all_pages_free()


def test_abort_frees_a_slot_for_a_waiting_request() -> None:
    h = Harness(max_num_seqs=1)
    h.add("first", prompt_len=4, seed=1, max_tokens=30)
    h.add("second", prompt_len=4, seed=2, max_tokens=3)
    h.step()
    h.abort("first")
    plan = h.step()
    assert plan.freed == [plan.new[0].slot]  # the slot is reused in the same step
    h.run()
    assert h.out("second") == h.expected("second", 3)
    h.assert_all_pages_free()


def test_duplicate_request_id_gives_an_error_delta() -> None:
    h = Harness()
    assert h.add("dup", prompt_len=4, seed=1, max_tokens=3) is None
    delta = h.add("dup", prompt_len=6, seed=2, max_tokens=3)
    assert delta is not None and delta.request_id == "dup" and delta.error and delta.finish_reason is None
    assert h.sched.stats(0).num_waiting == 1
    h.run()
    assert h.out("dup") == h.expected("dup", 3) and h.reason("dup") == "length"
    # once finished, the id may be used again
    assert h.add("dup", prompt_len=4, seed=3, max_tokens=2) is None
    h.run()
    assert h.out("dup") == [fake_token(3, 0), fake_token(3, 1)]
    h.assert_all_pages_free()


def test_nothing_to_do() -> None:
    h = Harness()
    assert h.sched.schedule() is None
    assert not (h.sched.waiting or h.sched.running)
    h.assert_all_pages_free()
