"""Fill-in-the-middle prompts: the text before a gap and the text after it, marked by the model's FIM tokens.

Code models trained to fill in the middle mark the parts of such a prompt with special tokens of their own.
The families here all lay the prompt out prefix, suffix, middle, as their model cards show:
``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``; the model then writes the middle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class FimTokenSet:
    """The three special tokens one family of code models marks a fill-in-the-middle prompt with: ``prefix``
    before the text ahead of the gap, ``suffix`` before the text after it, ``middle`` last, asking for the gap."""

    family: str
    prefix: str
    suffix: str
    middle: str


FIM_TOKEN_SETS = (
    FimTokenSet("Qwen2.5-Coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    FimTokenSet("StarCoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    FimTokenSet("DeepSeek-Coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)

NO_FIM_TOKENS = (
    "suffix needs a model trained to fill in the middle: this model's tokenizer has no fill-in-the-middle tokens "
    f"(none of the {', '.join(s.family for s in FIM_TOKEN_SETS)} sets)"
)


@dataclass(frozen=True)
class FimLayout:
    """A tokenizer's fill-in-the-middle token ids, and ``start``, the ids it opens every encoded text with
    (its BOS, where it adds one)."""

    tokens: FimTokenSet
    start: tuple[int, ...]
    prefix: int
    suffix: int
    middle: int

    def ids(self, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
        """The prompt's ids: ``start``, then prefix, suffix and middle, each FIM token as its own id."""
        return [*self.start, self.prefix, *prefix_ids, self.suffix, *suffix_ids, self.middle]


def opening_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens ``tokenizer`` puts before the tokens of any text it encodes (a BOS, or nothing)."""
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    start = next((i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0)
    return tuple(with_special[:start])


def find_fim_layout(tokenizer: PreTrainedTokenizerBase) -> FimLayout | None:
    """The layout of the first FIM token set whose three tokens are all in ``tokenizer``'s vocabulary, or None."""
    vocab = tokenizer.get_vocab()
    for tokens in FIM_TOKEN_SETS:
        if all(t in vocab for t in (tokens.prefix, tokens.suffix, tokens.middle)):
            ids = (vocab[tokens.prefix], vocab[tokens.suffix], vocab[tokens.middle])
            return FimLayout(tokens, opening_ids(tokenizer), *ids)
    return None


class FimPrompts:
    """Encodes fill-in-the-middle prompts with one tokenizer; finds its FIM tokens on first use."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @functools.cached_property
    def layout(self) -> FimLayout | None:
        """The tokenizer's FIM layout; None if it has no FIM token set."""
        return find_fim_layout(self.tokenizer)

    def encode(self, prefix: str, suffix: str) -> list[int]:
        """The ids of the prompt that asks for the text between ``prefix`` and ``suffix``; a ValueError for a
        tokenizer without FIM tokens."""
        if self.layout is None:
            raise ValueError(NO_FIM_TOKENS)
        encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
        return self.layout.ids(encode(prefix), encode(suffix))
