"""Structured output through the whole engine, on the bundled model."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from tristream import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
}
MESSAGES = [{"role": "user", "content": "Describe a user of a web shop as a JSON object."}]


async def text_of(stream) -> tuple[str, str]:
    text, reason = "", None
    async for out in stream:
        text += out.outputs[0].text
        reason = out.outputs[0].finish_reason
    return text, reason


async def test_json_schema_outputs_always_validate(engine):
    params = [
        SamplingParams(temperature=0.8, max_tokens=160, seed=i, structured=StructuredOutput(json=SCHEMA))
        for i in range(20)
    ]
    results = await asyncio.gather(*(text_of(engine.chat(MESSAGES, p)) for p in params))
    for text, reason in results:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 1, "different seeds sample different objects"


async def test_regex_choice_and_json_object(engine):
    regex = r"[A-Z][a-z]{2,8}-[0-9]{3}"
    choices = ["red", "green", "blue"]
    jobs = (
        [
            engine.generate(
                "A product code:", SamplingParams(temperature=1.0, max_tokens=30, seed=i, structured={"regex": regex})
            )
            for i in range(4)
        ]
        + [
            engine.chat(
                MESSAGES, SamplingParams(temperature=1.0, max_tokens=10, seed=i, structured={"choice": choices})
            )
            for i in range(4)
        ]
        + [engine.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=120, structured={"json_object": True}))]
    )
    results = await asyncio.gather(*(text_of(j) for j in jobs))
    assert all(re.fullmatch(regex, text) and reason == "stop" for text, reason in results[:4]), results[:4]
    assert all(text in choices and reason == "stop" for text, reason in results[4:8]), results[4:8]
    text, reason = results[8]
    assert reason == "stop" and isinstance(json.loads(text), dict), text


async def test_a_bad_schema_fails_alone(engine):
    good = SamplingParams(temperature=0, max_tokens=20, structured={"choice": ["yes", "no"]})
    bad = [
        ({"json": {"type": "nosuchtype"}}, "structured.json: invalid JSON schema"),
        ({"regex": "(unclosed"}, "structured.regex: invalid regex"),
        ({"grammar": "root ::= missing_rule"}, "structured.grammar: invalid grammar"),
        ({"json": "{not json"}, "structured.json: invalid JSON schema"),
    ]
    ok = asyncio.ensure_future(text_of(engine.chat(MESSAGES, good)))
    for structured, match in bad:
        with pytest.raises(ValueError, match=re.escape(match)):
            await text_of(engine.chat(MESSAGES, SamplingParams(max_tokens=20, structured=structured)))
    text, reason = await ok
    assert text in ("yes", "no") and reason == "stop"


def test_structured_params_are_checked_up_front():
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured={"regex": "a", "choice": ["a"]})
    with pytest.raises(ValueError, match="exactly one of"):
        SamplingParams(structured={})
    with pytest.raises(ValueError, match="structured:"):
        SamplingParams(structured={"schema": {}})
    with pytest.raises(ValueError, match="structured.choice"):
        SamplingParams(structured={"choice": "yes"})
