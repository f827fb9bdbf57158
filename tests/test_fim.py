"""Fill in the middle: ``suffix`` on completions lays the prompt out with the model's FIM tokens, or is a 400
for a model whose tokenizer has none (the bundled SmolLM2)."""

from __future__ import annotations

import copy

import openai
import pytest

from tests.conftest import random_hf_model  # pytest has imported the conftest under this name
from tristream import AsyncEngine, SamplingParams
from tristream.openai_api import CompletionReply, CompletionRequest
from tristream.outputs import accumulate
from tristream.tokenizer_proc.fim import FIM_TOKEN_SETS, FimPrompts, FimTokenSet

PREFIX = "def area(r):\n    return "
SUFFIX = "\n\nprint(area(2))\n"
QWEN, STARCODER, DEEPSEEK = FIM_TOKEN_SETS


def with_fim_tokens(tokenizer, tokens: FimTokenSet, add_bos: bool = False):
    """A copy of ``tokenizer`` with ``tokens`` added as special tokens, adding a BOS to every text if ``add_bos``."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": [tokens.prefix, tokens.suffix, tokens.middle]})
    tok.add_bos_token = add_bos
    return tok


def expected_ids(tok, tokens: FimTokenSet, prefix: str, suffix: str) -> list[int]:
    """The FIM prompt as the model cards lay it out, in ids: [BOS,] prefix token, prefix, suffix token, suffix,
    middle token."""
    fim_prefix, fim_suffix, fim_middle = tok.convert_tokens_to_ids([tokens.prefix, tokens.suffix, tokens.middle])
    start = [tok.bos_token_id] if tok.add_bos_token else []
    plain = tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)
    return [*start, fim_prefix, *plain[0], fim_suffix, *plain[1], fim_middle]


@pytest.mark.parametrize("tokens", FIM_TOKEN_SETS, ids=lambda t: t.family)
@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_each_token_set_lays_out_prefix_suffix_middle(tokenizer, tokens, add_bos):
    tok = with_fim_tokens(tokenizer, tokens, add_bos)
    fim = FimPrompts(tok)
    ids = fim.encode(PREFIX, SUFFIX)
    assert fim.layout.tokens == tokens
    assert ids == expected_ids(tok, tokens, PREFIX, SUFFIX)
    # The same ids as the model cards' text layout, and one BOS at most.
    assert ids == tok.encode(f"{tokens.prefix}{PREFIX}{tokens.suffix}{SUFFIX}{tokens.middle}")
    assert ids.count(tokenizer.bos_token_id) == (1 if add_bos else 0)


def test_a_tokenizer_without_fim_tokens_is_a_value_error(tokenizer):
    fim = FimPrompts(tokenizer)
    assert fim.layout is None
    with pytest.raises(ValueError, match="no fill-in-the-middle tokens"):
        fim.encode(PREFIX, SUFFIX)


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"prompt": PREFIX}, "suffix", ["no fill-in-the-middle tokens", "StarCoder"]),
        ({"prompt": [1, 2, 3]}, "suffix", ["text prompt"]),
        ({"prompt": PREFIX, "echo": True}, "echo", ["echo", "suffix"]),
    ],
    ids=["no-fim-tokens", "token-ids", "echo"],
)
def test_server_refusals_name_the_field(client, live_server, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=live_server.model, suffix=SUFFIX, max_tokens=2, **fields)
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert all(word in error.message for word in words), error.message


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory, tokenizer):
    """A tiny random llama saved with the bundled tokenizer plus Qwen2.5-Coder's FIM tokens; returns its path
    and tokenizer."""
    path = tmp_path_factory.mktemp("fim_model")
    tok = with_fim_tokens(tokenizer, QWEN)
    fields = dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    random_hf_model(path, fields, norm_offset=1.0)
    tok.save_pretrained(path)
    return str(path), tok


@pytest.fixture(scope="module")
async def fim_engine(fim_model):
    async with AsyncEngine(model=fim_model[0], max_model_len=256, kv_cache_tokens=1024, log_level="ERROR") as eng:
        yield eng


async def test_the_engine_runs_the_fim_prompt_and_replies_with_the_middle_alone(fim_engine, fim_model):
    tok = fim_model[1]
    body = CompletionRequest(model="m", prompt=PREFIX, suffix=SUFFIX, max_tokens=5, temperature=0)
    (call,) = body.calls()
    final = None
    async for out in call.start(fim_engine, "fim"):
        final = accumulate(final, out)
    assert final.prompt_token_ids == expected_ids(tok, QWEN, PREFIX, SUFFIX)
    sample = final.outputs[0]
    assert sample.token_ids and SUFFIX not in sample.text
    reply = await CompletionReply(body, [call], "fim", "m", fim_engine, {}).whole([final])
    assert reply["choices"][0]["text"] == sample.text
    assert reply["usage"]["prompt_tokens"] == len(final.prompt_token_ids)


async def test_the_engine_refuses_a_suffix_after_token_ids(fim_engine):
    with pytest.raises(ValueError, match="suffix needs a text prompt"):
        async for _ in fim_engine.generate([1, 2, 3], SamplingParams(max_tokens=2), suffix=SUFFIX):
            pass


async def test_the_guides_completion_body_with_its_suffix_answers(fim_engine, fim_model):
    """The deployment guide's completion body, suffix and word lists included, on a model with FIM tokens."""
    tok = fim_model[1]
    ids = tok.encode(" a brave knight", add_special_tokens=False)
    body = CompletionRequest(
        model="m",
        prompt="Once upon a time",
        suffix=" And they lived happily ever after.",
        max_tokens=8,
        temperature=0.8,
        logit_bias={"adventure": 0.5},
        white_list_token_ids=ids,
        white_list_token=["adventure", "dragon"],
        logprobs=0,
        force_prompt="Answer briefly.",
        user="user-7",
    )
    (call,) = body.calls()
    final = None
    async for out in call.start(fim_engine, "guide"):
        final = accumulate(final, out)
    words = {
        t for w in ("adventure", "dragon") for text in (w, " " + w) for t in tok.encode(text, add_special_tokens=False)
    }
    assert len(final.outputs[0].token_ids) == 8
    assert set(final.outputs[0].token_ids) <= set(ids) | words
    reply = await CompletionReply(body, [call], "guide", "m", fim_engine, {}).whole([final])
    assert reply["choices"][0]["text"] == final.outputs[0].text and reply["usage"]["completion_tokens"] == 8
