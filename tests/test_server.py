"""The OpenAI-compatible server, through the official openai client and raw HTTP."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tristream import SamplingParams
from tristream.openai_api import RequestDefaults
from tristream.server import build_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(live_server) -> str:
    return live_server.model


def post(live_server, path: str, body: object, **kwargs) -> httpx.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(
        live_server.url + path, content=data, headers={"content-type": "application/json"}, timeout=120, **kwargs
    )


async def test_chat_matches_the_engine_and_has_openai_shape(client, model, engine):
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    expected = ""
    async for out in engine.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24)):
        expected += out.outputs[0].text
        final = out
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    assert [c.index for c in r.choices] == [0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == final.outputs[0].finish_reason
    assert r.usage.prompt_tokens == final.metrics.num_prompt_tokens
    assert r.usage.completion_tokens == final.metrics.num_generated_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens, "the prefix cache's hit"


async def test_completions_of_several_prompts_match_the_engine(client, model, engine):
    prompts = ["The capital of France is", "Once upon a time"]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    total = 0
    for prompt, choice in zip(prompts, r.choices):
        text = ""
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=8)):
            text += out.outputs[0].text
            total += out.metrics.num_prompt_tokens if out.finished else 0
        assert choice.text == text
        assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == total
    ids = client.completions.create(model=model, prompt=[[504, 3575, 282]], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].text


def test_streaming_with_usage_concatenates_to_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    stream = list(
        client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    )
    plain = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_raw_stream_is_sse_ending_in_done(live_server):
    with httpx.stream(
        "POST",
        live_server.url + "/v1/chat/completions",
        timeout=120,
        json={"messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_n_samples_and_seed_reproducibility(client, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=16, temperature=1.0, seed=1234)
    a = client.chat.completions.create(n=2, **kwargs)
    b = client.chat.completions.create(n=2, **kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].message.content != a.choices[1].message.content
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    other = client.chat.completions.create(n=1, **{**kwargs, "seed": 99})
    assert other.choices[0].message.content != a.choices[0].message.content
    assert a.usage.completion_tokens <= 32


def test_chat_logprobs_rank_the_top_tokens(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    tokens = "".join(e.token for e in content)
    # A stop at EOS reports the EOS token's logprob too, while its text is not part of the answer.
    expected = r.choices[0].message.content + (content[-1].token if r.choices[0].finish_reason == "stop" else "")
    assert tokens == expected
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(tops[0])
        assert e.bytes == list(e.token.encode())


def test_completion_logprobs_and_echo(client, model):
    r = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("The capital of France is")
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for _token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0 and len(top) == 2
    for token, value, top in zip(lp.tokens[-4:], lp.token_logprobs[-4:], lp.top_logprobs[-4:]):
        assert top[token] == pytest.approx(value) and value == pytest.approx(max(top.values()))


def test_stop_strings(client, model):
    full = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    word = text.split()[2]
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0, stop=[word])
    assert r.choices[0].message.content == text[: text.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_response_format_json_schema_and_json_object(client, model):
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
            "is_capital": {"type": "boolean"},
        },
        "required": ["city", "is_capital"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=60, temperature=0, seed=3, response_format={"type": "json_object"}
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_models_tokenize_detokenize(live_server, tokenizer):
    models = httpx.get(live_server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == live_server.model
    r = post(live_server, "/tokenize", {"prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    chat = post(live_server, "/tokenize", {"messages": QUESTION}).json()
    assert (
        chat["tokens"]
        == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    assert post(live_server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    assert post(live_server, "/detokenize", {"tokens": [10**9]}).status_code == 400


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word in err["message"], err
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize(
    "path, body, status, words, param",
    [
        ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-9"}, 404, ["gpt-9"], "model"),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "use_beam_search": True, "guided_regex": "a+"},
            400,
            ["structured", "beam search"],
            None,
        ),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "length_penalty": 0.5},
            400,
            ["length_penalty"],
            "length_penalty",
        ),
        ("/v1/chat/completions", {"messages": QUESTION, "tools": [{"type": "function"}]}, 400, ["tools"], "tools"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400, ["logprobs"], "top_logprobs"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400, ["temperature"], "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, ["temperature"], "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, 400, ["n"], "n"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, ["messages"], "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, ["role"], "messages"),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "response_format": {"type": "json_schema"}},
            400,
            ["json_schema"],
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": QUESTION,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                    },
                },
            },
            400,
            ["schema"],
            None,
        ),
        ("/v1/completions", {"prompt": "hi", "suffix": "there"}, 400, ["suffix"], "suffix"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, ["logprobs"], "logprobs"),
        ("/v1/completions", {"prompt": ""}, 400, ["empty"], None),
        ("/v1/completions", {"prompt": []}, 400, ["empty"], "prompt"),
        ("/v1/completions", {"prompt": [[]]}, 400, ["empty"], None),
        ("/v1/completions", {"prompt": [10**9]}, 400, ["vocabulary"], None),
        ("/v1/completions", {"prompt": ["a", [1]]}, 400, ["prompt"], "prompt"),
        ("/v1/completions", {"max_tokens": 3}, 400, ["prompt"], "prompt"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"49152": 5}}, 400, ["logit_bias", "49152"], "logit_bias"),
        (
            "/v1/chat/completions",
            {"messages": QUESTION, "logit_bias": {"7": 1, str(10**12): -1}},
            400,
            [],
            "logit_bias",
        ),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2, 10**6]}, 400, ["vocabulary"], "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, ["1000000000000", "1024"], "max_tokens"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1020}, 400, ["1020", "1024"], "max_tokens"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 5000}, 400, ["5000"], "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors(live_server, path, body, status, words, param):
    assert_error(post(live_server, path, body), status, *words, param=param)


FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
@pytest.mark.parametrize("field", [*FLOAT_FIELDS, "length_penalty", "logit_bias"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_non_finite_numbers_are_400s_naming_the_field(live_server, path, field, value):
    """Python's JSON reads NaN, Infinity and 1e999 (an overflow to infinity): each is refused."""
    given = f'{{"{field}": {{"5": {value}}}}}' if field == "logit_bias" else f'{{"{field}": {value}}}'
    base = {"messages": QUESTION} if path == "/v1/chat/completions" else {"prompt": "Hello"}
    raw = json.dumps({**base, "max_tokens": 2})[:-1] + ", " + given[1:]
    assert_error(post(live_server, path, raw), 400, field, "finite", param=field)


