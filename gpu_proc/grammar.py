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
        self._pending: dict[int, tuple[Future[xgr.CompiledGrammar], list[int]]] = {}
        self._matchers: dict[int, xgr.GrammarMatcher] = {}
        self._host: torch.Tensor | None = None

    def _make_compiler(self) -> xgr.GrammarCompiler:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        # vocab_size is the model's: ids past the tokenizer's vocabulary are never allowed.
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids)
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
        self.remove(slot)
        if self._compiler is None:
            self._compiler = self._pool.submit(self._make_compiler)
        if spec not in self._futures:
            if len(self._futures) >= MAX_CACHED_GRAMMARS:
                del self._futures[next(iter(self._futures))]  # the oldest; matchers keep their own grammar
            self._futures[spec] = self._pool.submit(self._compile, spec)
        self._pending[slot] = (self._futures[spec], list(output_ids))

    def remove(self, slot: int) -> None:
        self._pending.pop(slot, None)
        self._matchers.pop(slot, None)

    def __contains__(self, slot: int) -> bool:
        return slot in self._matchers or slot in self._pending

    def _matcher(self, slot: int) -> xgr.GrammarMatcher:
        """The slot's matcher, created (waiting for its grammar to compile) on first use."""
        if slot in self._pending:
            future, output_ids = self._pending.pop(slot)
            self._matchers[slot] = xgr.GrammarMatcher(future.result())
            self._accept(slot, output_ids)
        return self._matchers[slot]

    def _accept(self, slot: int, tokens: list[int]) -> None:
        matcher = self._matchers[slot]
        for token in tokens:
            if not matcher.is_terminated() and not matcher.accept_token(token):
                logger.warning("slot %d: structured output rejected token %d", slot, token)

    def bitmask(self, slot_ids: list[int]) -> torch.Tensor | None:
        """int32 [len(slot_ids), ceil(vocab/32)] on the device, all ones for slots without a grammar
        (or whose grammar has accepted EOS); None if no slot has a grammar.

        Filled on the host into a reused buffer: the previous step's copy is done by then, since
        its tokens were read back for ``accept``.
        """
        if not any(slot in self for slot in slot_ids):
            return None
        words = (self.vocab_size + 31) // 32
        if self._host is None or self._host.shape[0] < len(slot_ids):
            self._host = torch.empty(len(slot_ids), words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host = self._host[: len(slot_ids)].fill_(-1)
        for row, slot in enumerate(slot_ids):
            if slot in self and not (matcher := self._matcher(slot)).is_terminated():
                matcher.fill_next_token_bitmask(host, row)
        return host.to(self.device, non_blocking=True, copy=True)

    def accept(self, slot_ids: list[int], tokens: list[int]) -> None:
        """Advance the matchers of the slots that have one by the tokens just sampled."""
        for slot, token in zip(slot_ids, tokens):
            if slot in self._pending:
                self._pending[slot][1].append(token)
            elif slot in self._matchers:
                self._accept(slot, [token])
