"""Tool calling: the parsers, the chat template's tools, tool_choice forced by a grammar, and the OpenAI route."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tristream import SamplingParams, StructuredOutput
from tristream.outputs import accumulate, merge_tool_calls
from tristream.tokenizer_proc.templates import HERMES
from tristream.tokenizer_proc.tool_calls import FORCED, FORMATS, ToolCallParser, format_of_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
HERMES_KWARGS = {"chat_template": "hermes"}


def parse(fmt, text: str, step: int | None = None, **kw) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) of ``text`` pushed whole, or in pieces of ``step`` characters."""
    parser = ToolCallParser(fmt, **kw)
    pieces = [text] if step is None else [text[i : i + step] for i in range(0, len(text), step)]
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, deltas = parser.push(piece, finished=i == len(pieces) - 1)
        content += c
        calls = merge_tool_calls(calls, deltas)
    assert all(c.id.startswith("call_") for c in calls)
    return content, [(c.name, c.arguments) for c in calls]


HERMES_REPLY = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris \\"}{"}}\n</tool_call>'
)
CASES = [
    (
        FORMATS["hermes"],
        HERMES_REPLY,
        {},
        "Let me look.\n\n",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"zone": "Europe/Paris \\"}{"}')],
    ),
    (
        FORMATS["hermes"],
        HERMES_REPLY,
        {"max_calls": 1},
        "Let me look.\n\n",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (FORMATS["hermes"], "No call here, <tool but text.", {}, "No call here, <tool but text.", []),
    (
        FORMATS["hermes"],
        '<tool_call>\n{"arguments": {"a": [1, 2]}, "name": "f"}</tool_call>',
        {},
        "",
        [("f", '{"a": [1, 2]}')],
    ),
    (
        FORMATS["hermes"],
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        {},
        "",
        [("f", '{"a": 1}')],
    ),
    (FORMATS["hermes"], '<tool_call>{"name": "f", "arguments": {"a": 1', {}, "", [("f", '{"a": 1')]),
    (
        FORMATS["llama3_json"],
        '<|python_tag|>{"name": "f", "parameters": {"q": 1}}; {"name": "g", "parameters": {}}',
        {},
        "",
        [("f", '{"q": 1}'), ("g", "{}")],
    ),
    (FORMATS["llama3_json"], "Hello {there}", {}, "Hello {there}", []),
    (FORMATS["llama3_json"], "[1] First, [2] second.", {}, "[1] First, [2] second.", []),
    (FORMATS["mistral"], ' [{"name": "f", "arguments": {"q": 2}}]', {}, "", [("f", '{"q": 2}')]),
    (
        FORMATS["mistral"],
        'Sure. [TOOL_CALLS][{"name": "f", "arguments": {"q": "]"}}]',
        {},
        "Sure. ",
        [("f", '{"q": "]"}')],
    ),
    (
        FORCED,
        '[{"name": "f", "parameters": {"q": 1}}, {"name": "g", "parameters": {"z": [{}]}}]',
        {},
        "",
        [("f", '{"q": 1}'), ("g", '{"z": [{}]}')],
    ),
    (FORCED, '{"city": "Paris"}', {"name": "get_weather"}, "", [("get_weather", '{"city": "Paris"}')]),
]


@pytest.mark.parametrize("fmt, text, kw, content, calls", CASES)
def test_parser_streams_what_it_parses_whole(fmt, text, kw, content, calls):
    assert parse(fmt, text, **kw) == (content, calls)
    for step in (1, 2, 5, 13):
        assert parse(fmt, text, step, **kw) == (content, calls)


def test_the_first_delta_of_a_call_names_it_and_the_rest_add_arguments():
    parser = ToolCallParser(FORMATS["hermes"])
    deltas = [d for i in range(0, len(HERMES_REPLY), 3) for d in parser.push(HERMES_REPLY[i : i + 3])[1]]
    deltas += parser.push("", finished=True)[1]
    firsts = [d for d in deltas if d.name is not None]
    assert [(d.index, d.name) for d in firsts] == [(0, "get_weather"), (1, "get_time")]
    assert all(d.id is None and d.name is None for d in deltas if d not in firsts)
    assert parser.calls == 2


def test_the_template_shows_its_call_format():
    assert format_of_template(HERMES) == "hermes"
    assert format_of_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert format_of_template("<|python_tag|>{{ tools }}") == "llama3_json"
    assert format_of_template("{{ messages }}") is None
    assert format_of_template("<tool_call>[TOOL_CALLS]") is None


def _calls(output) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in output.tool_calls]