def test_max_tokens_that_fits_the_context_still_runs(live_server, tokenizer):
    """The whole context is usable: max_tokens up to max_model_len minus the prompt."""
    prompt = "The capital of France is"
    room = 1024 - len(tokenizer.encode(prompt))
    r = post(live_server, "/v1/completions", {"prompt": prompt, "max_tokens": room, "temperature": 0, "stop": ["."]})
    assert r.status_code == 200, r.text
    assert_error(post(live_server, "/v1/completions", {"prompt": prompt, "max_tokens": room + 1}), 400, str(room + 1))


def test_prompt_over_the_context_names_both_lengths(live_server):
    r = post(live_server, "/v1/completions", {"prompt": "hello " * 1500, "max_tokens": 4})
    assert_error(r, 400, "1501", "1024")
    r = post(live_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 1500}]})
    assert_error(r, 400, "1024")


def test_malformed_bodies_and_unknown_fields(live_server):
    assert_error(post(live_server, "/v1/chat/completions", "{not json"), 400, "JSON")
    assert_error(post(live_server, "/v1/chat/completions", "[1, 2]"), 400)
    assert_error(post(live_server, "/v1/chat/completions", b"\xff\xfe"), 400)
    assert_error(httpx.get(live_server.url + "/v1/nothing-here"), 404)
    r = post(
        live_server,
        "/v1/chat/completions",
        {"messages": QUESTION, "max_tokens": 2, "frobnicate": {"x": 1}, "user": "u-1", "parallel_tool_calls": False},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert live_server.healthy()


def test_chat_echo_and_add_generation_prompt(client, model):
    messages = QUESTION + [{"role": "assistant", "content": "The capital"}]
    r = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False},
    )
    assert r.choices[0].message.content.startswith("The capital")


