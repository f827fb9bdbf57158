"""The newer model families through the whole engine: greedy output and logprobs equal transformers' for
concurrent prompts of several pages, some sharing a long prefix.

Qwen3-MoE, Gemma 2 and GLM-4 each run on an engine with the prefix cache off that prefills in chunks, and on one
with it on over two rounds, the second reusing the first's cached pages (pages written while decoding too).
The prefix-cache engines of Qwen3-MoE, Qwen2-MoE (shared expert) and Gemma 2 split the model over two
tensor-parallel ranks, with sizes that split unevenly. (An unsupported architecture is tested in test_models.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.conftest import hf_logits, random_hf_model  # pytest has imported the conftest under this name
from tristream import LLM, SamplingParams

PAGE = 8
NEW_TOKENS = 12
# Sizes that split unevenly over two ranks: the dense MLP (129), every expert (33) and the shared expert (97).
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=129,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
)
FAMILIES = {
    "qwen3-moe": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=8,
        moe_intermediate_size=33,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "qwen2-moe": dict(
        model_type="qwen2_moe",
        architectures=["Qwen2MoeForCausalLM"],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=33,
        shared_expert_intermediate_size=97,
    ),
    "gemma2": dict(
        model_type="gemma2",
        architectures=["Gemma2ForCausalLM"],
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=24,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "glm4": dict(model_type="glm4", architectures=["Glm4ForCausalLM"], head_dim=32, attention_bias=True),
}


@dataclass
class Reference:
    """transformers' greedy tokens for one prompt, and the log-probabilities of each step."""

    tokens: list[int]
    logprobs: torch.Tensor


@dataclass
class Family:
    """A tiny random checkpoint and two rounds of prompts with transformers' greedy decoding of each."""

    path: str
    round1: list[list[int]]
    round2: list[list[int]]
    ref1: list[Reference]
    ref2: list[Reference]


def reference(model, prompt: list[int]) -> Reference:
    rows = torch.stack(hf_logits(model, prompt, NEW_TOKENS - 1))
    return Reference(rows.argmax(-1).tolist(), torch.log_softmax(rows, -1))


def build(root, name: str) -> Family:
    fields = {**TINY, **FAMILIES[name]}
    # transformers' grouped expert matmul wants 16-byte strides, which 33 columns are not.
    extra = {"experts_implementation": "eager"} if "num_experts" in fields else {}
    # Norm weights near 1 (Gemma's norms scale by 1 + w already): at 0.2 the attention is nearly uniform
    # and greedy decoding settles on one repeated token, whatever the window or the rotary embedding.
    path = root / name
    model = random_hf_model(path, fields, norm_offset=0.0 if name == "gemma2" else 1.0, **extra)

    gen = torch.Generator().manual_seed(1)

    def rand(n: int) -> list[int]:
        return torch.randint(1, 512, (n,), generator=gen).tolist()

    # A 43-token common prefix (5 whole pages and 3 tokens), longer than Gemma 2's window of 24.
    prefix = rand(43)
    round1 = [prefix + rand(6), prefix + rand(17), rand(13)]
    ref1 = [reference(model, p) for p in round1]
    # The same prefix again, a conversation going on after round 1's output, and a repeated prompt.
    round2 = [prefix + rand(9), round1[1] + ref1[1].tokens + rand(5), round1[2]]
    ref2 = [reference(model, p) for p in round2]
    return Family(str(path), round1, round2, ref1, ref2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)``: that family's checkpoint and references, built once for the module."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Family:
        if name not in built:
            built[name] = build(root, name)
        return built[name]

    return get


def engine(path: str, tp: int, prefix_cache: bool) -> LLM:
    return LLM(
        model=path,
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        enable_prefix_caching=prefix_cache,
        # Without the prefix cache, prompts prefill in chunks that end mid-page and mid-window.
        max_num_batched_tokens=2048 if prefix_cache else 40,
        page_size=PAGE,
        max_model_len=128,
        kv_cache_tokens=1024,
        check_invariants=True,
        log_level="ERROR",
    )


def generate(llm: LLM, prompts: list[list[int]]) -> tuple[list, list[int]]:
    """Every prompt in one call: the greedy tokens and top logprobs of each, and how many of its prompt tokens
    came from the cache."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0] for o in outs], [o.num_cached_tokens for o in outs]


def cached_pages_of(prompt: list[int], earlier: list[list[int]]) -> int:
    """Tokens of ``prompt`` (but its last) that whole cached pages of the ``earlier`` sequences cover."""
    best = 0
    for seq in earlier:
        n = 0
        while n < min(len(seq), len(prompt) - 1) and seq[n] == prompt[n]:
            n += 1
        best = max(best, n // PAGE * PAGE)
    return best


def assert_greedy(name: str, got: list, prompts: list[list[int]], ref: list[Reference]) -> None:
    for i, (prompt, ours, theirs) in enumerate(zip(prompts, got, ref)):
        assert list(ours.token_ids) == theirs.tokens, f"{name}: prompt {i} ({len(prompt)} tokens) diverges"
        assert len(ours.logprobs) == NEW_TOKENS and all(len(top) >= 2 for top in ours.logprobs)
        for step, top in enumerate(ours.logprobs):
            for token, logprob in top.items():
                err = abs(logprob - float(theirs.logprobs[step, token]))
                assert err < 1e-4, f"{name}: prompt {i} step {step} token {token}: logprob off by {err:.1e}"


@pytest.mark.parametrize(
    "name, tp",
    [
        pytest.param("qwen3-moe", 2, id="qwen3-moe-tp2"),
        pytest.param("qwen2-moe", 2, id="qwen2-moe-tp2"),
        pytest.param("gemma2", 2, id="gemma2-tp2"),
        pytest.param("glm4", 1, id="glm4"),
    ],
)
def test_prefix_cache_on_two_rounds_match_transformers(family, name, tp):
    fam = family(name)
    with engine(fam.path, tp, prefix_cache=True) as llm:
        got1, _ = generate(llm, fam.round1)
        assert_greedy(name, got1, fam.round1, fam.ref1)
        got2, cached2 = generate(llm, fam.round2)
    assert_greedy(name, got2, fam.round2, fam.ref2)
    # A request caches its prompt and every output token but the last (whose KV it never wrote).
    earlier = [p + ref.tokens[:-1] for p, ref in zip(fam.round1, fam.ref1)]
    expected = [cached_pages_of(p, earlier) for p in fam.round2]
    assert expected == [40, 64, 8]
    assert cached2 == expected


@pytest.mark.parametrize("name", ["qwen3-moe", "gemma2", "glm4"])
def test_prefix_cache_off_chunked_prefill_matches_transformers(family, name):
    fam = family(name)
    prompts, ref = fam.round1 + fam.round2, fam.ref1 + fam.ref2
    with engine(fam.path, 1, prefix_cache=False) as llm:
        got, cached = generate(llm, prompts)
    assert_greedy(name, got, prompts, ref)
    assert cached == [0] * len(prompts)