async def _chat(engine, messages, params, **kw):
    final = None
    async for out in engine.chat(messages, params, chat_template_kwargs=HERMES_KWARGS, **kw):
        final = accumulate(final, out)
    return final


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
async def test_forced_calls_always_parse_and_validate(engine, tool_choice):
    params = SamplingParams(temperature=1.0, max_tokens=80, n=20, seed=7)
    out = await _chat(engine, QUESTION, params, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert len(out.outputs) == 20
    for sample in out.outputs:
        assert sample.finish_reason == "tool_calls", sample
        assert sample.text == ""
        calls = _calls(sample)
        assert calls
        for name, arguments in calls:
            assert isinstance(tool_choice, str) or name == "get_weather"
            jsonschema.validate(arguments, SCHEMAS[name])
        assert len(calls) == 1


async def test_a_weather_conversation_calls_then_answers(engine):
    greedy = SamplingParams(temperature=0, max_tokens=60)
    first = await _chat(engine, QUESTION, greedy, tools=TOOLS, tool_choice="required")
    [call] = first.outputs[0].tool_calls[:1]
    assert call.name in SCHEMAS
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    turn = {"role": "assistant", "content": None, "tool_calls": [_message_call(call)]}
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}
    second = await _chat(engine, [*QUESTION, turn, result], greedy, tools=TOOLS)
    answer = second.outputs[0]
    assert answer.text.strip() and answer.tool_calls == [] and answer.finish_reason in ("stop", "length")
    rendered_call = f'<tool_call>\n{{"name": "{call.name}", "arguments": {call.arguments}}}\n</tool_call><|im_end|>'
    assert "<|im_start|>assistant\n" + rendered_call in second.prompt
    assert "<tool_response>\n" + result["content"] + "\n</tool_response>" in second.prompt


def _message_call(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


async def test_auto_parses_the_calls_the_model_writes(engine):
    """A regex makes the model write a Hermes call, as a model trained on the format would, and the call is
    parsed out of the reply's text."""
    regex = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Lyon)", "unit": "celsius"\}\}\n</tool_call>'
    params = SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutput(regex=regex))
    out = (await _chat(engine, QUESTION, params, tools=TOOLS)).outputs[0]
    assert out.text == "Checking.\n"
    assert out.finish_reason == "tool_calls"
    [(name, arguments)] = _calls(out)
    assert name == "get_weather" and arguments["city"] in ("Paris", "Lyon")


async def test_tool_choice_none_renders_the_tools_and_parses_nothing(engine):
    params = SamplingParams(temperature=0, max_tokens=8)
    out = await _chat(engine, QUESTION, params, tools=TOOLS, tool_choice="none")
    assert out.outputs[0].tool_calls is None and "get_weather" in out.prompt


@pytest.mark.parametrize(
    "tools, tool_choice, kwargs, message",
    [
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}],
            "auto",
            HERMES_KWARGS,
            "tools[0].function.parameters",
        ),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", HERMES_KWARGS, "tools[0].function.name"),
        ([WEATHER, WEATHER], "auto", HERMES_KWARGS, "unique"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, HERMES_KWARGS, "'nope'"),
        (TOOLS, "sometimes", HERMES_KWARGS, "tool_choice must be"),
        (TOOLS, "auto", None, "chat_template='hermes'"),
        (TOOLS, "auto", {"chat_template": "{{ tools }}{{ messages[0]['content'] }}"}, "--tool-call-parser"),
    ],
    ids=["schema", "name", "duplicate", "unknown-function", "choice", "template", "format"],
)
async def test_bad_tools_are_a_clear_error_and_others_go_on(engine, tools, tool_choice, kwargs, message):
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        async for _ in engine.chat(QUESTION, params, chat_template_kwargs=kwargs, tools=tools, tool_choice=tool_choice):
            pass
    outputs = [out async for out in engine.chat(QUESTION, params)]
    assert outputs[-1].finished


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_route_streams_the_calls_it_answers_whole(client, live_server):
    kwargs = dict(
        model=live_server.model,
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0.9,
        seed=3,
        extra_body={"chat_template": "hermes"},
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert calls and all(c.id.startswith("call_") and c.type == "function" for c in whole.message.tool_calls)
    streamed: dict[int, list] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                if d.index not in streamed:
                    assert d.id and d.function.name, "a call's first delta names it"
                    streamed[d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                streamed[d.index][1] += d.function.arguments or ""
    assert [tuple(streamed[i]) for i in sorted(streamed)] == calls
    assert finish == "tool_calls"
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_the_route_takes_a_tool_result_turn(client, live_server):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    reply = client.chat.completions.create(
        model=live_server.model,
        messages=messages,
        tools=TOOLS,
        max_tokens=20,
        temperature=0,
        extra_body={"chat_template": "hermes"},
    ).choices[0]
    assert reply.message.content and reply.finish_reason in ("stop", "length")


def test_a_malformed_tool_schema_is_a_400(live_server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "city"}}}
    body = {"messages": QUESTION, "tools": [tool], "chat_template": "hermes", "max_tokens": 4}
    r = httpx.post(live_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "tools[0].function.parameters" in r.json()["error"]["message"]
