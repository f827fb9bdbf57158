"""Turning a GenerateRequest into validated prompt token ids."""

from __future__ import annotations

import dataclasses

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tristream.config import EngineConfig
from tristream.protocol import GenerateRequest, ImageInput
from tristream.sampling_params import SamplingParams
from tristream.tokenizer_proc.fim import FimPrompts
from tristream.tokenizer_proc.images import PromptImages
from tristream.tokenizer_proc.lengths import LengthGuard, too_long
from tristream.tokenizer_proc.templates import resolve_chat_template
from tristream.tokenizer_proc.tools import ChatTools, template_message
from tristream.tokenizer_proc.turn_cache import TurnCache


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase:
    """The tokenizer the engine runs: of ``config.tokenizer`` or the (resolved) model, with its ``chat_template``."""
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    if config.chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(config.chat_template)
    return tokenizer


def _template_message(i: int, message: object) -> dict:
    """Message ``i`` as the chat template takes it: a list of text parts joined into text, a list that holds
    ``{"type": "image"}`` parts kept for the template to place the images; other parts are a ValueError.
    An assistant's ``tool_calls`` take the place of its content."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"messages[{i}] must be a dict with a string 'role' and a 'content'")
    if "content" not in message and not message.get("tool_calls"):
        raise ValueError(f"messages[{i}] must be a dict with a string 'role' and a 'content'")
    try:
        message = template_message(message)
    except ValueError as e:
        raise ValueError(f"messages[{i}]: {e}") from None
    content = message.get("content")
    if content is None:
        return {**message, "content": ""}
    if not isinstance(content, list):
        return message
    for part in content:
        text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        if not text and part != {"type": "image"}:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"messages[{i}]: content parts are text or images, not parts of type {kind!r}")
    if any(part["type"] == "image" for part in content):
        return message
    return {**message, "content": "".join(part["text"] for part in content)}


class PromptBuilder:
    """Applies chat templates, tokenizes, and rejects prompts the engine cannot run."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, max_model_len: int, images: PromptImages
    ) -> None:
        self.tokenizer = tokenizer
        self.images = images
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.turns = TurnCache(tokenizer) if tokenizer is not None else None
        self.fim = FimPrompts(tokenizer) if tokenizer is not None else None
        self.guard = LengthGuard(tokenizer, max_model_len) if tokenizer is not None else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def template(self, chat_template_kwargs: dict | None) -> str | None:
        """The chat template a request renders with: its own ``chat_template`` (Jinja text, a file or a built-in
        name), else the tokenizer's."""
        own = (chat_template_kwargs or {}).get("chat_template")
        if own is not None:
            if not isinstance(own, str):
                raise ValueError("chat_template must be a string: Jinja text, a file or a built-in template name")
            return resolve_chat_template(own)
        return getattr(self.tokenizer, "chat_template", None)

    def render_chat(
        self, messages: list[dict], chat_template_kwargs: dict | None, tools: ChatTools | None = None
    ) -> str:
        """The prompt text of a conversation, ending with the assistant's turn, with ``tools`` for the template."""
        template = self.template(chat_template_kwargs)
        if not template:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        messages = [_template_message(i, m) for i, m in enumerate(messages)]
        kwargs = {"add_generation_prompt": True, **(chat_template_kwargs or {})}
        if "chat_template" in kwargs:
            kwargs["chat_template"] = template
        if tools is not None:
            kwargs["tools"] = tools.tools
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from e

    def word_variants(self, word: str) -> list[list[int]]:
        """The token ids of ``word`` alone and after a space."""
        word = word.strip()
        return [self.tokenizer.encode(v, add_special_tokens=False) for v in (word, " " + word)]

    def word_tokens(self, word: str) -> set[int]:
        """Every token that ``word`` becomes, alone and after a space."""
        return {t for ids in self.word_variants(word) for t in ids}

    def with_word_tokens(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the words of ``logit_bias`` and ``allowed_words`` turned into token ids."""
        words = params.word_biases
        if not words and params.allowed_words is None:
            return params
        if self.tokenizer is None:
            raise ValueError(
                "logit_bias words and allowed_words need a tokenizer (this engine runs with skip_tokenizer_init)"
            )
        bias = {t: b for word, b in words.items() for t in self.word_tokens(word)}
        bias.update((k, b) for k, b in (params.logit_bias or {}).items() if isinstance(k, int))
        changes: dict = {"logit_bias": bias or None}
        if params.allowed_words is not None:
            allowed = set(params.allowed_token_ids or [])
            allowed.update(t for word in params.allowed_words for t in self.word_tokens(word))
            if not allowed:
                raise ValueError(f"allowed_words {params.allowed_words!r} have no tokens")
            changes.update(allowed_token_ids=sorted(allowed), allowed_words=None)
        return dataclasses.replace(params, **changes)

    def build(
        self, req: GenerateRequest, tools: ChatTools | None = None
    ) -> tuple[list[int], str | None, list[ImageInput]]:
        """Prompt token ids for ``req`` (a chat with ``tools``), for a chat its rendered text, and its images;
        ``ValueError`` if it is bad."""
        text = None
        self.images.check(len(req.images or []))
        if self.tokenizer is None and req.prompt_token_ids is None:
            raise ValueError("this engine runs without a tokenizer (skip_tokenizer_init): send prompt token ids")
        if req.messages is not None:
            text = self.render_chat(req.messages, req.chat_template_kwargs, tools)
            self.guard.check(text)
            ids = self.turns.encode(text)
        elif req.prompt is not None:
            if not req.prompt:
                raise ValueError("the prompt is empty")
            for part in (req.prompt, req.suffix or ""):
                self.guard.check(part)
            ids = self.tokenizer.encode(req.prompt) if req.suffix is None else self.fim.encode(req.prompt, req.suffix)
        else:
            if req.suffix is not None:
                raise ValueError("suffix needs a text prompt: a prompt of token ids runs as given, FIM tokens and all")
            ids = list(req.prompt_token_ids or [])
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        ids, images = self.images.expand(ids, req.images or [])
        self._check(ids, req.params)
        return ids, text, images

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        """Reject a prompt and parameters that do not fit the context or the vocabulary."""
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(too_long(len(ids), self.max_model_len))
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                f"max_model_len={self.max_model_len}"
            )
        for name, token_ids in (
            ("logit_bias", params.logit_bias or {}),
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids or []),
        ):
            bad = [t for t in token_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
