"""Pipelined steps: the scheduler plans step N+1 before it has seen step N's tokens.

Outputs must equal those of the synchronous loop, no request may receive a token
past its end, and no KV page may leak, whatever aborts, stops and preemptions do.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass, field

import pytest

from tristream import AsyncEngine, SamplingParams
from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.model_files import resolve_model
from tristream.plan_codec import PlanDecoder, PlanEncoder
from tristream.protocol import BatchPlan, StepResult, TokenizedRequest, decode, encode
from tristream.scheduler_proc.scheduler import Scheduler

EOS = 2


# ---------------------------------------------------------------- the scheduler against a simulated device


@dataclass
class Job:
    """A request of the simulated workload and what happens to it."""

    request_id: str
    seed: int
    prompt: list[int]
    params: SamplingParams
    eos_at: int | None = None  # the output index at which the device samples EOS
    abort_after: int | None = None  # the client aborts once it has this many tokens
    stop_after: int | None = None  # a stop string ends it once it has this many tokens
    arrive_step: int = 0


def fake_token(job: Job, index: int) -> int:
    return EOS if index == job.eos_at else 100 + (job.seed * 7919 + index * 31) % 30000


@dataclass
class DeviceSlot:
    job: Job
    token_ids: list[int]
    num_computed: int
    num_prompt: int
    pages: list[int] = field(default_factory=list)


class SimulatedDevice:
    """Runs plans in order as the gpu_proc does: a sampled token is known to the next step at once. A row with room
    for draft tokens proposes some (0 to all) of which a pseudo-random number match the job's next tokens and are
    kept, as the gpu_proc's check does, with the token after them."""

    def __init__(self, jobs: dict[int, Job], page_size: int) -> None:
        self.jobs = jobs
        self.page_size = page_size
        self.slots: dict[int, DeviceSlot] = {}
        self.encoder, self.decoder = PlanEncoder(), PlanDecoder()

    def run(self, plan: BatchPlan) -> StepResult:
        plan = self.decoder.plan(decode(encode(self.encoder.diff(plan))))
        for slot in plan.freed:
            del self.slots[slot]
        for new in plan.new:
            assert new.slot not in self.slots
            job = self.jobs[new.params.seed]
            self.slots[new.slot] = DeviceSlot(job, list(new.token_ids), new.num_cached, len(job.prompt))
        for slot, pages in plan.pages:
            self.slots[slot].pages.extend(pages)
        result = StepResult(plan.step_id, [], [])
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            view = self.slots[slot]
            end = view.num_computed + n
            assert len(view.pages) * self.page_size >= end, "KV written past the slot's pages"
            room = end - len(view.token_ids)
            kept = int(sample)
            if room > 0:
                assert sample and view.num_computed == len(view.token_ids) - 1, "room for drafts of a row not decoding"
                proposed = (view.job.seed + end) % (room + 1)
                kept = 1 + (view.job.seed * 3 + end) % (proposed + 1)
                result.drafts.append((slot, proposed))
                end = len(view.token_ids)
            assert end <= len(view.token_ids), "a row computes a token nobody has sampled"
            assert sample == (end == len(view.token_ids))
            view.num_computed = end + kept - 1 if kept > 1 else end
            for _ in range(kept):
                token = fake_token(view.job, len(view.token_ids) - view.num_prompt)
                view.token_ids.append(token)
                result.slots.append(slot)
                result.token_ids.append(token)
        return result


