"""Incremental detokenization of streamed output tokens."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

REPLACEMENT_CHAR = "\ufffd"

# How many trailing prompt tokens are decoded ahead of the output, so that the first
# output token decodes as it does in context (SentencePiece decoders drop the leading
# space of the first token of a fresh decode).
PROMPT_CONTEXT_TOKENS = 5

# An incomplete UTF-8 character at the end of the text has at most 3 bytes, so it lies
# within the last 3 tokens: the text before them is final unless it is invalid itself.
_MAX_HELD_TOKENS = 3


def skipped_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that ``tokenizer.decode(..., skip_special_tokens=True)`` drops.

    Fast tokenizers skip every added token flagged special (which may be more than
    ``all_special_ids``); Python tokenizers skip ``all_special_ids``.
    """
    if getattr(tokenizer, "is_fast", False):
        return frozenset(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(tokenizer.all_special_ids)


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas; never emits a broken UTF-8 character.

    One instance per request. Contract, with ``D(ids)`` meaning
    ``tokenizer.decode(ids, skip_special_tokens=..., spaces_between_special_tokens=...,
    clean_up_tokenization_spaces=False)``, ``S`` the ids that skipping drops
    (``skipped_token_ids(tokenizer)``, empty when not skipping), ``O`` the output ids
    without those in ``S``, and ``T`` the last ``PROMPT_CONTEXT_TOKENS`` prompt ids not
    in ``S`` (empty when ``D(T)`` ends in an incomplete character):

        "".join(push results) + flush() == D(T + O)[len(D(T)):]

    i.e. the output text as decoded in the context of the prompt. This holds for the
    byte-level BPE and SentencePiece (Metaspace/ByteFallback) decoders of LLM
    tokenizers. For byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM) it
    equals ``D(output_ids)``; for SentencePiece tokenizers it differs from a fresh
    ``D(output_ids)`` only in keeping the first token's leading space.

    A push whose text ends in an incomplete character (U+FFFD from a partial byte
    sequence) emits everything before the last complete point and holds the rest
    until more tokens arrive or flush() is called. Each decode covers only the ids
    emitted by the previous step plus those not yet emitted, so the cost of a push
    does not grow with the length of the output.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._skipped = skipped_token_ids(tokenizer) if skip_special_tokens else frozenset()

        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skipped:
                context.append(token_id)
        context.reverse()
        context_text = self._decode(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            context, context_text = [], ""

        # _ids is the decode window: ids[:_read] were emitted by the last step (or are
        # the prompt context) and decode to _prefix_text; ids[_read:] are not emitted yet.
        self._ids: list[int] = context
        self._read = len(context)
        self._prefix_text = context_text
        self._pieces: list[str] = []

    def push(self, token_ids: Iterable[int]) -> str:
        """Append newly generated ids; return the text that became final since the last call ("" if none)."""
        self._ids.extend(t for t in token_ids if t not in self._skipped)
        for end in range(len(self._ids), max(self._read, len(self._ids) - _MAX_HELD_TOKENS - 1), -1):
            text = self._decode(self._ids[:end])
            if not text.endswith(REPLACEMENT_CHAR):
                return self._emit(text, end)
        return ""

    def flush(self) -> str:
        """At the end of the request: return any held-back text, even if it ends in an incomplete character."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._decode(self._ids), len(self._ids))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, text: str, end: int) -> str:
        """Emit `text` (the decode of ids[:end]) past the prefix, and slide the window to end at `end`."""
        delta = text[len(self._prefix_text) :]
        del self._ids[: self._read]
        self._read = end - self._read
        self._prefix_text = self._decode(self._ids[: self._read])
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
