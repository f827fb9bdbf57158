"""Free-list allocator of KV page ids. Page 0 is reserved and never handed out."""

from __future__ import annotations


class PageAllocator:
    """Hands out and takes back page ids ``1 .. num_pages - 1``."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` pages, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return taken

    def free_pages(self) -> list[int]:
        return list(self._free)

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
