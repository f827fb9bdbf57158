"""The LMDeploy-style pipeline and the ms-swift-style chat helpers, against plain LLM and AsyncEngine calls."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from types import SimpleNamespace

import pytest

import tristream.chat as chat
from tests.conftest import make_lora_adapter  # pytest has imported the conftest under this name
from tristream import EngineConfig, GenerationConfig, Response, SamplingParams, pipeline
from tristream.outputs import RequestOutput, accumulate
from tristream.pipeline import _params, _template_name

GREEDY = GenerationConfig(max_new_tokens=16)
Q1, Q2 = "What is the capital of France?", "Name a color."
CONV = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say hi."}]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def pipe():
    with pipeline(backend_config=EngineConfig(max_model_len=1024, max_loras=1, log_level="INFO")) as p:
        yield p


def check(resp: Response, out: RequestOutput, index: int) -> None:
    """``resp`` is the pipeline's view of the LLM output ``out``."""
    sample = out.outputs[0]
    assert isinstance(resp, Response) and resp.index == index
    assert (resp.text, resp.token_ids) == (sample.text, sample.token_ids)
    assert resp.generate_token_len == len(sample.token_ids) == out.metrics.num_generated_tokens
    assert resp.input_token_len == len(out.prompt_token_ids) == out.metrics.num_prompt_tokens
    assert resp.finish_reason == sample.finish_reason in ("stop", "length")


def test_backend_config_and_log_level_become_engine_args(pipe):
    assert pipe.llm.engine.config.max_model_len == 1024
    assert pipe.llm.engine.config.log_level == "ERROR"


def test_every_prompt_form_matches_llm_chat(pipe, tokenizer):
    expected = pipe.llm.chat([user(Q1), user(Q2), CONV], GREEDY, use_tqdm=False)
    assert {o.outputs[0].finish_reason for o in expected} == {"stop", "length"}
    rendered = tokenizer.apply_chat_template(user(Q1), tokenize=False, add_generation_prompt=True)
    assert expected[0].prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)

    check(pipe(Q1, GREEDY), expected[0], 0)
    check(pipe(CONV, GREEDY), expected[2], 0)
    for i, got in enumerate(pipe([Q1, Q2], GREEDY)):
        check(got, expected[i], i)
    batch = pipe([user(Q2), CONV, Q1], (GREEDY, GREEDY, GREEDY))
    assert isinstance(batch, list) and len(batch) == 3
    for i, want in enumerate([expected[1], expected[2], expected[0]]):
        check(batch[i], want, i)


def test_default_gen_config_is_greedy_to_the_end(pipe):
    expected = pipe.llm.chat(user(Q1), SamplingParams(temperature=0), use_tqdm=False)[0]
    got = pipe(Q1)
    check(got, expected, 0)
    assert got.finish_reason == "stop"


def test_stream_infer_deltas_add_up_to_the_batch_result(pipe):
    prompts = [Q2, CONV, Q1]
    expected = pipe(prompts, GREEDY)
    deltas = list(pipe.stream_infer(prompts, GREEDY))
    for i, want in enumerate(expected):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == want.text
        assert [t for d in mine for t in d.token_ids] == want.token_ids
        counts = [d.generate_token_len for d in mine]  # a stream that falls behind gets merged deltas
        assert counts[-1] == want.generate_token_len and all(a < b for a, b in zip(counts, counts[1:]))
        assert [len(d.token_ids) for d in mine] == [b - a for a, b in zip([0, *counts], counts)]
        assert {d.input_token_len for d in mine} == {want.input_token_len}
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + [want.finish_reason]
    positions = {i: [k for k, d in enumerate(deltas) if d.index == i] for i in range(3)}
    assert positions[0][-1] > positions[1][0] and positions[1][-1] > positions[0][0]  # they ran at once


def assert_idle(pipe) -> None:
    """No task of ours is left on the LLM's loop, and the scheduler runs no request."""
    assert [t for t in asyncio.all_tasks(pipe.llm._loop) if t is not pipe.llm.engine._reader] == []
    deadline = time.monotonic() + 10
    while (stats := pipe.llm.get_stats()).num_running + stats.num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.num_running == stats.num_waiting == 0


