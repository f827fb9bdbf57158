"""OpenAI response objects built from engine outputs: choices, chunks, logprobs and usage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
from starlette.responses import Response
from tristream.outputs import CompletionOutput

# JSON has no -inf; OpenAI clients expect a number.
MIN_LOGPROB = -9999.0


class JSONResponse(Response):
    """A JSON response serialized by orjson."""

    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


def sse(payload: object) -> bytes:
    """One server-sent event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def ranked(step: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one logprobs step, most likely first."""
    return sorted(step.items(), key=lambda kv: -kv[1])[:k]


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def chat_logprobs(steps: list[dict[int, float]], texts: dict[int, str], k: int) -> list[dict]:
    """Chat ``logprobs.content`` entries; the first key of each step is the sampled token."""
    out = []
    for step in steps:
        token, lp = next(iter(step.items()))
        out.append(
            {
                "token": texts[token],
                "logprob": _lp(lp),
                "bytes": list(texts[token].encode()),
                "top_logprobs": [
                    {"token": texts[t], "logprob": _lp(v), "bytes": list(texts[t].encode())} for t, v in ranked(step, k)
                ],
            }
        )
    return out


@dataclass
class TextLogprobs:
    """Legacy completions logprobs, grown token by token."""

    k: int
    offset: int = 0
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: int, step: dict[int, float] | None, texts: dict[int, str]) -> None:
        """One token; ``step`` is None for the first prompt token, which has no logprob."""
        text = texts[token]
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if step is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(_lp(step.get(token, next(iter(step.values())))))
        self.top_logprobs.append({texts[t]: _lp(v) for t, v in ranked(step, self.k)})

    def body(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }

    def take(self) -> dict:
        """The body so far, then start afresh (for a streamed delta), keeping the text offset."""
        body = self.body()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return body


@dataclass
class Choice:
    """One choice folded from its stream of deltas."""

    index: int
    text: str = ""
    reasoning: str | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict] | None = None

    def fold(self, sample: CompletionOutput) -> None:
        self.text += sample.text
        self.num_tokens += len(sample.token_ids)
        if sample.reasoning_content:
            self.reasoning = (self.reasoning or "") + sample.reasoning_content
        if sample.finish_reason is not None:
            self.finish_reason = sample.finish_reason


def now() -> int:
    return int(time.time())
