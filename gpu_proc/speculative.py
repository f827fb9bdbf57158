"""Draft tokens for speculative decoding, and the check of a step's drafts against the tokens the model sampled.

The model samples a token at every row of a slot with drafts: after its newest token and after each draft.
Row i's token is what the model would produce next had the drafts before it been produced, so the slot keeps
row 0's token, and row i+1's while draft i equals row i's token. Each kept token is a sample from the model's own
distribution (the drafts are proposed deterministically, so this is rejection sampling with a point-mass
proposal), greedy output is unchanged, and a seeded request draws the same noise for each output position
(``Sampler.launch``'s ``offsets``) as without drafts.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from tristream.gpu_proc.slot_state import Sequence
from tristream.speculative import SpeculativeConfig


class NgramProposer:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n tokens,
    for n from ``prompt_lookup_max`` down to ``prompt_lookup_min``."""

    def __init__(self, spec: SpeculativeConfig) -> None:
        self.min_n, self.max_n = spec.prompt_lookup_min, spec.prompt_lookup_max

    def propose(self, items: list[tuple[int, Sequence, int]]) -> list[list[int]]:
        """For each (slot, sequence, room), up to ``room`` draft tokens to follow the sequence's tokens."""
        return [ngram_drafts(seq.token_ids, room, self.min_n, self.max_n) for _, seq, room in items]


def ngram_drafts(tokens: list[int], room: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``room`` tokens that followed the most recent earlier occurrence of the last n of ``tokens``, for the
    largest n in [``min_n``, ``max_n``] that occurs; none if none does."""
    ids = np.asarray(tokens)
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        windows = sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + room]
    return []


def accepted(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a slot keeps from one row per position (``len(drafts) + 1`` of them): the first, and each next
    one while the draft before it equals the token sampled before it."""
    kept = sampled[:1]
    for draft, token in zip(drafts, sampled[1:]):
        if draft != kept[-1]:
            break
        kept.append(token)
    return kept