def test_stopping_a_stream_early_aborts_its_requests(pipe):
    long = GenerationConfig(max_new_tokens=400, ignore_eos=True)
    stream = pipe.stream_infer([Q1, Q2], long)
    assert 1 <= next(stream).generate_token_len < 400
    stream.close()
    assert_idle(pipe)
    for resp in pipe.stream_infer(CONV, long):  # noqa: B007 (resp is read after the loop)
        break
    assert resp.index == 0
    assert_idle(pipe)

    def interrupt() -> None:
        raise KeyboardInterrupt

    stream = pipe.stream_infer([Q1, Q2], long)
    next(stream)
    pipe.llm._loop.call_later(0.2, interrupt)  # Ctrl-C while the stream waits for its next delta
    with pytest.raises(KeyboardInterrupt):
        list(stream)
    assert_idle(pipe)
    check(pipe(Q1, GREEDY), pipe.llm.chat(user(Q1), GREEDY, use_tqdm=False)[0], 0)


def test_bad_input_raises_and_the_pipeline_goes_on(pipe):
    for bad in (123, [], None, [Q1, 5], [Q1, []], {"role": "user", "content": Q1}):
        with pytest.raises(ValueError, match="prompt"):
            pipe(bad)
        with pytest.raises(ValueError, match="prompt"):
            pipe.stream_infer(bad)
    with pytest.raises(ValueError, match="1 gen_configs for 2 prompts"):
        pipe([Q1, Q2], [GREEDY])
    with pytest.raises(ValueError, match="2 gen_configs for 1 prompts"):
        pipe.stream_infer(CONV, [GREEDY, GREEDY])
    with pytest.raises(TypeError, match="gen_config"):
        pipe(Q1, {"max_new_tokens": 4})
    with pytest.raises(TypeError, match="gen_config"):
        pipe([Q1], ["greedy"])
    with pytest.raises(ValueError, match="n and best_of"):
        pipe(Q1, SamplingParams(n=2, max_tokens=4))
    with pytest.raises(ValueError, match="prompt 1: messages\\[0\\]"):
        pipe([Q1, [{"content": "no role"}]], GREEDY)
    with pytest.raises(ValueError, match="prompt 0: messages\\[0\\]"):
        list(pipe.stream_infer([[{"content": "no role"}], Q1], GREEDY))
    assert pipe(Q1, GREEDY).text == pipe.llm.chat(user(Q1), GREEDY, use_tqdm=False)[0].outputs[0].text


def test_adapter_name_copies_the_params():
    params = _params([GREEDY, SamplingParams(temperature=0.5, max_tokens=3)], "sql", 2)
    assert [p.lora for p in params] == ["sql", "sql"] and GREEDY.lora is None
    assert (params[0].temperature, params[0].max_tokens, params[1].temperature) == (0.0, 16, 0.5)
    assert isinstance(params[0], GenerationConfig)
    assert _params(None, None, 2) == [GenerationConfig()] * 2


