"""The OpenAI layer: request bodies into engine calls, engine outputs into response bodies.

The server and ``tristream batch`` both go through it. Unknown fields are ignored, as
OpenAI ignores them. Known fields that tristream does not implement are refused with
an error that names them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tristream.engine import AsyncEngine
from tristream.outputs import CompletionOutput, RequestOutput, ToolCall
from tristream.protocol import ToolSpec
from tristream.sampling_params import MAX_LOGPROBS, SAMPLING_ONLY_OFF, SamplingParams

# OpenAI's own bound on n.
MAX_SAMPLES = 128
# JSON has no -inf; OpenAI clients expect a number.
MIN_LOGPROB = -9999.0
# The largest request body a server takes by default (``--max-request-bytes``): 16 MiB.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20

Items = AsyncIterator[tuple[int, RequestOutput]]


class UnsupportedField(ValueError):
    """A request asks for something tristream does not do; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors of a body as one message, and the field they name."""
    locs = [[str(x) for x in err.get("loc", ()) if x != "body"] for err in errors]
    param = locs[0][0] if locs[0] else None
    same = [(err, loc) for err, loc in zip(errors, locs) if loc[:1] == locs[0][:1]]
    if len(same) > 1:
        # A union field: say what each accepted type objected to.
        reasons = "; ".join(f"{'.'.join(loc[1:]) or param}: {err['msg']}" for err, loc in same[:4])
        return f"{param}: matches none of the accepted types ({reasons})", param
    return f"{'.'.join(locs[0]) or 'body'}: {errors[0].get('msg')}", param


@dataclass
class EngineCall:
    """One engine request of a body: a prompt (text or token ids) or a conversation, and its parameters;
    ``suffix`` asks for the text between the prompt and it (fill in the middle)."""

    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    chat_template_kwargs: dict | None = None
    suffix: str | None = None
    tools: dict[str, Any] = field(default_factory=dict)

    def start(self, engine: AsyncEngine, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's stream of deltas for this request; ``tools`` are ``AsyncEngine.chat``'s tool arguments."""
        if self.messages is not None:
            return engine.chat(self.messages, self.params, request_id, self.chat_template_kwargs, **self.tools)
        return engine.generate(self.prompt, self.params, request_id, self.suffix)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """``messages`` opened by the system prompt ``system``, unless it is None or they have one."""
    if system is None or any(m["role"] in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


@dataclass
class RequestDefaults:
    """What a server or batch job gives the requests that leave it out: SamplingParams fields (the command's
    sampling options) and a system prompt for conversations that have none."""

    sampling: dict[str, Any] = field(default_factory=dict)
    system: str | None = None

    def base(self, body: _SamplingFields, engine: AsyncEngine) -> SamplingParams:
        """What the fields ``body`` leaves out take: these sampling fields, over the model's generation_config.json
        defaults, over the body's own default ``max_tokens`` (OpenAI's 16 for completions)."""
        omitted = {} if "max_tokens" in body.model_fields_set else {"max_tokens": body.max_tokens}
        return dataclasses.replace(engine.default_sampling_params(**omitted), **self.sampling)

    def calls(self, body: _SamplingFields, engine: AsyncEngine) -> list[EngineCall]:
        """The engine requests of ``body``, with these defaults."""
        return body.calls(self.base(body, engine), self.system)


def usage(outputs: list[RequestOutput], completion_tokens: int) -> dict:
    """OpenAI's ``usage`` of a request made of ``outputs`` (one per prompt)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }


def ranked(step: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one logprobs step, most likely first."""
    return sorted(step.items(), key=lambda kv: -kv[1])[:k]


def _lp(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _token(texts: dict[int, str], token: int, logprob: float) -> dict:
    return {"token": texts[token], "logprob": _lp(logprob), "bytes": list(texts[token].encode())}


def chat_logprobs(steps: list[dict[int, float]], texts: dict[int, str], k: int) -> list[dict]:
    """Chat ``logprobs.content`` entries; the first key of each step is the sampled token."""
    return [
        {**_token(texts, *next(iter(step.items()))), "top_logprobs": [_token(texts, *top) for top in ranked(step, k)]}
        for step in steps
    ]


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
        """The logprobs so far, as the response holds them."""
        return {name: getattr(self, name) for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}

    def take(self) -> dict:
        """The body so far, then start afresh (for a streamed delta), keeping the text offset."""
        body = self.body()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return body


class Reply:
    """The response bodies of one request, built from its engine outputs: ``await whole(finals)`` from
    each call's whole output, or ``chunks(items)`` from their merged deltas.

    ``texts`` caches each token's text, asked of the engine when logprobs need it. While streaming,
    ``firsts`` holds each prompt's first output and ``completion_tokens`` counts the tokens streamed so far.
    """

    PREFIX: ClassVar[str]
    OBJECT: ClassVar[str]
    CHUNK: ClassVar[str]

    def __init__(
        self, body: Any, calls: list[EngineCall], rid: str, model: str, engine: AsyncEngine, texts: dict[int, str]
    ) -> None:
        self.body, self.calls, self.model, self.engine, self.texts = body, calls, model, engine, texts
        self.id = f"{self.PREFIX}-{rid}"
        self.created = int(time.time())
        self.n, self.k = calls[0].params.n, calls[0].params.logprobs
        self.firsts: dict[int, RequestOutput] = {}
        self.completion_tokens = 0

    async def token_texts(self, ids: Iterable[int]) -> dict[int, str]:
        missing = sorted(set(ids) - self.texts.keys())
        if missing:
            self.texts.update(zip(missing, await self.engine.token_texts(missing)))
        return self.texts

    def envelope(self, kind: str, choices: list[dict], usage: dict | None) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def streamed_usage(self) -> dict:
        """The ``usage`` of what the stream has carried so far."""
        return usage(list(self.firsts.values()), self.completion_tokens)

    def chunk(self, choice: dict) -> dict:
        """A stream chunk of one choice: with ``continuous_usage_stats`` it carries the usage so far; else
        ``usage`` is null in it when the stream ends in a usage chunk, and absent otherwise."""
        chunk = self.envelope(self.CHUNK, [choice], None)
        if self.body.continuous_usage:
            chunk["usage"] = self.streamed_usage()
        elif not self.body.include_usage:
            del chunk["usage"]
        return chunk

    def usage_chunk(self) -> list[dict]:
        """The stream's closing chunk with the whole usage, when ``include_usage`` asks for it."""
        return [self.envelope(self.CHUNK, [], self.streamed_usage())] if self.body.include_usage else []


def _tokens(samples: Iterable[CompletionOutput]) -> int:
    return sum(len(s.token_ids) for s in samples)


def tool_call(call: ToolCall, whole: bool) -> dict:
    """A call as OpenAI's message (``whole``) or stream delta has it; a delta has ``id`` and ``type`` only first."""
    function = {"name": call.name, "arguments": call.arguments} if call.name is not None else {}
    if whole:
        return {"id": call.id, "type": call.type, "function": function}
    head = {"id": call.id, "type": call.type} if call.id is not None else {}
    return {"index": call.index, **head, "function": {**function, "arguments": call.arguments}}


class ChatReply(Reply):
    """``chat.completion`` bodies and ``chat.completion.chunk`` chunks."""

    PREFIX, OBJECT, CHUNK = "chatcmpl", "chat.completion", "chat.completion.chunk"

    async def _logprobs(self, steps: list[dict[int, float]] | None) -> dict | None:
        if self.k is None:
            return None
        texts = await self.token_texts(t for step in steps or [] for t in step)
        return {"content": chat_logprobs(steps or [], texts, self.k)}

    async def whole(self, finals: list[RequestOutput]) -> dict:
        echo = self.body.echo_text()
        choices = []
        for s in finals[0].outputs:
            message = {"role": "assistant", "content": echo + s.text}
            if s.reasoning_content:
                message["reasoning_content"] = s.reasoning_content
            if s.tool_calls:
                message["tool_calls"] = [tool_call(c, whole=True) for c in s.tool_calls]
                message["content"] = message["content"] or None
            logprobs = await self._logprobs(s.logprobs)
            choices.append(
                {"index": s.index, "message": message, "logprobs": logprobs, "finish_reason": s.finish_reason}
            )
        return self.envelope(self.OBJECT, choices, usage(finals, _tokens(finals[0].outputs)))

    def _delta(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return self.chunk({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    def _opening(self) -> list[dict]:
        """Each choice's first chunks: the role, then the echoed text."""
        echo = self.body.echo_text()
        chunks = []
        for i in range(self.n):
            chunks.append(self._delta(i, {"role": "assistant", "content": ""}))
            if echo:
                chunks.append(self._delta(i, {"content": echo}))
        return chunks

    async def chunks(self, items: Items) -> AsyncIterator[dict]:
        async for _, out in items:
            if not self.firsts:
                self.firsts[0] = out
                for chunk in self._opening():
                    yield chunk
            for s in out.outputs:
                self.completion_tokens += len(s.token_ids)
                delta = {"reasoning_content": s.reasoning_content} if s.reasoning_content else {}
                if s.tool_calls:
                    delta["tool_calls"] = [tool_call(c, whole=False) for c in s.tool_calls]
                if s.text or not delta:
                    delta["content"] = s.text
                logprobs = await self._logprobs(s.logprobs) if s.logprobs else None
                if s.text or s.reasoning_content or s.tool_calls or s.finish_reason or logprobs:
                    yield self._delta(s.index, delta, s.finish_reason, logprobs)
        for chunk in self.usage_chunk():
            yield chunk


class CompletionReply(Reply):
    """``text_completion`` bodies and chunks; choice ``i * n + j`` is sample j of prompt i."""

    PREFIX, OBJECT, CHUNK = "cmpl", "text_completion", "text_completion"

    async def _echo(self, i: int, out: RequestOutput) -> str:
        if not self.body.echo:
            return ""
        prompt = self.calls[i].prompt
        return prompt if isinstance(prompt, str) else await self.engine.detokenize(out.prompt_token_ids)

    async def _start_logprobs(self, first: RequestOutput) -> TextLogprobs | None:
        """A choice's logprobs, holding the echoed prompt's (``first`` is its prompt's first output)."""
        if self.k is None:
            return None
        lp = TextLogprobs(self.k)
        if self.body.echo and first.prompt_logprobs is not None:
            ids = first.prompt_token_ids
            texts = await self.token_texts(set(ids) | {t for step in first.prompt_logprobs[1:] for t in step})
            for token, step in zip(ids, first.prompt_logprobs):
                lp.add(token, step, texts)
        return lp

    async def _add(self, lp: TextLogprobs | None, sample: CompletionOutput) -> TextLogprobs | None:
        if lp is not None:
            steps = sample.logprobs or []
            texts = await self.token_texts({t for step in steps for t in step} | set(sample.token_ids))
            for token, step in zip(sample.token_ids, steps):
                lp.add(token, step, texts)
        return lp

    async def whole(self, finals: list[RequestOutput]) -> dict:
        choices = []
        for i, final in enumerate(finals):
            echo = await self._echo(i, final)
            for s in final.outputs:
                lp = await self._add(await self._start_logprobs(final), s)
                choices.append(
                    {
                        "index": i * self.n + s.index,
                        "text": echo + s.text,
                        "logprobs": lp.body() if lp is not None else None,
                        "finish_reason": s.finish_reason,
                    }
                )
        return self.envelope(self.OBJECT, choices, usage(finals, sum(_tokens(f.outputs) for f in finals)))

    async def chunks(self, items: Items) -> AsyncIterator[dict]:
        echoes: dict[int, str] = {}
        logprobs: dict[tuple[int, int], TextLogprobs | None] = {}
        async for i, out in items:
            if i not in self.firsts:
                self.firsts[i], echoes[i] = out, await self._echo(i, out)
            for s in out.outputs:
                self.completion_tokens += len(s.token_ids)
                text = s.text
                if (i, s.index) not in logprobs:
                    logprobs[i, s.index], text = await self._start_logprobs(self.firsts[i]), echoes[i] + text
                lp = await self._add(logprobs[i, s.index], s)
                if text or s.finish_reason or (lp is not None and lp.tokens):
                    choice = {"index": i * self.n + s.index, "text": text, "finish_reason": s.finish_reason}
                    yield self.chunk({**choice, "logprobs": lp.take() if lp is not None else None})
        for chunk in self.usage_chunk():
            yield chunk


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchema(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class ImageUrl(_Body):
    url: str


class ContentPart(_Body):
    """A content part: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url": ...}}``."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None

    def engine_part(self, i: int) -> dict:
        """The part as the engine takes it; ``i`` is its message's index, for the error of any other part."""
        if self.type == "text" and self.text is not None:
            return {"type": "text", "text": self.text}
        if self.type == "image_url" and self.image_url is not None:
            return {"type": "image_url", "image_url": {"url": self.image_url.url}}
        missing = f" without {self.type!r}" if self.type in ("text", "image_url") else ""
        raise UnsupportedField(
            f"messages[{i}].content",
            f'messages[{i}]: only text parts {{"type": "text", "text": ...}} and image parts '
            f'{{"type": "image_url", "image_url": {{"url": ...}}}} are supported, not a part of type {self.type!r}'
            + missing,
        )


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Body):
    """A call of an assistant message, as the reply gave it: ``{"id", "type": "function", "function": {...}}``."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def engine_message(self, i: int) -> dict:
        """Message ``i`` as the engine takes it."""
        message: dict[str, Any] = {"role": self.role, "content": self.engine_content(i)}
        for key in ("name", "tool_call_id"):
            if getattr(self, key):
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return message

    def parts(self, i: int) -> list[dict]:
        """The content as the engine's content parts (text and image_url), in order."""
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [{"type": "text", "text": self.content}]
        return [part.engine_part(i) for part in self.content]

    def engine_content(self, i: int) -> str | list[dict]:
        """The content as the engine takes it: one string, or its parts when it holds images."""
        parts = self.parts(i)
        if any(part["type"] == "image_url" for part in parts):
            return parts
        return "".join(part["text"] for part in parts)

    def text(self, i: int) -> str:
        """The content as one string; content parts must be text."""
        content = self.engine_content(i)
        if not isinstance(content, str):
            raise UnsupportedField(f"messages[{i}].content", f"messages[{i}]: images are not taken here, only text")
        return content


# The body fields that are SamplingParams fields of the same name and meaning.
_SAME_NAMES = (
    "n best_of temperature top_p min_p presence_penalty frequency_penalty repetition_penalty min_tokens stop "
    "stop_token_ids include_stop_str_in_output ignore_eos skip_special_tokens spaces_between_special_tokens seed "
    "use_beam_search length_penalty early_stopping"
).split()
# The SamplingParams field that each body field sets, where their names differ.
_PARAM_OF = {
    "max_completion_tokens": "max_tokens",
    "top_logprobs": "logprobs",
    "echo": "prompt_logprobs",
    "white_list_token_ids": "allowed_token_ids",
    "white_list_token": "allowed_words",
    **dict.fromkeys(
        ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"), "structured"
    ),
}


class _SamplingFields(_Body):
    """The fields that chat and completions share."""

    reply: ClassVar[type[Reply]]

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_SAMPLES)
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    white_list_token_ids: list[int] | None = None
    white_list_token: list[str] | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every stream chunk carries the usage so far (vLLM's ``continuous_usage_stats``)."""
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    def _allowed_token_ids(self) -> list[int] | None:
        """The token ids of vLLM's ``allowed_token_ids`` and the deployment guide's ``white_list_token_ids``."""
        given = [ids for ids in (self.allowed_token_ids, self.white_list_token_ids) if ids is not None]
        return [t for ids in given for t in ids] if given else None

    def _structured(self) -> dict | None:
        given = {
            name: value
            for name, value in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
                ("grammar", self.guided_grammar),
            )
            if value is not None
        }
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise UnsupportedField("response_format", "response_format json_schema needs json_schema.schema")
            given["json"] = fmt.json_schema.schema_
        if len(given) > 1:
            raise UnsupportedField("response_format", f"give one output constraint, not {sorted(given)}")
        return given or None

    def _params(
        self, base: SamplingParams | None, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """The body's SamplingParams; with ``base``, only the fields the body gives (not null) override it. A beam
        search leaves out the sampling-only fields of ``base`` (it samples nothing)."""
        if base is not None and self.use_beam_search:
            base = dataclasses.replace(base, **SAMPLING_ONLY_OFF)
        values: dict[str, Any] = {name: getattr(self, name) for name in _SAME_NAMES}
        values.update(max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        values["structured"] = self._structured()
        if self.top_k is not None:
            values["top_k"] = 0 if self.top_k == -1 else self.top_k
        values["logit_bias"] = self.logit_bias or None
        values["allowed_token_ids"] = self._allowed_token_ids()
        values["allowed_words"] = self.white_list_token
        given = {_PARAM_OF.get(name, name) for name in self.model_fields_set if getattr(self, name) is not None}
        overrides = {k: v for k, v in values.items() if v is not None and (base is None or k in given)}
        return dataclasses.replace(base, **overrides) if base is not None else SamplingParams(**overrides)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    reply: ClassVar[type[Reply]] = ChatReply

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    functions: list[dict[str, Any]] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _non_empty(cls, value: object) -> object:
        if not isinstance(value, list) or not value:
            raise ValueError("messages must be a non-empty list of message objects")
        return value

    def conversation(self, system: str | None = None) -> list[dict]:
        """The messages as the chat template takes them, opened by ``system`` unless they have a system prompt."""
        return with_system([m.engine_message(i) for i, m in enumerate(self.messages)], system)

    def echo_text(self) -> str:
        """What ``echo`` puts before the reply: the last message's text, when the assistant's."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return "".join(part.get("text", "") for part in last.parts(len(self.messages) - 1))

    def sampling_params(self, base: SamplingParams | None = None) -> SamplingParams:
        """The request's SamplingParams; with ``base``, those of the fields it gives, over ``base``."""
        if self.functions:
            raise UnsupportedField("functions", "functions is OpenAI's retired form of tools: send tools instead")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs=true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise UnsupportedField("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}]")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(base, max_tokens, logprobs, None)

    def calls(self, base: SamplingParams | None = None, system: str | None = None) -> list[EngineCall]:
        """The one engine request of this body; ``system`` opens a conversation that has no system prompt."""
        kwargs = {"add_generation_prompt": self.add_generation_prompt, **(self.chat_template_kwargs or {})}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        messages = self.conversation(system)
        tools = {"tools": self.tools, "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls}
        try:
            ToolSpec.of(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ValueError as e:
            raise UnsupportedField("tool_choice", str(e)) from None
        return [EngineCall(self.sampling_params(base), messages=messages, chat_template_kwargs=kwargs, tools=tools)]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    reply: ClassVar[type[Reply]] = CompletionReply

    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise UnsupportedField("prompt", "the prompt is empty")
        return list(p)

    def sampling_params(self, base: SamplingParams | None = None) -> SamplingParams:
        """The request's SamplingParams; with ``base``, those of the fields it gives, over ``base``."""
        if self.suffix is not None and self.echo:
            raise UnsupportedField("echo", "echo cannot be combined with suffix: the completion is the middle alone")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UnsupportedField("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}]")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._params(base, self.max_tokens, self.logprobs, prompt_logprobs)

    def calls(self, base: SamplingParams | None = None, system: str | None = None) -> list[EngineCall]:
        """One engine request per prompt, all with the same parameters (``system`` is for chats)."""
        params = self.sampling_params(base)
        return [EngineCall(params, prompt=p, suffix=self.suffix) for p in self.prompts()]


# The request body of each OpenAI route that generates.
ROUTES: dict[str, type[_SamplingFields]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}


class SimpleChatRequest(_Body):
    """``POST /``, the deployment guide's API: a ``prompt`` after a ``history`` of ``[query, response]`` pairs,
    with ``max_length`` (prompt and answer together), ``top_p`` and ``temperature``."""

    prompt: str
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = None
    max_length: int | None = Field(default=None, ge=1)
    top_p: float | None = None
    temperature: float | None = None

    def chat(self, max_tokens: int | None = None) -> ChatCompletionRequest:
        """The same request as a chat completions body."""
        turns = [(role, text) for pair in self.history or [] for role, text in zip(("user", "assistant"), pair)]
        messages = [{"role": role, "content": text} for role, text in [*turns, ("user", self.prompt)]]
        given = {"top_p": self.top_p, "temperature": self.temperature, "max_tokens": max_tokens}
        return ChatCompletionRequest(messages=messages, **{k: v for k, v in given.items() if v is not None})


class TokenizeRequest(_Body):
    """``POST /tokenize``: a prompt, or chat messages through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


class LoadLoraAdapterRequest(_Body):
    """``POST /v1/load_lora_adapter``: a PEFT adapter directory, served as the model ``lora_name``."""

    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Body):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str
