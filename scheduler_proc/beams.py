"""Beam search in the scheduler: which hypotheses live on, finish or drop each step, and the KV forks that follow.

A search starts as one request, its prompt. Each step every live beam computes its newest token and reports the
top ``2 * width`` logprobs of the next one; its sampled token is never used. Once every beam has reported, the
``2 * width`` best continuations by cumulative logprob are taken: those that end (EOS, a stop token, the length
limit) join the finished hypotheses (the best ``width`` kept), and the best ``width`` others become the next
beams. A parent's first continuation keeps its request and slot; each further one forks it: the parent's whole
computed pages enter the prefix cache, the fork locks them there and gets a copy of the last partial page
(``BatchPlan.copies``). A beam that no continuation chose frees its pages and its slot waits for a fork.

Stopping follows vLLM and transformers (``early_stopping``): True stops once ``width`` hypotheses have finished;
False stops then too, once the best live beam scores no better than the worst of them at its current length;
"never" compares instead the best score the live beam could still reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tristream.protocol import BeamFork, TokenDelta, sample_request_id
from tristream.scheduler_proc.kv_pages import KVPages
from tristream.scheduler_proc.request import Request, finish_reason

Logprobs = list[tuple[int, float]]


def beam_score(cumulative_logprob: float, length: int, length_penalty: float) -> float:
    """vLLM's length-penalised score of a hypothesis of ``length`` tokens (prompt and output, an ending EOS not
    counted)."""
    return cumulative_logprob / length**length_penalty


@dataclass
class Beam:
    """A live hypothesis: its request (tokens, slot, pages), its cumulative logprob, each output token's logprobs
    entry for the user ([(token, logprob), then the top k]), and once this step's result is in, the logprobs
    of the tokens that may follow it, most likely first."""

    request: Request
    cumulative_logprob: float = 0.0
    logprobs: list[Logprobs] = field(default_factory=list)
    next_logprobs: Logprobs | None = None


@dataclass
class Choice:
    """A continuation of ``parent`` by ``token``."""

    parent: Beam
    token: int
    cumulative_logprob: float
    entry: Logprobs


@dataclass
class Hypothesis:
    """A finished hypothesis: its output tokens and their logprobs entries, why it ended, and its score."""

    token_ids: list[int]
    logprobs: list[Logprobs]
    cumulative_logprob: float
    finish_reason: str
    score: float


class BeamSearch:
    """The beams, finished hypotheses and spare slots of one beam search request, whose prompt is ``root``.

    ``forks``, ``pages`` and ``copies`` are what the next plan must carry for the beams' new tokens.
    """

    def __init__(self, root: Request, max_len: int) -> None:
        self.root = root
        self.spec = root.spec
        self.params = root.spec.params
        self.width = self.params.beam_width
        self.max_len = max_len
        self.beams = [Beam(root)]
        self.finished: list[Hypothesis] = []
        self.spare_slots: list[int] = []
        self.forks: list[BeamFork] = []
        self.pages: list[tuple[int, list[int]]] = []
        self.copies: list[tuple[int, int]] = []
        self.sample_ids = [sample_request_id(root.request_id, i) for i in range(self.params.n)]

    @property
    def slots_to_reserve(self) -> int:
        """Slots that its beams will need beyond the ones it holds (its prompt's own, once admitted)."""
        return self.width - 1 - len(self.spare_slots)

    def reserve(self, free_slots: list[int]) -> None:
        """Take the slots its beams will need from ``free_slots``."""
        self.spare_slots += [free_slots.pop() for _ in range(self.slots_to_reserve)]

    def holds(self, req: Request) -> bool:
        return any(beam.request is req for beam in self.beams)

    def take(self, req: Request, logprobs: Logprobs) -> bool:
        """Record a beam's step result ([(sampled token, logprob), then the top ones]); whether every beam's is in."""
        beam = next(beam for beam in self.beams if beam.request is req)
        beam.next_logprobs = logprobs[1:]
        return all(beam.next_logprobs is not None for beam in self.beams)

    def choose(self) -> list[Choice]:
        """The next beams' continuations, once every beam has reported; empty when the search is over."""
        k = self.params.logprobs or 0
        ranked = sorted(
            (
                Choice(beam, token, beam.cumulative_logprob + lp, [(token, lp), *beam.next_logprobs[:k]])
                for beam in self.beams
                for token, lp in beam.next_logprobs[: 2 * self.width]
                if lp != float("-inf")
            ),
            key=lambda c: -c.cumulative_logprob,
        )
        live = []
        for choice in ranked[: 2 * self.width]:
            req = choice.parent.request
            reason = finish_reason(
                self.spec, choice.token, len(req.output_token_ids) + 1, req.num_tokens + 1, self.max_len
            )
            if reason is None:
                live.append(choice)
            else:
                self.finish(choice, reason)
        for beam in self.beams:
            beam.next_logprobs = None
        live = live[: self.width]
        if not live or (len(self.finished) >= self.width and self._done(live[0])):
            return []
        return live

    def finish(self, choice: Choice, reason: str) -> None:
        """Add the hypothesis of ``choice`` to the finished ones, keeping the best ``width``."""
        parent = choice.parent
        tokens = [*parent.request.output_token_ids, choice.token]
        eos = reason == "stop" and not self.params.ignore_eos and choice.token in self.spec.eos_token_ids
        length = len(self.spec.prompt_token_ids) + len(tokens) - int(eos)
        score = beam_score(choice.cumulative_logprob, length, self.params.length_penalty)
        logprobs = [*parent.logprobs, choice.entry]
        self.finished.append(Hypothesis(tokens, logprobs, choice.cumulative_logprob, reason, score))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width :]

    def _done(self, best: Choice) -> bool:
        """Whether the best live continuation can no longer beat the worst of ``width`` finished hypotheses."""
        if self.params.early_stopping is True:
            return True
        length = best.parent.request.num_tokens + 1
        if self.params.early_stopping == "never" and self.params.length_penalty > 0:
            max_tokens = self.params.max_tokens
            longest = len(self.spec.prompt_token_ids) + max_tokens if max_tokens is not None else self.max_len
            length = min(longest, self.max_len)
        best_score = beam_score(best.cumulative_logprob, length, self.params.length_penalty)
        return self.finished[self.width - 1].score >= best_score

    def pages_needed(self, choices: list[Choice], kv: KVPages) -> int:
        """The free pages that ``branch(choices)`` takes."""
        ps, needed, seen = kv.page_size, 0, set()
        for choice in choices:
            length = choice.parent.request.num_tokens
            if id(choice.parent) in seen:
                needed += -(-(length + 1) // ps) - (length // ps if kv.cache is not None else 0)
            else:
                needed += -(-(length + 1) // ps) - -(-length // ps)
                seen.add(id(choice.parent))
        return needed

    def drop_unchosen(self, choices: list[Choice], kv: KVPages, running: list[Request]) -> None:
        """Free the pages of the beams that no choice continues; their slots wait for forks."""
        chosen = {id(choice.parent) for choice in choices}
        for beam in self.beams:
            if id(beam) not in chosen:
                running.remove(beam.request)
                kv.release(beam.request)
                self.spare_slots.append(beam.request.slot)
                beam.request.slot = None
        self.beams = [beam for beam in self.beams if id(beam) in chosen]

    def branch(self, choices: list[Choice], kv: KVPages, running: list[Request]) -> None:
        """Make ``choices`` the beams: each parent's first continuation goes on in its request, the others fork
        it (``drop_unchosen`` first; ``pages_needed`` pages must be free)."""
        by_parent: dict[int, list[Choice]] = {}
        for choice in choices:
            by_parent.setdefault(id(choice.parent), []).append(choice)
        beams = []
        for first, *others in by_parent.values():
            if others:
                kv.cache_computed(first.parent.request)
            beams += [self._fork(choice, kv, running) for choice in others]
            beams.append(self._go_on(first, kv))
        self.beams = beams

    def _go_on(self, choice: Choice, kv: KVPages) -> Beam:
        beam, req = choice.parent, choice.parent.request
        num_shared = len(req.pages)
        req.output_token_ids.append(choice.token)
        pages = kv.grow(req, req.num_tokens)
        assert pages is not None, "a beam grew past the pages made free for it"
        self.forks.append(BeamFork(req.slot, req.slot, choice.token, num_shared))
        if pages:
            self.pages.append((req.slot, pages))
        beam.cumulative_logprob = choice.cumulative_logprob
        beam.logprobs.append(choice.entry)
        return beam

    def _fork(self, choice: Choice, kv: KVPages, running: list[Request]) -> Beam:
        parent = choice.parent.request
        child = Request(self.spec, output_token_ids=[*parent.output_token_ids, choice.token])
        hit = kv.lock_prefix(child)
        pages = kv.grow(child, child.num_tokens)
        assert pages is not None, "a fork grew past the pages made free for it"
        ps = kv.page_size
        copied = range(hit // ps, -(-parent.num_computed // ps))
        self.copies.extend((parent.pages[j], child.pages[j]) for j in copied)
        num_shared = next((j for j, (a, b) in enumerate(zip(child.pages, parent.pages)) if a != b), hit // ps)
        child.num_computed = parent.num_computed
        child.slot = self.spare_slots.pop()
        running.append(child)
        self.forks.append(BeamFork(child.slot, parent.slot, choice.token, num_shared))
        self.pages.append((child.slot, child.pages[num_shared:]))
        return Beam(child, choice.cumulative_logprob, [*choice.parent.logprobs, choice.entry])

    def finish_at_capacity(self, choices: list[Choice]) -> None:
        """End the search where the KV cache holds no more: the chosen continuations finish as at the length limit."""
        for choice in choices:
            self.finish(choice, "length")

    def results(self) -> list[TokenDelta]:
        """The ``n`` best hypotheses, as the whole outputs of samples 0..n-1."""
        root, params = self.root, self.params
        return [
            TokenDelta(
                sample_id,
                hypothesis.token_ids,
                finish_reason=hypothesis.finish_reason,
                num_cached_tokens=root.num_cached_tokens or 0,
                time_in_queue=root.first_scheduled_time - self.spec.arrival_time,
                logprobs=hypothesis.logprobs,
                prompt_logprobs=root.prompt_logprobs if i == 0 and params.prompt_logprobs is not None else None,
                worker=self.spec.worker,
            )
            for i, (sample_id, hypothesis) in enumerate(zip(self.sample_ids, self.finished))
        ]
