"""Sliding-window attention: a request gives back the KV pages that lie wholly before the window of its next query.

KVPages' rule on its own; the Scheduler against a simulated device whose every query checks the keys of its
window (right tokens, in pages its request still holds), synchronous and pipelined, with and without the prefix
cache, with forked samples and preemption; and the whole engine on a tiny Mistral against transformers' greedy
decoding, holding about window / page_size pages while it generates. A model with a full-attention layer (Qwen2
with ``max_window_layers``) frees nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from tests.conftest import hf_greedy, random_hf_model  # pytest has imported the conftest under this name
from tristream import AsyncEngine, SamplingParams
from tristream.config import EngineConfig
from tristream.model_config import ModelConfig
from tristream.protocol import BatchPlan, StepResult, TokenizedRequest
from tristream.scheduler_proc.kv_pages import KVPages
from tristream.scheduler_proc.request import Request
from tristream.scheduler_proc.scheduler import Scheduler

PS = 4
WINDOW = 10
EOS = 2


def spec(rid: str, prompt: list[int], seed: int, fork_of: str | None = None, **params: object) -> TokenizedRequest:
    return TokenizedRequest(rid, prompt, SamplingParams(seed=seed, **params), [EOS], time.time(), fork_of=fork_of)


def prompt_of(seed: int, n: int) -> list[int]:
    return [10 + (seed * 13 + i) % 50 for i in range(n)]


def token_of(seed: int, index: int) -> int:
    """The token the simulated device samples as output ``index`` of the request with ``seed``."""
    return 100 + (seed * 7919 + index * 31) % 300


# ---------------------------------------------------------------- the rule, on KVPages


def holding(kv: KVPages, prompt_len: int, num_tokens: int) -> Request:
    req = Request(spec("r", prompt_of(0, prompt_len), 0))
    kv.grow(req, num_tokens)
    req.num_computed = num_tokens
    return req


def test_only_owned_pages_wholly_before_the_window_are_freed():
    kv = KVPages(32, PS, enable_cache=False, window=WINDOW)
    req = holding(kv, 6, 28)
    table = list(req.pages)
    # A query at 12 reads keys 3..12: page 0 (0-3) is still read.
    kv.drop_out_of_window(req, 12)
    assert req.pages == table and req.window_page == 0
    # At 13 it reads 4..13: page 0 is not; at 20, 11..20: pages 0 and 1 are not, page 2 (8-11) is.
    kv.drop_out_of_window(req, 13)
    assert req.pages == [0] + table[1:] and req.window_page == 1
    kv.drop_out_of_window(req, 20)
    assert req.pages == [0, 0] + table[2:] and req.window_page == 2
    assert req.own_pages == set(table[2:])
    assert kv.allocator.num_free == 31 - 7 + 2
    kv.check_invariants([req])
    # An earlier query changes nothing; release frees only the pages still owned.
    kv.drop_out_of_window(req, 5)
    assert req.window_page == 2
    kv.release(req)
    assert kv.allocator.num_free == 31 and req.window_page == 0


def test_without_a_window_nothing_is_freed():
    kv = KVPages(32, PS, enable_cache=False, window=0)
    req = holding(kv, 6, 28)
    kv.drop_out_of_window(req, 27)
    assert 0 not in req.pages and len(req.own_pages) == 7


def test_cached_pages_and_whole_prompt_pages_stay_and_the_cache_takes_no_holey_prefix():
    kv = KVPages(32, PS, enable_cache=True, window=WINDOW)
    req = holding(kv, 9, 9)
    kv.cache_computed(req)  # pages 0 and 1 (the prompt's whole pages) now belong to the cache
    cached = req.pages[:2]
    assert req.own_pages == {req.pages[2]}
    req.output_token_ids = list(range(100, 119))
    kv.grow(req, 28)
    req.num_computed = 27
    kv.drop_out_of_window(req, 27)  # keys 18..27: pages 0-3 lie before, but 0 and 1 are cached
    assert req.pages[:4] == [*cached, 0, 0] and req.window_page == 4
    kv.check_invariants([req])
    kv.cache_computed(req)  # having dropped pages, it caches nothing more
    assert sorted(kv.cache.all_pages()) == sorted(cached)
    kv.release(req)
    assert kv.allocator.num_free + kv.cache.num_pages == 31
    again = Request(spec("s", req.all_token_ids + [7], 1))
    assert kv.lock_prefix(again) == 2 * PS


def test_a_request_that_dropped_pages_keeps_its_hold_on_what_the_cache_took():
    kv = KVPages(32, PS, enable_cache=True, window=WINDOW)
    tokens = list(range(10, 34))
    other = Request(spec("b", tokens[:8] + [1], 1))
    kv.grow(other, 8)
    other.num_computed = 8
    kv.cache_computed(other)
    kv.release(other)  # the cache holds tokens 0-7
    req = Request(spec("a", tokens[:4], 0), output_token_ids=tokens[4:20])
    kv.grow(req, 20)
    req.num_computed = 16
    kv.cache_computed(req)  # the cache keeps its own pages 0 and 1 and takes pages 2 and 3
    taken = req.pages[2:4]
    assert req.own_pages == {req.pages[0], req.pages[1], req.pages[4]}
    req.num_computed = 19
    kv.drop_out_of_window(req, 19)  # keys 10..19: page 1 lies before (page 0 is the prompt's)
    assert req.pages[1] == 0
    kv.cache_computed(req)
    kv.cache.evict(32)
    assert set(taken) <= set(kv.cache.all_pages()), "pages in the window were evicted"
    kv.check_invariants([req])


def test_the_prompt_pages_stay_while_the_cache_may_still_take_them():
    kv = KVPages(32, PS, enable_cache=True, window=WINDOW)
    req = holding(kv, 24, 24)  # a prefill whose pages the cache has not taken yet
    kv.drop_out_of_window(req, 24)
    assert 0 not in req.pages
    kv.cache_computed(req)
    assert len(kv.cache.all_pages()) == 6


def test_the_scheduler_window_is_the_one_every_layer_has(tmp_path):
    def window(model_type: str, arch: str, **fields: object) -> int:
        AutoConfig.for_model(model_type, architectures=[arch], num_hidden_layers=3, **fields).save_pretrained(tmp_path)
        return ModelConfig.load(str(tmp_path)).kv_window()

    assert window("mistral", "MistralForCausalLM", sliding_window=12) == 12
    assert window("mistral", "MistralForCausalLM", sliding_window=None) == 0
    assert window("phi3", "Phi3ForCausalLM", sliding_window=48) == 48
    qwen2 = dict(model_type="qwen2", arch="Qwen2ForCausalLM", sliding_window=8)
    assert window(**qwen2, use_sliding_window=True, max_window_layers=1) == 0
    assert window(**qwen2, use_sliding_window=True, max_window_layers=0) == 8
    assert window(**qwen2, use_sliding_window=False) == 0
    assert window("gemma2", "Gemma2ForCausalLM", sliding_window=24) == 0
    # Layers with different windows: a page is unread once it lies before the largest.
    assert ModelConfig.kv_window(SimpleNamespace(num_layers=3, sliding_window=[8, 16, 8].__getitem__)) == 16


# ---------------------------------------------------------------- the Scheduler against a simulated device


class WindowDevice:
    """Runs each plan as it is made, in order, as the gpu_proc does. Each page offset holds the (token, position)
    written there; a step writes every row's KV, then each query reads the keys of its window, which must be its
    own sequence's, in pages its request holds. Writes go only to pages the request owns."""

    def __init__(self, sched: Scheduler, window: int) -> None:
        self.sched, self.window = sched, window
        self.kv: dict[int, list[tuple[int, int] | None]] = {}
        self.seqs: dict[int, dict] = {}
        self.reads = 0

    def run(self, plan: BatchPlan) -> StepResult:
        by_slot = {r.slot: r for r in self.sched.running}
        cached = set(self.sched.kv.cache.all_pages()) if self.sched.kv.cache else set()
        for slot in plan.freed:
            del self.seqs[slot]
        for new in plan.new:
            self.seqs[new.slot] = dict(
                tokens=list(new.token_ids),
                done=new.num_cached,
                table=[],
                prompt=len(new.token_ids) - new.num_outputs,
                seed=new.params.seed,
            )
        for slot, pages in plan.pages:
            self.seqs[slot]["table"].extend(pages)
        for src, dst in plan.copies:
            assert src in cached or any(src in r.own_pages for r in self.sched.running), "a copy of a free page"
            self.kv[dst] = list(self.kv[src])
        rows = list(zip(plan.slots, plan.num_tokens))
        for slot, n in rows:
            seq, req = self.seqs[slot], by_slot[slot]
            for pos in range(seq["done"], seq["done"] + n):
                page = seq["table"][pos // PS]
                assert page in req.own_pages, f"slot {slot} writes position {pos} into a page it does not own"
                self.kv.setdefault(page, [None] * PS)[pos % PS] = (seq["tokens"][pos], pos)
        for slot, n in rows:
            self._read(self.seqs[slot], by_slot[slot], n, cached)
        result = StepResult(plan.step_id, [], [])
        for slot, n, sample in zip(plan.slots, plan.num_tokens, plan.sample):
            seq = self.seqs[slot]
            seq["done"] += n
            if sample:
                token = token_of(seq["seed"], len(seq["tokens"]) - seq["prompt"])
                seq["tokens"].append(token)
                result.slots.append(slot)
                result.token_ids.append(token)
        return result

    def _read(self, seq: dict, req: Request, n: int, cached: set[int]) -> None:
        """The keys of the windows of a row's ``n`` queries."""
        start = seq["done"]
        first = max(0, start - self.window + 1) if self.window else 0
        for pos in range(first, start + n):
            page = seq["table"][pos // PS]
            assert page in req.own_pages or page in cached, f"position {pos} is read from a page nobody holds for it"
            assert self.kv[page][pos % PS] == (seq["tokens"][pos], pos), f"wrong KV at position {pos}"
            self.reads += 1


def config(caching: bool, **fields: object) -> EngineConfig:
    defaults = dict(max_model_len=160, max_num_seqs=4, max_num_batched_tokens=12, page_size=PS)
    return EngineConfig(model="unused", enable_prefix_caching=caching, check_invariants=True, **{**defaults, **fields})


def drive(
    sched: Scheduler,
    arrivals: list[tuple[int, TokenizedRequest]],
    pipelined: bool,
    watch: Callable[[Scheduler], None] | None = None,
) -> dict[str, list[int]]:
    """Run requests (each added at its step) to the end; every request's outputs. ``watch(sched)`` runs after
    each plan."""
    device = WindowDevice(sched, sched.kv.window)
    outputs = {s.request_id: [] for _, s in arrivals}
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    in_flight: deque[StepResult] = deque()
    step = 0
    while pending or sched.waiting or sched.running or in_flight:
        while pending and pending[0][0] <= step:
            assert sched.add(pending.popleft()[1]) is None
        while len(in_flight) < (2 if pipelined else 1) and (plan := sched.schedule()) is not None:
            in_flight.append(device.run(plan))
            if watch is not None:
                watch(sched)
        if in_flight:
            for delta in sched.on_result(in_flight.popleft()):
                outputs[delta.request_id].extend(delta.token_ids)
        step += 1
        assert step < 5000, "the scheduler did not finish"
    stats = sched.stats(0)
    assert stats.num_free_pages + stats.num_cached_pages == stats.num_pages, "KV pages leaked"
    assert device.reads > 0
    return outputs


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_a_long_generation_holds_about_a_window_of_pages(pipelined: bool, caching: bool):
    sched = Scheduler(config(caching, max_num_batched_tokens=16), 64, window=WINDOW)
    held: list[int] = []

    def watch(s: Scheduler) -> None:
        for r in s.running:
            if len(r.output_token_ids) >= 2:
                held.append(len(r.own_pages))

    prompt = prompt_of(1, 30)  # prefilled in two chunks, the second reading the window before it
    outputs = drive(sched, [(0, spec("r", prompt, 1, max_tokens=90))], pipelined, watch)
    assert outputs["r"] == [token_of(1, i) for i in range(90)]
    # It holds the pages from its next query's window through that query's own page: at most ceil(W / PS) + 1.
    assert held and max(held) <= -(-WINDOW // PS) + 1, max(held)
    if caching:
        # The prompt's whole pages went to the cache; the pages past them were dropped, so it took no more.
        assert sched.kv.cache.num_pages == len(prompt) // PS
        assert sched.kv.cache.peek(prompt + outputs["r"]) == len(prompt) // PS * PS


@pytest.mark.parametrize("pipelined", [False, True], ids=["sync", "pipelined"])
@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_samples_copy_the_window_their_leader_kept(pipelined: bool, caching: bool):
    # Two slots: the leader and one sample run while the other samples wait for a slot, and the leader keeps
    # its prompt's last window for them. A sample that arrives after the leader dropped it starts on its own.
    sched = Scheduler(config(caching, max_num_seqs=2, max_num_batched_tokens=64), 64, window=WINDOW)
    prompt = prompt_of(2, 23)
    arrivals = [(0, spec("r", prompt, 0, max_tokens=100))]
    arrivals += [(0, spec(f"r#{i}", prompt, i, fork_of="r", max_tokens=20)) for i in (1, 2, 3)]
    arrivals.append((60, spec("r#4", prompt, 4, fork_of="r", max_tokens=5)))
    started: dict[str, int] = {}

    def watch(s: Scheduler) -> None:
        for r in s.running:
            started.setdefault(r.request_id, r.num_cached_tokens)

    outputs = drive(sched, arrivals, pipelined, watch)
    for _, s in arrivals:
        assert outputs[s.request_id] == [token_of(s.params.seed, i) for i in range(s.params.max_tokens)]
    assert [started[f"r#{i}"] for i in (1, 2, 3)] == [len(prompt) - 1] * 3, "the samples copied the leader's KV"
    assert started["r#4"] < len(prompt) - 1, "a sample whose leader dropped its window computes its prompt"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_random_workloads_with_preemption_read_only_their_window(seed: int, caching: bool):
    rng = random.Random(seed)
    arrivals = []
    for i in range(24):
        prompt = prompt_of(100 * seed + i % 6, rng.randint(1, 30))  # some prompts repeat: prefix cache hits
        max_tokens = rng.choice([1, 3, 17, 28])
        arrivals.append((rng.randint(0, 20), spec(f"q{i}", prompt, 1000 * seed + i, max_tokens=max_tokens)))
        if rng.random() < 0.2:
            arrivals.append((arrivals[-1][0], spec(f"q{i}#1", prompt, 1000 * seed + i + 500, f"q{i}", max_tokens=9)))
    scheds = [Scheduler(config(caching, max_num_seqs=6), 16, window=WINDOW) for _ in range(2)]
    runs = [drive(sched, arrivals, pipelined) for sched, pipelined in zip(scheds, (False, True))]
    assert runs[0] == runs[1]
    assert all(sched.counters.num_preemptions for sched in scheds)
    for _, s in arrivals:
        assert runs[0][s.request_id] == [token_of(s.params.seed, i) for i in range(s.params.max_tokens)]


def test_a_full_attention_layer_frees_nothing(tmp_path):
    qwen2 = dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=WINDOW)
    AutoConfig.for_model("qwen2", num_hidden_layers=2, max_window_layers=1, **qwen2).save_pretrained(tmp_path)
    mc = ModelConfig.load(str(tmp_path))
    assert [mc.sliding_window(layer) for layer in (0, 1)] == [0, WINDOW]
    sched = Scheduler(config(False), 64, window=mc.kv_window())
    free: list[int] = []
    arrivals = [(0, spec("r", prompt_of(3, 9), 3, max_tokens=40))]
    drive(sched, arrivals, True, lambda s: free.append(s.kv.allocator.num_free))
    assert 63 - min(free) == (9 + 39) // PS  # the KV of the prompt and of every output but the last


# ---------------------------------------------------------------- the engine on a tiny Mistral

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
)
ENGINE_PS = 4
ENGINE_WINDOW = 8
NEW_TOKENS = 60


async def generate_watching_pages(path: str, prompts: list[list[int]], caching: bool) -> tuple[list, list, list]:
    """Greedy outputs of ``prompts``, one after another; while the first generates, the pages that running
    requests hold after each streamed token, as (tokens seen, pages); then each output's cached prompt tokens."""
    engine = AsyncEngine(
        path,
        skip_tokenizer_init=True,
        page_size=ENGINE_PS,
        max_model_len=128,
        kv_cache_tokens=1024,
        max_num_batched_tokens=12,  # prompts prefill in chunks that end mid-page and mid-window
        enable_prefix_caching=caching,
        check_invariants=True,
        log_level="ERROR",
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens, held, cached = [], [], []
    async with engine:
        for i, prompt in enumerate(prompts):
            out_tokens = []
            async for out in engine.generate(prompt, params):
                out_tokens.extend(out.outputs[0].token_ids)
                if i == 0 and not out.finished:
                    s = await engine.get_stats()
                    if s.num_running:
                        held.append((len(out_tokens), s.num_pages - s.num_free_pages - s.num_cached_pages))
                if out.finished:
                    cached.append(out.num_cached_tokens)
            tokens.append(out_tokens)
    return tokens, held, cached


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> tuple[str, list[list[int]], list[list[int]]]:
    """A tiny random Mistral with a window of 8; the long prompt, then one that shares its first 17 tokens,
    then the long one again; and transformers' greedy tokens for each."""
    path = tmp_path_factory.mktemp("sliding") / "mistral"
    # Norms near 1, else attention is near uniform and greedy repeats one token.
    fields = {"model_type": "mistral", "sliding_window": ENGINE_WINDOW, **TINY}
    model = random_hf_model(path, fields, norm_offset=1.0)
    prompt = torch.randint(1, 512, (27,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [prompt, prompt[:17] + [5, 6, 7], prompt]
    ref = [hf_greedy(model, p, NEW_TOKENS) for p in prompts[:2]]
    return str(path), prompts, [*ref, ref[0]]


@pytest.mark.parametrize("caching", [False, True], ids=["no-cache", "cache"])
def test_mistral_matches_transformers_holding_a_window_of_pages(mistral, caching: bool):
    path, prompts, ref = mistral
    assert len(set(ref[0])) > 10, "greedy decoding should not settle on a few tokens"
    tokens, held, cached = asyncio.run(generate_watching_pages(path, prompts, caching))
    assert tokens == ref
    decoding = [pages for seen, pages in held if seen >= 3]
    assert len(decoding) >= 5 and max(decoding) <= ENGINE_WINDOW // ENGINE_PS + 1, held
    # The cache took the prompt's whole pages, not the outputs' (the first run dropped pages there).
    assert cached == ([0, 16, 24] if caching else [0, 0, 0])