def make_jobs(seed: int, n: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        job_seed = 1000 * seed + i
        prompt = [10 + (job_seed + j) % 50 for j in range(rng.randint(1, 40))]
        kind = rng.random()
        params = SamplingParams(seed=job_seed, max_tokens=rng.choice([1, 1, 2, 5, 17, 40]))
        job = Job(f"r{i}", job_seed, prompt, params, arrive_step=rng.randint(0, 30))
        if kind < 0.25:
            job.eos_at = rng.randint(0, 10)
        elif kind < 0.45:
            job.abort_after = rng.randint(0, 6)
        elif kind < 0.6:
            job.stop_after = rng.randint(1, 6)
        jobs.append(job)
    return jobs


def drive(
    jobs: list[Job], pipelined: bool, num_pages: int, speculative: dict | None = None
) -> dict[str, tuple[list[int], str]]:
    """Run the workload through a Scheduler and the simulated device: (tokens, how it ended) per request."""
    config = EngineConfig(
        model="unused",
        max_model_len=96,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        page_size=4,
        check_invariants=True,
        speculative=speculative,
    )
    sched = Scheduler(config, num_pages)
    device = SimulatedDevice({j.seed: j for j in jobs}, config.page_size)
    by_id = {j.request_id: j for j in jobs}
    outputs: dict[str, list[int]] = {j.request_id: [] for j in jobs}
    ended: dict[str, str] = {}
    in_flight: deque[StepResult] = deque()
    depth = 2 if pipelined else 1
    step = 0

    def take(deltas) -> None:
        for d in deltas:
            rid = d.request_id
            assert rid not in ended, f"{rid} got a delta after it ended ({ended[rid]})"
            assert d.error is None
            outputs[rid].extend(d.token_ids)
            job = by_id[rid]
            if d.finish_reason is not None:
                ended[rid] = d.finish_reason
                assert d.finish_reason != "length" or len(outputs[rid]) == job.params.max_tokens
            elif job.abort_after is not None and len(outputs[rid]) >= job.abort_after:
                assert sched.abort(rid).finish_reason == "abort"
                ended[rid] = "abort"
            elif job.stop_after is not None and len(outputs[rid]) >= job.stop_after:
                sched.finish(rid)
                ended[rid] = "stop string"

    pending = sorted(jobs, key=lambda j: j.arrive_step)
    while pending or sched.waiting or sched.running or in_flight:
        while pending and pending[0].arrive_step <= step:
            job = pending.pop(0)
            assert sched.add(TokenizedRequest(job.request_id, job.prompt, job.params, [EOS], time.time())) is None
            if job.abort_after == 0:
                sched.abort(job.request_id)
                ended[job.request_id] = "abort"
        while len(in_flight) < depth and (plan := sched.schedule()) is not None:
            in_flight.append(device.run(plan))
        if in_flight:
            take(sched.on_result(in_flight.popleft()))
        step += 1
        assert step < 5000, "the scheduler did not finish"
    stats = sched.stats(0)
    if speculative:
        assert stats.num_draft_tokens > stats.num_accepted_tokens > 0
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages, "KV pages leaked"
    for rid, tokens in outputs.items():
        job = by_id[rid]
        assert tokens == [fake_token(job, i) for i in range(len(tokens))]
        assert len(tokens) <= job.params.max_tokens
        assert EOS not in tokens[:-1], "a token after EOS"
    return {rid: (outputs[rid], ended[rid]) for rid in outputs}


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("num_pages", [24, 200], ids=["preempting", "roomy"])
def test_pipelined_scheduler_gives_the_synchronous_outputs(seed: int, num_pages: int) -> None:
    jobs = make_jobs(seed, 40)
    sync = drive(jobs, pipelined=False, num_pages=num_pages)
    assert drive(jobs, pipelined=True, num_pages=num_pages) == sync
    reasons = {reason for _, reason in sync.values()}
    assert {"stop", "length", "abort", "stop string"} <= reasons


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_pages", [24, 200], ids=["preempting", "roomy"])
def test_speculating_scheduler_gives_the_outputs_of_one_token_per_step(seed: int, num_pages: int) -> None:
    """Rows with room for drafts, some accepted, under preemption, aborts, stop strings and EOS: the outputs are
    those of one token per step (where the client ends a request after some tokens, a delta may have carried
    more), nothing runs past max_tokens, no page leaks."""
    jobs = make_jobs(seed, 40)
    sync = drive(jobs, pipelined=False, num_pages=num_pages)
    for pipelined in (False, True):
        spec = {"method": "ngram", "num_tokens": 3, "disable_by_batch_size": 5}
        got = drive(jobs, pipelined=pipelined, num_pages=num_pages, speculative=spec)
        for rid, (tokens, reason) in got.items():
            want, want_reason = sync[rid]
            if want_reason in ("stop", "length"):
                assert (tokens, reason) == (want, want_reason)
            else:  # the delta that reached the client's limit may also have reached EOS or max_tokens
                assert tokens[: len(want)] == want and reason in (want_reason, "stop", "length")


def test_plan_diff_sends_no_rows_for_a_steady_decode_step() -> None:
    encoder, decoder = PlanEncoder(), PlanDecoder()
    full = BatchPlan(0, slots=[0, 3, 5, 9, 2], num_tokens=[1, 1, 1, 1, 30], sample=[True, True, True, True, False])
    steady = BatchPlan(1, slots=[0, 3, 5, 9], num_tokens=[1] * 4, sample=[True] * 4)
    changed = BatchPlan(2, slots=[0, 2, 5, 9, 7], num_tokens=[1, 1, 1, 1, 1], sample=[True, True, True, True, False])
    for plan in (full, steady, changed):
        diff = encoder.diff(plan)
        got = decoder.plan(decode(encode(diff)))
        assert (got.slots, got.num_tokens, got.sample) == (plan.slots, plan.num_tokens, plan.sample)
        if plan is steady:
            assert diff.left == diff.joined == () and diff.rest is None
        if plan is changed:
            assert set(diff.left) == {3} and set(diff.joined) == {2} and diff.rest == ([7], [1], [False])


def test_plan_codec_puts_decode_rows_first_by_slot_then_the_rest_in_plan_order() -> None:
    encoder, decoder = PlanEncoder(), PlanDecoder()
    plan = BatchPlan(
        0, slots=[8, 4, 1, 6, 3, 0], num_tokens=[1, 7, 1, 1, 2, 1], sample=[True, False, True, False, True, True]
    )
    got = decoder.plan(decode(encode(encoder.diff(plan))))
    assert got.slots == [0, 1, 8, 4, 6, 3]
    assert got.num_tokens == [1, 1, 1, 7, 1, 2]
    assert got.sample == [True, True, True, False, False, True]


# ---------------------------------------------------------------- the engine, pipelined and synchronous


@pytest.fixture(scope="module")
async def sync_engine():
    async with AsyncEngine(max_model_len=1024, check_invariants=True, log_level="WARNING", pipelined=False) as eng:
        yield eng


PROMPTS = [
    "The capital of France is",
    "List three colours:",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time",
    "Translate 'good morning' into German:",
]


def mixed_workload() -> list[tuple[str, SamplingParams, int | None]]:
    """(prompt, params, abort after this many tokens or None)."""
    work = []
    for i, prompt in enumerate(PROMPTS * 3):
        kind = i % 6
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=1)
        elif kind == 1:
            params = SamplingParams(temperature=0, max_tokens=24, stop=[" the", "\n"])
        elif kind == 2:
            params = SamplingParams(temperature=0, max_tokens=40)
        elif kind == 3:
            params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        elif kind == 4:
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=20)
        else:
            params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        work.append((prompt, params, 5 + i % 4 if kind == 5 else None))
    return work


