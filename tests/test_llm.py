"""The offline LLM API and the command line, on one shared engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tristream import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=512, log_level="WARNING") as llm:
        yield llm


def test_generate_accepts_every_prompt_form_and_keeps_order(llm, tokenizer):
    prompts = ["The first", "A second prompt that is longer than the first one", "Third"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert all(o.finished and len(o.outputs[0].token_ids) == 12 for o in outs)
    for o in outs:
        assert o.outputs[0].text == tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
        assert o.prompt_token_ids == tokenizer.encode(o.prompt)
    single = llm.generate(prompts[1], GREEDY, use_tqdm=False)
    by_ids = llm.generate(tokenizer.encode(prompts[1]), GREEDY, use_tqdm=False)
    batch_ids = llm.generate([tokenizer.encode(p) for p in prompts], GREEDY, use_tqdm=False)
    assert single[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in batch_ids] == [o.outputs[0].token_ids for o in outs]


def test_chat_single_and_batch(llm, tokenizer):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=32)
    one = llm.chat(conv, params, use_tqdm=False)
    batch = llm.chat([conv, [{"role": "user", "content": "Write a haiku about the sea."}]], params, use_tqdm=False)
    assert len(one) == 1 and len(batch) == 2
    assert one[0].outputs[0].text == batch[0].outputs[0].text
    rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert one[0].prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)


def test_per_prompt_sampling_params(llm):
    outs = llm.generate(
        ["a", "b"],
        [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])


def test_a_bad_prompt_names_its_index_and_the_engine_goes_on(llm):
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate(["fine", "", "also fine"], GREEDY, use_tqdm=False)
    assert len(llm.generate("fine", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 12


@pytest.mark.parametrize(
    "params, match",
    [
        (
            SamplingParams(max_tokens=10**12),
            r"prompt 1: max_tokens=1000000000000 plus the prompt's \d+ tokens exceeds max_model_len=512",
        ),
        (
            SamplingParams(logit_bias={3: 1.0, 49152: 2.0}),
            r"prompt 1: logit_bias has token ids outside the vocabulary.*49152",
        ),
        (SamplingParams(stop_token_ids=[10**6]), r"prompt 1: stop_token_ids has token ids outside the vocabulary"),
    ],
)
def test_parameters_beyond_the_context_or_the_vocabulary_fail_their_prompt(llm, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", "bad"], [GREEDY, params], use_tqdm=False)


def test_progress_bar(llm, capsys):
    llm.generate(["x", "y"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert "Generating" in capsys.readouterr().err
    llm.generate(["x"], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert "Generating" not in capsys.readouterr().err


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tristream", *args, "--max-model-len", "512"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_generate_streams_the_same_answer_as_llm_chat(llm):
    question = "What is the capital of France?"
    res = cli("generate", question, "--max-tokens", "32", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    expected = llm.chat(
        [{"role": "user", "content": question}], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False
    )
    assert res.stdout.strip() == expected[0].outputs[0].text.strip()


def test_cli_reports_bad_input_without_a_traceback():
    res = cli("generate", "hello", "--temperature", "-1")
    assert res.returncode == 1
    assert "temperature must be >= 0" in res.stderr and "Traceback" not in res.stderr


def test_chat_template_kwargs_reach_the_template(llm, tokenizer):
    conv = [{"role": "user", "content": "Hello"}]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    plain = llm.chat(conv, params, chat_template_kwargs={"add_generation_prompt": False}, use_tqdm=False)
    rendered = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    assert plain[0].prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert plain[0].prompt_token_ids != llm.chat(conv, params, use_tqdm=False)[0].prompt_token_ids


def test_beam_search_as_vllm_offline_code_calls_it(llm, tokenizer):
    from tristream import BeamSearchParams

    prompts = ["The capital of France is", "My favourite colour is"]
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    outputs = llm.beam_search([{"prompt": p} for p in prompts], params)
    one_at_a_time = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in outputs] == [
        [s.tokens for s in o.sequences] for o in one_at_a_time
    ]
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer.encode(prompt)
        assert len(output.sequences) == 3 and len({tuple(s.tokens) for s in output.sequences}) == 3
        for seq in output.sequences:
            assert seq.tokens[: len(ids)] == ids and len(ids) < len(seq.tokens) <= len(ids) + 5
            assert seq.text == tokenizer.decode(seq.tokens)
        scores = [s.cum_logprob / len(s.tokens) for s in output.sequences if s.finish_reason == "length"]
        assert scores == sorted(scores, reverse=True)


def test_chat_with_tools_returns_the_forced_call(llm):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}},
        },
    }
    conv = [{"role": "user", "content": "What is the weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=40)
    [out] = llm.chat(conv, params, use_tqdm=False, tools=[weather], tool_choice="required", chat_template="hermes")
    sample = out.outputs[0]
    assert sample.finish_reason == "tool_calls" and sample.tool_calls[0].name == "get_weather"
    assert "get_weather" in out.prompt and "<tool_call>" in out.prompt
