"""TurnCache: the exact token ids of finished chat turns, reused by the next turn.

A reply the model generated often tokenizes differently when its text comes
back inside the next turn's prompt (for example "\\n\\n" generated as one token
but encoded as two). Reusing the ids the engine actually ran keeps the whole
history a prefix-cache hit.
"""

from __future__ import annotations

from collections import OrderedDict

from transformers import PreTrainedTokenizerBase


class TurnCache:
    """Maps a conversation's text (prompt plus reply) to the ids the engine ran, LRU-bounded."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, capacity: int = 256) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.turns: OrderedDict[str, list[int]] = OrderedDict()

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered chat prompt, starting from the longest remembered turn it extends."""
        best = max((t for t in self.turns if text.startswith(t)), key=len, default="")
        if not best:
            return self.tokenizer.encode(text, add_special_tokens=False)
        self.turns.move_to_end(best)
        return self.turns[best] + self.tokenizer.encode(text[len(best) :], add_special_tokens=False)

    def remember(self, prompt_text: str, prompt_ids: list[int], reply_text: str, reply_ids: list[int]) -> None:
        """Record a finished turn, if its reply ids decode to exactly its reply text."""
        if self.tokenizer.decode(reply_ids, skip_special_tokens=False) != reply_text:
            return
        self.turns[prompt_text + reply_text] = prompt_ids + reply_ids
        self.turns.move_to_end(prompt_text + reply_text)
        while len(self.turns) > self.capacity:
            self.turns.popitem(last=False)
