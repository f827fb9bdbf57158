"""Speculative decoding: n-gram prompt lookup and draft models never change greedy output, keep the sampled
distribution, leak no KV pages, and count what they propose and what is accepted."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from tests.test_pipelined import assert_same_outputs, run_workload
from tests.test_scheduling import workload
from tristream import LLM, AsyncEngine, SamplingParams, StructuredOutput
from tristream.cli import parse_args
from tristream.config import EngineConfig
from tristream.config_file import load_config_file
from tristream.gpu_proc.runner import ModelRunner, QueuedStep
from tristream.gpu_proc.speculative import accepted, ngram_drafts
from tristream.model_files import default_model_path
from tristream.outputs import accumulate
from tristream.protocol import BatchPlan, NewSequence
from tristream.server.metrics import ServerMetrics
from tristream.speculative import SpeculativeConfig, parse_speculative

ALWAYS = 256  # disable_by_batch_size above any batch of these tests
# The chi-square values that 1..7 degrees of freedom exceed with probability 0.001.
CHI2_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def spec_engine(kv_cache_tokens: int = 8192, **spec: object) -> AsyncEngine:
    return AsyncEngine(
        max_model_len=512,
        check_invariants=True,
        log_level="WARNING",
        speculative={"num_tokens": 3, "disable_by_batch_size": ALWAYS, **spec},
        kv_cache_tokens=kv_cache_tokens,
    )


@pytest.fixture(scope="module")
async def ngram_engine():
    """Prompt lookup, over a KV cache small enough that the workloads preempt requests."""
    async with spec_engine(384, method="ngram", num_tokens=4) as eng:
        yield eng


@pytest.fixture(scope="module")
async def own_draft_engine():
    """The model as its own draft."""
    async with spec_engine(method="draft", model=default_model_path()) as eng:
        yield eng


@pytest.fixture(scope="module")
def perturbed_model(model_dir, tmp_path_factory) -> str:
    """A copy of the model with noise on its weights: a draft that is often, not always, right."""
    path = tmp_path_factory.mktemp("perturbed")
    for item in Path(model_dir).iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, path / item.name)
    gen = torch.Generator().manual_seed(0)
    weights = load_file(Path(model_dir) / "model.safetensors")
    noisy = {k: w + 0.05 * w.float().std() * torch.randn(w.shape, generator=gen) for k, w in weights.items()}
    save_file({k: w.contiguous() for k, w in noisy.items()}, path / "model.safetensors")
    return str(path)


@pytest.fixture(scope="module")
async def perturbed_engine(perturbed_model):
    async with spec_engine(method="draft", model=perturbed_model) as eng:
        yield eng


def random_eagle3_head(path: Path, model_dir: str, draft_vocab: int = 4096) -> str:
    """An EAGLE-3 head for the model in ``model_dir``, random weights in the published layout: config.json with a
    draft vocabulary of ``draft_vocab`` tokens (``d2t`` maps them to model ids spread over its vocabulary)."""
    target = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = target["hidden_size"], target["intermediate_size"]
    heads, kv_heads = target["num_attention_heads"], target["num_key_value_heads"]
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": hidden, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
        "vocab_size": target["vocab_size"], "draft_vocab_size": draft_vocab, "rms_norm_eps": target["rms_norm_eps"],
        "rope_theta": target.get("rope_theta", 10000.0), "max_position_embeddings": target["max_position_embeddings"],
    }  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * shape[-1] ** -0.5

    ids = torch.randperm(target["vocab_size"], generator=gen)[:draft_vocab].sort().values
    weights = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(draft_vocab, hidden),
        "d2t": ids - torch.arange(draft_vocab),
        "t2d": torch.zeros(target["vocab_size"], dtype=torch.bool).index_fill(0, ids, True),
    }
    save_file(weights, path / "model.safetensors")
    return str(path)


@pytest.fixture(scope="module")
async def eagle_engine(model_dir, tmp_path_factory):
    head = random_eagle3_head(tmp_path_factory.mktemp("eagle3") / "head", model_dir)
    async with spec_engine(method="eagle3", model=head) as eng:
        yield eng


# ---------------------------------------------------------------- settings


def test_the_config_takes_the_peers_spellings_and_refuses_bad_values(tmp_path):
    assert parse_speculative('{"method": "ngram", "num_speculative_tokens": 5}').num_tokens == 5
    assert parse_speculative({"model": "d", "num_tokens": 2}) == SpeculativeConfig("draft", 2, model="d")
    assert parse_speculative({"method": "draft_model", "model": "d"}).method == "draft"
    for bad, match in [
        ({"method": "eagle", "model": "h"}, "EAGLE-3's are supported"),
        ({"method": "eagle3"}, "needs the draft's directory"),
        ({"method": "ngram", "num_tokens": 0}, "num_tokens must be an int >= 1"),
        ({"method": "ngram", "num_tokens": float("nan")}, "num_tokens must be an int"),
        ({"method": "ngram", "prompt_lookup_min": 5}, "prompt_lookup_min"),
        ({"method": "draft"}, "needs the draft's directory"),
        ({"method": "ngram", "lookahead": 2}, "unknown speculative config keys"),
        ({"num_tokens": 2}, "needs a method"),
        ("{not json", "not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_speculative(bad)
    args = parse_args(["serve", "--speculative-config", '{"method": "ngram", "num_tokens": 2}'])
    assert args.speculative == SpeculativeConfig("ngram", 2)
    with pytest.raises(SystemExit):
        parse_args(["serve", "--speculative-config", '{"method": "medusa"}'])
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("speculative_config:\n  method: ngram\n  prompt_lookup_max: 3\n")
    assert load_config_file(str(yaml), {"speculative"})["speculative"].prompt_lookup_max == 3


def test_a_draft_model_must_share_the_tokenizer_and_hold_the_context(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "big", ignore=shutil.ignore_patterns("*.safetensors"))
    config = (tmp_path / "big" / "config.json").read_text().replace('"vocab_size": 49152', '"vocab_size": 50000')
    (tmp_path / "big" / "config.json").write_text(config)
    with pytest.raises(ValueError, match="vocabulary .50000. is larger than the model's .49152."):
        LLM(speculative_config={"model": str(tmp_path / "big")}, load_format="dummy", max_model_len=256)
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(speculative={"model": model_dir}, tensor_parallel_size=2)


def test_ngram_drafts_follow_the_most_recent_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert ngram_drafts(tokens, 3, 1, 3) == [4, 5, 7]  # "2 3" last came before 4 5 7
    assert ngram_drafts(tokens, 1, 1, 3) == [4]
    assert ngram_drafts([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_drafts([5, 6, 5], 4, 1, 2) == [6, 5]  # a match of one token, the longer one absent
    assert ngram_drafts([5, 6, 5], 4, 2, 2) == []


def test_a_slot_keeps_its_first_token_and_each_next_while_the_drafts_match():
    assert accepted([7, 8, 9], [7, 8, 9, 10]) == [7, 8, 9, 10]
    assert accepted([7, 8, 9], [7, 5, 9, 10]) == [7, 5]
    assert accepted([7, 8, 9], [6, 8, 9, 10]) == [6]
    assert accepted([], [4]) == [4]


def reference_eagle3_drafts(head_dir: str, hf_model, context: list[int], k: int) -> list[int]:
    """The head's k greedy drafts after ``context``, computed whole in plain torch from the head's
    checkpoint and transformers' hidden states: entry i is (embedding of token i+1, fc of the residual stream
    entering layers 2, L/2 and L-3 at position i), causal attention over all entries with rotary positions i, and
    each draft fed back beside the head's own hidden state before its final norm."""
    w = load_file(Path(head_dir) / "model.safetensors")
    cfg = json.loads((Path(head_dir) / "config.json").read_text())
    heads, kv_heads, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    with torch.no_grad():
        states = hf_model(torch.tensor([context[:-1]]), output_hidden_states=True).hidden_states
        n = len(states) - 1
        aux = torch.cat([states[i][0] for i in (2, n // 2, n - 3)], dim=-1)
        embed = hf_model.get_input_embeddings().weight

        def rms(x, weight):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

        def head(tokens: list[int], hidden: torch.Tensor) -> tuple[int, torch.Tensor]:
            m = len(tokens)
            z = torch.cat([rms(embed[tokens], w["midlayer.input_layernorm.weight"]),
                           rms(hidden, w["midlayer.hidden_norm.weight"])], dim=-1)  # fmt: skip
            q, k_, v = (z @ w[f"midlayer.self_attn.{x}_proj.weight"].T for x in "qkv")
            d = q.shape[-1] // heads
            q, k_, v = q.view(m, heads, d), k_.view(m, kv_heads, d), v.view(m, kv_heads, d)
            inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2).float() / d)
            angles = torch.arange(m).float()[:, None] * inv[None, :]
            cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

            def rope(x):
                return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin

            q, k_ = rope(q), rope(k_)
            k_, v = k_.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k_) * d**-0.5
            scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
            attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(m, heads * d)
            r = attn @ w["midlayer.self_attn.o_proj.weight"].T + hidden
            y = rms(r, w["midlayer.post_attention_layernorm.weight"])
            gate, up = y @ w["midlayer.mlp.gate_proj.weight"].T, y @ w["midlayer.mlp.up_proj.weight"].T
            before = (torch.nn.functional.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T + r
            token = int((rms(before[-1], w["norm.weight"]) @ w["lm_head.weight"].T).argmax())
            return token + int(w["d2t"][token]), before[-1]

        tokens, hidden = context[1:], aux @ w["fc.weight"].T
        drafts = []
        for _ in range(k):
            token, state = head(tokens, hidden)
            drafts.append(token)
            tokens, hidden = tokens + [token], torch.cat([hidden, state[None]])
        return drafts


def test_eagle3_drafts_are_the_heads_own_greedy_tokens(model_dir, hf_model, tmp_path):
    """The proposals of the engine's head (kept features, catch-up extend, decode steps over its own KV) equal
    the head computed whole from the checkpoint and transformers' hidden states, at its first proposal (the whole
    prompt to catch up on) and at the next ones (the positions the checking step kept)."""
    head = random_eagle3_head(tmp_path / "head", model_dir, draft_vocab=49152)
    config = EngineConfig(
        model=model_dir, device="cpu", max_model_len=128, kv_cache_tokens=512, log_level="WARNING",
        speculative={"method": "eagle3", "model": head, "num_tokens": 3},
    )  # fmt: skip
    runner = ModelRunner(config)
    proposed: list[list[list[int]]] = []
    propose = runner.proposer.propose
    runner.proposer.propose = lambda items: proposed.append(propose(items)) or proposed[-1]
    prompt = AutoTokenizer.from_pretrained(model_dir).encode("The three primary colours are red, yellow and")
    params = SamplingParams(temperature=0, max_tokens=20)
    new = NewSequence(0, prompt, 0, 0, params)
    runner.step(BatchPlan(0, new=[new], pages=[(0, [1, 2, 3, 4])], slots=[0], num_tokens=[len(prompt)], sample=[True]))
    seq = runner.slots.seqs[0]
    for step in range(1, 4):
        context = list(seq.token_ids)
        kept = len(runner.step(BatchPlan(step, slots=[0], num_tokens=[4], sample=[True])).token_ids)
        assert proposed[-1] == [reference_eagle3_drafts(head, hf_model, context, 3)]
        assert seq.num_computed == len(context) - 1 + kept and len(seq.token_ids) == len(context) + kept


# ---------------------------------------------------------------- greedy output


async def test_greedy_output_with_each_method_is_that_without(
    engine, tokenizer, ngram_engine, own_draft_engine, eagle_engine
):
    """The scheduling workload (shared prefixes, arrivals mid-flight) and the mixed one (stop strings, aborts, EOS,
    max_tokens=1, seeded sampling), the n-gram engine's KV cache so small that requests are preempted."""
    reference = await workload(engine, tokenizer)
    mixed = await run_workload(engine, "plain")
    for spec in (ngram_engine, own_draft_engine, eagle_engine):
        assert await workload(spec, tokenizer) == reference
        assert_same_outputs(await run_workload(spec, "spec"), mixed)
        stats = await spec.get_stats()
        assert stats.num_draft_tokens >= stats.num_accepted_tokens and stats.num_drafts > 0
        # a head with random weights proposes, but its drafts need not be right
        assert stats.num_accepted_tokens > 0 or spec is eagle_engine
    assert (await ngram_engine.get_stats()).num_preemptions > 0


async def greedy_run(engine: AsyncEngine) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The history of the lighthouse", "def fibonacci(n):", "Ten facts about tides:", "Hello"]

    async def one(prompt: str) -> list[int]:
        return [t async for out in engine.generate(prompt, params) for t in out.outputs[0].token_ids]

    return await asyncio.gather(*map(one, prompts))


@pytest.fixture(scope="module")
async def greedy_reference(engine) -> list[list[int]]:
    return await greedy_run(engine)


async def test_the_model_as_its_own_draft_has_every_token_accepted(greedy_reference, own_draft_engine):
    before = await own_draft_engine.get_stats()
    assert await greedy_run(own_draft_engine) == greedy_reference
    after = await own_draft_engine.get_stats()
    drafted = after.num_draft_tokens - before.num_draft_tokens
    assert drafted > 0 and after.num_accepted_tokens - before.num_accepted_tokens == drafted
    metrics = ServerMetrics(own_draft_engine, "m")
    samples = {
        s.name: s.value for f in text_string_to_metric_families((await metrics.render()).decode()) for s in f.samples
    }
    stats = await own_draft_engine.get_stats()
    assert samples["tristream_spec_decode_num_accepted_tokens_total"] == stats.num_accepted_tokens
    assert samples["tristream_spec_decode_acceptance_rate"] == stats.acceptance_rate > 0


async def test_logprobs_and_samples_of_n_are_those_without_drafts(engine, own_draft_engine):
    """Each token's logprobs come from its own row, as if generated one by one; the samples of ``n=2`` with a seed
    draw the noise of their output positions."""
    params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=16, logprobs=3, ignore_eos=True)

    async def run(eng: AsyncEngine) -> list:
        whole = None
        async for out in eng.generate("Ten facts about tides:", params):
            whole = accumulate(whole, out)
        return sorted((o.index, o.token_ids, o.logprobs) for o in whole.outputs)

    want, got = await run(engine), await run(own_draft_engine)
    assert len(got) == 2
    for (_, ids, lps), (_, want_ids, want_lps) in zip(got, want):
        assert ids == want_ids and len(lps) == len(ids) == 16
        for step, want_step in zip(lps, want_lps):
            assert list(step) == list(want_step)
            assert all(abs(step[t] - want_step[t]) < 1e-4 for t in step)