def test_adapter_name_and_lora_params_run_the_adapter(pipe, model_dir, tmp_path):
    make_lora_adapter(
        model_dir,
        tmp_path / "a",
        0,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    pipe.llm.load_lora("a", str(tmp_path / "a"))
    try:
        with_adapter = pipe.llm.chat(user(Q1), dataclasses.replace(GREEDY, lora="a"), use_tqdm=False)[0]
        assert pipe(Q1, GREEDY, adapter_name="a").text == with_adapter.outputs[0].text
        assert pipe(Q1, GREEDY).text != with_adapter.outputs[0].text, "the adapter must change the output"
        answer, _ = chat.inference(pipe.llm, Q1, sampling_params=dataclasses.replace(GREEDY, lora="a"))
        assert answer == with_adapter.outputs[0].text and GREEDY.lora is None
    finally:
        pipe.llm.unload_lora("a")


def test_bad_pipeline_arguments_fail_before_any_engine_starts():
    with pytest.raises(TypeError, match="EngineConfig"):
        pipeline(backend_config={"max_model_len": 64})
    with pytest.raises(TypeError, match="chat_template_config"):
        pipeline(chat_template_config=42)
    with pytest.raises(ValueError, match="neither a file nor a built-in template"):
        pipeline(chat_template_config="no-such-template")
    for bad in ({"model_name": ""}, {"name": "chatml"}, SimpleNamespace(model_name=None), ""):
        with pytest.raises(ValueError, match="template name"):
            pipeline(chat_template_config=bad)
    assert _template_name({"model_name": "chatml"}) == _template_name("chatml") == "chatml"
    assert _template_name(None) is None


def test_chat_template_config_name_reaches_the_engine(tokenizer):
    prompt = "The capital of France is"
    with pipeline(chat_template_config=SimpleNamespace(model_name="default-generation"), max_model_len=256) as raw:
        assert raw.llm.engine.config.chat_template == "default-generation"
        got = raw(prompt, GREEDY)
        expected = raw.llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert expected.prompt_token_ids == tokenizer.encode(prompt)
        check(got, expected, 0)
    with pytest.raises(RuntimeError, match="shut down"):
        raw(prompt, GREEDY)


def test_chat_with_an_llm_keeps_the_history(pipe):
    params = SamplingParams(temperature=0, max_tokens=16)
    r1, h1 = chat.inference(pipe.llm, Q1, sampling_params=params)
    assert r1 == pipe.llm.chat(user(Q1), params, use_tqdm=False)[0].outputs[0].text
    assert h1 == [(Q1, r1)]
    past = [[Q1, r1]]
    r2, h2 = chat.inference(pipe.llm, "And of Italy?", past, system="Be brief.", sampling_params=params)
    messages = [
        {"role": "system", "content": "Be brief."},
        *user(Q1),
        {"role": "assistant", "content": r1},
        *user("And of Italy?"),
    ]
    assert r2 == pipe.llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    assert h2 == [(Q1, r1), ("And of Italy?", r2)] and past == [[Q1, r1]]
    steps = list(chat.inference_stream(pipe.llm, "And of Italy?", past, system="Be brief.", sampling_params=params))
    assert steps[-1] == (r2, h2)
    for (before, _), (after, history) in zip(steps, steps[1:]):
        assert after.startswith(before) and history == [(Q1, r1), ("And of Italy?", after)]


def test_chat_default_params_are_greedy_and_bounded(pipe):
    assert (chat.DEFAULT_PARAMS.temperature, chat.DEFAULT_PARAMS.max_tokens) == (0, 512)
    expected = pipe.llm.chat(user(Q1), SamplingParams(temperature=0, max_tokens=512), use_tqdm=False)[0]
    assert chat.inference(pipe.llm, Q1) == (expected.outputs[0].text, [(Q1, expected.outputs[0].text)])


def test_chat_rejects_bad_arguments(pipe):
    with pytest.raises(TypeError, match="got str"):
        chat.inference("not an engine", Q1)
    with pytest.raises(TypeError, match="got NoneType"):
        chat.inference_stream(None, Q1)
    for history in ("q and r", [("only a query",)], [(Q1, None)], [Q1]):
        with pytest.raises(ValueError, match="history"):
            chat.inference(pipe.llm, Q1, history)
        with pytest.raises(ValueError, match="history"):
            chat.inference_stream(pipe.llm, Q1, history)
    with pytest.raises(TypeError, match="sampling_params"):
        chat.inference(pipe.llm, Q1, sampling_params={"temperature": 0})
    with pytest.raises(TypeError, match="query"):
        chat.inference(pipe.llm, [Q1])


async def collect(stream) -> RequestOutput:
    final = None
    async for out in stream:
        final = accumulate(final, out)
    return final


async def test_chat_with_an_engine_reuses_the_first_turn(engine):
    params = SamplingParams(temperature=0, max_tokens=16)
    system = "You are a terse assistant."
    first = [{"role": "system", "content": system}, *user(Q1)]
    pending = chat.inference(engine, Q1, system=system, sampling_params=params)
    assert inspect.isawaitable(pending)
    r1, h1 = await pending
    expected1 = await collect(engine.chat(first, params))
    assert r1 == expected1.outputs[0].text and h1 == [(Q1, r1)]

    second = [*first, {"role": "assistant", "content": r1}, *user("And of Italy?")]
    turn1 = expected1.prompt_token_ids + expected1.outputs[0].token_ids
    assert (await engine.tokenize(messages=second))[: len(turn1)] == turn1
    before = (await engine.get_stats()).num_cache_hit_tokens
    r2, h2 = await chat.inference(engine, "And of Italy?", h1, system=system, sampling_params=params)
    hit = (await engine.get_stats()).num_cache_hit_tokens - before
    page = engine.config.page_size
    assert hit >= (len(turn1) - 1) // page * page  # all but the last sampled token, whose KV was never computed
    assert h2 == [(Q1, r1), ("And of Italy?", r2)] and h1 == [(Q1, r1)]
    assert r2 == (await collect(engine.chat(second, params))).outputs[0].text

    steps = [step async for step in chat.inference_stream(engine, "And of Italy?", h1, system, params)]
    assert steps[-1] == (r2, h2)
    for (before_text, _), (after, history) in zip(steps, steps[1:]):
        assert after.startswith(before_text) and history == [(Q1, r1), ("And of Italy?", after)]


def text_of(out: RequestOutput) -> str:
    return out.outputs[0].text


def test_prompt_dicts_and_prompt_token_ids_are_the_plain_prompts(pipe, tokenizer):
    """vLLM's TextPrompt and TokensPrompt, FastDeploy's prompt dict, and vLLM's prompt_token_ids keyword."""
    llm, params = pipe.llm, SamplingParams(temperature=0, max_tokens=8)
    ids = tokenizer.encode(Q1)
    [plain, by_ids] = llm.generate([Q1, ids], params, use_tqdm=False)
    assert by_ids.prompt_token_ids == ids
    forms = [{"prompt": Q1}, {"prompt": Q1, "multimodal_data": {}}, {"prompt": Q1, "multimodal_data": {"image": []}}]
    for form in forms:
        [out] = llm.generate(prompts=form, sampling_params=params, use_tqdm=False)
        assert (text_of(out), out.prompt_token_ids) == (text_of(plain), plain.prompt_token_ids)
    outs = llm.generate([{"prompt_token_ids": ids}, {"prompt": Q1}], params, use_tqdm=False)
    assert [text_of(o) for o in outs] == [text_of(by_ids), text_of(plain)]
    [out] = llm.generate(prompts=None, sampling_params=params, prompt_token_ids=[ids], use_tqdm=False)
    assert (text_of(out), out.prompt_token_ids) == (text_of(by_ids), ids)
    [out] = llm.generate(sampling_params=params, prompt_token_ids=ids, use_tqdm=False)
    assert text_of(out) == text_of(by_ids)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ({"text": Q1}, r"prompt, prompt_token_ids and multimodal_data, not \['text'\]"),
        ({"prompt": Q1, "prompt_token_ids": [1, 2]}, "exactly one of prompt or prompt_token_ids"),
        ({}, "exactly one of prompt or prompt_token_ids"),
        ({"prompt": [1, 2]}, "prompt must be a string"),
        ({"prompt_token_ids": "text"}, "prompt_token_ids must be a list of token ids"),
        ({"prompt": Q1, "multimodal_data": {"image": ["cat.png"]}}, "image 0: no such file: cat.png"),
        ({"prompt": Q1, "multimodal_data": {"image": [b"png"]}}, "text-only model: it takes no images"),
        ({"prompt": Q1, "multimodal_data": {"video": [b"mp4"]}}, "video input is not supported: send images"),
        ({"prompt": Q1, "multi_modal_data": ["cat.png"]}, "must be a dict of media lists, got list"),
        ({"prompt": ""}, "the prompt is empty"),
    ],
)
def test_a_bad_prompt_dict_is_refused(pipe, prompt, match):
    with pytest.raises(ValueError, match=match):
        pipe.llm.generate([Q1, prompt], SamplingParams(max_tokens=2), use_tqdm=False)


