"""Beam search: the scheduler's search against a plain reference, its KV forks over a simulated pool, and the
engine, server and offline outputs on the bundled model."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

import openai
import pytest
import torch

from tristream import BeamSearchParams, SamplingParams
from tristream.beam_search import beam_search_outputs
from tristream.config import EngineConfig
from tristream.outputs import accumulate
from tristream.protocol import StepResult, TokenizedRequest
from tristream.scheduler_proc.scheduler import Scheduler

EOS = 2
VOCAB = 12


def score(cumulative: float, length: int, length_penalty: float) -> float:
    return cumulative / length**length_penalty


def reference_beam_search(
    next_logprobs, prompt: list[int], params: SamplingParams, eos: set[int], max_len: int
) -> list:
    """(output tokens, cumulative logprob, finish reason) of the ``n`` best hypotheses of a plain beam search over
    ``next_logprobs(sequences) -> [{token: logprob}]`` (every sequence is as long), by vLLM's and transformers'
    rules."""
    width, lp = params.beam_width, params.length_penalty
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    finished: list[tuple[float, tuple[int, ...], float, str]] = []
    for _ in range(params.max_tokens):
        candidates = []
        for (outputs, cumulative), lps in zip(beams, next_logprobs([prompt + list(o) for o, _ in beams])):
            ranked = sorted(lps.items(), key=lambda kv: -kv[1])
            candidates += [(cumulative + value, outputs + (token,)) for token, value in ranked[: 2 * width]]
        candidates.sort(key=lambda c: -c[0])
        live = []
        for cumulative, outputs in candidates[: 2 * width]:
            ended = outputs[-1] in eos and not params.ignore_eos
            if ended or len(outputs) == params.max_tokens or len(prompt) + len(outputs) >= max_len:
                length = len(prompt) + len(outputs) - ended
                finished.append((score(cumulative, length, lp), outputs, cumulative, "stop" if ended else "length"))
                finished = sorted(finished, key=lambda f: -f[0])[:width]
            else:
                live.append((outputs, cumulative))
        beams = live[:width]
        if not beams:
            break
        if len(finished) >= width:
            outputs, cumulative = beams[0]
            length = len(prompt) + len(outputs)
            if params.early_stopping == "never" and lp > 0:
                length = min(len(prompt) + params.max_tokens, max_len)
            if params.early_stopping is True or finished[-1][0] >= score(cumulative, length, lp):
                break
    return [(list(outputs), cumulative, reason) for _, outputs, cumulative, reason in finished[: params.n]]


def toy_batch(sequences: list[list[int]]) -> list[dict[int, float]]:
    return [toy_logprobs(tokens) for tokens in sequences]


def toy_logprobs(tokens: list[int]) -> dict[int, float]:
    """A made-up model: log-softmax of logits drawn from the tokens so far."""
    rng = random.Random(hash(tuple(tokens)))
    logits = torch.tensor([rng.gauss(0, 2) for _ in range(VOCAB)], dtype=torch.float64)
    return dict(enumerate(logits.log_softmax(0).tolist()))


class BeamSim:
    """A Scheduler with a simulated gpu_proc whose pages hold the token written at each position, so that a wrong
    fork, copy or block table shows; it samples from ``toy_logprobs``. Up to ``depth`` steps are in flight: a
    step runs when planned, and the scheduler sees its result once ``depth`` steps are out."""

    def __init__(self, num_pages: int = 64, page_size: int = 4, caching: bool = True, depth: int = 1) -> None:
        config = EngineConfig(
            model="unused",
            max_model_len=64,
            page_size=page_size,
            max_num_seqs=8,
            max_num_batched_tokens=16,
            enable_prefix_caching=caching,
            check_invariants=True,
        )
        self.sched = Scheduler(config, num_pages)
        self.ps = page_size
        self.kv: dict[int, list[int | None]] = {p: [None] * page_size for p in range(num_pages)}
        self.seqs: dict[int, dict] = {}
        self.deltas = []
        self.depth = depth
        self.in_flight: deque[StepResult] = deque()

    def add(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        assert self.sched.add(TokenizedRequest(rid, prompt, params, [EOS], time.time())) is None

    def step(self) -> bool:
        plan = self.sched.schedule() if len(self.in_flight) < self.depth else None
        if plan is not None:
            self.in_flight.append(self._run_plan(plan))
        if plan is None or len(self.in_flight) == self.depth:
            if not self.in_flight:
                return False
            self.deltas += self.sched.on_result(self.in_flight.popleft())
        return True

    def _run_plan(self, plan) -> StepResult:
        for slot in plan.freed:
            self.seqs.pop(slot, None)
        for new in plan.new:
            self.seqs[new.slot] = {
                "tokens": list(new.token_ids),
                "done": new.num_cached,
                "pages": [],
                "params": new.params,
            }
        sources = {beam.source: self.seqs[beam.source] for beam in plan.beams}
        for beam in plan.beams:
            src = sources[beam.source]
            tokens = src["tokens"][: src["done"]] + [beam.token]
            self.seqs[beam.slot] = {**src, "tokens": tokens, "pages": src["pages"][: beam.num_shared_pages]}
        for slot, pages in plan.pages:
            self.seqs[slot]["pages"] = self.seqs[slot]["pages"] + pages
        for src, dst in plan.copies:
            self.kv[dst] = list(self.kv[src])
        result = StepResult(plan.step_id, [], [], [])
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            self._compute(slot, n, sample, result)
        return result

    def _compute(self, slot: int, n: int, sample: bool, result: StepResult) -> None:
        seq = self.seqs[slot]
        tokens, pages, ps = seq["tokens"], seq["pages"], self.ps
        for pos in range(seq["done"]):
            assert self.kv[pages[pos // ps]][pos % ps] == tokens[pos], f"slot {slot}: wrong KV at {pos}"
        for pos in range(seq["done"], seq["done"] + n):
            self.kv[pages[pos // ps]][pos % ps] = tokens[pos]
        seq["done"] += n
        if sample:
            lps = toy_logprobs(tokens)
            ranked = sorted(lps.items(), key=lambda kv: -kv[1])
            token = ranked[0][0]
            tokens.append(token)
            k = seq["params"].step_logprobs
            result.slots.append(slot)
            result.token_ids.append(token)
            result.logprobs.append([(token, lps[token])] + ranked[:k] if k is not None else None)

    def run(self) -> None:
        while self.step():
            pass

    def assert_no_leak(self) -> None:
        sched = self.sched
        cached = sched.kv.cache.num_pages if sched.kv.cache else 0
        assert sched.kv.allocator.num_free + cached == sched.kv.allocator.num_pages - 1, "KV pages leaked"
        assert not sched.running and not sched.beam_searches and not sched.beam_samples
        assert sorted(sched.free_slots) == list(range(8))


def results(deltas, rid: str, n: int) -> list:
    by_id = {d.request_id: d for d in deltas}
    ids = [rid] + [f"{rid}#{i}" for i in range(1, n)]
    return [(by_id[i].token_ids, sum(e[0][1] for e in by_id[i].logprobs), by_id[i].finish_reason) for i in ids]


@pytest.mark.parametrize("caching", [True, False])
def test_the_scheduler_finds_the_reference_beams_over_forked_kv(caching):
    for prompt_len, width, n, early, penalty in [
        (3, 3, 3, False, 1.0),
        (4, 2, 1, True, 0.5),
        (9, 4, 2, "never", 2.0),
        (5, 1, 1, False, 1.0),
        (7, 3, 2, False, -1.0),
    ]:
        sim = BeamSim(caching=caching)
        prompt = [20 + (prompt_len * 7 + i) % 50 for i in range(prompt_len)]
        params = SamplingParams(
            use_beam_search=True, n=n, best_of=width, max_tokens=9, length_penalty=penalty, early_stopping=early
        )
        sim.add("b", prompt, params)
        sim.run()
        got = results(sim.deltas, "b", n)
        want = reference_beam_search(toy_batch, prompt, params, {EOS}, 64)
        assert [g[0] for g in got] == [w[0] for w in want] and [g[2] for g in got] == [w[2] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-9)
        sim.assert_no_leak()


@pytest.mark.parametrize("other", [0, 12])
def test_searches_and_other_requests_run_together_with_steps_in_flight(other):
    sim = BeamSim(depth=2)
    if other:
        sim.add("other", list(range(60, 70)), SamplingParams(max_tokens=other, ignore_eos=True, seed=3))
    searches = {}
    for rid, prompt_len, width in (("a", 5, 3), ("b", 13, 2), ("c", 2, 4)):
        prompt = list(range(20, 20 + prompt_len))
        searches[rid] = (prompt, SamplingParams(use_beam_search=True, n=2, best_of=width, max_tokens=7))
        sim.add(rid, prompt, searches[rid][1])
        sim.step()
    sim.run()
    for rid, (prompt, params) in searches.items():
        want = reference_beam_search(toy_batch, prompt, params, {EOS}, 64)
        assert [g[0] for g in results(sim.deltas, rid, 2)] == [w[0] for w in want]
    assert sum(len(d.token_ids) for d in sim.deltas if d.request_id == "other") == other
    sim.assert_no_leak()


def test_beams_share_whole_pages_through_the_prefix_cache():
    sim = BeamSim()
    prompt = list(range(20, 37))
    sim.add("b", prompt, SamplingParams(use_beam_search=True, n=4, max_tokens=6, ignore_eos=True))
    while not sim.sched.beam_searches["b"].beams[1:]:
        sim.step()
    for _ in range(3):
        sim.step()
    used = sim.sched.kv.allocator.num_pages - 1 - sim.sched.kv.allocator.num_free
    assert used < 4 * (-(-len(prompt) // sim.ps) + 2), "the beams copied their shared prefix"
    sim.run()
    sim.assert_no_leak()


def test_an_abort_ends_every_sample_and_frees_the_pages():
    sim = BeamSim()
    sim.add("b", list(range(30, 41)), SamplingParams(use_beam_search=True, n=3, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        sim.step()
    for rid in ("b", "b#1", "b#2"):
        assert sim.sched.abort(rid).finish_reason == "abort"
    sim.run()
    sim.assert_no_leak()


def test_pages_for_beams_come_from_preempting_others_and_the_search_ends_where_none_are_left():
    sim = BeamSim(num_pages=14, caching=False)
    sim.add("other", list(range(60, 66)), SamplingParams(max_tokens=30, ignore_eos=True, seed=1))
    sim.add("b", list(range(20, 27)), SamplingParams(use_beam_search=True, n=2, best_of=3, max_tokens=40))
    sim.run()
    beams = [d for d in sim.deltas if d.request_id in ("b", "b#1")]
    assert len(beams) == 2 and all(d.finish_reason in ("stop", "length") for d in beams)
    assert sim.sched.counters.num_preemptions > 0
    assert any(d.request_id == "other" and d.finish_reason == "length" for d in sim.deltas)
    sim.assert_no_leak()


def test_beam_search_refuses_what_it_cannot_honour():
    for bad in ({"bad_words": ["x"]}, {"structured": {"regex": "a+"}}):
        with pytest.raises(ValueError, match="beam search"):
            SamplingParams(use_beam_search=True, **bad)
    SamplingParams(use_beam_search=True, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1)
    with pytest.raises(ValueError, match="length_penalty"):
        SamplingParams(length_penalty=0.5)
    with pytest.raises(ValueError, match="early_stopping"):
        SamplingParams(use_beam_search=True, early_stopping="sometimes")


async def beams(engine, prompt: str, params: SamplingParams) -> list:
    """The whole outputs of a request, by index."""
    final = None
    async for out in engine.generate(prompt, params):
        final = accumulate(final, out)
    return final.outputs


async def test_one_beam_is_greedy(engine):
    prompt = "The three primary colors are"
    greedy = await beams(engine, prompt, SamplingParams(temperature=0, max_tokens=8))
    beam = await beams(engine, prompt, SamplingParams(use_beam_search=True, max_tokens=8))
    assert beam[0].token_ids == greedy[0].token_ids


async def test_beams_are_penalised_for_their_own_tokens(engine, tokenizer):
    """A penalty this strong keeps every token of the prompt and of a beam's own earlier output out of its next
    one: it holds only if each beam counts the tokens it chose, not those its slot sampled."""
    prompt = "the cat and the dog and the cat and the dog and the"
    params = SamplingParams(use_beam_search=True, n=3, max_tokens=10, ignore_eos=True, repetition_penalty=1e4)
    prompt_ids = set(tokenizer.encode(prompt))
    for out in await beams(engine, prompt, params):
        assert len(out.token_ids) == 10
        for i, token in enumerate(out.token_ids):
            assert token not in prompt_ids and token not in out.token_ids[:i], (i, out.token_ids)


async def test_four_beams_are_the_best_by_length_penalised_logprob(engine, hf_model, tokenizer):
    prompt = "My favourite animal is the"
    params = SamplingParams(use_beam_search=True, n=4, max_tokens=6, length_penalty=1.2)
    got = await beams(engine, prompt, params)
    ids = tokenizer.encode(prompt)

    def hf_next(sequences: list[list[int]]) -> list[dict[int, float]]:
        """The top 16 next-token logprobs of each sequence under transformers (more than 2 * width)."""
        with torch.no_grad():
            top = hf_model(torch.tensor(sequences)).logits[:, -1].log_softmax(-1).topk(16)
        return [dict(zip(tokens.tolist(), values.tolist())) for values, tokens in zip(*top)]

    eos = set(engine.model_config.eos_token_ids)
    want = reference_beam_search(hf_next, ids, params, eos, 1024)
    assert [o.token_ids for o in got] == [w[0] for w in want]
    assert [o.cumulative_logprob for o in got] == pytest.approx([w[1] for w in want], abs=2e-3)
    lengths = [len(ids) + len(o.token_ids) - (o.token_ids[-1] in eos) for o in got]
    scores = [score(o.cumulative_logprob, length, 1.2) for o, length in zip(got, lengths)]
    assert scores == sorted(scores, reverse=True)
    assert all(o.logprobs is None for o in got)
    stats = await engine.get_stats()
    assert stats.num_running == 0 and stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_an_aborted_beam_search_frees_its_pages(engine):
    params = SamplingParams(use_beam_search=True, n=2, best_of=4, max_tokens=300, ignore_eos=True)
    task = asyncio.ensure_future(beams(engine, "Write a long story about a dragon.", params))
    for _ in range(600):
        busy = await engine.get_stats()
        if busy.num_running == 4:
            break
        await asyncio.sleep(0.05)
    assert busy.num_running == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        stats = await engine.get_stats()
        if stats.num_running == 0:
            break
        await asyncio.sleep(0.05)
    assert stats.num_running == 0 and stats.num_free_pages + stats.num_cached_pages == stats.num_pages


async def test_offline_outputs_hold_the_prompt_and_every_beam(engine, tokenizer):
    prompt = "Two plus two equals"
    final = None
    async for out in engine.generate(prompt, BeamSearchParams(beam_width=3, max_tokens=4).sampling_params()):
        final = accumulate(final, out)
    [output] = await beam_search_outputs(engine, [final])
    assert len(output.sequences) == 3
    for seq in output.sequences:
        assert seq.tokens[: len(final.prompt_token_ids)] == final.prompt_token_ids
        assert seq.text == tokenizer.decode(seq.tokens) and len(seq.logprobs) == len(seq.tokens) - len(
            final.prompt_token_ids
        )
    eos = set(engine.model_config.eos_token_ids)
    scores = [score(s.cum_logprob, len(s.tokens) - (s.tokens[-1] in eos), 1.0) for s in output.sequences]
    assert scores == sorted(scores, reverse=True)


def test_server_routes_take_beam_search_bodies(live_server):
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    body = {"use_beam_search": True, "length_penalty": 1.2, "best_of": 4, "n": 2}
    completion = client.completions.create(model=live_server.model, prompt="Apples are", max_tokens=5, extra_body=body)
    assert len(completion.choices) == 2 and completion.choices[0].text != completion.choices[1].text
    stream = client.completions.create(
        model=live_server.model, prompt="Apples are", max_tokens=5, stream=True, extra_body=body
    )
    texts = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[0], texts[1]] == [c.text for c in completion.choices]
    with pytest.raises(openai.BadRequestError, match="beam search"):
        client.completions.create(
            model=live_server.model,
            prompt="Apples are",
            max_tokens=5,
            extra_body={**body, "response_format": {"type": "json_object"}},
        )
    chat = client.chat.completions.create(
        model=live_server.model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=5, extra_body=body
    )
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
