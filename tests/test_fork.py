"""Samples of one request (n > 1) share its prompt's KV: scheduler plans against a simulated KV pool."""

from __future__ import annotations

import time

from tristream import SamplingParams
from tristream.config import EngineConfig
from tristream.protocol import BatchPlan, StepResult, TokenizedRequest
from tristream.scheduler_proc.scheduler import Scheduler

PS = 4


class KVSim:
    """Pages hold the token id written at each position, so a wrong copy or block table shows."""

    def __init__(self, config: EngineConfig, num_pages: int) -> None:
        self.sched = Scheduler(config, num_pages)
        self.pages: dict[int, list[int | None]] = {p: [None] * PS for p in range(num_pages)}
        self.seqs: dict[int, dict] = {}
        self.computed = 0

    def step(self) -> BatchPlan | None:
        plan = self.sched.schedule()
        if plan is None:
            return None
        for slot in plan.freed:
            del self.seqs[slot]
        for new in plan.new:
            self.seqs[new.slot] = {
                "tokens": list(new.token_ids),
                "done": new.num_cached,
                "pages": [],
                "seed": new.params.seed,
            }
        for slot, pages in plan.pages:
            self.seqs[slot]["pages"].extend(pages)
        for src, dst in plan.copies:
            self.pages[dst] = list(self.pages[src])
        result = StepResult(plan.step_id, [], [])
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            seq = self.seqs[slot]
            tokens, pages = seq["tokens"], seq["pages"]
            for pos in range(seq["done"]):
                assert self.pages[pages[pos // PS]][pos % PS] == tokens[pos], f"slot {slot}: wrong KV at {pos}"
            for pos in range(seq["done"], seq["done"] + n):
                self.pages[pages[pos // PS]][pos % PS] = tokens[pos]
            seq["done"] += n
            self.computed += n
            if sample:
                token = 100 + (seq["seed"] * 31 + len(tokens)) % 50
                tokens.append(token)
                result.slots.append(slot)
                result.token_ids.append(token)
        self.sched.on_result(result)
        return plan


def request(rid: str, prompt: list[int], seed: int, fork_of: str | None = None, **params) -> TokenizedRequest:
    return TokenizedRequest(
        rid, prompt, SamplingParams(seed=seed, max_tokens=6, **params), [2], time.time(), fork_of=fork_of
    )


def run(sim: KVSim) -> list[BatchPlan]:
    plans = []
    while (plan := sim.step()) is not None:
        plans.append(plan)
    return plans


def test_samples_wait_for_the_prompt_then_copy_its_kv():
    for caching in (True, False):
        for prompt_len in (1, 3, 4, 5, 9, 13):
            config = EngineConfig(
                model="unused",
                max_model_len=64,
                page_size=PS,
                max_num_batched_tokens=8,
                enable_prefix_caching=caching,
                check_invariants=True,
            )
            sim = KVSim(config, 40)
            prompt = list(range(10, 10 + prompt_len))
            sim.sched.add(request("r", prompt, 0))
            for i in (1, 2, 3):
                sim.sched.add(request(f"r#{i}", prompt, i, fork_of="r"))
            plans = run(sim)
            admitted = [new for plan in plans for new in plan.new]
            assert [new.params.seed for new in admitted] == [0, 1, 2, 3]
            leader_done = next(i for i, p in enumerate(plans) if (0, True) in zip(p.slots, p.sample))
            fork_plan = next(i for i, p in enumerate(plans) if any(n.params.seed != 0 for n in p.new))
            assert fork_plan == leader_done + 1, "the samples start right after the prompt is computed"
            assert all(new.num_cached == prompt_len - 1 for new in admitted[1:])
            # The prompt is computed once; each other sample recomputes only its last token.
            assert sim.computed == prompt_len + 3 * 1 + 4 * 5, (caching, prompt_len, sim.computed)
            stats = sim.sched.stats(0)
            assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages


def test_a_sample_whose_leader_is_gone_starts_on_its_own():
    config = EngineConfig(
        model="unused",
        max_model_len=64,
        page_size=PS,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        check_invariants=True,
    )
    sim = KVSim(config, 40)
    prompt = list(range(10, 19))
    sim.sched.add(request("r", prompt, 0))
    sim.sched.add(request("r#1", prompt, 1, fork_of="r"))
    sim.sched.abort("r")
    plans = run(sim)
    assert [n.num_cached for p in plans for n in p.new] == [0]
    assert not any(p.copies for p in plans)


def test_a_prompt_logprobs_request_computes_its_whole_prompt():
    config = EngineConfig(
        model="unused",
        max_model_len=64,
        page_size=PS,
        max_num_batched_tokens=64,
        enable_prefix_caching=True,
        check_invariants=True,
    )
    sim = KVSim(config, 40)
    prompt = list(range(10, 19))
    sim.sched.add(request("a", prompt, 0))
    run(sim)
    sim.sched.add(request("b", prompt, 1))
    sim.sched.add(request("c", prompt, 2, prompt_logprobs=1))
    plans = run(sim)
    cached = {n.params.seed: n.num_cached for p in plans for n in p.new}
    assert cached == {1: 8, 2: 0}
