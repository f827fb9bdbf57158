"""Embeddings: pooled final-norm hidden states equal transformers' (fp32, 1e-5) for last-token and mean
pooling, over prompts longer than a prefill chunk and with the prefix cache on; an embedding model in
sentence-transformers layout (a Qwen3 base model without an LM head) pools as its own config says; the
/v1/embeddings route answers the official openai client; bad input fails alone."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import Qwen3Config, Qwen3Model

from tests.conftest import hf_greedy, random_hf_model  # pytest has imported the conftest under this name
from tristream import LLM, AsyncEngine, SamplingParams
from tristream.cli import engine_args, parse_args
from tristream.pooling import PoolingParams, sentence_transformers_pooling

CHUNK = 16
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
SMALL_ENGINE = dict(
    skip_tokenizer_init=True,
    max_model_len=256,
    max_num_batched_tokens=CHUNK,
    page_size=4,
    kv_cache_tokens=2048,
    check_invariants=True,
    log_level="WARNING",
)


def random_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(TINY["vocab_size"]) for _ in range(n)]


def hidden_states(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' final-norm hidden states [tokens, hidden] of ``ids``."""
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]


def assert_close(got: list[float], want: torch.Tensor) -> None:
    assert len(got) == want.shape[0]
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=0)


def save_sentence_transformers(path, mode: str, normalize: bool) -> None:
    """A sentence-transformers ``modules.json`` (and its Pooling config) in the model directory ``path``."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    modes = ("cls_token", "mean_tokens", "max_tokens", "lasttoken")
    config = {"word_embedding_dimension": TINY["hidden_size"], **{f"pooling_mode_{m}": m == mode for m in modes}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def qwen3_embedding(tmp_path_factory):
    """A tiny random Qwen3 embedding model as Qwen3-Embedding ships one: base-model weights without an LM head,
    and a sentence-transformers config that pools the mean without normalizing. Returns (directory, model)."""
    path = tmp_path_factory.mktemp("qwen3_embedding")
    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(head_dim=16, **TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name:
                p.add_(1.0)
    model.save_pretrained(path)
    save_sentence_transformers(path, "mean_tokens", normalize=False)
    return str(path), model


@pytest.fixture(scope="module")
async def embedding_engine(qwen3_embedding):
    async with AsyncEngine(qwen3_embedding[0], **SMALL_ENGINE) as engine:
        yield engine


async def test_mean_pooling_of_an_embedding_model_matches_transformers(embedding_engine, qwen3_embedding):
    """Its own config pools the mean, unnormalized. Prompts span several prefill chunks; the second round repeats
    and extends the first's prompts, whose pages are then cached, yet every embedding computes all its tokens."""
    model = qwen3_embedding[1]
    first = [random_ids(1, 45), random_ids(2, 7)]
    second = [first[0], first[0][:33] + random_ids(3, 12), first[1]]
    for prompts in (first, second):
        outputs = await asyncio.gather(*(embedding_engine.embed(p) for p in prompts))
        for prompt, out in zip(prompts, outputs):
            assert out.prompt_token_ids == prompt
            assert_close(out.outputs.embedding, hidden_states(model, prompt).mean(dim=0))
    stats = await embedding_engine.get_stats()
    assert stats.num_cached_pages > 0 and stats.num_cache_hit_tokens == 0


async def test_pooling_params_normalize_and_refuse_dimensions(embedding_engine, qwen3_embedding):
    prompt = random_ids(4, 20)
    out = await embedding_engine.embed({"prompt_token_ids": prompt}, PoolingParams(normalize=True))
    mean = hidden_states(qwen3_embedding[1], prompt).mean(dim=0)
    assert_close(out.outputs.embedding, torch.nn.functional.normalize(mean, dim=0))
    with pytest.raises(ValueError, match="dimensions is not supported"):
        PoolingParams(dimensions=32)


async def test_an_embedding_model_does_not_generate(embedding_engine):
    with pytest.raises(ValueError, match="embedding model"):
        async for _ in embedding_engine.generate(random_ids(5, 4), SamplingParams(max_tokens=2)):
            pass


@pytest.fixture(scope="module")
def last_token_llm(tmp_path_factory):
    """A tiny random Llama with an LM head, run with ``pooling="last"``; returns (LLM, transformers' model)."""
    path = tmp_path_factory.mktemp("llama_last")
    model = random_hf_model(path, dict(model_type="llama", **TINY), norm_offset=1.0)
    with LLM(str(path), pooling="last", **SMALL_ENGINE) as llm:
        yield llm, model


