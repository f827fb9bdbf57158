"""Structured output on the gpu_proc: xgrammar matchers per slot and the token bitmask of a step."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

logger = logging.getLogger("tristream")

MAX_CACHED_GRAMMARS = 256


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with every token whose bit is 0 in ``bitmask`` [B, ceil(V/32)] set to -inf.

    int32 words; bit j of word w is token 32*w+j. Out of place.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : logits.shape[-1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


class GrammarMatchers:
    """xgrammar matchers of the slots that have a structured output, and the bitmask of a step.

    The tokenizer and compiler are built in the background on the first ``add``; each distinct
    spec (see tokenizer_proc/structured.py) compiles once, in a thread pool.
    """

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_token_ids: list[int], device: torch.device) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grammar")
        self._compiler: Future[xgr.GrammarCompiler] | None = None
        self._futures: dict[tuple[str, str], Future[xgr.CompiledGrammar]] = {}
        self._slots: dict[int, SlotGrammar] = {}
        self._host: torch.Tensor | None = None

    def _make_compiler(self) -> xgr.GrammarCompiler:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        # vocab_size is the model's: ids past the tokenizer's vocabulary are never allowed.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
        )
        return xgr.GrammarCompiler(info, cache_enabled=False)  # self._futures is the cache

    def _compile(self, spec: tuple[str, str]) -> xgr.CompiledGrammar:
        compiler = self._compiler.result()
        kind, text = spec
        if kind == "json_schema":
            return compiler.compile_json_schema(text, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "ebnf":
            return compiler.compile_grammar(text)
        raise ValueError(f"unknown grammar kind {kind!r}")

    def add(self, slot: int, spec: tuple[str, str], output_ids: list[int]) -> None:
        """Constrain ``slot`` by ``spec``; ``output_ids`` (tokens it already generated) are replayed."""
        if self._compiler is None:
            self._compiler = self._pool.submit(self._make_compiler)
        if spec not in self._futures:
            if len(self._futures) >= MAX_CACHED_GRAMMARS:
                del self._futures[next(iter(self._futures))]  # the oldest; matchers keep their own grammar
            self._futures[spec] = self._pool.submit(self._compile, spec)
        self._slots[slot] = SlotGrammar(slot, self._futures[spec], list(output_ids))

    def remove(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def of(self, slot_ids: list[int]) -> list[SlotGrammar | None]:
        """Each slot's constraint now, to advance later even if the slot has been refilled by then."""
        return [self._slots.get(slot) for slot in slot_ids]

    def bitmask_of(
        self, grammars: list[SlotGrammar | None], drafts: list[int | None] | None = None
    ) -> torch.Tensor | None:
        """int32 [len(grammars), ceil(vocab/32)] on the device, a row for each constraint that ``of``
        returned: all ones for a slot without a grammar (or whose grammar has accepted EOS); None if
        no slot has a grammar.

        A slot checking draft tokens has a row per draft too: ``drafts[row]`` is the draft that such a row follows
        (None for a slot's first row), and the row allows what the grammar allows once the slot's drafts up to it
        are accepted. Past a draft that the grammar forbids, rows allow everything: the row before can never
        sample that draft, so they are never kept. The matchers end as they began.

        Filled on the host into a reused buffer: the copy of the step before is done by then,
        since its tokens were read back before this step samples.
        """
        if not any(grammars):
            return None
        words = (self.vocab_size + 31) // 32
        if self._host is None or self._host.shape[0] < len(grammars):
            self._host = torch.empty(len(grammars), words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host = self._host[: len(grammars)].fill_(-1)
        accepted: dict[int, tuple[SlotGrammar, int]] = {}  # the drafts each grammar took for the rows after them
        blocked: set[int] = set()  # slots with a draft their grammar forbids
        for row, grammar in enumerate(grammars):
            if grammar is None:
                continue
            matcher = grammar.matcher()
            draft = drafts[row] if drafts else None
            if draft is not None:
                if grammar.slot in blocked or matcher.is_terminated() or not matcher.accept_token(draft):
                    blocked.add(grammar.slot)
                    continue
                accepted[grammar.slot] = grammar, accepted.get(grammar.slot, (grammar, 0))[1] + 1
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(host, row)
        for grammar, n in accepted.values():
            grammar.matcher().rollback(n)
        return host.to(self.device, non_blocking=True, copy=True)


def accept_each(grammars: list[SlotGrammar | None], tokens: list[int]) -> None:
    """Advance each constraint (from ``GrammarMatchers.of``) by its token."""
    for grammar, token in zip(grammars, tokens):
        if grammar is not None:
            grammar.accept(token)


class SlotGrammar:
    """One slot's constraint: its grammar, compiling in the background, then its matcher.

    Tokens accepted before the matcher exists are replayed into it when it is made.
    """

    def __init__(self, slot: int, grammar: Future[xgr.CompiledGrammar], output_ids: list[int]) -> None:
        self.slot = slot
        self._grammar = grammar
        self._replay = output_ids
        self._matcher: xgr.GrammarMatcher | None = None

    def matcher(self) -> xgr.GrammarMatcher:
        """The matcher, made (waiting for the grammar to compile) on first use."""
        if self._matcher is None:
            self._matcher = xgr.GrammarMatcher(self._grammar.result())
            for token in self._replay:
                self.accept(token)
            self._replay = []
        return self._matcher

    def accept(self, token: int) -> None:
        if self._matcher is None:
            self._replay.append(token)
        elif not self._matcher.is_terminated() and not self._matcher.accept_token(token):
            logger.warning("slot %d: structured output rejected token %d", self.slot, token)
