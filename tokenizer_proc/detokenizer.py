"""Incremental detokenization of streamed output tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


# decode_batch hands its work to a thread pool, at about 12 us a call: below this many
# sequences one decode call each is faster (bundled tokenizer, 2 CPU cores).
MIN_BATCH_DECODE = 128


def backend_decoder(tokenizer: Any) -> Any | None:
    """The Rust tokenizer to decode with in place of ``tokenizer.decode`` (clean-up off), or None.

    A fast tokenizer's ``decode`` is its backend's ``decode(ids, skip_special_tokens=...)``
    (``spaces_between_special_tokens`` has no effect there) unless its class changes
    decoding; slow tokenizers have no backend. Calling the backend saves transformers'
    Python layers, and its ``decode_batch`` decodes many sequences in one call where
    transformers' ``batch_decode`` loops over ``decode``.
    """
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    ):
        return tokenizer.backend_tokenizer
    return None


def decodes_by_concatenation(backend: Any | None) -> bool:
    """Whether the Rust tokenizer ``backend`` decodes ids as the concatenation of their bytes (a byte-level
    decoder, as GPT-2, Llama 3, Qwen and SmolLM have): then ``D(A + B) == D(A) + D(B)`` when ``D(A)`` ends
    in a complete character, and a push needs to decode only its unemitted ids."""
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


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
    does not grow with the length of the output. Where the tokenizer decodes by
    concatenation (``decodes_by_concatenation``), it covers only those not yet emitted,
    with no prompt context.

    A push runs in two halves, ``begin_push`` (the ids to decode) and ``end_push`` (their
    text), so that ``push_step`` can decode the pushes of many requests together.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._backend = backend_decoder(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._decode_key = (id(tokenizer), skip_special_tokens, spaces_between_special_tokens)
        self._skipped = skipped_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self._concatenates = decodes_by_concatenation(self._backend)
        # _ids is the decode window: ids[:_read] were emitted by the last step (or are
        # the prompt context) and decode to _prefix_text; ids[_read:] are not emitted yet.
        self._ids: list[int] = []
        self._read = 0
        self._prefix_text = ""
        if not self._concatenates:
            self._start_in_context(prompt_token_ids)

    def _start_in_context(self, prompt_token_ids: list[int]) -> None:
        """Put the last prompt ids in the window, so that the first output ids decode as they do after them."""
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if token_id not in self._skipped:
                context.append(token_id)
        context.reverse()
        context_text = self._decode(context)
        if not context_text.endswith(REPLACEMENT_CHAR):
            self._ids, self._read, self._prefix_text = context, len(context), context_text

    def push(self, token_ids: Iterable[int]) -> str:
        """Append newly generated ids; return the text that became final since the last call ("" if none)."""
        pending = self.begin_push(token_ids)
        if pending is None:
            return ""
        return self.end_push(*self._decode_many(pending))

    def begin_push(self, token_ids: Iterable[int]) -> list[list[int]] | None:
        """First half of a push: append the ids; return the id lists to decode: the window and its unemitted
        ids, or the unemitted ids alone where decoding concatenates.

        None means there is nothing to decode and the push gives "". Otherwise hand the
        decodes of the lists to ``end_push`` before any other call on this detokenizer.
        """
        self._ids.extend([t for t in token_ids if t not in self._skipped] if self._skipped else token_ids)
        if len(self._ids) == self._read:
            return None
        return self._to_decode()

    def _to_decode(self) -> list[list[int]]:
        return [self._ids] if self._concatenates else [self._ids, self._ids[self._read :]]

    def end_push(self, window_text: str, unemitted_text: str = "") -> str:
        """Second half of a push: given the decodes of ``begin_push``'s lists, return the push's text."""
        if not window_text.endswith(REPLACEMENT_CHAR):
            return self._emit(window_text, unemitted_text, len(self._ids))
        for end in range(len(self._ids) - 1, max(self._read, len(self._ids) - _MAX_HELD_TOKENS - 1), -1):
            text = self._decode(self._ids[:end])
            if not text.endswith(REPLACEMENT_CHAR):
                emitted_text = "" if self._concatenates else self._decode(self._ids[self._read : end])
                return self._emit(text, emitted_text, end)
        return ""

    def flush(self) -> str:
        """At the end of the request: return any held-back text, even if it ends in an incomplete character."""
        if len(self._ids) == self._read:
            return ""
        texts = self._decode_many(self._to_decode())
        return self._emit(texts[0], texts[-1], len(self._ids))

    def _emit(self, text: str, emitted_text: str, end: int) -> str:
        """Emit `text` (the decode of ids[:end]) past the prefix; slide the window to end at `end`.

        `emitted_text`, the decode of ids[_read:end], becomes the prefix text. Where decoding concatenates,
        the window keeps no emitted ids.
        """
        delta = text[len(self._prefix_text) :]
        if self._concatenates:
            del self._ids[:end]
            return delta
        del self._ids[: self._read]
        self._read = end - self._read
        self._prefix_text = emitted_text
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_many(self, seqs: list[list[int]]) -> list[str]:
        """``[self._decode(ids) for ids in seqs]``, in one call when there are many and a backend decoder."""
        if self._backend is None or len(seqs) < MIN_BATCH_DECODE:
            return [self._decode(ids) for ids in seqs]
        return self._backend.decode_batch(seqs, skip_special_tokens=self._skip_special_tokens)


def push_step(detoks: Sequence[IncrementalDetokenizer], token_ids: Sequence[Iterable[int]]) -> list[str]:
    """``[d.push(ids) for d, ids in zip(detoks, token_ids)]``, decoding all the pushes together.

    The pushes of detokenizers with the same tokenizer and decode settings are decoded
    in one ``decode_batch`` call (fast tokenizers, ``MIN_BATCH_DECODE`` sequences or
    more); text ending in an incomplete character needs a few more decodes of that
    request alone. Each detokenizer may appear only once.
    """
    pending = [d.begin_push(ids) for d, ids in zip(detoks, token_ids, strict=True)]
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for i, (detok, seqs) in enumerate(zip(detoks, pending)):
        if seqs is not None:
            groups.setdefault(detok._decode_key, []).append(i)
    deltas = [""] * len(detoks)
    for members in groups.values():
        texts = iter(detoks[members[0]]._decode_many([seq for i in members for seq in pending[i]]))
        # A group shares its tokenizer, so each of its members decodes as many lists.
        per_push = zip(texts, texts) if len(pending[members[0]]) == 2 else zip(texts)
        for i, push_texts in zip(members, per_push):
            deltas[i] = detoks[i].end_push(*push_texts)
    return deltas
