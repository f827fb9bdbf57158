"""OpenAI request bodies as pydantic models, and their translation into SamplingParams.

Unknown fields are ignored, as OpenAI ignores them. Known fields that tristream
does not implement are refused with an error that names them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tristream.sampling_params import MAX_LOGPROBS, SamplingParams

# OpenAI's own bound on n.
MAX_SAMPLES = 128


class UnsupportedField(ValueError):
    """A request asks for something tristream does not do; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchema(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, i: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise UnsupportedField(
                    f"messages[{i}].content",
                    f"messages[{i}]: content parts of type {part.type!r} are not supported; send text",
                )
        return "".join(part.text for part in self.content)


class _SamplingFields(_Body):
    """The fields that chat and completions share."""

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
    user: str | None = None
    echo: bool = False
    use_beam_search: bool = False
    length_penalty: float = 1.0
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_supported(self) -> None:
        if self.use_beam_search:
            raise UnsupportedField("use_beam_search", "use_beam_search is not supported: tristream has no beam search")
        if self.length_penalty != 1.0:
            raise UnsupportedField(
                "length_penalty", "length_penalty only applies to beam search, which tristream does not run"
            )

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

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        self._check_supported()
        fields: dict[str, Any] = dict(
            n=self.n,
            best_of=self.best_of,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids or [],
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=self._structured(),
        )
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        if self.top_k is not None:
            fields["top_k"] = 0 if self.top_k == -1 else self.top_k
        if self.logit_bias:
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise UnsupportedField("logit_bias", "logit_bias keys must be token ids") from None
        return SamplingParams(**fields)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them."""
        return [
            {"role": m.role, "content": m.text(i), **({"name": m.name} if m.name else {})}
            for i, m in enumerate(self.messages)
        ]

    def template_kwargs(self) -> dict:
        return {"add_generation_prompt": self.add_generation_prompt, **(self.chat_template_kwargs or {})}

    def sampling_params(self) -> SamplingParams:
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise UnsupportedField(name, f"{name} (tool calling) is not supported")
        if self.tool_choice not in (None, "none"):
            raise UnsupportedField("tool_choice", "tool_choice is not supported: tristream has no tool calling")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs=true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise UnsupportedField("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}]")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, logprobs, None)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

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

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported: tristream does not fill in the middle")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UnsupportedField("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}]")
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return self._params(self.max_tokens, self.logprobs, prompt_logprobs)


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