async def test_a_perturbed_draft_has_fewer_accepted_and_the_same_output(greedy_reference, perturbed_engine):
    assert await greedy_run(perturbed_engine) == greedy_reference
    stats = await perturbed_engine.get_stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert 1 < stats.mean_accepted_length < 4 and 0 < stats.acceptance_rate < 1


async def test_drafts_under_a_grammar_keep_its_output(engine, ngram_engine):
    """A grammar's mask at each row that checks a draft is the grammar's once the drafts before it are accepted;
    a draft the grammar forbids is rejected. Greedy output and seeded samples are those without drafts."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "sights": {"type": "array",
              "items": {"type": "string"}, "maxItems": 3}}, "required": ["city", "sights"]}  # fmt: skip
    prompt = 'Answer in JSON like {"city": "Paris", "sights": ["Louvre", "Eiffel Tower"]}. Rome:'
    jobs = [
        SamplingParams(temperature=0, max_tokens=48, structured=StructuredOutput(json=schema)),
        SamplingParams(temperature=0.7, seed=5, max_tokens=48, structured=StructuredOutput(json=schema)),
        SamplingParams(temperature=0, max_tokens=12, structured=StructuredOutput(regex=r"(Rome|Roma)( is old\.)+")),
    ]

    async def run(eng: AsyncEngine) -> list[str]:
        async def one(params: SamplingParams) -> str:
            return "".join([out.outputs[0].text async for out in eng.generate(prompt, params)])

        return await asyncio.gather(*map(one, jobs))

    before = await ngram_engine.get_stats()
    got, want = await run(ngram_engine), await run(engine)
    assert got == want and json.loads(got[0])["city"]
    after = await ngram_engine.get_stats()
    assert after.num_accepted_tokens > before.num_accepted_tokens


async def test_two_tensor_parallel_ranks_check_the_same_drafts(engine):
    """Every rank proposes the same n-gram drafts and keeps the same tokens, so the ranks stay in step."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = ["Count: 1, 2, 3, 4, 5, 6,", "def add(a, b):\n    return a + b\ndef add("]

    async def run(eng: AsyncEngine) -> list[list[int]]:
        async def one(prompt: str) -> list[int]:
            return [t async for out in eng.generate(prompt, params) for t in out.outputs[0].token_ids]

        return await asyncio.gather(*map(one, prompts))

    async with AsyncEngine(
        tensor_parallel_size=2, speculative={"method": "ngram"}, check_invariants=True, log_level="WARNING"
    ) as tp:
        assert await run(tp) == await run(engine)
        assert (await tp.get_stats()).num_accepted_tokens > 0


# ---------------------------------------------------------------- sampled output

CONTEXT = "one two three one two three one two three one two"
SAMPLED = dict(temperature=2.0, top_k=2, ignore_eos=True)


async def _next_token_probs(engine: AsyncEngine, prompt: list[int]) -> dict[int, float]:
    """The model's distribution of the token after ``prompt`` under SAMPLED (two tokens), without speculation."""
    params = SamplingParams(max_tokens=1, logprobs=2, seed=0, **SAMPLED)
    outs = [out async for out in engine.generate(prompt, params)]
    top = outs[-1].outputs[0].logprobs[0]
    return {token: math.exp(lp) for token, lp in top.items()}


async def _exact_triples(engine: AsyncEngine, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """The probability of each sequence of three tokens after ``prompt``, from the model's distributions."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):
        grown = {}
        for seq, p in probs.items():
            for token, q in (await _next_token_probs(engine, prompt + list(seq))).items():
                grown[seq + (token,)] = p * q
        probs = grown
    return probs


async def test_sampled_tokens_checked_against_ngram_drafts_keep_the_distribution(engine, tokenizer, ngram_engine):
    await check_distribution(engine, tokenizer, ngram_engine)


async def test_sampled_tokens_checked_against_model_drafts_keep_the_distribution(engine, tokenizer, perturbed_engine):
    await check_distribution(engine, tokenizer, perturbed_engine)


async def check_distribution(engine: AsyncEngine, tokenizer, spec: AsyncEngine) -> None:
    """Three tokens sampled after a repetitive context (two of them at rows that check drafts): the frequencies of
    the eight sequences match the model's own probabilities (chi-square), while drafts are accepted and rejected."""
    prompt = tokenizer.encode(CONTEXT)
    exact = await _exact_triples(engine, prompt)
    before = await spec.get_stats()
    requests, samples = 40, 5  # the samples of a request share its prompt's KV, each with a seed of its own
    n = requests * samples

    async def one(seed: int) -> list[tuple[int, ...]]:
        params = SamplingParams(max_tokens=3, seed=seed, n=samples, **SAMPLED)
        whole = None
        async for out in spec.generate(prompt, params):
            whole = accumulate(whole, out)
        return [tuple(o.token_ids) for o in whole.outputs]

    runs = await asyncio.gather(*(one(seed) for seed in range(requests)))
    counts = collections.Counter(seq for run in runs for seq in run)
    assert set(counts) <= set(exact)
    after = await spec.get_stats()
    drafted = after.num_draft_tokens - before.num_draft_tokens
    assert 0 < after.num_accepted_tokens - before.num_accepted_tokens < drafted
    expected = {seq: n * p for seq, p in exact.items()}
    small = [seq for seq, e in expected.items() if e < 5]
    cells = [([seq], e) for seq, e in expected.items() if e >= 5]
    if small:
        cells.append((small, sum(expected[s] for s in small)))
    chi2 = sum((sum(counts[s] for s in seqs) - e) ** 2 / e for seqs, e in cells)
    assert len(cells) >= 4 and chi2 < CHI2_P001[len(cells) - 1], (chi2, counts, expected)


def test_a_rank_a_step_behind_finishes_the_step_whose_tokens_the_next_plan_needs():
    """Slot 3 sampled its newest token in the step in flight, slot 5 checked two drafts in it."""
    seqs = [types.SimpleNamespace(drafts=0), types.SimpleNamespace(drafts=2)]
    step = QueuedStep(BatchPlan(0), None, None, seqs=seqs, slots=[3, 5])
    assert not step.feeds(BatchPlan(1, slots=[3, 7], num_tokens=[1, 16]))  # a plain decode stays pipelined
    assert step.feeds(BatchPlan(1, slots=[3], num_tokens=[3]))  # drafts for slot 3 follow its unknown token
    assert step.feeds(BatchPlan(1, slots=[5], num_tokens=[1]))  # slot 5's kept tokens are not known yet