def test_generate_takes_prompts_or_prompt_token_ids(pipe):
    with pytest.raises(ValueError, match="not both"):
        pipe.llm.generate(Q1, prompt_token_ids=[[1, 2]])
    with pytest.raises(ValueError, match="needs prompts or prompt_token_ids"):
        pipe.llm.generate()


def test_chat_outputs_carry_the_rendered_prompt_and_fastdeploys_fields(pipe, tokenizer):
    [out] = pipe.llm.chat(CONV, GREEDY, use_tqdm=False)
    assert out.prompt == tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert out.outputs.text == out.outputs[0].text and out.outputs.token_ids == out.outputs[0].token_ids
    assert len(out.outputs) == 1 and out.outputs.index(out.outputs[0]) == 0, "still a list"
    assert (out.error_code, out.error_msg) == (200, None)
    assert out.outputs.send_idx >= 1, "a whole result has its sample's last delta number"
    m = out.metrics
    assert m.arrival_time <= m.inference_start_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.model_execute_time == pytest.approx(m.last_token_time - m.arrival_time)
    assert 0 < m.model_forward_time <= m.model_execute_time
    [plain] = pipe.llm.generate(Q1, GREEDY, use_tqdm=False)
    assert plain.prompt == Q1


def test_text_parts_are_joined_and_a_text_model_refuses_images(pipe):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the "}, {"type": "text", "text": Q1[12:]}]}]
    want = text_of(pipe.llm.chat(user(Q1), GREEDY, use_tqdm=False)[0])
    assert text_of(pipe.llm.chat(parts, GREEDY, use_tqdm=False)[0]) == want
    assert pipe(parts, GREEDY).text == want
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text-only model: it takes no images"):
        pipe.llm.chat(image, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="LlamaForCausalLM is a text-only model: it takes no images"):
        pipe((Q1, b"png"), GREEDY)
    with pytest.raises(ValueError, match="content parts are text or images, not parts of type 'audio_url'"):
        pipe.llm.chat([{"role": "user", "content": [{"type": "audio_url", "audio_url": "a.wav"}]}], GREEDY)


