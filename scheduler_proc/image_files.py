"""The pixel files of the images of the requests the scheduler holds."""

from __future__ import annotations

import contextlib
import os
from collections import Counter, deque

from tristream.protocol import ImageInput


class ImageFiles:
    """Counts the requests (samples share files) that use each image file. A file no request uses is deleted
    once the last step planned before then has its result: no step still in flight reads it."""

    def __init__(self) -> None:
        self.users: Counter[str] = Counter()
        self.spent: deque[tuple[int, list[str]]] = deque()

    def add(self, images: list[ImageInput]) -> None:
        self.users.update(image.path for image in images)

    def drop(self, images: list[ImageInput], last_step: int | None) -> None:
        """A request that used ``images`` ended; ``last_step`` is the newest step in flight, or None."""
        unused = []
        for image in images:
            self.users[image.path] -= 1
            if self.users[image.path] <= 0:
                del self.users[image.path]
                unused.append(image.path)
        if last_step is None:
            _remove(unused)
        elif unused:
            self.spent.append((last_step, unused))

    def step_done(self, step_id: int) -> None:
        """Delete the files that no step after ``step_id`` reads."""
        while self.spent and self.spent[0][0] <= step_id:
            _remove(self.spent.popleft()[1])


def _remove(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
