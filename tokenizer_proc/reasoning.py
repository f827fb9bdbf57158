"""Streaming split of `<think>reasoning</think>content` completions into reasoning and content."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def opens_reasoning(prompt_text: str) -> bool:
    """True when the prompt ends inside an open <think> block (the chat template opened it),
    i.e. the last "<think>" in the prompt comes after the last "</think>"."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


class ThinkParser:
    """Splits a streamed completion into reasoning (inside <think>...</think>) and content."""

    def __init__(self, in_reasoning: bool = False) -> None:
        self.reasoning = ""  # all reasoning emitted so far
        self.content = ""  # all content emitted so far
        self._state = "reasoning" if in_reasoning else "start"
        self._held = ""  # text that may still turn out to be part of a tag
        self._drop_newlines = in_reasoning  # set right after a tag until non-newline text arrives

    def push(self, text: str, finished: bool = False) -> tuple[str, str]:
        """Feed the next text delta; returns (reasoning delta, content delta)."""
        text, self._held = self._held + text, ""
        reasoning = content = ""
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(OPEN):
                self._state, self._drop_newlines = "reasoning", True
                text = stripped[len(OPEN) :]
            elif OPEN.startswith(stripped) and not finished:
                self._held = text
                return "", ""
            else:
                self._state = "content"
        if self._state == "reasoning":
            text = self._strip_newlines(text)
            end = text.find(CLOSE)
            if end >= 0:
                reasoning, text = text[:end], text[end + len(CLOSE) :]
                self._state, self._drop_newlines = "content", True
            else:
                cut = len(text) - (0 if finished else _partial_tag_len(text, CLOSE))
                reasoning, self._held, text = text[:cut], text[cut:], ""
        if self._state == "content":
            content = self._strip_newlines(text)
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def _strip_newlines(self, text: str) -> str:
        """Drops the newlines that directly follow a tag, even when they come in later deltas."""
        if self._drop_newlines:
            text = text.lstrip("\n")
            self._drop_newlines = not text
        return text