def test_pipeline_chat_keeps_a_session(pipe):
    first = pipe.chat(Q1, gen_config=GREEDY)
    assert first.response.text == pipe(Q1, GREEDY).text and first.history == [(Q1, first.response.text)]
    second = pipe.chat("And of Italy?", session=first, gen_config=GREEDY)
    assert second is first and len(second.history) == 2
    messages = [*user(Q1), {"role": "assistant", "content": second.history[0][1]}, *user("And of Italy?")]
    assert second.response.text == text_of(pipe.llm.chat(messages, GREEDY, use_tqdm=False)[0])
    fresh = pipe.chat(Q1, gen_config=GREEDY, stream_response=True)
    deltas = list(fresh)
    assert "".join(d.text for d in deltas) == first.history[0][1] and deltas[-1].finish_reason is not None
    with pytest.raises(ValueError, match="a chat prompt must be a string"):
        pipe.chat(user(Q1))


def test_do_preprocess_false_runs_the_text_without_the_template(pipe):
    text = "The capital of France is"
    got = pipe(text, GREEDY, do_preprocess=False)
    assert got.text == text_of(pipe.llm.generate(text, GREEDY, use_tqdm=False)[0])
    assert got.text != pipe(text, GREEDY).text
    assert "".join(r.text for r in pipe.stream_infer([text], GREEDY, do_preprocess=False)) == got.text
    with pytest.raises(ValueError, match="do_preprocess=False takes text"):
        pipe([user(Q1)], GREEDY, do_preprocess=False)


def test_lmdeploys_call_time_arguments_warn_and_apply(pipe):
    with pytest.warns(DeprecationWarning, match="request_output_len, ignore_eos as arguments of the call"):
        got = pipe(Q1, GREEDY, request_output_len=5, ignore_eos=True)
    assert got.generate_token_len == 5 and got.finish_reason == "length"
    assert got.text == pipe(Q1, GenerationConfig(max_new_tokens=5, ignore_eos=True)).text
    with pytest.warns(DeprecationWarning):
        streamed = list(pipe.stream_infer(Q1, GREEDY, request_output_len=5, ignore_eos=True))
    assert "".join(r.text for r in streamed) == got.text
    with pytest.raises(TypeError, match=r"unexpected arguments \['max_length'\]"):
        pipe(Q1, max_length=5)


