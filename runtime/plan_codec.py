"""A step's plan on the wire: each BatchPlan as a diff against the plan before.

The codec orders the rows: decode rows (one token, sampling) first in slot order, then
the others in plan order. The decode rows are sent as the slots that left and joined
them since the plan before, so a steady decode step sends no rows at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tristream.protocol import BatchPlan


@dataclass
class PlanDiff:
    """A BatchPlan on the wire: ``plan`` without its rows; its decode rows as the slots that ``left``
    and ``joined`` the previous plan's decode rows, and ``rest`` the other rows as (slots, num_tokens,
    sample), or None."""

    plan: BatchPlan
    left: tuple[int, ...]
    joined: tuple[int, ...]
    rest: tuple[list[int], list[int], list[bool]] | None


class PlanEncoder:
    """The scheduler's end of the plan stream."""

    def __init__(self) -> None:
        self.decode: list[int] = []

    def diff(self, plan: BatchPlan) -> PlanDiff:
        """``plan`` as a diff against the plan before it."""
        rows = list(zip(plan.slots, plan.num_tokens, plan.sample))
        decode = sorted(slot for slot, n, sample in rows if n == 1 and sample)
        rest = [row for row in rows if not (row[1] == 1 and row[2])]
        left: tuple[int, ...] = ()
        joined: tuple[int, ...] = ()
        if decode != self.decode:
            before, now = set(self.decode), set(decode)
            left, joined = tuple(before - now), tuple(now - before)
            self.decode = decode
        bare = dataclasses.replace(plan, slots=[], num_tokens=[], sample=[])
        return PlanDiff(bare, left, joined, tuple(map(list, zip(*rest))) if rest else None)


class PlanDecoder:
    """The gpu_proc's end of the plan stream."""

    def __init__(self) -> None:
        self.decode: list[int] = []

    def plan(self, d: PlanDiff) -> BatchPlan:
        """The whole BatchPlan of ``d``, its rows in the codec's order."""
        if d.left or d.joined:
            self.decode = sorted(set(self.decode).difference(d.left).union(d.joined))
        k = len(self.decode)
        slots, num_tokens, sample = d.rest or ([], [], [])
        return dataclasses.replace(
            d.plan, slots=self.decode + slots, num_tokens=[1] * k + num_tokens, sample=[True] * k + sample
        )
