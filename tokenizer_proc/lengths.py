"""Refusing a prompt that cannot fit the context before tokenizing all of it.

Tokenizing takes most of a second per megabyte of text. A prompt far longer than the context is refused
without that work: at once where its characters alone outnumber what ``limit`` tokens can hold, else
once a count of its tokens, piece by piece, reaches ``limit``.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Text longer than this many characters per token of the limit is counted piece by piece before it is
# tokenized whole: it rarely fits (natural text and code have 2 to 5 characters a token), and the count
# stops after about ``limit`` tokens of work. Text that fits after all is tokenized twice.
LIKELY_CHARS_PER_TOKEN = 8
PIECE_CHARS = 1 << 16
# How far past a piece's end to look for a cut before whitespace, which a pre-tokenizer splits at too.
CUT_LOOKAHEAD = 256
# How many tokens a cut may take away from the count: where it splits a pre-token, or a normalizer adds a
# prefix to each piece, the tokens around the cut differ from those of the same text within the whole.
CUT_MARGIN = 8
# The longest canonical decomposition has 4 code points, so composing (NFC, NFKC) shortens text at most 4-fold.
COMPOSE_FACTOR = 4

_CUT = re.compile(r"(?<=\S)\s")
# Normalizers and pre-tokenizers that keep every character of the text (or, composing, all but a bounded part).
_KEEPING_NORMALIZERS = {
    "Prepend": 1,
    "NFD": 1,
    "NFKD": 1,
    "Lowercase": 1,
    "NFC": COMPOSE_FACTOR,
    "NFKC": COMPOSE_FACTOR,
}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def too_long(count: int, limit: int, at_least: bool = False) -> str:
    """The message for a prompt of ``count`` tokens (``at_least``: or more) that leaves no room for output."""
    return (
        f"the prompt has {'at least ' if at_least else ''}{count} tokens, which leaves no room for output within "
        f"max_model_len={limit}"
    )


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many times shorter a normalizer may make text, or None where it may drop characters outright."""
    if spec is None:
        return 1
    kind = spec["type"]
    if kind == "Sequence":
        factors = [_normalizer_factor(s) for s in spec["normalizers"]]
        return None if None in factors else max(factors, default=1)
    if kind == "Replace":
        pattern = spec["pattern"].get("String")
        return 1 if pattern is not None and len(spec["content"]) >= len(pattern) else None
    return _KEEPING_NORMALIZERS.get(kind)


def _keeps_text(spec: dict | None) -> bool:
    """Whether a pre-tokenizer keeps every character of the text in its pieces."""
    if spec is None:
        return True
    if spec["type"] == "Sequence":
        return all(_keeps_text(s) for s in spec["pretokenizers"])
    return spec["type"] in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _byte_level(spec: dict | None) -> bool:
    if spec is None:
        return False
    if spec["type"] == "Sequence":
        return any(_byte_level(s) for s in spec["pretokenizers"])
    return spec["type"] == "ByteLevel"


def _spec(component: Any) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def max_token_chars(tokenizer: Any) -> int | None:
    """The most characters of text that one token can stand for, or None where the tokenizer does not bound it.

    A BPE tokenizer over bytes (byte-level, or with byte fallback) has no unknown token that could swallow a
    run of characters; if its normalizer and pre-tokenizer keep every character, each token stands for at most
    as many characters as its own text has (or ``COMPOSE_FACTOR`` times that, where the normalizer composes).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return None
    pre_tokenizer = _spec(backend.pre_tokenizer)
    factor = _normalizer_factor(_spec(backend.normalizer))
    if factor is None or not _keeps_text(pre_tokenizer):
        return None
    if not (backend.model.byte_fallback or _byte_level(pre_tokenizer)):
        return None
    return factor * max(map(len, backend.get_vocab(with_added_tokens=True)))


class LengthGuard:
    """Refuses text that provably has ``limit`` tokens or more, cheaply, before it is tokenized whole."""

    def __init__(self, tokenizer: Any, limit: int) -> None:
        self.tokenizer = tokenizer
        self.limit = limit
        self.max_token_chars = max_token_chars(tokenizer)

    def check(self, text: str) -> None:
        """A ValueError (``too_long``) if ``text`` alone has at least ``limit`` tokens, as far as a bound on its
        characters per token or a count of its pieces shows."""
        bound = self.max_token_chars
        if bound is not None and len(text) > (self.limit - 1) * bound:
            raise ValueError(too_long(-(-len(text) // bound), self.limit, at_least=True))
        if len(text) > max(PIECE_CHARS, self.limit * LIKELY_CHARS_PER_TOKEN):
            count = self.count_until_limit(text)
            if count >= self.limit:
                raise ValueError(too_long(count, self.limit, at_least=True))

    def count_until_limit(self, text: str) -> int:
        """A lower bound on the tokens of ``text``, counted piece by piece, and stopped once it reaches ``limit``."""
        count, start = 0, 0
        while start < len(text) and count < self.limit:
            end = _cut(text, start + PIECE_CHARS)
            ids = self.tokenizer.encode(text[start:end], add_special_tokens=False)
            count += len(ids) - (CUT_MARGIN if start else 0)
            start = end
        return count


def _cut(text: str, at: int) -> int:
    """Where the piece that should end at ``at`` ends: before the next whitespace that follows a non-space,
    if one comes soon, so that the cut falls between pre-tokens."""
    if at >= len(text):
        return len(text)
    m = _CUT.search(text, at, at + CUT_LOOKAHEAD)
    return m.start() if m else at