def test_sampling_fields_without_do_sample_are_logged_once(caplog):
    from tristream.sampling_params import _log_greedy

    _log_greedy.cache_clear()
    with caplog.at_level("WARNING", logger="tristream"):
        assert GenerationConfig(temperature=0.8, top_p=0.9).temperature == 0
        assert GenerationConfig(top_k=40).temperature == 0
        assert GenerationConfig(do_sample=True, temperature=0.8).temperature == 0.8
        GenerationConfig(max_new_tokens=8)
    assert [r.message for r in caplog.records if "do_sample is False" in r.message] == [
        "GenerationConfig sets temperature, top_p, top_k or min_p, but do_sample is False: decoding is greedy, "
        "as in LMDeploy; pass do_sample=True to sample"
    ]


def test_lmdeploys_engine_configs_become_engine_args():
    from tristream import ChatTemplateConfig, PytorchEngineConfig, TurbomindEngineConfig

    turbo = TurbomindEngineConfig(tp=1, session_len=2048, max_batch_size=8, cache_max_entry_count=0.5)
    assert turbo.engine_args() == {
        "dtype": "auto",
        "tensor_parallel_size": 1,
        "max_model_len": 2048,
        "max_num_seqs": 8,
        "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": False,
        "page_size": 64,
        "max_num_batched_tokens": 8192,
    }
    torch_config = PytorchEngineConfig(block_size=16, adapters={"a": "/a"}, eager_mode=True, model_name="qwen")
    args = torch_config.engine_args()
    assert (args["page_size"], args["lora_adapters"], args["enforce_eager"]) == (16, {"a": "/a"}, True)
    assert (args["chat_template"], args["max_num_batched_tokens"]) == ("qwen", 4096)
    assert "model_format" not in args and "quant_policy" not in args
    quantized = TurbomindEngineConfig(quant_policy=8, model_format="awq").engine_args()
    assert (quantized["kv_cache_dtype"], quantized["quantization"]) == ("fp8", "awq")
    for make, match in [
        (lambda: TurbomindEngineConfig(quant_policy=4), "quant_policy=4: only 8 \\(an 8-bit KV cache\\)"),
        (lambda: PytorchEngineConfig(model_format="bnb"), "model_format='bnb': supported are hf, awq, gptq and fp8"),
        (lambda: PytorchEngineConfig(eviction_type="copy"), "always recomputed"),
        (lambda: ChatTemplateConfig("qwen", system="Be brief."), "system are not supported; give a Jinja file"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError):
        TurbomindEngineConfig(rope_scaling_factor=2.0)
    assert ChatTemplateConfig("qwen").model_name == "qwen"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tp": 2}, "tp: use tensor_parallel_size"),
        ({"session_len": 2048}, "session_len: use max_model_len"),
        ({"block_size": 16}, "block_size: use page_size"),
        ({"trust_remote_code": True}, "trust_remote_code: not needed"),
        ({"max_lenght": 8}, "unknown engine argument 'max_lenght'; the engine arguments are: model, "),
    ],
)
def test_a_peer_engines_argument_names_tristreams(kwargs, match):
    from tristream import LLM, AsyncEngine

    with pytest.raises(TypeError, match=match):
        AsyncEngine(**kwargs)
    with pytest.raises(TypeError, match=match):
        LLM(**kwargs)


def test_peer_reasoning_parser_names_and_template_names_are_checked_at_once():
    from tristream import AsyncEngine

    for name in ("think", "qwen3", "deepseek_r1", "ernie-45-vl"):
        assert AsyncEngine(reasoning_parser=name).config.reasoning_parser == name
    with pytest.raises(ValueError, match="reasoning_parser"):
        AsyncEngine(reasoning_parser="granite")
    assert AsyncEngine(chat_template="vicuna").config.chat_template == "vicuna"
    with pytest.raises(ValueError, match="'qwen2.5' is neither a file nor a built-in template"):
        AsyncEngine(chat_template="qwen2.5")
