"""Schemathesis fuzzes the completions routes from the server's own OpenAPI schema."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

ROUTES = ("/v1/chat/completions", "/v1/completions")
EXAMPLES = 30
# Read every event of a stream (several prompts and samples stream more than schemathesis' default 20).
CONFIG = SchemathesisConfig.from_dict({"max-stream-events": 1000})


VOCAB, MAX_MODEL_LEN = 49152, 1024


def as_id(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def token_ids(body: dict) -> list[int]:
    """The token ids that the body's logit_bias and stop_token_ids name, where they are ids."""
    bias = body.get("logit_bias") if isinstance(body.get("logit_bias"), dict) else {}
    stops = body.get("stop_token_ids") if isinstance(body.get("stop_token_ids"), list) else []
    return [t for t in map(as_id, bias) if t is not None] + [t for t in stops if isinstance(t, int)]


def check_accepted(body: object, r) -> None:
    """A body the server took has its token ids in the vocabulary, and one prompt and its max_tokens fit the context."""
    if not isinstance(body, dict):
        return
    assert all(0 <= t < VOCAB for t in token_ids(body)), (body, r.text)
    if r.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    prompt = body.get("prompt")
    one_prompt = (
        "messages" in body
        or isinstance(prompt, str)
        or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    )
    max_tokens = (
        body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else body.get("max_tokens")
    )
    if one_prompt and isinstance(max_tokens, int):
        assert r.json()["usage"]["prompt_tokens"] + max_tokens <= MAX_MODEL_LEN, (body, r.text)


def bounded(body: object) -> None:
    """Keep each case cheap on a CPU: at most 2 samples of at most 8 tokens."""
    if not isinstance(body, dict):
        return
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and body[key] > 2:
            body[key] = 2
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(key), int) and body[key] > 8:
            body[key] = 8
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 8


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("route", ROUTES)
def test_no_request_makes_a_server_error(live_server, route, mode):
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json", config=CONFIG)
    operation = next(op for op in (r.ok() for r in schema.get_all_operations()) if op.path == route)
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case) -> None:
        bounded(case.body)
        r = case.call(base_url=live_server.url, timeout=120)
        statuses.append(r.status_code)
        assert r.status_code < 500, (case.body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        elif r.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n"), r.text
        else:
            assert r.json()["choices"], r.text
        if r.status_code == 200:
            check_accepted(case.body, r)

    call()
    assert statuses and live_server.healthy()


NUMBERS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


@given(
    route=st.sampled_from(ROUTES),
    bad=st.one_of(
        st.tuples(st.sampled_from([*NUMBERS, "length_penalty"]), st.sampled_from(["NaN", "Infinity", "-1e999"])),
        st.tuples(st.just("logit_bias"), st.integers(VOCAB, 2**70).map(lambda t: f'{{"{t}": 1.5}}')),
        st.tuples(st.just("stop_token_ids"), st.integers(VOCAB, 2**70).map(lambda t: f"[3, {t}]")),
        st.tuples(st.just("max_tokens"), st.integers(MAX_MODEL_LEN, 10**15).map(str)),
    ),
)
@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_bad_numbers_and_token_ids_are_400s_naming_the_field(live_server, route, bad):
    """Raw bodies, since a non-finite number is no JSON that a client library writes."""
    field, value = bad
    base = {"messages": [{"role": "user", "content": "Hi"}]} if route == "/v1/chat/completions" else {"prompt": "Hi"}
    raw = json.dumps(base)[:-1] + f', "{field}": {value}}}'
    r = httpx.post(live_server.url + route, content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 400, (raw, r.text)
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"], (raw, error)
