"""Property tests of RadixCache against a naive model: a dict from every cached page-aligned prefix to its page."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tristream.scheduler_proc.kv_pages import PageAllocator
from tristream.scheduler_proc.radix_cache import Node, RadixCache

NUM_PAGES = 20
MAX_PAGES = 6
TOKEN = st.integers(0, 2)

Prefix = tuple[int, ...]


def path_tokens(node: Node) -> list[int]:
    """The tokens from the root down to the end of ``node``."""
    runs = []
    while node is not None:
        runs.append(node.tokens)
        node = node.parent
    return [t for run in reversed(runs) for t in run]


def tree_nodes(cache: RadixCache) -> list[Node]:
    """Every node but the root, parents before children."""
    out, stack = [], list(cache.roots[0].children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def evictable_pages(cache: RadixCache) -> int:
    """How many pages the unlocked nodes hold."""
    return sum(len(node.pages) for node in tree_nodes(cache) if node.lock_count == 0)


def tree_prefixes(cache: RadixCache) -> dict[Prefix, int]:
    """Each page-aligned prefix the tree holds, mapped to the page of its last page."""
    ps = cache.page_size
    out: dict[Prefix, int] = {}
    for node in tree_nodes(cache):
        start = tuple(path_tokens(node.parent))
        for j, page in enumerate(node.pages):
            prefix = start + tuple(node.tokens[: (j + 1) * ps])
            assert prefix not in out, f"prefix {prefix} is held twice"
            out[prefix] = page
    return out


def reference_pages(ref: dict[Prefix, int], tokens: list[int], page_size: int) -> list[int]:
    """The pages of the longest prefix of ``tokens`` in ``ref``."""
    pages = []
    while len(pages) < len(tokens) // page_size:
        prefix = tuple(tokens[: (len(pages) + 1) * page_size])
        if prefix not in ref:
            break
        pages.append(ref[prefix])
    return pages


class RadixMachine(RuleBasedStateMachine):
    """Random inserts, matches, locks, unlocks and evictions on one cache, checked against ``self.ref``."""

    page_size = 1

    def __init__(self) -> None:
        super().__init__()
        ps = self.page_size
        self.allocator = PageAllocator(NUM_PAGES)
        self.cache = RadixCache(ps, self.allocator)
        self.ref: dict[Prefix, int] = {}
        self.handles: list[tuple[Node, Prefix]] = []
        self.seen: list[Prefix] = []
        # A few near-identical pages make shared prefixes and splits common even for larger pages.
        patterns = [(0,) * ps, (1,) * ps, (0,) * (ps - 1) + (1,)]
        self.page = st.one_of(st.sampled_from(patterns), st.tuples(*[TOKEN] * ps))

    # ------------------------------------------------------------ helpers

    def draw_tokens(self, data: st.DataObject, aligned: bool) -> list[int]:
        """A token list, often extending a prefix of an inserted one; whole pages when ``aligned``."""
        ps = self.page_size
        tokens: list[int] = []
        if self.seen and data.draw(st.booleans(), label="reuse"):
            src = data.draw(st.sampled_from(self.seen), label="source")
            tokens = list(src[: data.draw(st.integers(0, len(src) // ps), label="keep") * ps])
        have = len(tokens) // ps
        extra = data.draw(st.lists(self.page, min_size=0 if have else 1, max_size=MAX_PAGES - have), label="pages")
        tokens += [t for page in extra for t in page]
        if not aligned:
            tokens += data.draw(st.lists(TOKEN, max_size=ps - 1), label="tail")
        return tokens

    def lock_count(self, prefix: Prefix) -> int:
        """How many held handles cover ``prefix``."""
        return sum(1 for _, held in self.handles if held[: len(prefix)] == prefix and len(held) >= len(prefix))

    # ------------------------------------------------------------ rules

    @rule(data=st.data(), evict_first=st.booleans())
    def insert(self, data: st.DataObject, evict_first: bool) -> None:
        """Insert fresh pages like the scheduler; with ``evict_first``, evict the shortfall first as it does."""
        ps = self.page_size
        tokens = self.draw_tokens(data, aligned=True)
        n = len(tokens) // ps
        if evict_first and n > self.allocator.num_free:
            self.checked_evict(n - self.allocator.num_free)
        mine = self.allocator.alloc(n)
        if mine is None:
            return
        node, tree_pages = self.cache.insert(tokens, mine)
        for j in range(n):
            self.ref.setdefault(tuple(tokens[: (j + 1) * ps]), mine[j])
        assert tree_pages == reference_pages(self.ref, tokens, ps)
        assert path_tokens(node) == tokens
        self.allocator.free([p for p, t in zip(mine, tree_pages) if p != t])
        self.seen.append(tuple(tokens))

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        tokens = self.draw_tokens(data, aligned=False)
        node, pages = self.cache.match(tokens)
        assert pages == reference_pages(self.ref, tokens, self.page_size)
        assert path_tokens(node) == tokens[: len(pages) * self.page_size]

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        tokens = self.draw_tokens(data, aligned=False)
        node, pages = self.cache.match(tokens)
        prefix = tuple(tokens[: len(pages) * self.page_size])
        assert path_tokens(node) == list(prefix)
        self.cache.lock(node)
        self.handles.append((node, prefix))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.handles) - 1), label="handle")
        node, _ = self.handles.pop(i)
        self.cache.unlock(node)

    @rule(n=st.integers(0, NUM_PAGES))
    def evict(self, n: int) -> None:
        self.checked_evict(n)

    def checked_evict(self, n: int) -> None:
        """``cache.evict(n)``, checked against the reference, which then drops what went."""
        nodes_before = [
            (node, tuple(node.tokens), tuple(node.pages), tuple(path_tokens(node))) for node in tree_nodes(self.cache)
        ]
        free_before = set(self.allocator.free_pages())
        evictable_before = sum(1 for prefix in self.ref if self.lock_count(prefix) == 0)
        assert evictable_pages(self.cache) == evictable_before

        freed = self.cache.evict(n)

        after = tree_prefixes(self.cache)
        assert after.items() <= self.ref.items(), "eviction added or moved a page"
        removed = self.ref.keys() - after.keys()
        for prefix in removed:
            assert self.lock_count(prefix) == 0, f"locked prefix {prefix} was evicted"
            assert all(other in removed for other in self.ref if other[: len(prefix)] == prefix), "evicted a non-leaf"
        for node, prefix in self.handles:
            assert path_tokens(node) == list(prefix)
            for end in range(self.page_size, len(prefix) + 1, self.page_size):
                assert after[prefix[:end]] == self.ref[prefix[:end]]
        assert freed == len(removed)
        assert set(self.allocator.free_pages()) - free_before == {self.ref[p] for p in removed}
        assert self.allocator.num_free == len(free_before) + freed
        assert freed >= min(n, evictable_before)

        # Whole nodes go, untouched nodes stay as they were, and eviction stops once it has freed ``n``.
        alive = set(map(id, tree_nodes(self.cache)))
        gone = []
        for node, tokens, pages, path in nodes_before:
            if id(node) in alive:
                assert (tuple(node.tokens), tuple(node.pages), tuple(path_tokens(node))) == (tokens, pages, path)
            else:
                assert all(
                    path[: len(path) - len(tokens) + (j + 1) * self.page_size] in removed for j in range(len(pages))
                )
                gone.append(len(pages))
        assert sum(gone) == freed
        if gone:
            assert freed - max(gone) < n
        for prefix in removed:
            del self.ref[prefix]

    # ------------------------------------------------------------ invariants

    @invariant()
    def pages_accounted(self) -> None:
        held = self.cache.all_pages()
        assert sorted(self.allocator.free_pages() + held) == list(range(1, NUM_PAGES))
        assert self.cache.num_pages == len(held)

    @invariant()
    def tree_matches_reference(self) -> None:
        assert tree_prefixes(self.cache) == self.ref

    @invariant()
    def structure(self) -> None:
        ps = self.page_size
        root = self.cache.roots[0]
        assert root.tokens == [] and root.pages == [] and root.parent is None
        for node in [root, *tree_nodes(self.cache)]:
            if node is not root:
                assert len(node.pages) >= 1
                assert len(node.tokens) == len(node.pages) * ps
            firsts = set()
            for key, child in node.children.items():
                assert child.parent is node
                assert key == tuple(child.tokens[:ps])
                firsts.add(tuple(child.tokens[:ps]))
            assert len(firsts) == len(node.children)

    @invariant()
    def locks(self) -> None:
        assert self.cache.roots[0].lock_count == 1 + len(self.handles)
        for node in tree_nodes(self.cache):
            assert node.lock_count == self.lock_count(tuple(path_tokens(node)))
        assert evictable_pages(self.cache) == sum(1 for prefix in self.ref if self.lock_count(prefix) == 0)
        for node, prefix in self.handles:
            assert path_tokens(node) == list(prefix)


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


class RadixMachinePage1(RadixMachine):
    page_size = 1


class RadixMachinePage2(RadixMachine):
    page_size = 2


class RadixMachinePage4(RadixMachine):
    page_size = 4


TestRadixCachePage1 = RadixMachinePage1.TestCase
TestRadixCachePage2 = RadixMachinePage2.TestCase
TestRadixCachePage4 = RadixMachinePage4.TestCase
for case in (TestRadixCachePage1, TestRadixCachePage2, TestRadixCachePage4):
    case.settings = SETTINGS


# ---------------------------------------------------------------- unit tests


def make(page_size: int = 2, num_pages: int = 32) -> tuple[RadixCache, PageAllocator]:
    allocator = PageAllocator(num_pages)
    return RadixCache(page_size, allocator), allocator


def put(cache: RadixCache, allocator: PageAllocator, tokens: list[int]) -> list[int]:
    """Insert like the scheduler: fresh pages, the unadopted ones go back. Returns the tree's pages."""
    mine = allocator.alloc(len(tokens) // cache.page_size)
    _, tree_pages = cache.insert(tokens, mine)
    allocator.free([p for p, t in zip(mine, tree_pages) if p != t])
    return tree_pages


def test_partial_match_splits_a_node() -> None:
    cache, allocator = make(page_size=2)
    pages = put(cache, allocator, [0, 0, 1, 1, 2, 2])
    assert len(tree_nodes(cache)) == 1
    cache.lock(cache.match([0, 0, 1, 1, 2, 2])[0])

    # The third page differs by its last token only.
    node, matched = cache.match([0, 0, 1, 1, 2, 0])
    assert matched == pages[:2]
    assert len(tree_nodes(cache)) == 2
    assert node.tokens == [0, 0, 1, 1] and node.pages == pages[:2] and node.parent is cache.roots[0]
    (lower,) = node.children.values()
    assert lower.tokens == [2, 2] and lower.pages == pages[2:] and lower.parent is node
    assert node.lock_count == lower.lock_count == 1
    assert cache.num_pages == 3 and evictable_pages(cache) == 0
    assert cache.match([0, 0, 1, 1, 2, 2]) == (lower, pages)


def test_insert_past_a_split_adopts_only_new_pages() -> None:
    cache, allocator = make(page_size=2)
    first = put(cache, allocator, [0, 0, 1, 1, 2, 2])
    free = allocator.num_free
    second = put(cache, allocator, [0, 0, 1, 1, 0, 1, 1, 0])
    assert second[:2] == first[:2] and second[2] not in first
    assert allocator.num_free == free - 2
    assert cache.num_pages == 5 and len(tree_nodes(cache)) == 3


def test_evict_is_least_recently_used_first() -> None:
    cache, allocator = make(page_size=1)
    shared = put(cache, allocator, [9])
    leaves = {t: put(cache, allocator, [9, t])[1] for t in (0, 1, 2)}
    cache.match([9, 0])  # 1 and 2 are now older than 0
    cache.match([9, 2, 5])  # a longer query still uses [9, 2]

    order = []
    for _ in range(3):
        free = set(allocator.free_pages())
        assert cache.evict(1) == 1
        (page,) = set(allocator.free_pages()) - free
        order.append(page)
    assert order == [leaves[1], leaves[0], leaves[2]]
    assert cache.all_pages() == shared
    assert cache.evict(1) == 1 and cache.num_pages == 0


def test_locked_leaf_survives_evicting_everything() -> None:
    cache, allocator = make(page_size=2)
    kept = put(cache, allocator, [1, 1, 0, 0])
    put(cache, allocator, [1, 1, 2, 2, 2, 2])
    put(cache, allocator, [0, 1])
    node, pages = cache.match([1, 1, 0, 0, 1])
    assert pages == kept
    cache.lock(node)

    assert cache.evict(10**6) == 3
    assert tree_prefixes(cache) == {(1, 1): kept[0], (1, 1, 0, 0): kept[1]}
    assert evictable_pages(cache) == 0
    assert sorted(allocator.free_pages() + cache.all_pages()) == list(range(1, 32))

    cache.unlock(node)
    assert evictable_pages(cache) == 2
    assert cache.evict(10**6) == 2 and cache.num_pages == 0
    assert allocator.num_free == 31


@pytest.mark.parametrize("page_size", [1, 2, 4])
def test_peek_gives_the_match_length_without_touching_the_tree(page_size):
    rng = random.Random(page_size)
    cache = RadixCache(page_size, PageAllocator(200))
    for _ in range(12):
        n = rng.randint(1, 6) * page_size
        tokens = [rng.randint(0, 2) for _ in range(n)]
        _, pages = cache.match(tokens)
        new = cache.allocator.alloc(n // page_size - len(pages))
        _, tree_pages = cache.insert(tokens, pages + new)
        cache.allocator.free([p for p, t in zip(pages + new, tree_pages) if p != t])
    for _ in range(50):
        query = [rng.randint(0, 2) for _ in range(rng.randint(0, 7 * page_size))]
        shape = [(id(n), tuple(n.tokens), n.last_used) for n in cache._nodes()]
        got = cache.peek(query)
        assert [(id(n), tuple(n.tokens), n.last_used) for n in cache._nodes()] == shape
        assert got == len(cache.match(query)[1]) * page_size
