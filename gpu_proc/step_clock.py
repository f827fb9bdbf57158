"""Device-side timestamps of one step, for the per-step accounting."""

from __future__ import annotations

import time

import torch


class StepClock:
    """Marks the start, forward end, sampling start and end of a step on the device's timeline.

    On CUDA each mark is an event recorded on the stream, so it is reached when the device gets
    there; elsewhere the device is the host and a mark is the host clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def done(self) -> bool:
        """Whether the device has reached the last mark."""
        return not self.cuda or self.marks[-1].query()

    def wait(self) -> None:
        """Block until the device has reached the last mark."""
        if self.cuda:
            self.marks[-1].synchronize()

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def busy_s(self) -> float:
        """Device time of the forward pass and of the sampling."""
        start, forward_end, sample_start, end = self.marks
        return self._seconds(start, forward_end) + self._seconds(sample_start, end)

    def idle_s(self, before: StepClock | None) -> float:
        """Device time idle within the step, and since the end of ``before`` if given."""
        start, forward_end, sample_start, _ = self.marks
        gap = self._seconds(forward_end, sample_start)
        if before is not None:
            gap += self._seconds(before.marks[-1], start)
        return max(gap, 0.0)
