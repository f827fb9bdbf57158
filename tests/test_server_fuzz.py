"""Schemathesis fuzzes the completions routes from the server's own OpenAPI schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

ROUTES = ("/v1/chat/completions", "/v1/completions")
EXAMPLES = 30


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
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
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

    call()
    assert statuses and live_server.healthy()
