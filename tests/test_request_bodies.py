"""The request bodies of vLLM's deployment guide: logit_bias words, white lists, ignored fields, continuous usage."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tristream import SamplingParams
from tristream.gpu_proc.sampler import Sampler, SamplingState

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The guide's fields that mean nothing to the engine.
IGNORED = {
    "force_prompt": "Answer briefly.",
    "enable_repeat_stopper": True,
    "add_default_stop": True,
    "conversation_id": "conv-42",
    "user": "user-7",
}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(live_server, path: str, body: dict) -> httpx.Response:
    return httpx.post(live_server.url + path, json=body, timeout=120)


def tokenize(live_server, text: str) -> list[int]:
    return post(live_server, "/tokenize", {"prompt": text}).json()["tokens"]


def token_texts(live_server, ids: list[int], words: list[str]) -> set[str]:
    """The text of each of ``ids`` and of each token of ``words``, alone and after a space."""
    every = {*ids, *(t for w in words for text in (w, " " + w) for t in tokenize(live_server, text))}
    return {post(live_server, "/detokenize", {"tokens": [t]}).json()["prompt"] for t in every}


def test_the_guides_chat_body_answers(live_server):
    body = {
        "model": live_server.model,
        "messages": [{"role": "system", "content": "You are a friendly assistant."}, *QUESTION],
        "max_tokens": 6,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "use_beam_search": True,
        "length_penalty": 1.2,
        "seed": 1,
        "logit_bias": {"greeting": -1.0},
        **IGNORED,
    }
    r = post(live_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["choices"][0]["message"]["content"].strip()
    assert reply["usage"]["completion_tokens"] > 0


def test_the_guides_completion_body_answers_within_its_white_list(live_server):
    ids = tokenize(live_server, " a brave knight")
    body = {
        "model": live_server.model,
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0.8,
        "logit_bias": {"adventure": 0.5},
        "white_list_token_ids": ids,
        "white_list_token": ["adventure", "dragon"],
        "logprobs": 0,
        **IGNORED,
    }
    r = post(live_server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 8
    assert set(tokens) <= token_texts(live_server, ids, ["adventure", "dragon"])


def test_a_word_bias_removes_or_forces_the_word(client, live_server):
    def answer(**extra) -> str:
        r = client.chat.completions.create(
            model=live_server.model, messages=QUESTION, max_tokens=8, temperature=0, extra_body=extra
        )
        return r.choices[0].message.content

    plain = answer()
    assert "Paris" in plain and "adventure" not in plain
    assert "Paris" not in answer(logit_bias={"Paris": -100})
    assert "adventure" in answer(logit_bias={"adventure": 100})


def test_a_white_list_holds_for_every_token(client, live_server):
    allowed = tokenize(live_server, " yes no Yes No")
    r = client.chat.completions.create(
        model=live_server.model,
        messages=QUESTION,
        max_tokens=4,
        temperature=1.0,
        seed=3,
        logprobs=True,
        extra_body={"white_list_token": ["maybe"], "allowed_token_ids": allowed},
    )
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert len(tokens) == 4
    assert set(tokens) <= token_texts(live_server, allowed, ["maybe"])


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("white_list_token", [], ["allowed_words", "non-empty"]),
        ("white_list_token_ids", [], ["allowed_token_ids", "non-empty"]),
        ("white_list_token_ids", [49152], ["allowed_token_ids", "vocabulary"]),
        ("allowed_token_ids", [5, 10**9], ["allowed_token_ids", "vocabulary"]),
        ("logit_bias", {"49152": 5}, ["logit_bias", "vocabulary"]),
        ("logit_bias", {" ": 5}, ["logit_bias", "non-blank words"]),
    ],
)
def test_empty_white_lists_and_ids_outside_the_vocabulary_are_400s(live_server, field, value, words):
    for path, body in (("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": "Hi"})):
        r = post(live_server, path, {**body, "max_tokens": 2, field: value})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert all(word in message for word in words), message


def test_beam_search_and_suffix_stay_refused(live_server):
    for field, value in (("length_penalty", 0.5), ("suffix", "The end.")):
        r = post(live_server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_continuous_usage_stats_put_usage_on_every_chunk(client, live_server):
    options = {"include_usage": True, "continuous_usage_stats": True}
    streams = [
        client.chat.completions.create(
            model=live_server.model, messages=QUESTION, max_tokens=4, temperature=0, stream=True, stream_options=options
        ),
        client.completions.create(
            model=live_server.model,
            prompt="Once upon a time",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options=options,
        ),
    ]
    for stream in streams:
        chunks = list(stream)
        assert all(c.usage is not None for c in chunks)
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 4 and counts[0] < 4
        assert all(c.usage.prompt_tokens == chunks[0].usage.prompt_tokens > 0 for c in chunks)
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
        assert chunks[-1].choices == []


def test_allowed_token_ids_and_word_keys_are_validated():
    p = SamplingParams(logit_bias={"50256": 1, "greeting": -1, 7: 2}, allowed_token_ids=(4, 5), allowed_words=["hi"])
    assert p.logit_bias == {50256: 1.0, "greeting": -1.0, 7: 2.0}
    assert p.word_biases == {"greeting": -1.0}
    assert p.allowed_token_ids == [4, 5] and p.allowed_words == ["hi"]
    for bad in ({"allowed_token_ids": []}, {"allowed_token_ids": [-1]}, {"allowed_token_ids": [True]}):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams(**bad)
    for bad in ({"allowed_words": []}, {"allowed_words": ["  "]}, {"allowed_words": [3]}):
        with pytest.raises(ValueError, match="allowed_words"):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"": 1.0})


def test_the_sampler_keeps_only_the_allowed_tokens():
    vocab = 32
    params = [
        SamplingParams(temperature=0, allowed_token_ids=[3, 9]),
        SamplingParams(temperature=1.0, seed=1, allowed_token_ids=[20, 21, 22], logit_bias={21: 5.0, 7: 50.0}),
        SamplingParams(temperature=0),
    ]
    state = SamplingState(len(params), vocab, [0], torch.device("cpu"))
    for slot, p in enumerate(params):
        state.set(slot, p, [1], 0)
    sampler = Sampler(state)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = 100.0
    got = sampler.process(logits, torch.arange(3), [0, 1, 2])
    for row, p in enumerate(params[:2]):
        outside = [t for t in range(vocab) if t not in p.allowed_token_ids]
        assert torch.isinf(got[row, outside]).all() and torch.isfinite(got[row, p.allowed_token_ids]).all()
    assert got[1, 21] == logits[1, 21] + 5.0
    assert torch.equal(got[2], logits[2])
    for _ in range(5):
        tokens = sampler(logits, torch.arange(3), [0, 1, 2]).tolist()
        assert tokens[0] in (3, 9) and tokens[1] in (20, 21, 22) and tokens[2] == 7