def test_llm_embed_pools_the_last_token_like_vllm(last_token_llm):
    """``LLM.embed`` returns vLLM's shape, normalized last-token states; the prompt that embedded first then
    generates from its cached pages as transformers does."""
    llm, model = last_token_llm
    prompts = [random_ids(6, 37), random_ids(7, 3), random_ids(6, 37)[:20]]
    outputs = llm.embed(prompts, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.finished and out.prompt_token_ids == prompt and out.outputs.hidden_size == TINY["hidden_size"]
        last = hidden_states(model.model, prompt)[-1]
        assert_close(out.outputs.embedding, torch.nn.functional.normalize(last, dim=0))
    [generated] = llm.generate([prompts[0]], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    assert generated.num_cached_tokens > 0
    assert generated.outputs[0].token_ids == hf_greedy(model, prompts[0], 6)


async def test_embeddings_run_beside_generation(engine, hf_model, tokenizer):
    """On the bundled model (last token, normalized by default) an embedding shares steps with a generation,
    and neither changes the other."""
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."
    ids = tokenizer(text).input_ids

    async def generate() -> list[int]:
        tokens = []
        async for out in engine.generate(ids, SamplingParams(max_tokens=4, temperature=0)):
            tokens += out.outputs[0].token_ids
        return tokens

    embedded, generated = await asyncio.gather(engine.embed(text), generate())
    assert embedded.prompt_token_ids == ids
    assert_close(
        embedded.outputs.embedding, torch.nn.functional.normalize(hidden_states(hf_model.model, ids)[-1], dim=0)
    )
    assert generated == hf_greedy(hf_model, ids, 4)


async def test_bad_input_fails_alone(engine):
    bad = {"": "empty", (5, 49152): "outside the vocabulary", (7,) * 1100: "max_model_len", (): "empty"}
    calls = [engine.embed("a good prompt"), *(engine.embed(list(p) if isinstance(p, tuple) else p) for p in bad)]
    good, *errors = await asyncio.gather(*calls, return_exceptions=True)
    assert good.outputs.hidden_size == 576
    for error, match in zip(errors, bad.values()):
        assert isinstance(error, ValueError) and match in str(error)


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_embeddings(client, live_server):
    """The openai client asks for base64 and decodes it; the same embeddings come as floats, from text and from
    token ids, with ``usage``."""
    texts = ["Embeddings place similar texts close together.", "hello"]
    response = client.embeddings.create(model=live_server.model, input=texts)
    assert [d.index for d in response.data] == [0, 1] and response.model == live_server.model
    floats = httpx.post(live_server.url + "/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
    for got, want in zip(response.data, floats["data"]):
        np.testing.assert_allclose(got.embedding, want["embedding"], atol=1e-6)
        assert abs(np.linalg.norm(got.embedding) - 1) < 1e-5
    ids = httpx.post(live_server.url + "/tokenize", json={"prompt": texts[1]}).json()["tokens"]
    by_ids = client.embeddings.create(model=live_server.model, input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, floats["data"][1]["embedding"], atol=1e-6)
    assert response.usage.prompt_tokens == response.usage.total_tokens == floats["usage"]["prompt_tokens"] > len(ids)


BAD_BODIES = [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": [[1, 2], [3, 10**6]]}, "input", "prompt 1: prompt token ids outside the vocabulary"),
    ({"input": [7] * 1100}, "input", "max_model_len"),
    ({"input": "hi", "dimensions": 64}, "dimensions", "not supported"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
]


def test_bad_embedding_requests_are_400_and_the_server_goes_on(client, live_server):
    for body, param, words in BAD_BODIES:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=live_server.model, **body)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == param and words in error["message"], body
    assert len(client.embeddings.create(model=live_server.model, input="still here").data) == 1


def test_pooling_flags_and_model_configs(tmp_path):
    args = parse_args(["serve", "--pooling", "mean", "--no-normalize"])
    assert {k: engine_args(args)[k] for k in ("pooling", "normalize")} == {"pooling": "mean", "normalize": False}
    assert sentence_transformers_pooling(str(tmp_path)) == (None, None)
    save_sentence_transformers(tmp_path, "cls_token", normalize=True)
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        sentence_transformers_pooling(str(tmp_path))
