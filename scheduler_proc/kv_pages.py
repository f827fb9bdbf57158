"""KV page ownership: the free pages, the prefix cache, and the pages each request holds."""

from __future__ import annotations

from tristream.scheduler_proc.radix_cache import RadixCache
from tristream.scheduler_proc.request import Request


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
        """The free page ids."""
        return list(self._free)

    def free(self, pages: list[int]) -> None:
        """Take ``pages`` back."""
        self._free.extend(reversed(pages))


class KVPages:
    """The scheduler's ``num_pages`` KV pages of ``page_size`` tokens, with a prefix cache if ``enable_cache``.

    ``window`` > 0 bounds every layer's sliding window (the largest, where they differ): a query at
    position p reads only keys at k > p - window, so a request's pages wholly before the window of its
    next query are never read again and it gives back those it owns (``drop_out_of_window``). The
    device runs steps in order, so a step in flight reads such a page before any later step writes it.
    """

    def __init__(self, num_pages: int, page_size: int, enable_cache: bool, window: int = 0) -> None:
        self.page_size = page_size
        self.window = window
        self.allocator = PageAllocator(num_pages)
        self.cache = RadixCache(page_size, self.allocator) if enable_cache else None

    def ensure_free(self, n: int) -> bool:
        """Whether ``n`` pages are free, once unlocked cache leaves are evicted as needed."""
        short = n - self.allocator.num_free
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        return self.allocator.num_free >= n

    def _alloc(self, n: int) -> list[int] | None:
        """``n`` free pages, evicting cache leaves if needed; None if that is not enough."""
        if n <= 0:
            return []
        self.ensure_free(n)
        return self.allocator.alloc(n)

    def lock_prefix(self, req: Request) -> int:
        """Give a request that holds no pages the longest cached whole-page prefix of its tokens but
        the last, locked; the number of tokens it covers."""
        if self.cache is None:
            return 0
        node, pages = self.cache.match(req.cache_token_ids[: req.num_tokens - 1], req.cache_namespace)
        self.cache.lock(node)
        req.pages, req.own_pages, req.cache_node = pages, set(), node
        return len(pages) * self.page_size

    def grow(self, req: Request, num_tokens: int) -> list[int] | None:
        """The pages added so that ``req``'s hold ``num_tokens`` tokens; None (nothing taken) if too few can be had."""
        pages = self._alloc(-(-num_tokens // self.page_size) - len(req.pages))
        if pages:
            req.pages.extend(pages)
            req.own_pages.update(pages)
        return pages

    def window_page(self, query: int) -> int:
        """How many leading pages lie wholly before the window of a query at position ``query``."""
        return max(0, query - self.window + 1) // self.page_size if self.window else 0

    def drop_out_of_window(self, req: Request, query: int) -> None:
        """Free the pages ``req`` owns that lie wholly before the window of ``query``, the first position
        any of its queries still to come can have; their block-table entries become 0.

        Cached pages stay, and with the prefix cache on so do the whole pages of the prompt, which the
        cache takes (a prefill chunk's pages may still await ``cache_computed`` in a step in flight).
        """
        end = min(self.window_page(query), len(req.pages))
        if end <= req.window_page:
            return
        keep = len(req.spec.prompt_token_ids) // self.page_size if self.cache is not None else 0
        dropped = [j for j in range(max(req.window_page, keep), end) if req.pages[j] in req.own_pages]
        for j in dropped:
            req.own_pages.remove(req.pages[j])
        self.allocator.free([req.pages[j] for j in dropped])
        for j in dropped:
            req.pages[j] = 0
        req.window_page = end

    def cache_computed(self, req: Request) -> None:
        """Put the request's computed whole pages into the prefix cache and hold them there. Once it has
        dropped a page it caches nothing more: the cache keeps (and it holds) what it took before."""
        if self.cache is None or 0 in req.pages[: req.window_page]:
            return
        n = min(req.num_computed, req.num_tokens) // self.page_size
        node, tree_pages = self.cache.insert(
            req.cache_token_ids[: n * self.page_size], req.pages[:n], req.cache_namespace
        )
        for mine, theirs in zip(req.pages, tree_pages):
            if mine == theirs:
                req.own_pages.discard(mine)
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = node

    def release(self, req: Request) -> None:
        """Free the pages ``req`` owns and unlock the cached ones it used."""
        self.allocator.free([p for p in req.pages if p in req.own_pages])
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.pages, req.own_pages, req.cache_node, req.window_page = [], set(), None, 0

    def check_invariants(self, running: list[Request]) -> None:
        """Every usable page is exactly one of: free, in the cache, or owned by a running request; a
        request's dropped pages (0) lie before its window."""
        free = self.allocator.free_pages()
        cached = self.cache.all_pages() if self.cache else []
        owned = [p for r in running for p in r.own_pages]
        total = self.allocator.num_pages - 1
        assert len(free) + len(cached) + len(owned) == total, (len(free), len(cached), len(owned), total)
        assert sorted(free + cached + owned) == list(range(1, total + 1)), "a page is lost or held twice"
        cached_set = set(cached)
        for r in running:
            assert set(r.pages) >= r.own_pages and len(r.pages) * self.page_size >= r.num_computed
            assert r.window_page <= self.window_page(r.num_computed), "a page was dropped inside the window"
            for j, p in enumerate(r.pages):
                if p not in r.own_pages and p not in cached_set:
                    assert p == 0 and j < r.window_page, "a request uses a page nobody holds"
        if self.cache:
            assert self.cache.num_pages == len(cached)