async def test_api_key_guards_the_api(engine):
    app = build_app(engine, "m", api_key="sesame")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        assert_error(await http.get("/v1/models"), 401, param=None)
        assert_error(await http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(await http.post("/v1/completions", json={"prompt": "x"}), 401)
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer sesame"})).status_code == 200
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/")).text.lstrip().lower().startswith("<!doctype html>")


def test_metrics_count_the_requests_sent(live_server, client, model, scrape):
    before = scrape(live_server)
    usages = [
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=n, temperature=0).usage
        for n in (3, 5)
    ]
    usages.append(client.completions.create(model=model, prompt="Once upon a time", max_tokens=4).usage)
    assert post(live_server, "/v1/completions", {"prompt": [10**9]}).status_code == 400
    after = scrape(live_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("tristream_requests_total{finish_reason=length}") == 3
    assert delta("tristream_requests_total{finish_reason=error}") == 1
    assert delta("tristream_prompt_tokens_total{}") == sum(u.prompt_tokens for u in usages)
    assert delta("tristream_generation_tokens_total{}") == sum(u.completion_tokens for u in usages)
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"tristream_{name}_seconds_count{{}}") == 3
    assert delta("tristream_inter_token_latency_seconds_count{}") == sum(u.completion_tokens - 1 for u in usages)
    assert after["tristream_kv_pages_total{engine=0}"] > 0
    assert (
        after["tristream_num_requests_running{engine=0}"] == 0
        and after["tristream_num_requests_waiting{engine=0}"] == 0
    )
    assert 0 < after["tristream_prefix_cache_hit_rate{engine=0}"] < 1
    # One step per token at least: the three requests ran one after another.
    assert delta("tristream_engine_steps_total{engine=0}") >= sum(u.completion_tokens for u in usages)
    assert (
        delta("tristream_step_gpu_busy_seconds_total{engine=0}") > 0
        and delta("tristream_step_scheduler_seconds_total{engine=0}") > 0
    )
    assert (
        delta("tristream_step_gpu_idle_seconds_total{engine=0}") >= 0
        and delta("tristream_step_ipc_seconds_total{engine=0}") >= 0
    )


async def test_the_deployment_guides_simple_api(live_server, engine):
    """``POST /`` with a prompt and a history of [query, response] pairs, as the guide's api.py answers it."""
    history = [["What is the capital of France?", "The capital of France is Paris."]]
    body = {"prompt": "And of Italy?", "history": history, "temperature": 0, "max_length": 200}
    r = post(live_server, "/", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"response", "history", "status", "time"} and answer["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])
    messages = [
        {"role": "user", "content": history[0][0]},
        {"role": "assistant", "content": history[0][1]},
        {"role": "user", "content": "And of Italy?"},
    ]
    prompt = await engine.tokenize(messages=messages)
    params = SamplingParams(temperature=0, max_tokens=200 - len(prompt))
    assert answer["response"] == "".join([o.outputs[0].text async for o in engine.chat(messages, params)])
    assert answer["history"] == [*history, ["And of Italy?", answer["response"]]]
    first = post(live_server, "/", {"prompt": "Hi", "max_length": 40}).json()
    assert first["history"] == [["Hi", first["response"]]]
    assert_error(post(live_server, "/", {"prompt": "Hi", "max_length": 3}), 400, "no room", param="max_length")
    assert_error(post(live_server, "/", {"history": []}), 400, param="prompt")
    assert_error(post(live_server, "/", {"prompt": "Hi", "history": [["only a query"]]}), 400, param="history")
    assert httpx.get(live_server.url + "/").text.lstrip().lower().startswith("<!doctype html>")


async def test_the_servers_defaults_fill_in_what_requests_leave_out(engine):
    defaults = RequestDefaults({"max_tokens": 3, "temperature": 0.0}, "Answer in French.")
    transport = httpx.ASGITransport(app=build_app(engine, "m", defaults=defaults))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
        chat = (await http.post("/v1/chat/completions", json={"messages": QUESTION})).json()
        system = [{"role": "system", "content": "Answer in French."}, *QUESTION]
        assert chat["usage"]["completion_tokens"] == 3
        assert chat["usage"]["prompt_tokens"] == len(await engine.tokenize(messages=system))
        greedy = SamplingParams(temperature=0, max_tokens=3)
        expected = "".join([o.outputs[0].text async for o in engine.chat(system, greedy)])
        assert chat["choices"][0]["message"]["content"] == expected
        own = [{"role": "system", "content": "Be brief."}, *QUESTION]
        chat = (await http.post("/v1/chat/completions", json={"messages": own, "max_tokens": 5})).json()
        assert chat["usage"]["completion_tokens"] == 5
        assert chat["usage"]["prompt_tokens"] == len(await engine.tokenize(messages=own))
        completion = (await http.post("/v1/completions", json={"prompt": "Once upon a time"})).json()
        assert completion["usage"]["completion_tokens"] == 3
        simple = (await http.post("/", json={"prompt": QUESTION[0]["content"]})).json()
        assert simple["response"] == expected