async def run_workload(engine: AsyncEngine, tag: str) -> list[tuple[list[int], str, str]]:
    async def one(i: int, prompt: str, params: SamplingParams, abort_after: int | None):
        await asyncio.sleep(0.01 * (i % 5))
        tokens, text, reason = [], "", None
        rid = f"{tag}-{i}"
        async for out in engine.generate(prompt, params, request_id=rid):
            o = out.outputs[0]
            assert reason is None, "output after the request finished"
            tokens += o.token_ids
            text += o.text
            reason = o.finish_reason
            if abort_after is not None and len(tokens) >= abort_after and reason is None:
                await engine.abort(rid)
        return tokens, text, reason

    return await asyncio.gather(*(one(i, *w) for i, w in enumerate(mixed_workload())))


async def test_pipelined_engine_gives_the_synchronous_outputs(engine, sync_engine) -> None:
    assert_same_outputs(await run_workload(engine, "p"), await run_workload(sync_engine, "s"))


def assert_same_outputs(outputs: list[tuple], reference: list[tuple]) -> None:
    """``run_workload``'s outputs are ``reference``'s (an aborted request's a prefix of the longer of the two),
    and end exactly at max_tokens, EOS or a stop string."""
    eos = ModelConfig.load(resolve_model(None)).eos_token_ids
    for (prompt, params, abort_after), got, want in zip(mixed_workload(), outputs, reference):
        tokens, text, reason = got
        if abort_after is None:
            assert got == want, prompt
        else:
            assert reason == "abort" and want[2] == "abort"
            full = want[0] if len(want[0]) > len(tokens) else tokens
            assert tokens == full[: len(tokens)] and len(tokens) >= abort_after
        # Nothing past the end: max_tokens, EOS and stop strings end the output exactly there.
        assert len(tokens) <= params.max_tokens
        if reason == "length":
            assert len(tokens) == params.max_tokens
        if reason == "stop" and params.stop:
            assert not any(s in text for s in params.stop)
        if reason == "stop" and not params.stop:
            assert tokens[-1] in eos and not set(eos) & set(tokens[:-1])
        if params.max_tokens == 1:
            assert len(tokens) == 1 and reason == "length"


async def wait_idle(engine: AsyncEngine, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while (stats := await engine.get_stats()).num_running or stats.num_waiting:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    return stats


async def test_200_requests_with_random_aborts_leak_no_pages(engine) -> None:
    rng = random.Random(7)
    before = await wait_idle(engine)

    async def one(i: int) -> int:
        params = SamplingParams(
            temperature=rng.choice([0, 0.9]), seed=i, max_tokens=rng.randint(1, 24), ignore_eos=rng.random() < 0.5
        )
        prompt = [rng.randint(100, 20000) for _ in range(rng.randint(1, 60))]
        abort_at = rng.random() * 0.8 if rng.random() < 0.4 else None
        await asyncio.sleep(rng.random() * 0.5)
        rid = f"stress-{i}"
        got = 0

        async def consume() -> None:
            nonlocal got
            async for out in engine.generate(prompt, params, request_id=rid):
                got += len(out.outputs[0].token_ids)

        task = asyncio.ensure_future(consume())
        if abort_at is not None:
            await asyncio.sleep(abort_at)
            await engine.abort(rid)
        await task
        assert got <= params.max_tokens
        return got

    counts = await asyncio.gather(*(one(i) for i in range(200)))
    after = await wait_idle(engine)
    assert after.num_free_pages + after.num_cached_pages == after.num_pages, "KV pages leaked"
    assert after.num_generated_tokens - before.num_generated_tokens >= sum(counts)
    assert after.num_steps > before.num_steps and after.gpu_busy_s > before.gpu_busy_s
